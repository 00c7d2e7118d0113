"""``plugtune resume`` and ``plugtune reproduce``: continue a run from its latest checkpoint,
or run its recorded recipe again and compare the loss step by step."""
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from . import checkpoint, loop, recipe as recipes, rundir
from .errors import InputError, PlugtuneError


#: How the manifest names a hub dataset's split (``dataset:NAME[/CONFIG]:SPLIT``).
HUB_SOURCE = "dataset:"

#: Where resume and reproduce say what they do (``print``, or the CLI's echo).
Echo = Callable[[str], object]


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file() or not (run_dir / "manifest.json").is_file():
        raise InputError(f"{run_dir}: not a run directory (no recipe.yaml and manifest.json);"
                         " give the directory a run printed")
    return json.loads((run_dir / "manifest.json").read_text())


def differences(manifest: dict[str, Any],
                recipe: recipes.Recipe) -> tuple[list[str], list[str]]:
    """What changed since the run was recorded: data file hashes, active plugins (name,
    distribution, version) and package versions; each a line. The first two decide whether a
    resume may go on; versions are only worth a warning."""
    data, plugins, versions = [], [], []
    for path, digest in manifest.get("data", {}).items():
        if path.startswith(HUB_SOURCE):  # a hub dataset's cache: pinned by its recipe entry
            continue
        now = rundir.sha256(path) if Path(path).exists() else "missing"
        if now != digest:
            data.append(f"data file {path} changed (sha256 {digest[:12]} -> {now[:12]})")
    active = rundir.plugin_versions(recipe)
    for name in sorted(set(active) | set(manifest.get("plugin_versions", {}))):
        was = manifest.get("plugin_versions", {}).get(name)
        if was != active.get(name):
            plugins.append(f"plugin {name}: {was or 'not active'} -> "
                           f"{active.get(name) or 'gone'}")
    current = rundir.versions()
    for package, was in manifest.get("versions", {}).items():
        if current.get(package) != was:
            versions.append(f"{package} {was} -> {current.get(package)}")
    return data + plugins, versions


def recipe_differences(manifest: dict[str, Any], recipe: recipes.Recipe) -> list[str]:
    """How the run's ``recipe.yaml`` (as now on disk, perhaps edited) and its model differ
    from what the run recorded when it started (or was last resumed): one line per key, and
    one for a local model whose files changed (:func:`plugtune.rundir.model_fingerprint`).
    Manifests written before plugtune recorded these give none."""
    lines = []
    if isinstance(manifest.get("recipe"), dict):
        lines += [f"recipe.yaml {line}" for line in changes(manifest["recipe"],
                                                           recipe.resolved())]
    model = manifest.get("model")
    if isinstance(model, dict) and model.get("fingerprint") and \
            model.get("name") == recipe.model.name:
        if rundir.model_fingerprint(recipe.model.name) != model["fingerprint"]:
            lines.append(f"model {recipe.model.name}: its files changed since the run started "
                         "(another model at the same path)")
    return lines


def changes(was: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``KEY: OLD -> NEW`` for each key that differs between two resolved recipes."""
    was, now = _flatten(was), _flatten(now)
    return [f"{key}: {_brief(was.get(key, ABSENT))} -> {_brief(now.get(key, ABSENT))}"
            for key in sorted(set(was) | set(now))
            if key not in IGNORED and was.get(key, ABSENT) != now.get(key, ABSENT)]


#: Recipe keys whose change does not change a run.
IGNORED = ("description",)
ABSENT = "(absent)"


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _brief(value: object) -> object:
    return value if value is ABSENT else recipes.brief(value, limit=80)


def intact_checkpoint(run_dir: str | Path,
                      echo: Echo) -> tuple[Path, list[tuple[Path, str]]]:
    """The newest checkpoint of the run that :func:`plugtune.checkpoint.verify` passes, and
    the damaged ones newer than it (``[(path, what is wrong)]``), each said in one line."""
    found = checkpoint.checkpoints(run_dir)
    if not found:
        raise PlugtuneError(f"{run_dir}: no checkpoint to resume from (it stopped before its "
                            "first; set train.save_every to write them); start it again with "
                            "plugtune run")
    damaged: list[tuple[Path, str]] = []
    for ckpt in reversed(found):
        problem = checkpoint.verify(ckpt)
        if problem is None:
            for bad, why in damaged:
                echo(f"warning: checkpoint {bad} is damaged ({why}); resuming from {ckpt.name}, "
                     "the newest intact one")
            return ckpt, damaged
        damaged.append((ckpt, problem))
    raise InputError(f"{run_dir}: no intact checkpoint to resume from: " +
                     "; ".join(f"{p.name}: {why}" for p, why in damaged) +
                     "; start the run again with plugtune run")


def set_aside(damaged: list[tuple[Path, str]]) -> None:
    """Rename damaged checkpoints ``step-K.damaged`` (kept to look at): the resumed run then
    neither counts them among the newest it keeps nor finds them again."""
    for path, _ in damaged:
        target, n = path.with_name(path.name + checkpoint.DAMAGED), 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}{checkpoint.DAMAGED}-{n}")
        os.replace(path, target)


def resume(run_dir: str | Path, force: bool = False, echo: Echo = print,
           trust_remote_code: bool = False,
           overrides: Sequence[str] = ()) -> tuple[dict[str, Any], "loop.Run"]:
    """Continue the run in ``run_dir`` from its newest intact checkpoint; return the summary.
    ``overrides`` (``KEY=VALUE``, as ``plugtune run`` takes) change the recipe from here on,
    e.g. ``train.max_steps=200`` to train longer; ``recipe.yaml`` then records them. The main
    process holds the run directory's lock (:func:`plugtune.rundir.lock`) until the run
    ends."""
    run_dir = Path(run_dir)
    read_manifest(run_dir)
    main = rundir.is_main_process()
    if main:
        rundir.lock(run_dir)
    try:
        return _resume(run_dir, force, echo, trust_remote_code, main, overrides)
    finally:
        rundir.release(run_dir)


def _resume(run_dir: Path, force: bool, echo: Echo, trust_remote_code: bool, main: bool,
            overrides: Sequence[str]) -> tuple[dict[str, Any], "loop.Run"]:
    manifest = read_manifest(run_dir)
    status = manifest.get("status", "")
    if status == "completed" or status.startswith("stopped early"):
        raise PlugtuneError(f"{run_dir}: the run has finished ({status}); nothing to resume")
    if main:
        checkpoint.clean(run_dir)
    ckpt, damaged = intact_checkpoint(run_dir, echo)
    recipe, pm = recipes.load_recipe(run_dir / "recipe.yaml", check_files=False,
                                     trust_remote_code=trust_remote_code)
    changed, versions = differences(manifest, recipe)
    changed += recipe_differences(manifest, recipe)
    for line in versions:
        echo(f"warning: {line}")
    if changed and not force:
        raise InputError(f"{run_dir}: cannot resume exactly; since the run was recorded:\n" +
                         "".join(f"  - {line}\n" for line in changed) +
                         "undo them, or pass --force to resume with them (recorded in the "
                         "manifest)")
    for line in changed:
        echo(f"warning: resuming with a change (--force): {line}")
    if overrides:  # asked for on the command line: no --force needed
        asked, pm = recipes.load_recipe(run_dir / "recipe.yaml", overrides, check_files=False,
                                        trust_remote_code=trust_remote_code)
        for line in changes(recipe.resolved(), asked.resolved()):
            echo(f"resuming with {line} (from the command line)")
            changed.append(f"command line {line}")
        recipe = asked
    run = loop.setup(recipe, pm, echo=echo)  # bad input stops here, before anything is written
    state = json.loads((ckpt / "state.json").read_text())
    step = state["step"]

    def started() -> None:  # the checkpoint loaded: only now is this a resume to record
        if not main:
            return
        set_aside(damaged)
        truncate_metrics(run_dir, step, state)
        resumed = manifest.get("resumed", []) + [{"from_step": step, "forced": changed}]
        # what was forced becomes what the run records, for the next resume to compare with
        now = {"recipe": recipe.resolved(), "model": rundir.model_record(recipe.model.name),
               "data": rundir.data_hashes(recipe, run.sources),
               "plugin_versions": rundir.plugin_versions(recipe)} if changed else {}
        if overrides:
            rundir.atomic_write(run_dir / "recipe.yaml",
                                yaml.safe_dump(recipe.resolved(), sort_keys=False))
        rundir.update_manifest(run_dir, status="running", resumed=resumed, pid=os.getpid(),
                               host=os.uname().nodename, **now)

    return loop.train(run, echo=echo, resume=(run_dir, ckpt), on_resume=started), run


def truncate_metrics(run_dir: str | Path, step: int, state: dict[str, Any]) -> None:
    """Drop what ``metrics.jsonl`` recorded after the checkpoint's step (the steps the resumed
    run takes again), and what was logged at its step after it was written: an evaluation it
    does not hold (the final one), the test split's."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        is_eval = "eval_loss" in record
        if record["step"] < step or (record["step"] == step and "test_loss" not in record and (
                not is_eval or _evaluated_at(state, step))):
            keep.append(line + "\n")
    rundir.atomic_write(path, "".join(keep))


def _evaluated_at(state: dict[str, Any], step: int) -> bool:
    """Whether the checkpoint holds an evaluation of its own step (the final evaluation,
    logged after the checkpoint, is not: resume runs it again)."""
    if "last_eval" in state:
        return (state["last_eval"] or {}).get("step") == step
    return state.get("evaluated", True)  # a checkpoint from before last_eval was kept


def losses(run_dir: str | Path) -> dict[int, float | None]:
    """``{step: loss}`` of the train records of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] \
        if path.is_file() else []
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def reproduce(run_dir: str | Path, steps: int | None = None, echo: Echo = print,
              trust_remote_code: bool = False) -> tuple[bool, str, Path]:
    """Run ``run_dir``'s recorded recipe again into a new run directory beside it and compare
    the loss at every step. Returns ``(identical, message, new_run_dir)``."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    recorded = losses(run_dir)
    if not recorded:
        raise PlugtuneError(f"{run_dir}: metrics.jsonl records no step to compare with")
    name, n = f"{run_dir.name}-reproduce", 1
    while (run_dir.parent / name).exists():
        n += 1
        name = f"{run_dir.name}-reproduce-{n}"
    recipe, pm = recipes.load_recipe(run_dir / "recipe.yaml",
                                     [f"output.dir={json.dumps(str(run_dir.parent))}",
                                      f"output.name={name}"],
                                     trust_remote_code=trust_remote_code)
    changed, versions = differences(manifest, recipe)
    for line in changed + versions:
        echo(f"warning: {line}")
    run = loop.setup(recipe, pm, echo=echo)
    loop.train(run, echo=echo, stop_after=steps)
    assert run.dir is not None  # one process: the main one, which made the run directory
    now = losses(run.dir)
    compared = sorted(set(recorded) & set(now))
    if steps is not None:
        compared = [s for s in compared if s <= steps]
    for s in compared:
        a, b = recorded[s], now[s]
        if a != b and not (a is None and b is None):
            delta = abs(a - b) if a is not None and b is not None else math.inf
            return False, (f"differs from step {s}: recorded loss {a}, now {b} "
                           f"(|difference| {delta:.3g})"), run.dir
    return True, f"identical: the loss of all {len(compared)} steps compared", run.dir
