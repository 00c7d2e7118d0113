"""Model sources: what a recipe's ``model.name`` (or ``model.tokenizer``) names, checked without
loading anything, and the loaders' errors turned into one line that names the key and source.

A name is a local path when it looks like one (``/``, ``./``, ``../``, ``~``, a ``.gguf`` suffix,
more than one ``/``, or a first folder that exists here); otherwise it is a hub id. A local
directory must hold ``config.json`` (a tokenizer directory need not); a ``.gguf`` file must start
with the GGUF magic bytes; a model or tokenizer whose config names custom code (``auto_map``) is
refused unless the command line says ``--trust-remote-code``. A hub id that is neither in the
hub cache nor in plugtune's catalog is refused while the hub is offline (``HF_HUB_OFFLINE``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import warnings
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError, first_line

#: What the hub accepts as ``name`` or ``namespace/name`` (huggingface_hub's rule).
HUB_ID = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9_][\w.-]{0,95}(/[A-Za-z0-9_][\w.-]{0,95})?")
GGUF_MAGIC = b"GGUF"
TRUST_HINT = "add --trust-remote-code to the command after reading that code"


def resolve_source(name: str) -> Path | str:
    """A local path for ``pkg:PACKAGE/FILE`` (a file inside an installed Python package) and
    file sources; the name itself for hub ids. What :func:`plugtune.models.read_config` and a
    loader take."""
    if name.startswith("pkg:"):
        package, _, inner = name[4:].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"Python package {package!r} is not installed")
        return Path(list(spec.submodule_search_locations)[0]) / inner
    return Path(name) if Path(name).exists() or name.endswith(".gguf") else name


def looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a path on this machine rather than a hub id."""
    if name.startswith(("pkg:", "/", "./", "../", "~", ".")) or name.endswith(".gguf"):
        return True
    if "\\" in name or name.count("/") > 1:
        return True
    first = name.split("/")[0]
    return "/" in name and _exists(first)


def _exists(path: str | os.PathLike[str]) -> bool:
    try:
        return os.path.lexists(path)
    except (OSError, ValueError):
        return False


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME",
                                                            Path.home() / ".cache")) / "huggingface"
    return Path(home) / "hub"


def in_hub_cache(hub_id: str) -> bool:
    """Whether the hub cache holds a snapshot of ``hub_id`` (any revision)."""
    folder = _hub_cache() / f"models--{hub_id.replace('/', '--')}" / "snapshots"
    try:
        return any(folder.iterdir())
    except OSError:
        return False


def check_hub_id(name: str, key: str, known: Collection[str] = ()) -> list[str]:
    """Problems of a name that is not local: not a valid hub id, or one that cannot be
    fetched because the hub is offline and it is not cached (``known``: ids whose config ships
    with plugtune, so that ``validate`` and ``plan`` work offline)."""
    if not HUB_ID.fullmatch(name):
        return [f"{key}: {name!r} is neither an existing path nor a valid hub id "
                "(ORG/NAME of letters, digits, '-', '_', '.'); write a local folder as ./DIR"]
    if hub_offline() and name not in known and not in_hub_cache(name):
        local = f"./{name}"
        return [f"{key}: {name!r} is not a local path (there is no {local}) and, as a hub id, "
                "it is not in the hub cache while the hub is offline (HF_HUB_OFFLINE); write "
                f"{local} for a folder (relative to the recipe), or download it online first"]
    return []


def check_local(path: str | os.PathLike[str], key: str, trust_remote_code: bool = False,
                tokenizer: bool = False) -> list[str]:
    """Problems of a local source ``path``, read from its first bytes and its JSON configs."""
    path = Path(path)
    try:
        if not path.exists():
            return [f"{key}: {path} does not exist; give a hub id, a save_pretrained "
                    "directory or a .gguf file"]
        if path.is_file():
            return _check_gguf(path, key)
        configs = ["tokenizer_config.json"] if tokenizer else ["config.json",
                                                               "tokenizer_config.json"]
        if not tokenizer and not (path / "config.json").is_file():
            return [f"{key}: {path} has no config.json, so it is not a save_pretrained model "
                    "directory; give the folder that holds config.json, or a .gguf file"]
        return [p for name in configs
                for p in _check_config(path / name, key, trust_remote_code)]
    except OSError as exc:
        return [f"{key}: {path}: cannot read it ({exc.strerror})"]


def _check_gguf(path: Path, key: str) -> list[str]:
    if path.suffix != ".gguf":
        return [f"{key}: {path} is a file, not a model directory; give a save_pretrained "
                "directory or a .gguf file"]
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        return [f"{key}: {path} is not a GGUF file (it does not start with the GGUF magic "
                f"bytes, but with {magic!r}); give a real .gguf model file"]
    return []


def _check_config(config: Path, key: str, trust_remote_code: bool) -> list[str]:
    if not config.is_file():
        return []
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [f"{key}: {config} is not valid UTF-8 JSON ({exc}); the model directory is "
                "damaged"]
    if not isinstance(data, dict):
        return [f"{key}: {config} is not a JSON object; the model directory is damaged"]
    custom = data.get("auto_map")
    if custom and not trust_remote_code:
        code = sorted({str(v) for v in custom.values()} if isinstance(custom, dict) else
                      {str(custom)})
        return [f"{key}: {config} has auto_map: the model runs its own Python code "
                f"({', '.join(code)[:120]}); {TRUST_HINT}"]
    return []


@contextmanager
def loading(key: str, name: object) -> Iterator[None]:
    """Turn what transformers and torch raise for an unusable source — not found, offline,
    misspelt, custom code, a refused pickle, a damaged file — into one :class:`InputError`
    line naming ``key`` and ``name``."""
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol of a refused file
            warnings.filterwarnings("ignore", "Detected pickle protocol")
            yield
    except pickle.UnpicklingError as exc:
        raise InputError(_refused_pickle(key, name, exc)) from exc
    except (OSError, ValueError) as exc:
        raise InputError(_describe(key, name, exc)) from exc
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise InputError(f"{key}: {name}: a .safetensors file is damaged "
                         f"({first_line(exc)}); copy it again") from exc


def _describe(key: str, name: object, exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if "Weights only load failed" in text:
        return _refused_pickle(key, name, exc)
    if "trust_remote_code" in text:
        return f"{key}: {name} needs its own Python code to load; {TRUST_HINT}"
    if looks_local(str(name)):
        return f"{key}: cannot load {name}: {first_line(exc)}"
    if hub_offline() or "couldn't connect" in text or "outgoing traffic" in text:
        return (f"{key}: cannot load {name!r}: the hub is offline or unreachable and it is not "
                "in the hub cache; write ./PATH for a local folder, or download it online first")
    return (f"{key}: cannot load {name!r} from the hub ({first_line(exc)[:200]}); check the "
            "hub id's spelling (a private or gated model needs `hf auth login`), or write "
            "./PATH for a local folder")


def _refused_pickle(key: str, name: object, exc: BaseException) -> str:
    """A pickled ``.bin`` that holds more than tensors: name the file and what it asked for."""
    path = Path(str(name))
    files = sorted(p.name for p in path.glob("*.bin")) if path.is_dir() else []
    where = f"{path / files[0]}" if len(files) == 1 else f"{name} ({', '.join(files) or '.bin'})"
    asked = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    what = f" (it asks for {asked.group(1)})" if asked else ""
    return (f"{key}: {where}: torch's safe unpickler refused this pickled weights file{what}: it "
            "holds more than tensors and could run code when loaded; use a safetensors copy "
            "of the model from a source you trust")
