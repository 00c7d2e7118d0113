"""Stop control and faults as an outside plugin author meets them: `run.stop()` at every moment,
a plugin's exception in every phase, the rate that is logged, and signals and kills in the
final evaluation and save (real subprocesses, real signals), each followed by `resume`."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plugtune import cli, hookimpl, manager, resume, testing

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def records(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_steps(run_dir):
    return [r["step"] for r in records(run_dir) if "loss" in r]


def eval_steps(run_dir):
    return [r["step"] for r in records(run_dir) if "eval_loss" in r]


def status(run_dir):
    return json.loads((Path(run_dir) / "manifest.json").read_text())["status"]


def weights(run_dir):
    return load_file(Path(run_dir) / "model" / "model.safetensors")


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# run.stop()
# ---------------------------------------------------------------------------------------------


class StopInFinalEvaluation:
    @hookimpl
    def plugtune_evaluate(self, run, step):
        if step == run.total_steps:
            run.stop("asked during the final evaluation")


def test_a_stop_during_the_final_evaluation_leaves_the_run_completed(make_recipe):
    summary, run = testing.run(make_recipe(train={"max_steps": 2}),
                               extra_plugins=[StopInFinalEvaluation()])
    assert summary["steps"] == 2 and summary["stopped_early"] is None
    assert status(run.dir) == "completed"


class StopAtStep0:
    @hookimpl
    def plugtune_eval_end(self, run, step):
        if step == 0:
            run.stop("the base model is good enough")


def test_a_stop_at_the_step_0_evaluation_takes_no_step(make_recipe, tiny_llama):
    summary, run = testing.run(make_recipe(train={"max_steps": 5}), extra_plugins=[StopAtStep0()])
    assert summary["steps"] == 0 and train_steps(run.dir) == []
    assert eval_steps(run.dir) == [0]  # the untouched weights are not evaluated twice
    assert status(run.dir) == "stopped early: the base model is good enough"
    assert same_weights(weights(run.dir), load_file(tiny_llama / "model.safetensors"))


class StopAtStep2:
    @hookimpl
    def plugtune_eval_end(self, run, step):
        if step == 2:
            run.stop("enough")


class Perturb:
    """Changes the weights after the last step, as restoring a best checkpoint does."""

    @hookimpl
    def plugtune_steps_done(self, run):
        with torch.no_grad():
            for p in run.model.parameters():
                if p.requires_grad:
                    p.mul_(0.5)


def test_an_early_stop_evaluates_once_unless_the_weights_changed(make_recipe):
    recipe = make_recipe(train={"max_steps": 6, "eval_every": 1})
    summary, run = testing.run(recipe, extra_plugins=[StopAtStep2()])
    assert summary["steps"] == 2 and eval_steps(run.dir) == [0, 1, 2]
    assert summary["eval_after"] == records(run.dir)[-1]
    assert status(run.dir) == "stopped early: enough"
    summary, run = testing.run(recipe, ["output.name=perturbed"],
                               extra_plugins=[StopAtStep2(), Perturb()])
    assert eval_steps(run.dir) == [0, 1, 2, 2]  # steps_done changed what is saved
    evals = [r["eval_loss"] for r in records(run.dir) if "eval_loss" in r]
    assert evals[-1] != evals[-2] and summary["eval_after"]["eval_loss"] == evals[-1]


# ---------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------


class FailIn:
    """Raises in one hook (none: a harmless stand-in), as a buggy plugin would."""

    def __init__(self, hook=None, step=None, name="broken"):
        self.__name__ = name
        if hook is not None:
            setattr(self, hook, hookimpl(tryfirst=True)(self._raise(hook, step)))

    @staticmethod
    def _raise(hook, step):
        def fail(run=None):
            if step is None or run.step == step:
                raise ValueError(f"bug in {hook}")
        fail.__name__ = hook
        return fail


def installed(monkeypatch, plugin):
    """``plugin`` installed, for `plugtune` commands and for resuming a run that named it."""
    found = testing.with_plugins([plugin])
    monkeypatch.setattr(manager, "discover", lambda broken=None: found)


def test_a_step_end_fault_then_resume_logs_every_step_once(make_recipe, monkeypatch):
    recipe = make_recipe(train={"max_steps": 4})
    with pytest.raises(manager.PluginFault, match="failed in plugtune_step_end at step 2"):
        testing.run(recipe, extra_plugins=[FailIn("plugtune_step_end", step=2)])
    run_dir = Path(recipe).parent / "runs" / "run"
    assert train_steps(run_dir) == [1, 2]  # the step happened; its record is kept
    installed(monkeypatch, FailIn())
    summary, run = resume.resume(run_dir, echo=lambda *a: None)
    assert summary["steps"] == 4 and train_steps(run_dir) == [1, 2, 3, 4]
    # loss.png is drawn from the whole run, not only the resumed steps
    assert [s for s, _ in run.pm.get_plugin("plot").train] == [1, 2, 3, 4]
    assert len(json.loads((run_dir / "manifest.json").read_text())["resumed"]) == 1


@pytest.mark.parametrize("hook", ["plugtune_check_recipe", "plugtune_read_data",
                                  "plugtune_prepare_model", "plugtune_build_optimizer"])
def test_a_plugin_fault_before_training_names_the_plugin(hook, make_recipe, monkeypatch,
                                                          capsys, tmp_path):
    installed(monkeypatch, FailIn(hook))
    recipe = make_recipe(plugins=["causal_lm", "full", "broken"])
    assert cli.main(["run", str(recipe)]) == 3
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (f"plugtune: error: plugin broken (distribution "
                                    f"plugtune.testing test) failed in {hook}: ValueError: "
                                    f"bug in {hook}")


class FailInStep2Loss:
    def __init__(self):
        self.calls = 0

    @hookimpl(wrapper=True)  # watches the task's answer (a wrapper answers nothing)
    def plugtune_compute_loss(self):
        self.calls += 1
        if self.calls == 2:  # no evaluation: the second call computes step 2
            raise ValueError("loss broke")
        return (yield)


def test_a_fault_while_a_step_runs_names_that_step(make_recipe):
    with pytest.raises(manager.PluginFault, match="failed in plugtune_compute_loss at step 2:"):
        testing.run(make_recipe(train={"max_steps": 3, "eval_every": None}),
                    extra_plugins=[FailInStep2Loss()])


# ---------------------------------------------------------------------------------------------
# The rate that is logged
# ---------------------------------------------------------------------------------------------


class LayerwiseDecay:
    """Layer-wise learning-rate decay: the head trains at train.lr, each block below at half
    the rate of the one above, the embeddings slowest; built from the parameters' names."""

    def __init__(self):
        self.names = []

    @hookimpl
    def plugtune_build_optimizer(self, named_params, recipe):
        self.names = [n for n, _ in named_params]
        lr, groups = recipe.train.lr, {}
        for name, p in named_params:
            depth = 3 if "embed" in name else 1 + (name.split(".")[2] == "0") \
                if ".layers." in name else 0
            groups.setdefault(depth, []).append(p)
        return torch.optim.SGD([{"params": groups[d], "lr": lr * 0.5 ** d}
                                for d in sorted(groups, reverse=True)], lr=lr)


def test_the_logged_lr_is_the_one_train_lr_names(make_recipe):
    plugin = LayerwiseDecay()
    _, run = testing.run(make_recipe(train={"max_steps": 2, "lr": 1e-2, "schedule": "constant"}),
                         extra_plugins=[plugin])
    assert "model.embed_tokens.weight" in plugin.names and "lm_head.weight" in plugin.names
    logged = [r for r in records(run.dir) if "loss" in r]
    assert [r["lr"] for r in logged] == [1e-2, 1e-2]  # the head's, not the embeddings'
    assert logged[0]["lrs"] == pytest.approx([1.25e-3, 2.5e-3, 5e-3, 1e-2])


class MarkedBase:
    @hookimpl
    def plugtune_build_optimizer(self, params, recipe):
        return torch.optim.SGD([{"params": params[:1], "lr": 1e-4},
                                {"params": params[1:], "lr": 2e-3, "plugtune_base": True}])


def test_an_optimizer_can_mark_the_group_whose_rate_is_logged(make_recipe):
    _, run = testing.run(make_recipe(train={"max_steps": 1, "lr": 1e-3, "schedule": "constant"}),
                         extra_plugins=[MarkedBase()])
    assert [(r["lr"], r["lrs"]) for r in records(run.dir) if "loss" in r] == [(2e-3, [1e-4, 2e-3])]


# ---------------------------------------------------------------------------------------------
# Runs that cannot learn
# ---------------------------------------------------------------------------------------------


def test_a_saturating_learning_rate_stops_instead_of_completing(make_recipe, capsys):
    recipe = make_recipe(train={"max_steps": 10, "lr": 1e6})
    assert cli.main(["run", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "the gradient was exactly 0 for 3 optimizer steps in a row" in err
    assert "train.lr=1000000.0" in err and "no model is saved" in err
    run_dir = Path(recipe).parent / "runs" / "run"
    assert status(run_dir).startswith("failed at step 4: Diverged") and \
        not (run_dir / "model").exists()


def test_data_without_target_tokens_is_blamed_on_the_data(make_recipe, tmp_path, capsys):
    empty = testing.write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}] * 16)
    recipe = make_recipe(data={"train": str(empty)})
    assert cli.main(["run", str(recipe)]) == 2  # refused before a step is taken
    err = capsys.readouterr().err
    assert str(empty) in err and "learning rate" not in err
    assert not (Path(recipe).parent / "runs" / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


def test_a_failed_resume_leaves_the_manifest_as_it_was(make_recipe, tiny_llama, tmp_path,
                                                       monkeypatch):
    recipe = make_recipe(train={"max_steps": 4, "save_every": 2})
    with pytest.raises(manager.PluginFault):
        testing.run(recipe, extra_plugins=[FailIn("plugtune_steps_done")])
    run_dir = Path(recipe).parent / "runs" / "run"
    installed(monkeypatch, FailIn())
    before = (run_dir / "manifest.json").read_text()
    # the base model's weights gone: the resume fails once the recipe is loaded
    moved = (tiny_llama / "model.safetensors").rename(tmp_path / "moved.safetensors")
    try:
        assert cli.main(["resume", str(run_dir)]) != 0
        assert (run_dir / "manifest.json").read_text() == before
    finally:
        moved.rename(tiny_llama / "model.safetensors")
    assert cli.main(["resume", str(run_dir)]) == 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and len(manifest["resumed"]) == 1


# ---------------------------------------------------------------------------------------------
# Signals and kills in the final evaluation and save (real subprocesses, real signals)
# ---------------------------------------------------------------------------------------------

SCRIPT = """
import os, signal, sys, time
from plugtune import hookimpl, testing
from plugtune.errors import PlugtuneError

class Plugin:
{plugin}

try:
    testing.run(sys.argv[1], extra_plugins=[Plugin()], echo=print)
except PlugtuneError as exc:
    print(exc, file=sys.stderr)
    sys.exit(exc.exit_code)
except KeyboardInterrupt:
    sys.exit(130)
"""


def run_with(tmp_path, recipe, plugin):
    """Run ``recipe`` in a subprocess with the plugin class body ``plugin`` active;
    ``(exit status, stderr)``."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(plugin=textwrap.indent(textwrap.dedent(plugin), "    ")))
    done = subprocess.run([sys.executable, str(script), str(recipe)], env=ENV,
                          capture_output=True, text=True, timeout=120)
    return done.returncode, done.stderr


def resume_here(monkeypatch, capsys, run_dir):
    """``plugtune resume RUN_DIR`` in this process, with a stand-in for the script's plugin;
    ``(exit status, stdout, stderr)``."""
    installed(monkeypatch, FailIn(name="Plugin"))
    code = cli.main(["resume", str(run_dir)])
    return (code, *capsys.readouterr())


def losses(run_dir):
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in records(run_dir)]


SIGTERM_IN_FINAL_EVALUATION = """
    @hookimpl
    def plugtune_evaluate(self, run, step):
        if step == run.total_steps:
            os.kill(os.getpid(), signal.SIGTERM)
"""


def test_sigterm_in_the_final_evaluation_checkpoints_and_resume_finishes(make_recipe, tmp_path,
                                                                         monkeypatch, capsys):
    """No train.save_every: before, the announced stop was not acted on, and the SIGKILL a
    scheduler sends next left nothing to resume from."""
    straight = testing.run(make_recipe("straight.yaml", train={"max_steps": 3},
                                       output={"name": "straight"}))[1].dir
    recipe = make_recipe(train={"max_steps": 3})
    code, err = run_with(tmp_path, recipe, SIGTERM_IN_FINAL_EVALUATION)
    run_dir = tmp_path / "runs" / "run"
    assert code == 143, err[-2000:]
    assert "SIGTERM: interrupted at step 3 of 3 (after the last step, before the model was " \
        "saved)" in err
    assert status(run_dir) == "interrupted at step 3"
    assert (run_dir / "checkpoints" / "step-3" / "state.json").is_file()
    assert not (run_dir / "model").exists()
    code, out, err = resume_here(monkeypatch, capsys, run_dir)
    assert code == 0, err[-2000:]
    assert status(run_dir) == "completed"
    assert same_weights(weights(run_dir), weights(straight))
    assert losses(run_dir) == losses(straight)  # the final evaluation once, at step 3


SIGTERM_IN_LAST_STEP_END = """
    @hookimpl
    def plugtune_step_end(self, run, step):
        if step == run.total_steps:  # after the step's own check for signals
            os.kill(os.getpid(), signal.SIGTERM)
"""


def test_sigterm_after_the_last_steps_check_is_acted_on(make_recipe, tmp_path):
    code, err = run_with(tmp_path, make_recipe(train={"max_steps": 2, "eval_every": None}),
                         SIGTERM_IN_LAST_STEP_END)
    run_dir = tmp_path / "runs" / "run"
    assert code == 143, err[-2000:]
    assert (run_dir / "checkpoints" / "step-2" / "state.json").is_file()
    assert status(run_dir) == "interrupted at step 2" and not (run_dir / "model").exists()


SIGKILL_IN_SAVE = """
    @hookimpl(tryfirst=True)
    def plugtune_save_model(self):
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_kill_between_the_final_evaluation_and_the_manifest_logs_it_once(make_recipe,
                                                                          tmp_path, monkeypatch,
                                                                          capsys):
    recipe = make_recipe(train={"max_steps": 3, "save_every": 3})
    code, err = run_with(tmp_path, recipe, SIGKILL_IN_SAVE)
    run_dir = tmp_path / "runs" / "run"
    assert code == -signal.SIGKILL, err[-2000:]
    assert eval_steps(run_dir) == [0, 3] and status(run_dir) == "running"
    code, out, err = resume_here(monkeypatch, capsys, run_dir)
    assert code == 0, err[-2000:]
    assert eval_steps(run_dir) == [0, 3] and train_steps(run_dir) == [1, 2, 3]
    assert status(run_dir) == "completed"


SECOND_SIGINT_IN_THE_CHECKPOINT = """
    @hookimpl
    def plugtune_step_end(self, step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # the first: stop after the step

    @hookimpl
    def plugtune_save_checkpoint(self, run, path):
        if run.signum is not None:  # writing the interrupt's checkpoint: the second, at once
            (path / "partial.bin").write_bytes(bytes(1000))
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
"""


def test_a_second_sigint_stops_at_once_and_the_run_resumes_exactly(make_recipe, tmp_path,
                                                                    monkeypatch, capsys):
    train = {"max_steps": 8, "save_every": 2}
    straight = testing.run(make_recipe("straight.yaml", train=train,
                                       output={"name": "straight"}))[1].dir
    code, err = run_with(tmp_path, make_recipe(train=train), SECOND_SIGINT_IN_THE_CHECKPOINT)
    run_dir = tmp_path / "runs" / "run"
    assert code == 130, err[-2000:]
    assert status(run_dir) == "interrupted at step 6"
    # the checkpoint the second signal cut short is not there, not even half
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2", "step-4"]
    code, out, err = resume_here(monkeypatch, capsys, run_dir)
    assert code == 0, err[-2000:]
    assert "resuming at step 4" in out
    assert same_weights(weights(run_dir), weights(straight))
    assert losses(run_dir) == losses(straight)
