"""The ``data`` plugin: JSONL, JSON, CSV and text files become records that remember their file
and line; a malformed line stops the run naming file:line (exit 2, no run directory); without
``data.validation`` a seeded ``data.val_fraction`` is held out."""
import json

import pytest

from plugtune import cli, testing
from plugtune.errors import RecipeError


def read(make_recipe, **data):
    """The ``Splits`` the recipe's data phase reads (no model is loaded)."""
    train = data.pop("train_section", {})
    recipe, pm = testing.load_recipe(make_recipe(data=data, train=train))
    return pm.hook.plugtune_read_data(recipe=recipe)


def records(split):
    return [(r.data, r.where) for r in split]


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(make_recipe, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n   \n{"text": "three"}\n')
    splits = read(make_recipe, train=str(path), validation=str(path))
    assert records(splits.train) == [({"text": "one"}, f"{path}:1"),
                                     ({"text": "two"}, f"{path}:3"),
                                     ({"text": "three"}, f"{path}:5")]


def test_json_list_or_single_key_wrapper(make_recipe, tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    (tmp_path / "list.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    splits = read(make_recipe, train=str(tmp_path / "list.json"),
                  validation=str(tmp_path / "wrapped.json"))
    assert records(splits.train) == [(rows[0], f"{tmp_path / 'list.json'}:1"),
                                     (rows[1], f"{tmp_path / 'list.json'}:2")]
    assert [r.data for r in splits.validation] == rows


def test_csv_header_quoted_fields_and_line_numbers(make_recipe, tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('prompt,completion\n"Capital of France, please?",Paris\n'
                    '"two\nlines",yes\nplain,no\n')
    splits = read(make_recipe, train=str(path), validation=str(path))
    assert records(splits.train) == [
        ({"prompt": "Capital of France, please?", "completion": "Paris"}, f"{path}:2"),
        ({"prompt": "two\nlines", "completion": "yes"}, f"{path}:4"),
        ({"prompt": "plain", "completion": "no"}, f"{path}:5")]


def test_text_one_record_per_non_empty_line(make_recipe, tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\n\nsecond line  \n")
    splits = read(make_recipe, train=str(path), validation=str(path))
    assert records(splits.train) == [({"text": "first line"}, f"{path}:1"),
                                     ({"text": "second line  "}, f"{path}:3")]


def test_several_files_of_several_kinds(make_recipe, tmp_path):
    testing.write_jsonl(tmp_path / "a.jsonl", [{"text": "from jsonl"}])
    (tmp_path / "b.txt").write_text("from text\n")
    splits = read(make_recipe, train=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")],
                  validation=str(tmp_path / "b.txt"))
    assert [r.data["text"] for r in splits.train] == ["from jsonl", "from text"]


BAD_FILES = {
    "malformed JSONL line": ("train.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n',
                             "train.jsonl:3: not valid JSON"),
    "JSONL record not an object": ("train.jsonl", '{"text": "ok"}\n[1, 2]\n',
                                   "train.jsonl:2: a record must be a JSON object"),
    "CSV row with too many columns": ("train.csv", "prompt,completion\na,b\nc,d,e\n",
                                      "train.csv:3: expected 2 columns (prompt, completion)"),
    "CSV row with too few columns": ("train.csv", "prompt,completion\na\n",
                                     "train.csv:2: expected 2 columns"),
    "malformed JSON": ("train.json", '[\n  {"text": "a"},\n  {"text": }\n]\n',
                       "train.json:3: not valid JSON"),
    "JSON not a list": ("train.json", '{"a": 1, "b": 2}', "train.json: a .json data file holds "
                        "a list of records"),
    "empty file": ("train.jsonl", "\n\n", "train.jsonl: no records"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_data_stops_the_run_naming_file_and_line(case, make_recipe, tmp_path, capsys):
    """Caught by validation (the files are read then), before any model or tokenizer loads."""
    name, text, expected = BAD_FILES[case]
    (tmp_path / name).write_text(text)
    recipe = make_recipe(data={"train": name})
    for command in ("validate", "run"):
        assert cli.main([command, str(recipe)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("plugtune: error: ")
        assert f"data.train: {tmp_path}/{expected}" in err
    assert not (tmp_path / "runs").exists()


def test_unknown_file_type_is_a_recipe_problem(make_recipe, tmp_path):
    (tmp_path / "train.xlsx").write_bytes(b"PK")
    with pytest.raises(RecipeError, match=r"data.train: \S+train.xlsx: unknown data file type"):
        testing.load_recipe(make_recipe(data={"train": "train.xlsx"}))


def test_val_fraction_holds_out_a_seeded_share(make_recipe, tmp_path):
    rows = [{"text": f"record {i}"} for i in range(20)]
    path = testing.write_jsonl(tmp_path / "all.jsonl", rows)

    def split(seed):
        s = read(make_recipe, train=str(path), validation=None, val_fraction=0.25,
                 train_section={"seed": seed})
        return [r.data["text"] for r in s.train], [r.data["text"] for r in s.validation]

    train, validation = split(seed=0)
    assert (len(train), len(validation)) == (15, 5)
    assert sorted(train + validation) == sorted(r["text"] for r in rows)
    assert split(seed=0) == (train, validation)
    assert set(split(seed=1)[1]) != set(validation)


def test_too_few_records_to_split(make_recipe, tmp_path):
    path = testing.write_jsonl(tmp_path / "one.jsonl", [{"text": "alone"}])
    # said by validate, which has the data plugin read the records
    with pytest.raises(RecipeError, match="data.train: 1 record.s. cannot be split"):
        read(make_recipe, train=str(path), validation=None)
