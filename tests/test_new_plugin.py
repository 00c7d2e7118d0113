"""`plugtune new-plugin NAME` writes a skeleton a stranger can start from: it pip-installs as
written, plugtune finds it through its entry point, and its own pytest tests pass."""
import os
import subprocess
import sys
from pathlib import Path

from plugtune import cli


def python(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PLUGTUNE_SKIP_PLUGINS", None)
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_new_plugin_installs_and_its_test_passes(tmp_path, capsys):
    assert cli.main(["new-plugin", "skeleton_check", "--dir", str(tmp_path)]) == 0
    root = tmp_path / "plugtune-skeleton-check"
    assert f"wrote {root}" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == [
        "README.md", "plugtune_skeleton_check.py", "pyproject.toml", "test_skeleton_check.py"]
    install = python("-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                     "--no-index", "-e", root)
    assert install.returncode == 0, install.stderr
    try:
        listed = python("-m", "plugtune.cli", "plugins")
        assert listed.returncode == 0, listed.stderr
        assert ("skeleton_check  (plugtune-skeleton-check 0.1.0)  Write a message into the run "
                "directory when training ends") in listed.stdout
        tested = python("-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=root)
        assert tested.returncode == 0, tested.stdout + tested.stderr
        assert "2 passed" in tested.stdout
    finally:
        python("-m", "pip", "uninstall", "--quiet", "--yes", "plugtune-skeleton-check")


def test_new_plugin_refuses_a_bad_name_or_an_existing_directory(tmp_path, capsys):
    assert cli.main(["new-plugin", "My-Plugin", "--dir", str(tmp_path)]) == 2
    assert "a plugin name is lower-case letters" in capsys.readouterr().err
    (tmp_path / "plugtune-taken").mkdir()
    assert cli.main(["new-plugin", "taken", "--dir", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not list(Path(tmp_path).glob("plugtune-my*"))
