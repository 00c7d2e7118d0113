"""Model utilities plugins need, apart from the planner: a model's config without its weights
(``read_config``, the shipped ``catalog``) and its repeated transformer blocks
(``transformer_blocks``). Part of the plugin API (see ``plugtune.__all__``)."""
import json
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import RecipeError

if TYPE_CHECKING:
    from importlib.abc import Traversable


def catalog() -> "dict[str, Traversable]":
    """``{hub id: config.json path}`` of the configs that ship with plugtune."""
    root = files("plugtune.catalog")
    index = json.loads((root / "index.json").read_text())
    return {hub_id: root / name for hub_id, name in index.items()}


def read_config(source: str | Path, trust_remote_code: bool = False) -> Any:
    """The transformers config of ``source`` without loading weights: a ``save_pretrained``
    directory, a ``.gguf`` file (its header only), a hub id of the catalog (offline), or any hub
    id when the hub is reachable."""
    from transformers import AutoConfig

    path = Path(str(source))
    if path.suffix == ".gguf" and path.is_file():
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if path.is_dir():
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    known = catalog()
    if str(source) in known:
        data = json.loads(known[str(source)].read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data)
    try:
        return AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise RecipeError([f"model.name: cannot read the config of {source!r} ({exc}); it is not "
                           "a local directory or .gguf file, the hub is unreachable, and the "
                           "offline catalog has: " + ", ".join(sorted(known))]) from exc


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the largest ``nn.ModuleList`` (``model.layers``,
    ``transformer.h``, ...), or an empty list."""
    lists: list[torch.nn.ModuleList] = [m for m in model.modules()
                                        if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        return []
    sizes = [_size(m) for m in lists]
    return list(lists[sizes.index(max(sizes))])  # the first largest, as max(key=) picks


def _size(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def adapter_dir(path: str | Path) -> Path:
    """The PEFT adapter directory ``model.adapter`` names: ``path`` itself when it holds an
    ``adapter_config.json``, or the saved adapter of a finished plugtune run directory
    (``RUN/adapter``). Raises :class:`~plugtune.errors.RecipeError` with one line naming
    ``model.adapter`` otherwise."""
    path = Path(path)
    for where in (path, path / "adapter"):
        if (where / "adapter_config.json").is_file():
            return where
    if not path.exists():
        why = "no such directory"
    elif (path / "recipe.yaml").is_file():
        why = "a run directory without a saved adapter (a full fine-tuning run, or unfinished)"
    else:
        why = "no adapter_config.json in it"
    raise RecipeError([f"model.adapter: {path}: {why}; give a finished plugtune run directory "
                       "of an adapter method or a PEFT adapter directory"])
