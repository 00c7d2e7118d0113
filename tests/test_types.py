"""mypy over the package: ``core/`` (imported as ``plugtune``) and the public plugin families,
with the settings in pyproject.toml's ``[tool.mypy]`` (every def annotated, except in the
modules listed there as not yet done).

mypy cannot follow setuptools' editable-install finder, and ``core/`` is not named
``plugtune`` on disk, so the test lays out a ``plugtune/`` folder of symbolic links (each
entry of ``core/``, and ``plugins/`` as ``plugtune/plugins``) under ``.mypy_cache/`` and
points ``MYPYPATH`` at it. Its cache lives there too: a first run takes about a minute, later
ones a few seconds.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".mypy_cache"


def package_tree(where):
    """``where/plugtune``: links to ``core/``'s entries and to ``plugins/``, rebuilt each run
    (modules come and go)."""
    package = where / "plugtune"
    package.mkdir(parents=True, exist_ok=True)
    for old in package.iterdir():
        old.unlink()
    for entry in sorted((ROOT / "core").iterdir()):
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "plugins").symlink_to(ROOT / "plugins")
    return where


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed (pip install -e '.[test]' installs it)")
def test_package_type_checks():
    source = package_tree(CACHE / "source")
    env = {**os.environ, "MYPYPATH": str(source)}
    done = subprocess.run([sys.executable, "-m", "mypy", "--config-file",
                           str(ROOT / "pyproject.toml"), "--cache-dir", str(CACHE),
                           "-p", "plugtune"],
                          cwd=source, env=env, capture_output=True, text=True, timeout=600)
    # mypy names files by the linked path: plugtune/X is core/X, plugtune/plugins/X plugins/X
    report = (done.stdout + done.stderr).replace("plugtune/plugins/", "plugins/") \
        .replace("plugtune/", "core/")
    assert done.returncode == 0, f"mypy found problems:\n{report}"


def test_lazy_names_are_typed_from_their_modules():
    """``plugtune/__init__``'s ``TYPE_CHECKING`` imports name each lazy name's own module, so
    what mypy sees is what ``import plugtune`` gives."""
    import ast

    import plugtune

    tree = ast.parse((ROOT / "core" / "__init__.py").read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If)
                 and getattr(node.test, "id", None) == "TYPE_CHECKING")
    typed = {alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom)
             for alias in node.names}
    assert typed, "no TYPE_CHECKING imports in core/__init__.py"
    wrong = {name: module for name, module in typed.items() if plugtune._LAZY.get(name) != module}
    assert not wrong, f"TYPE_CHECKING imports that are not the lazy names' modules: {wrong}"
