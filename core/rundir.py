"""The run directory: atomic writes, the resolved recipe and the manifest."""
import errno
import fcntl
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import InputError, PlugtuneError

if TYPE_CHECKING:
    from .recipe import Recipe

UMASK = os.umask(0o022)
os.umask(UMASK)
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "pluggy", "plugtune")


class DiskFull(PlugtuneError):
    """The disk (or the user's quota) filled up while plugtune wrote ``path``."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(f"{path}: no space left on the device (disk full or over quota); "
                         "nothing was left half-written and the previous checkpoints are whole; "
                         "free some space, then continue with: plugtune resume RUN_DIR")


def is_disk_full(exc: BaseException, folder: str | Path | None = None) -> bool:
    """Whether ``exc`` is a full disk or quota: an ``OSError`` saying so, or (with ``folder``)
    the ``RuntimeError`` torch.save raises for it ("unexpected pos ...", no errno) while the
    disk holding ``folder`` has (almost) no room left."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if folder is None or not isinstance(exc, RuntimeError):
        return False
    try:
        stat = os.statvfs(folder)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < NO_ROOM


#: Free bytes below which a failed write is put down to a full disk.
NO_ROOM = 1 << 20


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` (str or bytes) to ``path`` through a temporary file and a rename, so a
    reader sees the old file or the new one, never half of one."""
    path = Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFull(path) from exc
        raise
    os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; give the usual permissions
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(exc):
            raise DiskFull(path) from exc
        raise


#: The lock file of a run directory (see :func:`lock`).
LOCK = ".lock"
_locks: dict[Path, int] = {}  # run directory (resolved) -> the open lock file this process holds


def lock(run_dir: str | Path) -> None:
    """Hold ``RUN/.lock`` for this process, or refuse in one line naming the process that
    holds it: one process at a time writes a run directory (two resumes at once would both
    train and log every step twice). ``fcntl.flock`` rather than a pid file: the kernel drops
    the lock when its process dies, however it dies, so a killed run never leaves a stale lock
    to clean up; the pid in the file is only for the message. Taking it again in the process
    that holds it does nothing; :func:`release` lets go."""
    key = Path(run_dir).resolve()
    while key not in _locks:
        fd = os.open(key / LOCK, os.O_RDWR | os.O_CREAT, 0o666 & ~UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InputError(f"{run_dir}: another plugtune process (pid {holder}) is using this "
                             "run directory; wait for it to end or stop it (Ctrl-C writes a "
                             "checkpoint), then resume") from None
        if _same_file(fd, key / LOCK):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            _locks[key] = fd
        else:  # locked a file its holder removed on release: take the new one
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def release(run_dir: str | Path | None) -> None:
    """Let go of the lock :func:`lock` took (if this process holds it), removing the file
    while still holding it (a process that opened it meanwhile sees it gone and starts over)."""
    if run_dir is None:
        return
    key = Path(run_dir).resolve()
    fd = _locks.pop(key, None)
    if fd is not None:
        Path(key / LOCK).unlink(missing_ok=True)
        os.close(fd)


def is_main_process() -> bool:
    """Whether this process writes the run directory and speaks: always, except under
    torchrun / accelerate launch, where only rank 0 does. Read from the environment, so that
    it can be asked before the Accelerator (and its process group) exists."""
    return os.environ.get("RANK", "0") == "0"


def run_name(recipe: "Recipe") -> str:
    return recipe.output.name or f"{recipe.path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


#: Where a run directory can never live: kernel file systems, not disks.
VIRTUAL = ("/proc", "/sys", "/dev")


def unusable_parent(parent: str | Path) -> str | None:
    """Why run directories cannot be made in ``parent`` (``output.dir``), or None: it has a
    NUL byte, lies in /proc, /sys or /dev, is (or lies under) a file, or is not writable.
    Asks the file system only; creates nothing."""
    if "\0" in str(parent):
        return f"{parent!r} has a NUL byte; give a folder name"
    path = Path(os.path.abspath(parent))
    real = os.path.realpath(path)
    for root in VIRTUAL:
        if real == root or real.startswith(root + "/"):
            return (f"{parent} is in {root}, a kernel file system that cannot hold run "
                    "directories; give a folder on disk (output.dir=runs)")
    for ancestor in (path, *path.parents):
        try:  # one stat: another run may create the folder between two questions
            is_dir = stat.S_ISDIR(os.stat(ancestor).st_mode)
        except (FileNotFoundError, NotADirectoryError):  # missing, or under a file: look up
            if not os.path.islink(ancestor):  # a dangling link is in the way, not missing
                continue
            is_dir = False
        except OSError as exc:
            return f"{parent} is not a usable path ({exc.strerror}); give a shorter folder name"
        if not is_dir:
            return (f"{parent} lies under {ancestor}, which is a file, not a directory; give "
                    "another folder (output.dir=...)")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            return (f"cannot create run directories in {parent}: {ancestor} is not writable by "
                    "this user; give another folder (output.dir=...)")
        return None
    return None


def create(recipe: "Recipe", sources: dict[str, str] | None = None) -> Path:
    """Create ``output.dir/<name>/`` holding ``recipe.yaml`` and ``manifest.json``.

    The name is claimed with one ``mkdir``, which is atomic: of two runs racing for a name one
    gets it and the other a clear "already exists" (a default, timestamped name moves on to
    ``NAME-2``, ``NAME-3``, ...). Each file is then written atomically. Hidden ``.NAME.*``
    folders that earlier versions assembled the directory in, and left behind when killed,
    are removed."""
    parent = Path(recipe.output.dir)
    problem = unusable_parent(parent)
    if problem:
        raise InputError(f"output.dir: {problem}")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"output.dir: cannot create {parent} ({exc.strerror}); give another "
                         "folder (output.dir=...)") from exc
    final = _claim(parent, run_name(recipe), numbered=not recipe.output.name)
    try:
        lock(final)
        remove_stale(parent, final.name)
        atomic_write(final / "recipe.yaml", yaml.safe_dump(recipe.resolved(), sort_keys=False))
        write_manifest(final, manifest(recipe, sources))
    except BaseException:
        release(final)
        shutil.rmtree(final, ignore_errors=True)
        raise
    return final


def _claim(parent: Path, name: str, numbered: bool) -> Path:
    """``parent/name`` made with ``os.mkdir`` (or ``name-N`` when ``numbered``)."""
    for n in range(1, 1000 if numbered else 2):
        final = parent / (name if n == 1 else f"{name}-{n}")
        try:
            final.mkdir()
            return final
        except FileExistsError:
            continue
        except OSError as exc:
            raise InputError(f"output.name: cannot create {final} ({exc.strerror})") from exc
    raise InputError(f"output.name: {final} already exists (another run may have just taken "
                     "the name); pick another name (output.name=...) or delete it")


def remove_stale(parent: str | Path, name: str) -> None:
    """Remove the hidden ``.NAME.XXXXXXXX`` temporary folders of ``name`` in ``parent``."""
    pattern = re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}")
    for entry in Path(parent).iterdir():
        if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def manifest(recipe: "Recipe", sources: dict[str, str] | None = None) -> dict[str, Any]:
    """The manifest of a new run. ``sources``: ``{name: sha256}`` of what the data phase read
    that is not a local path (a hub dataset's cached files); local files and directories (a
    ``save_to_disk`` dataset, named as a path or as ``dataset:``) are hashed here."""
    data = data_hashes(recipe, sources)
    return {
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions(),
        "seed": recipe.train.seed,
        "trust_remote_code": recipe.model.trust_remote_code,
        "plugins": recipe.plugins,
        "plugin_versions": plugin_versions(recipe),
        "pid": os.getpid(),
        "host": os.uname().nodename,
        "recipe_file": str(recipe.path),
        "git_revision": _git_revision(recipe.path.parent),
        "command": sys.argv,
        "data": data,
        "mixture": mixture_record(recipe, data),
        "recipe": recipe.resolved(),
        "model": model_record(recipe.model.name),
    }


def data_hashes(recipe: "Recipe", sources: dict[str, str] | None = None) -> dict[str, str]:
    """``{file: sha256}`` of the recipe's local data files and directories, with ``sources``
    (what the data phase read that is not a local path)."""
    files = [f if isinstance(f, str) else f.dataset
             for key in ("train", "validation", "test") for f in getattr(recipe.data, key) or []]
    files = [f for f in files if Path(f).is_absolute() and os.path.exists(f)]  # not hub ids
    return {**{f: sha256(f) for f in files}, **(sources or {})}


def mixture_record(recipe: "Recipe", hashes: dict[str, str]) -> dict[str, Any]:
    """``data.mix`` and each ``data.train`` source's name, sha256 and weight."""
    weights = recipe.data.weights or [1.0] * len(recipe.data.train)
    out = []
    for source, weight in zip(recipe.data.train, weights):
        name = source if isinstance(source, str) else source.dataset
        digest = hashes.get(name) or next((v for k, v in hashes.items()
                                           if k.startswith(f"dataset:{name}")), None)
        out.append({"source": name, "sha256": digest, "weight": weight})
    return {"mix": recipe.data.mix, "sources": out}


#: Model files up to this size are hashed in full; larger ones by size and their ends.
HASHED_IN_FULL = 64 << 20
ENDS = 4 << 20


def model_record(name: str) -> dict[str, Any]:
    """What a manifest records of the model: its name and :func:`model_fingerprint`."""
    return {"name": name, "fingerprint": model_fingerprint(name)}


def model_fingerprint(name: str) -> str | None:
    """A cheap fingerprint of a local model (a folder, a ``.gguf`` or ``pkg:`` file), for
    resume to notice the base changed: every file's name and size, the sha256 of each file up
    to 64 MiB (config, tokenizer, small weights) and of the first and last 4 MiB of a larger
    one (a weight file's header and its first and last tensors) -- a few MiB read per shard,
    not a 16 GB hash at every resume. None for a hub id (compared by name)."""
    path = _model_path(name)
    if path is None:
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        h.update(f"{file.relative_to(path).as_posix() if path.is_dir() else file.name} "
                 f"{size}\n".encode())
        with open(file, "rb") as f:
            if size <= HASHED_IN_FULL:
                h.update(f.read())
            else:
                h.update(f.read(ENDS))
                f.seek(size - ENDS)
                h.update(f.read(ENDS))
    return h.hexdigest()


def _model_path(name: str) -> Path | None:
    if name.startswith("pkg:"):  # as plugins/hf.py resolves it: a file in a package
        package, _, inner = name[4:].partition("/")
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            return None
        locations = list(spec.submodule_search_locations or []) if spec else []
        path = Path(locations[0]) / inner if locations else None
    else:
        path = Path(name).expanduser()
    try:
        return path if path is not None and path.exists() else None
    except (OSError, ValueError):
        return None


def versions() -> dict[str, str | None]:
    return {p: _version(p) for p in PACKAGES}


def plugin_versions(recipe: "Recipe") -> dict[str, str]:
    """``{plugin: "distribution version"}`` of the recipe's active plugins."""
    return {ep.name: f"{ep.dist.name} {ep.dist.version}" if ep.dist else "?"
            for ep in entry_points(group="plugtune") if ep.name in recipe.plugins}


def write_manifest(run_dir: str | Path, data: dict[str, Any]) -> None:
    atomic_write(Path(run_dir) / "manifest.json", json.dumps(data, indent=2) + "\n")


def update_manifest(run_dir: str | Path, **changes: Any) -> None:
    data = json.loads((Path(run_dir) / "manifest.json").read_text())
    data.update(changes)
    write_manifest(run_dir, data)


def sha256(path: str | Path) -> str:
    """The sha256 of a file; of a directory, the sha256 of its files' relative names and
    hashes, in name order."""
    if Path(path).is_dir():
        lines = "".join(f"{p.relative_to(path).as_posix()} {sha256(p)}\n"
                        for p in sorted(Path(path).rglob("*")) if p.is_file())
        return hashlib.sha256(lines.encode()).hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


#: git as run on a recipe's folder, which may be anyone's: no hooks, no fsmonitor command (a
#: repository's own .git/config could name one), no index refresh written back. A repository
#: owned by another user stays refused by git's safe.directory check (then no revision).
GIT = ["git", "-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null",
       "--no-optional-locks"]


def _git_revision(folder: str | Path) -> str | None:
    try:
        rev = subprocess.run([*GIT, "-C", str(folder), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run([*GIT, "-C", str(folder), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
