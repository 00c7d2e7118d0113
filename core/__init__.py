"""plugtune: fine-tune GPT-class models with a small loop, pluggy hooks and YAML recipes."""
from importlib.metadata import PackageNotFoundError, version

import pluggy

from .loss import Loss

try:
    __version__ = version("plugtune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

#: Decorator for hook implementations: ``@hookimpl def plugtune_check_recipe(recipe): ...``
hookimpl = pluggy.HookimplMarker("plugtune")

__all__ = ["__version__", "hookimpl", "Loss"]
