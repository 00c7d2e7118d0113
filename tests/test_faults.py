"""Faults injected into real runs of a tiny model (LoRA with dropout, a checkpoint every 2 of 8
steps): SIGKILL at random moments, inside a checkpoint write and inside the final save; damaged
checkpoints; an edited recipe; two resumes at once; a full disk. Each ends with an adapter
bit-identical to an uninterrupted run's, or with one clear line -- never a checkpoint that
resume trusts but is corrupt, never a lost or doubled step.

Kills that must land inside a hook come from a test plugin installed for real (a dist-info
folder on PYTHONPATH, so the ``plugtune`` entry-point group finds it in every process): it
SIGKILLs its own process in the hook ``PLUGTUNE_KILL_AT=HOOK:STEP`` names. It is active in every
run of this module, the reference included, so every run has the same plugins."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from plugtune import checkpoint, cli, testing
from plugtune.plugins.adamw import multiplier

STEPS, LR = 8, 1e-3
WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle"]

KILLER = '''"""Test plugin: SIGKILL this process in the hook PLUGTUNE_KILL_AT=HOOK:STEP names."""
import os
import signal

from plugtune import hookimpl

PLUGTUNE_DEFAULT = True


def _maybe(hook, step):
    name, _, at = os.environ.get("PLUGTUNE_KILL_AT", "").partition(":")
    if name == hook and (not at or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


@hookimpl
def plugtune_step_end(run, step):
    _maybe("step_end", step)


@hookimpl
def plugtune_save_checkpoint(run, path):
    _maybe("save_checkpoint", run.step)


@hookimpl(wrapper=True)  # watches the plugin that answers (a wrapper answers nothing)
def plugtune_save_model(run):
    _maybe("save_model", run.step)
    return (yield)
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder holding the killer plugin as an installed distribution."""
    root = tmp_path_factory.mktemp("site")
    (root / "plugtune_killer.py").write_text(KILLER)
    info = root / "plugtune_killer-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugtune-killer\n"
                                   "Version: 0.1\n")
    (info / "entry_points.txt").write_text("[plugtune]\nkiller = plugtune_killer\n")
    return root


@pytest.fixture(autouse=True)
def killer_here(site, monkeypatch):
    """The killer plugin in this process too (for in-process resumes), never armed here."""
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("PLUGTUNE_KILL_AT", raising=False)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_llama):
    """``recipe(name, **train) -> path`` of a run named ``name`` in the module's runs folder."""
    root = tmp_path_factory.mktemp("faults")
    records = [{"messages": [{"role": "user", "content": f"Echo: {w}"},
                             {"role": "assistant", "content": w.upper()}]}
               for w in WORDS for _ in range(4)]
    data = testing.write_jsonl(root / "train.jsonl", records)

    def make(name, out=None, **train):
        return testing.write_recipe(
            root / f"{name}.yaml", model=str(tiny_llama), plugins=["causal_lm", "lora"],
            lora={"r": 4, "dropout": 0.1}, causal_lm={"exact_match": False},
            data={"train": str(data), "validation": str(data)},
            train={"max_steps": STEPS, "batch_size": 4, "save_every": 2, "lr": LR,
                   "eval_every": 4, **train},
            output={"dir": str(out or root / "runs"), "name": name})
    return make


def plugtune(site, *args, kill_at=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(site)}
    env.pop("PLUGTUNE_KILL_AT", None)
    if kill_at:
        env["PLUGTUNE_KILL_AT"] = kill_at
    return subprocess.Popen([sys.executable, "-m", "plugtune.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err


def run_dir(recipe_path):
    return recipe_path.parent / "runs" / recipe_path.stem


@pytest.fixture(scope="module")
def reference(site, recipe):
    """The uninterrupted run, in this process (as the in-process resumes: a subprocess and
    this process train bit for bit alike on one thread)."""
    path = recipe("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))
        assert cli.main(["run", str(path)]) == 0
    return run_dir(path)


@pytest.fixture(scope="module")
def killed(site, recipe):
    """A run SIGKILLed at step 7 (checkpoints step-4 and step-6 on disk); tests copy it."""
    path = recipe("killed")
    code, _, err = finish(plugtune(site, "run", path, kill_at="step_end:7"))
    assert code == -signal.SIGKILL, err[-2000:]
    return run_dir(path)


def copy_of(run, tmp_path):
    return Path(shutil.copytree(run, tmp_path / run.name))


def resume_here(run, *flags, capsys=None):
    """``plugtune resume`` in this process: (exit status, stdout, stderr)."""
    if capsys is not None:
        capsys.readouterr()
    code = cli.main(["resume", str(run), *flags])
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


def adapter(run):
    return (run / "adapter" / "adapter_model.safetensors").read_bytes()


def records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def same_as_reference(run, reference):
    """The final adapter bit for bit, and every train and eval record's numbers (each once)."""
    assert adapter(run) == adapter(reference)

    def numbers(r):
        return [(x["step"], x.get("loss"), x.get("lr"), x.get("eval_loss")) for x in records(r)]
    assert numbers(run) == numbers(reference)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["steps"] == STEPS


def error_lines(err):
    lines = [x for x in err.splitlines() if x.startswith("plugtune: ")]
    assert "Traceback" not in err
    return lines


def test_kills_inside_a_checkpoint_write_and_the_final_save_resume_bit_identical(
        site, recipe, reference, capsys):
    path = recipe("in-writes")
    run = run_dir(path)
    code, _, err = finish(plugtune(site, "run", path, kill_at="save_checkpoint:4"))
    assert code == -signal.SIGKILL, err[-2000:]
    # killed half-way through writing step-4: the previous checkpoint is the newest whole one
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step-2"]
    assert any(p.name.startswith(".step-4.") for p in (run / "checkpoints").iterdir())
    # the dead process's lock is no obstacle: the kernel dropped it with the process
    dead = int((run / ".lock").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    code, _, err = finish(plugtune(site, "resume", run, kill_at="save_model"))
    assert code == -signal.SIGKILL, err[-2000:]
    assert not (run / "adapter").exists()
    code, out, err = resume_here(run, capsys=capsys)
    assert code == 0, err[-2000:]
    assert "resuming at step 8" in out
    same_as_reference(run, reference)
    assert len(json.loads((run / "manifest.json").read_text())["resumed"]) == 2


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_at_a_random_moment_resumes_bit_identical(site, recipe, reference, seed,
                                                          capsys):
    rng = random.Random(seed)
    after, delay = rng.randint(3, STEPS - 1), rng.uniform(0, 0.05)
    path = recipe(f"random-{seed}")
    run = run_dir(path)
    proc = plugtune(site, "run", path)
    deadline = time.time() + 240
    while not any(r.get("step", 0) >= after and "loss" in r for r in _records_so_far(run)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    code, _, _ = finish(proc)
    if code == -signal.SIGKILL:
        code, _, err = resume_here(run, capsys=capsys)
        assert code == 0, err[-2000:]
    same_as_reference(run, reference)


def _records_so_far(run):
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(x) for x in lines[:-1]]  # the last line may be half-written


def _flip(file):
    data = bytearray(file.read_bytes())
    for i in range(len(data) - 16, len(data)):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


def _truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _edit_step(file):
    file.write_text(json.dumps({**json.loads(file.read_text()), "step": 2}))


DAMAGE = {
    "flipped bytes": ("trainable.safetensors", _flip, "differs from what was written"),
    "truncated": ("optimizer.pt", _truncate, "bytes, not the"),
    "garbage": ("rng.pt", lambda f: f.write_bytes(os.urandom(f.stat().st_size)),
                "differs from what was written"),
    "hand-edited step": ("state.json", _edit_step, "state.json says step 2, not 6"),
    "missing": ("scheduler.pt", Path.unlink, "scheduler.pt is missing"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_newest_checkpoint_is_passed_over_in_one_line(killed, reference, case,
                                                                tmp_path, capsys):
    run = copy_of(killed, tmp_path)
    name, damage, why = DAMAGE[case]
    damage(run / "checkpoints" / "step-6" / name)
    code, out, err = resume_here(run, capsys=capsys)
    assert code == 0, err[-2000:]
    warned = [x for x in out.splitlines() if x.startswith("warning: checkpoint")]
    assert len(warned) == 1 and f"{run}/checkpoints/step-6" in warned[0] and why in warned[0]
    assert "resuming from step-4" in warned[0]
    assert (run / "checkpoints" / "step-6.damaged" / "state.json").is_file()  # kept to look at
    same_as_reference(run, reference)


def test_a_checkpoint_from_before_checksums_is_accepted(killed, reference, tmp_path, capsys):
    run = copy_of(killed, tmp_path)
    (run / "checkpoints" / "step-6" / checkpoint.CHECKSUMS).unlink()
    code, out, err = resume_here(run, capsys=capsys)
    assert code == 0, err[-2000:]
    assert "resuming at step 6" in out and "warning: checkpoint" not in out
    same_as_reference(run, reference)


def test_no_intact_checkpoint_is_one_line_and_changes_nothing(killed, tmp_path, capsys):
    run = copy_of(killed, tmp_path)
    _flip(run / "checkpoints" / "step-6" / "trainable.safetensors")
    _truncate(run / "checkpoints" / "step-4" / "optimizer.pt")
    manifest = (run / "manifest.json").read_text()
    code, _, err = resume_here(run, capsys=capsys)
    assert code == 2
    [line] = error_lines(err)
    assert "no intact checkpoint" in line and "step-6: trainable.safetensors" in line
    assert "step-4: optimizer.pt" in line
    assert (run / "manifest.json").read_text() == manifest  # not marked "running" again


def test_an_edited_recipe_is_refused_naming_each_key_and_forced_uses_it(killed, tmp_path,
                                                                        capsys):
    run = copy_of(killed, tmp_path)
    saved = (run / "recipe.yaml").read_text()
    tree = yaml.safe_load(saved)
    moved = testing.write_jsonl(tmp_path / "other.jsonl", [{"text": "something else"}] * 8)
    tree["train"].update(lr=2 * LR, max_steps=10)
    tree["data"]["train"] = [str(moved)]
    (run / "recipe.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    manifest = (run / "manifest.json").read_text()
    code, _, err = resume_here(run, capsys=capsys)
    assert code == 2
    assert err.count("plugtune: error:") == 1 and "--force" in err
    for key, change in (("train.lr", "0.001 -> 0.002"), ("train.max_steps", "8 -> 10"),
                        ("data.train", "other.jsonl")):
        [line] = [x for x in err.splitlines() if f"recipe.yaml {key}:" in x]
        assert change in line
    assert (run / "manifest.json").read_text() == manifest

    # --force: goes on with the edited recipe (lr and max_steps included), and records it
    tree["data"]["train"] = yaml.safe_load(saved)["data"]["train"]
    (run / "recipe.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    code, out, err = resume_here(run, "--force", capsys=capsys)
    assert code == 0, err[-2000:]
    assert "resuming with a change (--force): recipe.yaml train.lr" in out
    lrs = {r["step"]: r["lr"] for r in records(run) if "loss" in r}
    assert max(lrs) == 10
    assert lrs[7] == 2 * LR * multiplier("linear", 0, 10)(6)  # the new rate and schedule
    forced = json.loads((run / "manifest.json").read_text())["resumed"][0]["forced"]
    assert any("train.max_steps" in x for x in forced)
    # what was forced is now what the run records: resuming again would not complain
    assert json.loads((run / "manifest.json").read_text())["recipe"]["train"]["lr"] == 2 * LR


def test_resume_overrides_extend_a_run_from_the_command_line(killed, tmp_path, capsys):
    run = copy_of(killed, tmp_path)
    code, out, err = resume_here(run, "train.max_steps=10", capsys=capsys)
    assert code == 0, err[-2000:]
    assert "resuming with train.max_steps: 8 -> 10 (from the command line)" in out
    lrs = {r["step"]: r["lr"] for r in records(run) if "loss" in r}
    assert sorted(lrs) == list(range(1, 11))
    assert lrs[7] == LR * multiplier("linear", 0, 10)(6)
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["max_steps"] == 10
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["steps"] == 10 and manifest["recipe"]["train"]["max_steps"] == 10


def test_two_resumes_at_once_the_second_is_refused_in_one_line(site, killed, reference,
                                                               tmp_path, capsys):
    run = copy_of(killed, tmp_path)
    first = plugtune(site, "resume", run)
    lock, deadline = run / ".lock", time.time() + 120
    while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.005)
    code, _, err = resume_here(run, capsys=capsys)
    assert code == 2
    [line] = error_lines(err)
    assert f"pid {first.pid}" in line and str(run) in line
    code, _, err = finish(first)
    assert code == 0, err[-2000:]
    same_as_reference(run, reference)


@pytest.fixture
def small_disk(tmp_path):
    """A 600 KiB tmpfs, room for about three checkpoints (root only; skipped where it cannot
    be mounted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_the_checkpoints_stay_whole(recipe, reference, small_disk,
                                                                capsys):
    path = recipe("full", out=small_disk, save_every=1, keep_checkpoints=None)
    run = small_disk / "full"
    code = cli.main(["run", str(path)])
    err = capsys.readouterr().err
    assert code == 1, err[-2000:]
    [line] = error_lines(err)
    assert "no space left on the device" in line and str(run) in line
    kept = checkpoint.checkpoints(run)
    assert kept and all(checkpoint.verify(p) is None for p in kept)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    code, _, err = resume_here(run, capsys=capsys)
    assert code == 0, err[-2000:]
    assert adapter(run) == adapter(reference)


def validate(path, capsys):
    capsys.readouterr()
    code = cli.main(["validate", str(path)])
    return code, capsys.readouterr().err


def test_hostile_recipes_are_one_line_each_and_quick(tmp_path, capsys):
    bomb = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    bomb += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    cases = {
        "bomb.yaml": ("\n".join(["model: ./tiny", *bomb, "train: {lr: *a9}"]),
                      "expand to more than 100,000 values"),
        "deep.yaml": ("model: ./tiny\nx: " + "[" * 900 + "]" * 900 + "\n",
                      "deep.yaml:2: nested more than 64 levels deep"),
        "latin1.yaml": ("model: ./tiny\ndescription: caf\xe9\n".encode("latin-1"),
                        "latin1.yaml:2: not UTF-8 text (byte 0xe9 at column 17)"),
        "huge.yaml": ("model: ./tiny\nx: " + "a" * (2 << 20) + "\n", "a recipe is at most 1 MiB"),
        "long.yaml": ("model: ./tiny\ntrain: {lr: [" + ", ".join(["1"] * 5000) + "]}\n",
                      "train.lr: Input should be a valid number (got [1, 1,"),
    }
    for name, (text, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        start = time.perf_counter()
        code, err = validate(path, capsys)
        assert time.perf_counter() - start < 10, name
        assert code == 2, (name, err[-500:])
        assert expected in err, (name, err[-500:])
        assert "Traceback" not in err and all(len(x) < 1200 for x in err.splitlines()), name


def test_an_adapter_too_large_to_allocate_is_one_line(recipe, capsys):
    path = recipe("huge-r")
    for value, code, expected in (("1e30", 2, "lora.r: Input should be a valid integer"),
                                  ("1.0e+12", 1, "out of memory")):
        capsys.readouterr()
        assert cli.main(["run", str(path), f"lora.r={value}"]) == code
        [line] = error_lines(capsys.readouterr().err)
        assert expected in line
    assert not run_dir(path).exists()
