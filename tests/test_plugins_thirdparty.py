"""Third-party plugins, installed for real: the packages under tests/plugins/ are pip-installed
into temporary folders (not the venv) and the ``plugtune`` command runs with those folders on
PYTHONPATH, so discovery goes through the ``plugtune`` entry-point group as for any user."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from plugtune import API_VERSION, hookimpl, testing
from plugtune.errors import PluginError

PACKAGES = Path(__file__).parent / "plugins"
BROKEN_ERROR = "ModuleNotFoundError: No module named 'a_dependency_that_is_not_installed'"


def pip_install(package, tmp_path_factory):
    """Install ``tests/plugins/<package>`` into a new folder (built from a copy, so the source
    tree gets no build/ or egg-info); return the folder."""
    work = tmp_path_factory.mktemp(package)
    source = shutil.copytree(PACKAGES / package, work / "src")
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(target), str(source)],
                   check=True, capture_output=True, text=True)
    return target


@pytest.fixture(scope="module")
def example_site(tmp_path_factory):
    return pip_install("plugtune-example", tmp_path_factory)


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory):
    return pip_install("plugtune-broken", tmp_path_factory)


def plugtune(*args, sites=(), skip=None, cwd=None):
    """Run the installed ``plugtune`` command with ``sites`` on PYTHONPATH."""
    script = Path(sys.executable).parent / "plugtune"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "plugtune.cli"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PLUGTUNE_SKIP_PLUGINS")}
    env["PYTHONPATH"] = os.pathsep.join(map(str, sites))
    env["OMP_NUM_THREADS"] = "1"  # a tiny model: see conftest._one_thread_for_tiny_models
    if skip:
        env["PLUGTUNE_SKIP_PLUGINS"] = skip
    return subprocess.run(command + [str(a) for a in args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_plugins_lists_the_installed_plugin(example_site):
    result = plugtune("plugins", sites=[example_site])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("example "))
    assert lines[i] == ("example  (plugtune-example 0.3.1)  Write a greeting into the run "
                        "directory and report the held-out token count at evaluation")
    assert lines[i + 1].split() == ["hooks:", "plugtune_check_recipe,", "plugtune_evaluate,",
                                    "plugtune_recipe_sections,", "plugtune_train_end"]
    assert any(line.startswith("causal_lm ") for line in lines)  # built-ins still there


def test_plugin_changes_the_run_and_a_broken_one_can_be_skipped(example_site, broken_site,
                                                                 make_recipe, tmp_path):
    recipe = make_recipe(plugins=["causal_lm", "full", "example"],
                         example={"greeting": "hi there"}, train={"max_steps": 1},
                         causal_lm={"exact_match": False})
    result = plugtune("run", recipe, sites=[example_site, broken_site], skip="broken",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "run"
    assert (run_dir / "example.txt").read_text() == "hi there\n"
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in line]
    assert len(evals) == 2 and all(e["example_tokens"] > 0 for e in evals)
    assert "held-out example_tokens:" in result.stdout
    assert "example" in json.loads((run_dir / "manifest.json").read_text())["plugins"]


def test_plugin_section_is_validated(example_site, make_recipe):
    recipe = make_recipe(plugins=["causal_lm", "example"], example={"greeting": " "})
    result = plugtune("validate", recipe, sites=[example_site])
    assert result.returncode == 2
    assert "example.greeting: is empty; give some text" in result.stderr


def test_broken_plugin_stops_a_command_with_its_name_distribution_and_error(
        example_site, broken_site, make_recipe):
    result = plugtune("validate", make_recipe(), sites=[example_site, broken_site])
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert "plugin 'broken' (distribution plugtune-broken 0.0.1" in result.stderr
    assert BROKEN_ERROR in result.stderr
    assert "PLUGTUNE_SKIP_PLUGINS=broken" in result.stderr


@pytest.fixture(scope="module")
def future_site(tmp_path_factory):
    return pip_install("plugtune-future", tmp_path_factory)


@pytest.fixture(scope="module")
def misspelt_site(tmp_path_factory):
    return pip_install("plugtune-misspelt", tmp_path_factory)


def listed(stdout):
    """``{plugin name: its line}`` of ``plugtune plugins``' output."""
    return {line.split()[0]: line for line in stdout.splitlines() if not line.startswith(" ")}


def test_plugins_lists_every_healthy_plugin_and_marks_the_broken_ones(
        example_site, broken_site, future_site, misspelt_site):
    result = plugtune("plugins", sites=[example_site, broken_site, future_site, misspelt_site])
    assert result.returncode == 3 and "Traceback" not in result.stderr
    lines = listed(result.stdout)
    assert lines["example"].startswith("example  (plugtune-example 0.3.1)  Write a greeting")
    assert {"causal_lm", "lora", "hf", "progress"} <= set(lines)  # built-ins still there
    # a class entry point shows its class's docstring (docs/plugins.md)
    assert lines["progress"].endswith("Progress bar with loss, lr, tokens/s and ETA; prints "
                                      "each evaluation")
    assert lines["broken"] == ("broken  (plugtune-broken 0.0.1)  BROKEN: failed to import: "
                               + BROKEN_ERROR)
    assert "needs plugtune plugin API <3,>=2.0" in lines["future"]
    assert "unknown hook 'plugtune_step_ends' (did you mean 'plugtune_step_end'?)" in \
        lines["misspelt"]
    for name in ("broken", "future", "misspelt"):
        assert f"skip it with PLUGTUNE_SKIP_PLUGINS={name}" in result.stdout
        assert f"plugtune: error: plugin '{name}' (distribution plugtune-{name} " in result.stderr
    skipped = plugtune("plugins", sites=[example_site, broken_site, future_site, misspelt_site],
                       skip="broken,future,misspelt")
    assert skipped.returncode == 0 and "example  (plugtune-example" in skipped.stdout


def test_a_misspelt_hook_stops_only_the_recipes_that_use_its_plugin(misspelt_site, make_recipe):
    assert plugtune("validate", make_recipe(), sites=[misspelt_site]).returncode == 0
    result = plugtune("validate", make_recipe(plugins=["causal_lm", "full", "misspelt"]),
                      sites=[misspelt_site])
    assert result.returncode == 3
    assert result.stderr.startswith(
        "plugtune: error: plugin 'misspelt' (distribution plugtune-misspelt 0.1.0): unknown "
        "hook 'plugtune_step_ends' (did you mean 'plugtune_step_end'?)")


def test_a_plugin_for_another_api_is_refused_in_one_line(future_site, make_recipe):
    result = plugtune("validate", make_recipe(), sites=[future_site])
    assert result.returncode == 3
    first, hint = result.stderr.splitlines()
    assert first == ("plugtune: error: plugin 'future' (distribution plugtune-future 2.0.0) "
                     "needs plugtune plugin API <3,>=2.0, and this plugtune "
                     f"{plugtune_version()} provides API {API_VERSION}")
    assert hint.strip().startswith("hint: install a version of plugtune-future made for API "
                                   f"{API_VERSION}")
    assert plugtune("validate", make_recipe(), sites=[future_site], skip="future").returncode == 0


def plugtune_version():
    import plugtune as package

    return package.__version__


class Misspelt:
    @hookimpl
    def plugtune_step_ends(self, step):
        pass


class WrongArgument:
    @hookimpl
    def plugtune_step_end(self, stepp):
        pass


def test_misspelt_hook_is_an_error(make_recipe):
    with pytest.raises(PluginError) as info:
        testing.load_recipe(make_recipe(), extra_plugins=[Misspelt])
    assert str(info.value).startswith(
        "plugin 'Misspelt' (distribution plugtune.testing test): unknown hook "
        "'plugtune_step_ends' (did you mean 'plugtune_step_end'?)")


def test_hook_argument_not_in_the_spec_is_an_error(make_recipe):
    with pytest.raises(PluginError, match="plugin 'WrongArgument'.*'stepp'"):
        testing.load_recipe(make_recipe(), extra_plugins=[WrongArgument])


class Undecorated:
    def __init__(self):
        self.steps = []

    def plugtune_step_end(self, step):  # no @hookimpl: still a hook, as in pytest
        self.steps.append(step)


class UndecoratedMisspelt:
    def plugtune_stepend(self, step):
        pass


def test_undecorated_hook_functions_are_hooks_too(make_recipe):
    plugin = Undecorated()
    testing.run(make_recipe(train={"max_steps": 2}, causal_lm={"exact_match": False}),
                extra_plugins=[plugin])
    assert plugin.steps == [1, 2]
    with pytest.raises(PluginError, match="unknown hook 'plugtune_stepend' .did you mean "
                                          "'plugtune_step_end'.."):
        testing.load_recipe(make_recipe(), extra_plugins=[UndecoratedMisspelt])


class NearMiss:
    def plugtun_step_end(self, step):  # no @hookimpl and a typo in the prefix
        pass


def test_a_near_miss_of_a_hook_name_is_an_error(make_recipe):
    with pytest.raises(PluginError) as info:
        testing.load_recipe(make_recipe(), extra_plugins=[NearMiss])
    assert str(info.value).startswith(
        "plugin 'NearMiss' (distribution plugtune.testing test): function 'plugtun_step_end' "
        "looks like a misspelt hook (did you mean 'plugtune_step_end'?)")


class ForApiOne:
    PLUGTUNE_API = ">=1.0,<2"

    def plugtune_step_end(self, step):
        pass


class ForApiTwo(ForApiOne):
    PLUGTUNE_API = ">=2"


class NotARange(ForApiOne):
    PLUGTUNE_API = "version one"


def test_a_plugin_declares_the_api_range_it_needs(make_recipe):
    import plugtune

    assert plugtune.API_VERSION == "1.4"  # 1.1-1.4 added names only: a 1.0 plugin still loads
    testing.load_recipe(make_recipe(), extra_plugins=[ForApiOne])  # accepted
    with pytest.raises(PluginError, match=r"plugin 'ForApiTwo' \(distribution plugtune.testing "
                                          r"test\) needs plugtune plugin API >=2, and this "
                                          r"plugtune .* provides API 1.4"):
        testing.load_recipe(make_recipe(), extra_plugins=[ForApiTwo])
    with pytest.raises(PluginError, match="PLUGTUNE_API = 'version one' is not a version range"):
        testing.load_recipe(make_recipe(), extra_plugins=[NotARange])


def test_the_public_api_is_importable_from_plugtune():
    import plugtune

    for name in plugtune.__all__:
        assert getattr(plugtune, name) is not None, name
    from plugtune import Param, Plan, Record, Run, Tokenized, loss_of, transformer_blocks
    from plugtune.loop import Run as LoopRun
    assert Run is LoopRun and callable(loss_of) and callable(transformer_blocks)
    assert Plan.__module__.startswith("plugtune.plan") and Param.__module__ == Plan.__module__
    assert Record.__module__ == Tokenized.__module__ == "plugtune.data"
