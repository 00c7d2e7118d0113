"""Fuzzing (hypothesis): random mutations of a valid recipe and of valid data files — wrong
types, missing and unknown keys, odd strings, other encodings, truncation, stray bytes — go
through ``plugtune validate`` and a one-step ``plugtune run`` on a tiny model. Every outcome is
success or a clear error: exit status 0 or 2, an error is ``plugtune: error: ...`` with no
traceback, and no file appears outside a run directory.

The examples are derandomized (the same cases on every run) and bounded so the file takes well
under a minute on two CPU cores; ``CASES`` is the count the README reports."""
import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings, strategies as st

from plugtune import cli

from conftest import echo_records

RECIPE_CASES, DATA_CASES, RUN_CASES = 60, 40, 12
CASES = RECIPE_CASES + DATA_CASES + RUN_CASES

FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture,
                                   HealthCheck.too_slow])

# --- what a mutation puts in place of a value ----------------------------------------------

ODD_TEXT = st.sampled_from(["", " ", "\x00", "../../etc", "~", "nan", "-1", "1e309", "\u202e",
                            "null", "é", "a" * 300, "runs/../..", "{", "[1, 2]", "\ud800x"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                    ODD_TEXT)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3),
                   st.dictionaries(st.text(max_size=8), SCALARS, max_size=3))


def base_recipe(model, train, validation):
    return {"description": "fuzzed", "model": str(model), "plugins": ["causal_lm", "full"],
            "data": {"train": str(train), "validation": str(validation)},
            "train": {"max_steps": 1, "lr": 1e-3, "batch_size": 4, "seed": 0},
            "causal_lm": {"exact_match": False},
            "output": {"dir": "runs", "name": "run"}}


def key_paths(tree, prefix=()):
    """Every key path of a nested mapping, sections included."""
    for key, value in tree.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from key_paths(value, prefix + (key,))


@st.composite
def recipe_mutations(draw, tree):
    """1-3 of: drop a key, give it another value, add an unknown key, make a value a list."""
    tree = json.loads(json.dumps(tree))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(key_paths(tree))
        path = draw(st.sampled_from(paths))
        *parents, leaf = path
        node = tree
        for p in parents:
            node = node[p]
        action = draw(st.sampled_from(["drop", "replace", "replace", "unknown", "listify"]))
        if action == "drop":
            del node[leaf]
        elif action == "replace":
            value = draw(VALUES)
            if leaf == "dir" and isinstance(value, str) and value.startswith(("/", "~")):
                value = "x" + value  # never aim a run at a real folder of this machine
            node[leaf] = value
        elif action == "unknown":
            node[draw(st.text(min_size=1, max_size=12))] = draw(SCALARS)
        else:
            node[leaf] = [node[leaf]]
    return tree


@st.composite
def data_mutations(draw):
    """A valid JSONL file's bytes, then: a record's field given another value or dropped,
    another encoding, truncation, or stray bytes."""
    records = json.loads(json.dumps(echo_records()[:8]))
    i = draw(st.integers(0, len(records) - 1))
    record = records[i]
    kind = draw(st.sampled_from(["field", "turn", "drop", "encoding", "truncate", "bytes",
                                 "text"]))
    if kind == "field":
        record["messages"] = draw(VALUES)
    elif kind == "turn":
        turn = record["messages"][draw(st.integers(0, 1))]
        turn[draw(st.sampled_from(["role", "content"]))] = draw(VALUES)
    elif kind == "drop":
        turn = record["messages"][draw(st.integers(0, 1))]
        del turn[draw(st.sampled_from(["role", "content"]))]
    elif kind == "text":
        records[i] = {"text": draw(VALUES)}
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    text = text.replace("Echo", "\u00c9cho")  # something to mis-encode
    raw = text.encode("utf-8")
    if kind == "encoding":
        raw = text.encode(draw(st.sampled_from(["latin-1", "utf-16", "utf-32", "cp1252"])))
    elif kind == "truncate":
        raw = raw[:draw(st.integers(0, len(raw)))]
    elif kind == "bytes":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    return raw


# --- running and judging one case ----------------------------------------------------------


def files_under(root):
    return {p for p in Path(root).rglob("*") if p.is_file() or p.is_symlink()}


def plugtune(*argv):
    """``(exit status, stderr)`` of ``plugtune ARGV`` in-process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


def check_case(folder, command, recipe):
    """Run one case in ``folder`` (the working directory too) and judge it."""
    before = files_under(folder)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        code, err = plugtune(command, recipe)
    finally:
        os.chdir(cwd)
    event(f"{command}: exit {code}")
    assert code in (0, 2), (code, err)
    if code:
        assert err.startswith("plugtune: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    new = files_under(folder) - before
    if command == "validate":
        assert not new, new
    else:
        # every new file lies in a run directory (one that holds a manifest)
        strays = [p for p in new if not any((d / "manifest.json").is_file()
                                            for d in p.parents if folder in d.parents)]
        assert not strays, strays
        assert code != 0 or any(p.name == "manifest.json" for p in new)
    return code


@pytest.fixture
def case_folder(tiny_llama, monkeypatch):
    """A factory of fresh folders holding valid data, with the hub offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    records = echo_records()

    @contextlib.contextmanager
    def make():
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            for name, rows in (("train.jsonl", records), ("validation.jsonl", records[::8])):
                (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
            yield folder, base_recipe(tiny_llama, folder / "train.jsonl",
                                      folder / "validation.jsonl")
    return make


def write(folder, tree):
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8",
                    errors="surrogatepass")
    return path


@settings(max_examples=RECIPE_CASES, **FUZZ)
@given(data=st.data())
def test_mutated_recipes_validate_or_say_why(case_folder, data):
    with case_folder() as (folder, tree):
        check_case(folder, "validate", write(folder, data.draw(recipe_mutations(tree))))


@settings(max_examples=DATA_CASES, **FUZZ)
@given(raw=data_mutations())
def test_mutated_data_validates_or_says_why(case_folder, raw):
    with case_folder() as (folder, tree):
        (folder / "train.jsonl").write_bytes(raw)
        code = check_case(folder, "validate", write(folder, tree))
        if code == 0:  # what validation passes, the run's reading and tokenizing accept too
            check_case(folder, "run", write(folder, tree))


@settings(max_examples=RUN_CASES, **FUZZ)
@given(data=st.data())
def test_mutated_recipes_run_one_step_or_say_why(case_folder, data):
    with case_folder() as (folder, tree):
        check_case(folder, "run", write(folder, data.draw(recipe_mutations(tree))))
