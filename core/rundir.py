"""The run directory: atomic writes, the resolved recipe and the manifest."""
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path

import yaml

UMASK = os.umask(0o022)
os.umask(UMASK)
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "pluggy", "plugtune")


def atomic_write(path, data):
    """Write ``data`` (str or bytes) to ``path`` through a temporary file and a rename, so a
    reader sees the old file or the new one, never half of one."""
    path = Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; give the usual permissions
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_main_process():
    """Whether this process writes the run directory and speaks: always, except under
    torchrun / accelerate launch, where only rank 0 does. Read from the environment, so that
    it can be asked before the Accelerator (and its process group) exists."""
    return os.environ.get("RANK", "0") == "0"


def run_name(recipe):
    return recipe.output.name or f"{recipe.path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def create(recipe):
    """Create ``output.dir/<name>/`` holding ``recipe.yaml`` and ``manifest.json``.

    The directory is assembled under a hidden temporary name and renamed into place."""
    parent = Path(recipe.output.dir)
    parent.mkdir(parents=True, exist_ok=True)
    name = run_name(recipe)
    final = parent / name
    n = 1
    while final.exists() and not recipe.output.name:
        n += 1
        final = parent / f"{name}-{n}"
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}."))
    os.chmod(tmp, 0o777 & ~UMASK)
    atomic_write(tmp / "recipe.yaml", yaml.safe_dump(recipe.resolved(), sort_keys=False))
    write_manifest(tmp, manifest(recipe))
    os.replace(tmp, final)
    return final


def manifest(recipe):
    files = [f for key in ("train", "validation") for f in getattr(recipe.data, key) or []]
    return {
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions(),
        "seed": recipe.train.seed,
        "plugins": recipe.plugins,
        "plugin_versions": plugin_versions(recipe),
        "pid": os.getpid(),
        "host": os.uname().nodename,
        "recipe_file": str(recipe.path),
        "git_revision": _git_revision(recipe.path.parent),
        "command": sys.argv,
        "data": {f: sha256(f) for f in files},
    }


def versions():
    return {p: _version(p) for p in PACKAGES}


def plugin_versions(recipe):
    """``{plugin: "distribution version"}`` of the recipe's active plugins."""
    return {ep.name: f"{ep.dist.name} {ep.dist.version}" if ep.dist else "?"
            for ep in entry_points(group="plugtune") if ep.name in recipe.plugins}


def write_manifest(run_dir, data):
    atomic_write(Path(run_dir) / "manifest.json", json.dumps(data, indent=2) + "\n")


def update_manifest(run_dir, **changes):
    data = json.loads((Path(run_dir) / "manifest.json").read_text())
    data.update(changes)
    write_manifest(run_dir, data)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version(package):
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _git_revision(folder):
    try:
        rev = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
