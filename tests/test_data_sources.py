"""Data where users keep it: Parquet and Arrow files, a directory written by `save_to_disk`,
hub dataset ids (offline here: one clear line), `data.columns`, row-numbered errors, and the
manifest hashing what was read."""
import json
import os
import subprocess
import sys

import pytest

from plugtune import cli, testing
from plugtune.errors import RecipeError

from conftest import echo_records


def conversations(records):
    """The echo records with the conversation under another column name."""
    return [{"conversation": r["messages"], "id": i} for i, r in enumerate(records)]


@pytest.fixture
def saved_dataset(tmp_path):
    """A DatasetDict (train and validation) written by save_to_disk."""
    import datasets

    records = conversations(echo_records())
    path = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records),
                          "validation": datasets.Dataset.from_list(records[::4])}
                         ).save_to_disk(str(path))
    return path


def write_parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_arrow(path, records):
    import pyarrow as pa
    import pyarrow.feather as feather

    feather.write_feather(pa.Table.from_pylist(records), str(path))
    return path


def test_parquet_and_arrow_files_with_a_column_mapping(make_recipe, tmp_path):
    records = conversations(echo_records())
    train = write_parquet(tmp_path / "train.parquet", records)
    validation = write_arrow(tmp_path / "validation.arrow", records[::4])
    summary, run = testing.run(make_recipe(
        data={"train": str(train), "validation": str(validation),
              "columns": {"messages": "conversation"}}, train={"max_steps": 20},
        causal_lm={"exact_match": False}))
    assert len(run.data["train"].examples) == 32 and len(run.data["validation"].examples) == 8
    assert run.data["train"].records[2].where == f"{train}:row 3"
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    manifest = json.loads((run.dir / "manifest.json").read_text())
    assert set(manifest["data"]) == {str(train), str(validation)}


def test_a_saved_dataset_directory_gives_each_key_its_split(make_recipe, saved_dataset):
    recipe = make_recipe(data={"train": str(saved_dataset), "validation": str(saved_dataset),
                               "test": {"dataset": str(saved_dataset), "split": "validation"},
                               "columns": {"messages": "conversation"}},
                         train={"max_steps": 2}, causal_lm={"exact_match": False})
    summary, run = testing.run(recipe)
    assert len(run.data["train"].examples) == 32 and len(run.data["validation"].examples) == 8
    assert summary["test"]["test_loss"] == pytest.approx(summary["eval_after"]["eval_loss"])
    manifest = json.loads((run.dir / "manifest.json").read_text())
    assert list(manifest["data"]) == [str(saved_dataset)]  # one directory, hashed whole
    # a changed file of the directory changes its hash
    from plugtune import rundir

    before = rundir.sha256(saved_dataset)
    (saved_dataset / "train" / "state.json").write_text("{}")
    assert rundir.sha256(saved_dataset) != before


def test_a_missing_split_lists_the_saved_ones(make_recipe, saved_dataset, capsys):
    recipe = make_recipe(data={"train": str(saved_dataset),
                               "validation": {"dataset": str(saved_dataset), "split": "dev"},
                               "columns": {"messages": "conversation"}})
    assert cli.main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"data.validation: {saved_dataset}: no split 'dev'; it has train, validation" in err


def test_a_bad_row_is_named_by_file_and_row(make_recipe, tmp_path, capsys):
    rows = [{"prompt": "a", "completion": "b"}] * 3 + [{"prompt": "a", "completion": None}]
    train = write_parquet(tmp_path / "train.parquet", rows)
    assert cli.main(["validate", str(make_recipe(data={"train": str(train)}))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f'data.train: {train}:row 4: "completion" must be a string, got null' in err


def test_a_mapped_column_that_is_missing(make_recipe, tmp_path, capsys):
    train = write_parquet(tmp_path / "train.parquet", [{"text": "hello"}, {"text": "x"}])
    recipe = make_recipe(data={"train": str(train), "validation": str(train),
                               "columns": {"text": "body"}})
    assert cli.main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"data.train: {train}:row 1: no 'body' column (data.columns reads 'text' from it); " \
        "this record has ['text']" in err


def test_a_damaged_parquet_file(make_recipe, tmp_path):
    (tmp_path / "train.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(RecipeError, match=r"train.parquet: not a readable Parquet file"):
        testing.load_recipe(make_recipe(data={"train": "train.parquet"}))


def test_a_directory_that_is_not_a_saved_dataset(make_recipe, tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(RecipeError, match=r"folder: a directory, but not a dataset written by "
                       "save_to_disk"):
        testing.load_recipe(make_recipe(data={"train": str(tmp_path / "folder")}))


def test_a_hub_dataset_offline_is_one_line(make_recipe, tmp_path):
    recipe = make_recipe(data={"train": {"dataset": "someone/no-such-dataset", "config": "x",
                                         "split": "train"}})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "plugtune.cli", "validate", str(recipe)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [f"plugtune: error: {recipe}: data.train: dataset "
                     "someone/no-such-dataset/x:train: cannot load it: the hub is offline or "
                     "unreachable (HF_HUB_OFFLINE) and it is not in the datasets cache; "
                     "download it online first, or save it locally (save_to_disk, Parquet)"]


def test_a_dataset_entry_with_an_unknown_key(make_recipe, capsys):
    recipe = make_recipe(data={"train": {"dataset": "squad", "splt": "train"}})
    assert cli.main(["validate", str(recipe)]) == 2
    assert "unknown key 'splt' in a dataset entry (did you mean 'split'?)" in capsys.readouterr().err
