"""Units of the training loop, without a training run: a checkpoint's save/load round trip
(weights, optimizer, scheduler, random states and the loop's progress come back identical),
the progress's ``state.json`` (old checkpoints load, unknown keys survive), and blame (a
plugin's fault is named with its hook and step; a fault outside any hook is not blamed)."""
import copy
import json
import random
import warnings

import numpy as np
import pluggy
import pytest
import torch

from plugtune import checkpoint, hookimpl, hookspecs, manager
from plugtune.state import Progress


def model_and_optimizer(seed):
    """A small real network (one frozen layer), AdamW and a warm-up schedule."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model[0].bias.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5))
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, n):
    for _ in range(n):
        model(torch.randn(3, 4)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def draws():
    """One number from each random generator a checkpoint restores."""
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_a_checkpoint_round_trip_restores_weights_optimizer_scheduler_rng_and_progress(
        tmp_path):
    model, optimizer, scheduler = model_and_optimizer(seed=0)
    train_steps(model, optimizer, scheduler, 3)
    progress = Progress(bad_steps=1, empty_steps=1, skipped_steps=2, evaluated=False,
                        eval_before={"step": 0, "eval_loss": 2.5},
                        last_eval={"step": 3, "eval_loss": 1.25}, stop_reason="plateau")
    plugin_paths = []
    path = checkpoint.save(tmp_path / "step-3", model=model, optimizer=optimizer,
                           scheduler=scheduler, scaler=None,
                           state={"step": 3, **progress.to_json()},
                           plugin_hook=plugin_paths.append)
    expected = draws()  # what the generators give right after the save
    as_saved = copy.deepcopy((model, optimizer, scheduler))
    train_steps(model, optimizer, scheduler, 2)  # the run goes on, then crashes

    fresh, fresh_optimizer, fresh_scheduler = model_and_optimizer(seed=1)
    saved = checkpoint.load(path, model=fresh, optimizer=fresh_optimizer,
                            scheduler=fresh_scheduler, scaler=None,
                            plugin_hook=plugin_paths.append)
    assert draws() == expected
    assert saved.pop("step") == 3 and Progress.from_json(saved) == progress
    assert len(plugin_paths) == 2 and plugin_paths[1] == path  # the plugins' own files
    old, old_optimizer, old_scheduler = as_saved
    for (name, p), q in zip(old.named_parameters(), fresh.parameters()):
        if p.requires_grad:  # a checkpoint keeps the trainable weights, exactly
            assert torch.equal(p, q), name
    assert_same_optimizer_state(old_optimizer.state_dict(), fresh_optimizer.state_dict())
    assert fresh_scheduler.state_dict() == old_scheduler.state_dict()
    # and the next step is the same step
    x = torch.randn(3, 4)
    for m, o, s in ((old, old_optimizer, old_scheduler), (fresh, fresh_optimizer,
                                                          fresh_scheduler)):
        m[0].bias.data.zero_()  # the frozen weight is the base's, not the checkpoint's
        m(x).square().sum().backward()
        o.step()
        s.step()
    for p, q in zip(old.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


def assert_same_optimizer_state(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for key, value in a["state"][k].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][k][key])), key


def test_progress_round_trips_through_state_json_and_reads_old_checkpoints(tmp_path):
    progress = Progress(dead_steps=2, last_eval={"step": 4, "eval_loss": 0.5},
                        extra={"from_a_newer_plugtune": [1, 2]})
    state = json.loads(json.dumps({"step": 4, **progress.to_json()}))
    assert set(state) == {"step", "bad_steps", "empty_steps", "dead_steps", "skipped_steps",
                          "evaluated", "eval_before", "last_eval", "from_a_newer_plugtune"}
    state.pop("step")
    assert Progress.from_json(state) == progress
    # a checkpoint written while run.state was a dict, before last_eval was kept
    old = {"bad_steps": 0, "empty_steps": 0, "dead_steps": 0, "skipped_steps": 3,
           "evaluated": False, "eval_before": {"step": 0, "eval_loss": 3.0},
           "stop_reason": "stopped after 4 steps as asked"}
    loaded = Progress.from_json(old)
    assert (loaded.skipped_steps, loaded.evaluated, loaded.last_eval, loaded.stop_reason) == (
        3, False, None, "stopped after 4 steps as asked")
    assert loaded.to_json() == {**old, "last_eval": None}


def test_reading_run_state_as_a_dict_still_works_but_is_deprecated():
    progress = Progress(skipped_steps=5)
    with pytest.warns(DeprecationWarning, match="run.state.KEY"):
        assert progress["skipped_steps"] == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert progress.get("stop_reason") is None and progress.get("evaluated") is True


class Boom:
    """Fails inside a helper its hook calls: the hook is still the one blamed."""

    @hookimpl
    def plugtune_log(self, run, record):
        self.explode(record)

    @staticmethod
    def explode(record):
        raise ValueError(f"cannot log {record}")


class Quiet:
    @hookimpl
    def plugtune_log(self, run, record):
        pass


@pytest.fixture
def pm():
    pm = pluggy.PluginManager("plugtune")
    pm.add_hookspecs(hookspecs)
    pm.register(Quiet(), name="quiet")
    pm.register(Boom(), name="boom")
    return pm


def test_a_fault_in_a_hook_names_the_plugin_the_hook_and_the_step(pm):
    with pytest.raises(ValueError) as info:
        pm.hook.plugtune_log(run=None, record={"step": 7})
    fault = manager.blame(pm, info.value, 7)
    assert str(fault) == ("plugin boom failed in plugtune_log at step 7: ValueError: cannot "
                          "log {'step': 7}")
    assert (fault.plugin, fault.hook) == ("boom", "plugtune_log")
    assert "at step" not in str(manager.blame(pm, info.value))  # before training: no step


def test_a_fault_outside_any_hook_is_not_blamed(pm):
    def core_code():
        raise ValueError("the core's own bug")

    with pytest.raises(ValueError) as info:
        core_code()
    assert manager.blame(pm, info.value, 3) is None
    with pytest.raises(ValueError, match="the core's own bug"):  # not turned into a fault
        with manager.blamed(pm):
            core_code()
    with pytest.raises(manager.PluginFault, match="plugin boom failed in plugtune_log"):
        with manager.blamed(pm):
            pm.hook.plugtune_log(run=None, record={})
