"""Roles: the core, not the plugins, decides who answers a single-answer hook. A stranger's
plugins (tests/plugins/plugtune-stranger, pip-installed for real) fill the roles built-ins
fill and are arbitrated exactly as built-ins are: refused in one line beside a plugin in the
same exclusive role, found by role where a built-in asks ("is there an adapter?"), and
replacing a built-in's answer only where they declare it."""
import ast
import json
import re
from pathlib import Path

import pytest
from test_plugins_thirdparty import pip_install, plugtune

from plugtune import cli, manager, testing
from plugtune.errors import RecipeError


@pytest.fixture(scope="module")
def stranger_site(tmp_path_factory):
    return pip_install("plugtune-stranger", tmp_path_factory)


@pytest.fixture
def stranger(stranger_site, monkeypatch):
    """The stranger's plugins installed in this process too (discovery reads sys.path)."""
    monkeypatch.syspath_prepend(str(stranger_site))
    import plugtune_stranger

    plugtune_stranger.CALLS["focal_loss"] = 0
    return plugtune_stranger


def problems(path):
    with pytest.raises(RecipeError) as info:
        testing.load_recipe(path)
    return info.value.problems


def test_a_strangers_adapter_beside_lora_is_refused_in_one_line(stranger_site, make_recipe):
    result = plugtune("validate", make_recipe(plugins=["causal_lm", "lora", "layernorm"]),
                      sites=[stranger_site])
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"plugtune: error: {result.args[-1]}: plugins: `lora` and `layernorm` both fill the "
        "role `adapter` (the plugin that wraps the model with trainable adapters), which one "
        "plugin fills in a run: keep one of them"]


def test_a_strangers_adapter_on_an_int8_base_is_found_by_its_role_and_trains(stranger,
                                                                             make_recipe):
    snapshot = testing.WeightSnapshot()
    summary, run = testing.run(make_recipe(plugins=["causal_lm", "int8", "layernorm"],
                                           train={"max_steps": 3}), extra_plugins=[snapshot])
    changed = snapshot.changed(run.model)
    assert changed and all("norm" in name for name in changed), changed  # only the norms
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    assert (run.dir / "adapter" / "adapter_config.json").exists()
    assert json.loads((run.dir / "adapter" / "adapter_config.json").read_text())[
        "peft_type"] == "LN_TUNING"


def test_int8_without_any_adapter_still_says_nothing_would_train(stranger, make_recipe):
    assert any("`int8` freezes the quantized base, so nothing would train" in p
               for p in problems(make_recipe(plugins=["causal_lm", "int8"])))


def test_a_strangers_task_beside_causal_lm_is_refused(stranger, make_recipe):
    found = problems(make_recipe(plugins=["causal_lm", "echo_task", "full"]))
    assert found == ["plugins: `causal_lm` and `echo_task` both fill the role `task` (the plugin "
                     "that turns records into examples and computes the loss), which one plugin "
                     "fills in a run: keep one of them"]


def test_a_declared_replacement_of_causal_lms_loss_is_the_loss(stranger, make_recipe):
    path = make_recipe(plugins=["causal_lm", "full", "focal_loss"], train={"max_steps": 1})
    focal, _ = testing.run(path)
    assert stranger.CALLS["focal_loss"] > 0
    cross_entropy, _ = testing.run(path, ["plugins=[causal_lm, full]", "output.name=ce"])
    # (1 - p)^2 * CE < CE for every token (p ~ 1/400 on the untrained model: 0.6% less, far
    # above run-to-run noise, which is none here): the focal loss, not causal_lm's, evaluated
    assert focal["eval_before"]["eval_loss"] < cross_entropy["eval_before"]["eval_loss"] - 0.01


def test_an_undeclared_second_answer_is_refused_naming_both_and_the_hook(stranger,
                                                                          make_recipe):
    found = problems(make_recipe(plugins=["causal_lm", "full", "rival_loss"]))
    assert found == ["plugins: `causal_lm` and `rival_loss` both answer plugtune_compute_loss, "
                     "which one plugin answers: keep one, or declare in `rival_loss` that it "
                     "replaces the other's answer: PLUGTUNE_REPLACES = {\"causal_lm\": "
                     "\"plugtune_compute_loss\"} (docs/plugins.md, Roles)"]


def test_a_default_yields_its_role_to_the_plugin_a_recipe_names(make_recipe):
    recipe, pm = testing.load_recipe(make_recipe(plugins=["causal_lm", "full", "adamw_8bit"]))
    assert recipe.roles["optimizer"] == ["adamw_8bit"]
    assert recipe.roles["scheduler"] == ["adamw"]  # adamw keeps the role nobody else fills
    answering = [i.plugin_name for i in pm.hook.plugtune_build_optimizer.get_hookimpls()]
    assert answering == ["adamw_8bit"]  # not a matter of registration order


def test_plugins_shows_roles_and_api_ranges(stranger_site):
    result = plugtune("plugins", sites=[stranger_site])
    lines = result.stdout.splitlines()
    assert lines[lines.index(next(x for x in lines if x.startswith("layernorm "))) + 2] == \
        "    roles: adapter, trainable  API: >=1.1,<2"
    assert lines[lines.index(next(x for x in lines if x.startswith("focal_loss "))) + 2] == \
        "    roles: -  replaces: causal_lm's plugtune_compute_loss  API: any"
    assert lines[lines.index(next(x for x in lines if x.startswith("nf4 "))) + 2] == \
        "    roles: packed-weights, quantizer  API: any"


@pytest.fixture(scope="module")
def twin_site(tmp_path_factory):
    return pip_install("plugtune-twin", tmp_path_factory)


def test_a_name_two_distributions_register_disables_only_that_name(stranger_site, twin_site,
                                                                    make_recipe):
    sites = [stranger_site, twin_site]
    listing = plugtune("plugins", sites=sites)
    assert listing.returncode == 3
    assert "twin  (plugtune-stranger and plugtune-twin)  BROKEN: plugin 'twin' is registered " \
           "by two distributions, plugtune-stranger 1.0.0 and plugtune-twin 0.1.0, so neither " \
           "is loaded" in listing.stdout.splitlines()
    assert {"layernorm", "causal_lm", "lora"} <= {line.split()[0] for line in
                                                  listing.stdout.splitlines()}
    assert plugtune("validate", make_recipe(), sites=sites).returncode == 0
    refused = plugtune("validate", make_recipe(plugins=["causal_lm", "full", "twin"]),
                       sites=sites)
    assert refused.returncode == 2
    assert "plugins: plugin 'twin' is registered by two distributions, plugtune-stranger " \
           "1.0.0 and plugtune-twin 0.1.0, so neither is loaded; uninstall one of them" \
           in refused.stderr


def test_bad_role_declarations_are_refused_naming_the_plugin(make_recipe):
    class Roles:
        PLUGTUNE_ROLES = 3

    with pytest.raises(Exception, match="plugin 'Roles'.*PLUGTUNE_ROLES = 3 is not a set"):
        testing.load_recipe(make_recipe(), extra_plugins=[Roles])


# ---------------------------------------------------------------------------------------------
# No plugin keeps a list of other plugins' names.
# ---------------------------------------------------------------------------------------------

PLUGINS = Path(__file__).parent.parent / "plugins"


def names_in_code(path, others):
    """Strings equal to another plugin's name used outside messages: not in an f-string, not
    a docstring, not in a ``Variant(...)`` (what ``plan --fit`` proposes to try)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.JoinedStr, ast.Expr)) or (
                isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Variant"):
            skip |= {id(n) for n in ast.walk(node)}
    return [f"{path.name}:{n.lineno}: {n.value!r}" for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and n.value in others and id(n) not in skip]


def test_no_plugin_module_names_another_plugin():
    names = set(manager.discover())
    found = []
    for path in sorted(PLUGINS.glob("*.py")):
        found += names_in_code(path, names - {path.stem})
    assert found == []


def test_the_check_catches_a_name_list(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""Doc: lora."""\nADAPTERS = ("lora", "ia3")\nmessage = f"use {1} lora"\n')
    assert names_in_code(sample, {"lora", "ia3"}) == ["sample.py:2: 'lora'", "sample.py:2: 'ia3'"]


def test_cli_validate_lists_a_role_conflict_with_other_problems(make_recipe, capsys):
    path = make_recipe(plugins=["causal_lm", "lora", "ia3"], train={"lr": "fast"})
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"`lora` and `ia3` both fill the role `adapter`", err)
    assert "train.lr:" in err and "Traceback" not in err
