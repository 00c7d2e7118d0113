"""Bad input as a careless, hurried or hostile user gives it (issue 13): each case is one
clear ``plugtune: error:`` line naming the recipe key, file (and line) or path at fault, exit
status 2, no traceback, and nothing written — no run directory, no hidden temporary folder.
Cases that can be known without loading a model are caught by ``plugtune validate``."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from plugtune import cli, rundir
from plugtune.recipe import load_recipe


def plugtune_cli(capsys, *argv):
    """``(exit status, stdout, stderr)`` of ``plugtune ARGV``, run in-process."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code, err, *expected, runs=None):
    """Exit 2, one ``plugtune: error:`` message containing ``expected``, no traceback, and
    (given ``runs``) no run directory nor temporary leftover under it."""
    assert code == 2, err
    assert err.startswith("plugtune: error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    if runs is not None:
        assert not Path(runs).exists() or not any(Path(runs).iterdir()), list(Path(runs).iterdir())


def validate_and_run(capsys, recipe, *overrides, expected=(), runs=None, flags=()):
    """The same refusal from ``validate`` and from ``run``."""
    for command in ("validate", "run"):
        code, _, err = plugtune_cli(capsys, command, recipe, *overrides, *flags)
        assert_refused(code, err, *expected, runs=runs)
    return err


# --- recipe keys ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, 2 ** 32])
def test_seed_out_of_range(seed, make_recipe, capsys, tmp_path):
    validate_and_run(capsys, make_recipe(), f"train.seed={seed}",
                     expected=["train.seed:"], runs=tmp_path / "runs")


@pytest.mark.parametrize("name", ["../escape", "{tmp}/abs", "", "a/b", ".", ".."])
def test_output_name_is_one_path_component(name, make_recipe, capsys, tmp_path):
    name = name.format(tmp=tmp_path)
    target = tmp_path / "runs" / name  # where a run named so would land ("{tmp}/abs": there)
    err = validate_and_run(capsys, make_recipe(output={"name": name}),
                           expected=["output.name:", "single"], runs=tmp_path / "runs")
    assert "already exists" not in err
    if name not in ("", ".", ".."):  # those name folders that exist anyway
        assert not target.exists(), target


def test_output_dir_under_a_file(make_recipe, capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    err = validate_and_run(capsys, make_recipe(output={"dir": str(tmp_path / "afile" / "runs")}),
                           expected=["output.dir:", "afile", "not a directory"])
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("where", ["/proc/plugtune-runs", "/sys/runs"])
def test_output_dir_in_a_virtual_file_system(where, make_recipe, capsys):
    validate_and_run(capsys, make_recipe(output={"dir": where}),
                     expected=["output.dir:", where.split("/")[1]])


def test_model_dtype_override_on_the_string_shorthand(make_recipe, capsys, tmp_path):
    recipe, _ = load_recipe(make_recipe(), ["model.dtype=bfloat16"])
    assert recipe.model.dtype == "bfloat16" and Path(recipe.model.name).is_dir()


def test_extends_of_a_missing_file_names_the_recipe(make_recipe, capsys, tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("extends: nowhere.yaml\ntrain: {lr: 1e-3}\n")
    code, _, err = plugtune_cli(capsys, "validate", child)
    assert_refused(code, err, str(child), "extends:", "nowhere.yaml")


@pytest.mark.parametrize("key, suggestion", [
    ("train.learning_rate", "lr"), ("train.num_train_epochs", "epochs"),
    ("train.num_epochs", "epochs"), ("train.gradient_accumulation_steps", "grad_accum"),
    ("train.per_device_train_batch_size", "batch_size"), ("train.micro_batch_size", "batch_size"),
    ("train.warmup_ratio", None), ("train.lr_scheduler_type", "schedule"),
    ("train.sequence_len", "max_length"), ("output.output_dir", "dir"),
])
def test_names_from_other_tools_get_a_did_you_mean(key, suggestion, make_recipe, capsys):
    code, _, err = plugtune_cli(capsys, "validate", make_recipe(), f"{key}=1")
    assert_refused(code, err, f"{key}: unknown key")
    if suggestion:
        assert f"did you mean {suggestion!r}" in err


# --- data files ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix, content", [
    (".jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1")),
    (".txt", "line one\nna\u00efve line\n".encode("latin-1")),
    (".csv", "text\nd\u00e9j\u00e0 vu\n".encode("latin-1")),
    (".json", '[{"text": "\u00fcber"}]'.encode("latin-1")),
])
def test_non_utf8_data_names_the_file_and_line(suffix, content, make_recipe, capsys, tmp_path):
    bad = tmp_path / f"latin1{suffix}"
    bad.write_bytes(content)
    validate_and_run(capsys, make_recipe(data={"train": str(bad)}),
                     expected=[str(bad), "UTF-8"], runs=tmp_path / "runs")


@pytest.mark.parametrize("record, expected", [
    ({"text": None}, '"text" must be a string'),
    ({"text": 42}, '"text" must be a string'),
    ({"messages": [{"role": "user", "content": ["a", "list"]},
                   {"role": "assistant", "content": "x"}]}, "content must be a string"),
    ({"messages": [{"role": "user", "content": None},
                   {"role": "assistant", "content": "x"}]}, "content must be a string"),
    ({"messages": [{"role": "wizard", "content": "hi"},
                   {"role": "assistant", "content": "x"}]}, "unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
     "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
])
def test_bad_records_name_the_line(record, expected, make_recipe, capsys, tmp_path, echo_data):
    bad = tmp_path / "bad.jsonl"
    good = echo_data[0].read_text()
    bad.write_text(good + json.dumps(record) + "\n")
    line = len(good.splitlines()) + 1
    code, _, err = plugtune_cli(capsys, "run", make_recipe(data={"train": str(bad)}))
    assert_refused(code, err, f"{bad}:{line}", expected, runs=tmp_path / "runs")
    assert "truncation" not in err


@pytest.mark.parametrize("record", [{"question": "a", "answer": "b"}, {"prompt": "no answer"},
                                    {"completion": "no prompt"}])
def test_validate_refuses_a_record_a_causal_lm_cannot_use(record, make_recipe, capsys, tmp_path,
                                                          echo_data):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(echo_data[0].read_text() + json.dumps(record) + "\n")
    line = len(echo_data[0].read_text().splitlines()) + 1
    code, _, err = plugtune_cli(capsys, "validate", make_recipe(data={"train": str(bad)}))
    assert_refused(code, err, f"{bad}:{line}: a causal_lm record needs \"text\"",
                   str(sorted(record)))


@pytest.mark.parametrize("line, expected", [
    ('{"text": "cut here"', "Expecting ',' delimiter at column 20, where the line ends: is it "
                            "cut short?"),
    ('{"text": "cut', "Unterminated string starting at column 10; the line ends inside it"),
    ('{"text" "x"}', "Expecting ':' delimiter at column 9)"),
])
def test_a_json_error_names_its_column(line, expected, make_recipe, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a whole line"}\n' + line + "\n")
    code, _, err = plugtune_cli(capsys, "validate", make_recipe(data={"train": str(bad)}))
    assert_refused(code, err, f"{bad}:2: not valid JSON ({expected}")


@pytest.mark.parametrize("where", ["missing", "file", "empty"])
def test_resume_of_a_path_that_is_no_run_directory_exits_2(where, capsys, tmp_path):
    path = tmp_path / where
    if where == "file":
        path.write_text("not a run\n")
    elif where == "empty":
        path.mkdir()
    code, _, err = plugtune_cli(capsys, "resume", path)
    assert_refused(code, err, f"{path}: not a run directory")


def test_roles_are_configurable(make_recipe, tmp_path, echo_data):
    from plugtune import testing

    records = [{"messages": [{"role": "narrator", "content": "Once"},
                             {"role": "user", "content": "Echo: a"},
                             {"role": "assistant", "content": "A"}]}] * 8
    data = testing.write_jsonl(tmp_path / "roles.jsonl", records)
    recipe = make_recipe(data={"train": str(data), "validation": str(data)},
                         train={"max_steps": 1},
                         causal_lm={"roles": ["narrator", "user", "assistant"]})
    summary, run = testing.run(recipe)
    assert summary["steps"] == 1


# --- model sources -------------------------------------------------------------------------


def test_a_relative_path_that_looks_local_is_checked_as_one(make_recipe, capsys, tmp_path,
                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    validate_and_run(capsys, make_recipe(model="models/nothing-here"),
                     expected=["model.name:", "models/nothing-here", "does not exist"],
                     runs=tmp_path / "runs")


@pytest.mark.parametrize("name", ["nowhere/model", "HuggingFaceTB/SmolLM2-135M-Instrcut"])
def test_hub_id_while_offline_is_one_line(name, make_recipe, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    err = validate_and_run(capsys, make_recipe(model=name),
                           expected=["model.name:", name, "offline"], runs=tmp_path / "runs")
    assert len(err.strip().splitlines()) <= 2


def test_not_a_gguf_file(make_recipe, capsys, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("this is a text file, not a model\n")
    validate_and_run(capsys, make_recipe(model=str(fake)),
                     expected=["model.name:", str(fake), "GGUF"], runs=tmp_path / "runs")


@pytest.fixture
def custom_code_model(tmp_path, tiny_llama):
    """A copy of the tiny model whose config asks for custom code (``auto_map``)."""
    import shutil

    path = tmp_path / "custom"
    shutil.copytree(tiny_llama, path)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "modeling_evil.py").write_text(
        "import pathlib\npathlib.Path('PWNED').write_text('ran')\n")
    (path / "configuration_evil.py").write_text(
        "import pathlib\npathlib.Path('PWNED').write_text('ran')\n")
    return path


@pytest.mark.parametrize("command", ["validate", "run", "plan"])
def test_custom_code_needs_the_flag(command, custom_code_model, make_recipe, capsys, tmp_path,
                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = plugtune_cli(capsys, command, make_recipe(model=str(custom_code_model)))
    assert_refused(code, err, "model.name:", "auto_map", "--trust-remote-code",
                   runs=tmp_path / "runs")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("command", ["validate", "run", "plan"])
def test_trust_remote_code_in_a_recipe_alone_is_refused(command, make_recipe, capsys, tmp_path):
    recipe = make_recipe(model={"name": str(tmp_path / "x"), "trust_remote_code": True})
    code, _, err = plugtune_cli(capsys, command, recipe)
    assert_refused(code, err, "model.trust_remote_code:", "--trust-remote-code",
                   runs=tmp_path / "runs")


def test_trust_remote_code_arriving_through_extends_is_refused(make_recipe, capsys, tmp_path):
    parent = make_recipe("parent.yaml", model={"name": "org/model", "trust_remote_code": True})
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {parent.name}\n")
    code, _, err = plugtune_cli(capsys, "validate", child)
    assert_refused(code, err, "model.trust_remote_code:", "--trust-remote-code")


def test_the_flag_is_recorded_in_the_manifest(make_recipe, capsys, tmp_path):
    code, _, err = plugtune_cli(capsys, "run", make_recipe(train={"max_steps": 1}),
                                "--trust-remote-code")
    assert code == 0, err
    manifest = json.loads((tmp_path / "runs" / "run" / "manifest.json").read_text())
    assert manifest["trust_remote_code"] is True
    # a run directory that says trust_remote_code: true is reloaded only with the flag too
    code, _, err = plugtune_cli(capsys, "generate", tmp_path / "runs" / "run", "hi",
                                "--max-new-tokens", "2")
    assert_refused(code, err, "model.trust_remote_code:", "--trust-remote-code")
    code, out, err = plugtune_cli(capsys, "generate", tmp_path / "runs" / "run", "hi",
                                  "--max-new-tokens", "2", "--trust-remote-code")
    assert code == 0, err
    (tmp_path / "afile").write_text("x")
    code, _, err = plugtune_cli(capsys, "export", tmp_path / "runs" / "run",
                                tmp_path / "afile" / "out", "--trust-remote-code")
    assert_refused(code, err, f"{tmp_path / 'afile' / 'out'}: cannot create it")


def test_malicious_pickle_is_refused_in_one_line(make_recipe, capsys, tmp_path, tiny_llama):
    import shutil

    path = tmp_path / "pickled"
    shutil.copytree(tiny_llama, path)
    (path / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))

    (path / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Evil()}))
    code, _, err = plugtune_cli(capsys, "run", make_recipe(model=str(path)),
                                f"output.dir={tmp_path / 'runs'}")
    assert_refused(code, err, "pytorch_model.bin", runs=tmp_path / "runs")
    assert not Path("PWNED").exists()


# --- run directories -----------------------------------------------------------------------


def test_racing_runs_the_loser_is_told_it_exists(make_recipe, tmp_path):
    """Three processes, each past validation, create the same run directory at once: one
    wins, the others get a clear "already exists"; no hidden temporary folder is left."""
    import time

    recipe, go = make_recipe(), tmp_path / "go"
    script = ("import sys, time, pathlib\nfrom plugtune import recipe as r, rundir\n"
              "from plugtune.errors import PlugtuneError\n"
              "rec, _ = r.load_recipe(sys.argv[1])\n"
              "pathlib.Path(sys.argv[2] + sys.argv[3]).touch()\n"
              "while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.001)\n"
              "try:\n    print(rundir.create(rec))\nexcept PlugtuneError as e:\n"
              "    print('refused:', e)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(recipe), str(go), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    deadline = time.time() + 120
    while not all(Path(f"{go}{i}").exists() for i in range(3)) and time.time() < deadline:
        time.sleep(0.01)
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert all("Traceback" not in err for _, err in results), results
    outs = [out for out, _ in results]
    assert sum(not o.startswith("refused:") for o in outs) == 1, outs
    assert all("output.name:" in o and "already exists" in o
               for o in outs if o.startswith("refused:")), outs
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["run"]
    made = {p.name for p in (tmp_path / "runs" / "run").iterdir()}
    assert made - {rundir.LOCK} == {"recipe.yaml", "manifest.json"}  # the winner's lock stays


def test_stale_temporary_run_folders_are_cleaned(make_recipe, tmp_path):
    runs = tmp_path / "runs"
    (runs / ".run.ab12cd34").mkdir(parents=True)
    (runs / ".run.ab12cd34" / "recipe.yaml").write_text("half")
    (runs / ".other-run.zz99zz99").mkdir()
    recipe, _ = load_recipe(make_recipe())
    final = rundir.create(recipe)
    assert final == runs / "run"
    assert not (runs / ".run.ab12cd34").exists()
    assert (runs / ".other-run.zz99zz99").exists()  # another name's: not ours to judge


def test_default_names_in_the_same_second_do_not_collide(make_recipe, tmp_path):
    recipe, _ = load_recipe(make_recipe(), ["output.name=null"])
    made = [rundir.create(recipe) for _ in range(3)]
    assert len(set(made)) == 3 and all(p.parent == tmp_path / "runs" for p in made)
    assert not [p for p in (tmp_path / "runs").iterdir() if p.name.startswith(".")]


def test_git_runs_without_hooks_or_fsmonitor(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for argv in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(["git", "-C", str(repo), *argv], check=True, env=env)
    marker = tmp_path / "FSMONITOR-RAN"
    hook = tmp_path / "fsmonitor.sh"
    hook.write_text(f"#!/bin/sh\ntouch {marker}\n")
    hook.chmod(0o755)
    subprocess.run(["git", "-C", str(repo), "config", "core.fsmonitor", str(hook)], check=True)
    (repo / "new-file").write_text("dirty")
    revision = rundir._git_revision(repo)
    assert revision and revision.endswith("-dirty")
    assert not marker.exists()


# --- SIGTERM during the GGUF conversion ----------------------------------------------------


@pytest.mark.slow
def test_sigterm_during_gguf_conversion_leaves_no_temporary_folder(smollm2, tmp_path):
    import signal
    import time

    cache = tmp_path / "cache"
    script = ("import sys\nfrom plugtune.plugins import hf\n"
              "hf.local_model_dir(sys.argv[1])\n")
    env = {**os.environ, "PLUGTUNE_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, "-c", script, smollm2], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list((cache / "gguf").glob(".*")) if (cache / "gguf").is_dir() else []:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the conversion ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not list((cache / "gguf").glob(".*"))
    assert not list((cache / "gguf").glob("*"))
