"""Recipe handling in parts: validation finds structured problems (the key at fault, what is
wrong, where in a file), the command line renders each as one line, and loading keeps its
bounds. The texts are those users see (tests/test_recipes.py runs them through the CLI)."""
import pytest

from plugtune import cli, recipe as recipes
from plugtune.errors import Problem, RecipeError, render


def problems_of(path, *overrides):
    """The structured problems ``load_recipe`` raises for a recipe."""
    with pytest.raises(RecipeError) as info:
        recipes.load_recipe(path, overrides)
    assert info.value.problems == [str(p) for p in info.value.details]
    return info.value.details


def test_an_unknown_key_is_its_key_and_a_did_you_mean(make_recipe):
    found = problems_of(make_recipe(train={"lrr": 1e-3, "learning_rate": 1e-3}, lr=1e-3))
    assert Problem("train.lrr", "unknown key (did you mean 'lr'?)") in found
    # another tool's name for a key, and a core key put at the top level
    assert Problem("train.learning_rate", "unknown key (did you mean 'lr'?)") in found
    assert Problem("lr", "unknown key (did you mean 'train.lr'?)") in found
    assert len(found) == 3


def test_a_wrong_type_names_the_key_and_quotes_the_value(make_recipe):
    [problem] = problems_of(make_recipe(train={"batch_size": "eight"}))
    assert problem.key == "train.batch_size" and problem.where is None
    assert problem.message.startswith("Input should be a valid integer")
    assert problem.message.endswith("(got 'eight')")


def test_a_missing_data_file_is_the_data_key(make_recipe, tmp_path):
    [problem] = problems_of(make_recipe(data={"train": "missing.jsonl"}))
    assert problem == Problem("data.train", f"file not found: {tmp_path / 'missing.jsonl'}; "
                              "paths in a recipe are relative to the recipe file, on the command "
                              "line to the cwd")


def test_a_role_conflict_is_a_plugins_problem_naming_both(make_recipe):
    [problem] = problems_of(make_recipe(plugins=["causal_lm", "full", "freeze"],
                                        freeze={"last_n_blocks": 1}))
    assert problem.key == "plugins" and problem.section == "plugins"
    assert problem.message.startswith("`full` and `freeze` both fill the role `trainable`")


def test_a_plugins_check_line_becomes_a_problem_of_its_section(make_recipe):
    [problem] = problems_of(make_recipe(plugins=["causal_lm", "freeze"], freeze={}))
    assert problem.key == "freeze" and problem.message.startswith("says nothing to freeze")


def test_each_problem_is_one_line_of_the_cli_and_exit_2(make_recipe, capsys):
    path = make_recipe(train={"lrr": 1, "batch_size": "eight"}, data={"train": "missing.jsonl"})
    found = problems_of(path)
    assert cli.main(["validate", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"plugtune: error: {len(found)} problem(s) in {path}:"] + [
        f"  - {p.key}: {p.message}" for p in found]
    assert [p.key for p in found] == ["train.lrr", "train.batch_size", "data.train"]


def test_one_problem_is_one_line_with_its_source():
    problem = Problem("train.lr", "Input should be greater than 0 (got -1)")
    assert render([problem], "r.yaml") == \
        "r.yaml: train.lr: Input should be greater than 0 (got -1)"
    assert str(RecipeError([problem], "r.yaml")) == render([problem], "r.yaml")
    assert str(Problem(None, "not UTF-8 text", "r.yaml:3")) == "r.yaml:3: not UTF-8 text"


@pytest.mark.parametrize("line", ["lora.r: must be > 0", "plugins: `a` and `b` both fill it",
                                  "override 'x': expected KEY=VALUE", "no colon at all", ": x"])
def test_a_line_parses_into_a_problem_that_renders_it_back(line):
    assert str(Problem.parse(line)) == line


def test_parse_takes_a_key_only_where_the_head_is_one():
    assert Problem.parse("lora.r: must be > 0") == Problem("lora.r", "must be > 0")
    assert Problem.parse("override 'x': bad").key is None


def test_a_long_problem_is_cut_as_a_line_with_its_key_kept():
    problem = Problem("train.lr", "x" * 5000, "r.yaml")
    cut = problem.capped(recipes.LINE_CHARS)
    assert str(cut) == str(problem)[:recipes.LINE_CHARS] + "... (cut)"
    assert (cut.key, cut.where) == ("train.lr", "r.yaml")
    assert problem.capped(10_000) is problem


def load_refused(path):
    with pytest.raises(RecipeError) as info:
        recipes.load_tree(path)
    [problem] = info.value.details
    return problem


def test_an_alias_bomb_is_refused_by_the_file(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    problem = load_refused(path)
    assert problem.where == str(path) and problem.key is None
    assert problem.message.startswith("its aliases (*NAME) expand to more than 100,000 values")


def test_deep_nesting_is_refused_at_its_line(tmp_path):
    path = tmp_path / "deep.yaml"
    nested = "".join(f"{'  ' * i}b:\n" for i in range(1, 80))
    path.write_text(f"a:\n{nested}{'  ' * 80}c: 1\n")
    problem = load_refused(path)
    assert problem.where.startswith(f"{path}:") and problem.where != str(path)
    assert problem.message.startswith(f"nested more than {recipes.MAX_DEPTH} levels deep")


def test_a_file_over_the_size_bound_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * recipes.MAX_RECIPE_BYTES + "\n")
    problem = load_refused(path)
    assert problem.where == str(path)
    size = path.stat().st_size
    assert problem.message.startswith(f"{size:,} bytes; a recipe is at most 1 MiB")


def test_bytes_that_are_not_utf8_are_refused_at_line_and_column(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"description: ok\nmodel: caf\xe9\n")
    assert load_refused(path) == Problem(None, "not UTF-8 text (byte 0xe9 at column 11); save "
                                         "the file as UTF-8", f"{path}:2")


def test_an_extends_cycle_is_the_extends_key(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    problem = load_refused(tmp_path / "a.yaml")
    assert problem.key == "extends" and problem.message.startswith("cycle ")
    a, b = (tmp_path / "a.yaml").resolve(), (tmp_path / "b.yaml").resolve()
    assert problem == Problem("extends", f"cycle {a} -> {b} -> {a}", str(a))


def test_overrides_apply_and_a_bad_one_is_one_problem():
    tree = recipes.apply_overrides({"model": "m", "train": {"lr": 1}}, ["train.lr=0.0001"])
    assert tree["train"]["lr"] == 0.0001 and tree["model"] == {"name": "m"}
    with pytest.raises(RecipeError) as info:
        recipes.apply_overrides({}, ["train.lr"])
    assert info.value.details == [Problem(None, "override 'train.lr': expected KEY=VALUE, e.g. "
                                          "train.lr=1e-4")]
