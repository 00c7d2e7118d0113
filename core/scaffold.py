"""``plugtune new-plugin NAME``: write an installable plugin skeleton — a pyproject with the entry
point, a module with a recipe section and one documented hook, and a pytest test that uses
``plugtune.testing`` and passes as written once the skeleton is installed."""
import keyword
import re
from importlib.resources import files
from pathlib import Path

from . import API_VERSION
from .errors import InputError

#: ``{file in the skeleton: template in plugtune.templates}``; ``str.format`` fields: name,
#: dist, module, cls, major, minor, next_major.
TEMPLATES = {"pyproject.toml": "pyproject.toml.tmpl", "{module}.py": "module.py.tmpl",
             "test_{name}.py": "test.py.tmpl", "README.md": "README.md.tmpl"}


def new_plugin(name: str, where: str | Path = ".") -> Path:
    """Write the skeleton of plugin ``name`` into ``where/plugtune-NAME/``; return that path."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name or "") or keyword.iskeyword(name):
        raise InputError(f"new-plugin {name}: a plugin name is lower-case letters, digits and "
                         "underscores, starting with a letter (it is a recipe key and part of a "
                         "Python module name), e.g. my_plugin")
    dist, module = "plugtune-" + name.replace("_", "-"), "plugtune_" + name
    root = Path(where) / dist
    if root.exists():
        raise InputError(f"new-plugin {name}: {root} already exists; choose another name or "
                         "remove it")
    major, minor = (int(x) for x in API_VERSION.split(".")[:2])
    fields = {"name": name, "dist": dist, "module": module, "major": major, "minor": minor,
              "next_major": major + 1,
              "cls": "".join(part.title() for part in name.split("_")) + "Section"}
    try:
        root.mkdir(parents=True)
    except OSError as exc:
        raise InputError(f"new-plugin {name}: cannot create {root}: {exc.strerror}") from exc
    for target, template in TEMPLATES.items():
        text = (files("plugtune.templates") / template).read_text()
        (root / target.format(**fields)).write_text(text.format(**fields))
    return root
