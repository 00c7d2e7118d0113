"""One public API: what a built-in plugin imports from plugtune, a stranger may import too. Every
import under plugins/ is of a public name (exported from ``plugtune``, in ``__all__``) or of a
public module (``plugtune.PUBLIC_MODULES``); each public name and module is documented in
docs/plugins.md."""
import ast
import importlib
import re
from pathlib import Path

import pytest

import plugtune

ROOT = Path(__file__).parent.parent
PLUGINS = ROOT / "plugins"
DOC = (ROOT / "docs" / "plugins.md").read_text()

def imports(path):
    """``(module, name or None, line)`` of every import of plugtune in a file; ``from plugtune
    import x`` gives ``("plugtune", "x")``, ``from plugtune.plugins import m`` gives
    ``("plugtune.plugins", "m")``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("plugtune"):
            out += [(node.module, a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names
                    if a.name.startswith("plugtune")]
    return out


def problem(module, name):
    """Why importing ``name`` from ``module`` is not the public API, or None."""
    public = set(plugtune.PUBLIC_MODULES)
    if module == "plugtune":
        if name in plugtune.__all__ or f"plugtune.{name}" in public:
            return None
        return f"plugtune.{name} is not in plugtune.__all__"
    if module == "plugtune.plugins":
        module, name = f"{module}.{name}", None  # a module of plugins/, imported as a whole
    if module not in public:
        return f"{module} is not a public module"
    if name is not None and name.startswith("_"):
        return f"{module}.{name} is private"
    return None


def found(path):
    """``{(module, message)}`` of a file's imports that are not the public API."""
    return {(f"{module}.{name}" if module == "plugtune.plugins" else module,
             f"{path.name}:{line}: {why}")
            for module, name, line in imports(path) if (why := problem(module, name))}


@pytest.mark.parametrize("path", sorted(PLUGINS.glob("*.py")), ids=lambda p: p.name)
def test_plugins_import_only_the_public_api(path):
    assert sorted(why for _, why in found(path)) == []


def test_the_check_catches_private_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from plugtune import hookimpl, Section\n"
                      "from plugtune.rundir import atomic_write\n"
                      "from plugtune.plugins import _peft\n"
                      "from plugtune.loss import _chunks\n"
                      "import plugtune.signals\n")
    assert sorted(why for _, why in found(sample)) == [
        "sample.py:2: plugtune.rundir is not a public module",
        "sample.py:3: plugtune.plugins._peft is not a public module",
        "sample.py:4: plugtune.loss._chunks is private",
        "sample.py:5: plugtune.signals is not a public module"]


@pytest.mark.parametrize("name", plugtune.__all__)
def test_each_public_name_exists_and_is_documented(name):
    assert getattr(plugtune, name) is not None
    if name != "__version__":
        assert re.search(rf"`(plugtune\.)?{name}\b", DOC), f"{name} is not in docs/plugins.md"


@pytest.mark.parametrize("module", plugtune.PUBLIC_MODULES)
def test_each_public_module_imports_and_is_documented(module):
    importlib.import_module(module)
    assert f"`{module}`" in DOC, f"{module} is not in docs/plugins.md"


def test_api_1_0_import_paths_still_work():
    """API 1.1 added names only: what 1.0 plugins (and the built-ins before 1.1) imported."""
    from plugtune.plugins import _generation_metrics, _heads, _kbit, _peft
    from plugtune.plugins.peft_family import AdapterSection
    from plugtune.recipe import Section, float16_training_problem, is_file  # noqa: F401
    from plugtune.rundir import atomic_write, sha256  # noqa: F401

    assert _peft.AdapterSection is AdapterSection and callable(_peft.plugtune_save_model)
    assert callable(_heads.label_ids) and callable(_kbit.prepare)
    assert _generation_metrics.score(["exact_match"], ["A."], ["a"]) == {"exact_match": 1.0}
    assert plugtune.Section is Section and plugtune.API_VERSION == "1.4"


@pytest.mark.parametrize("task", ["sequence_classification", "token_classification",
                                  "question_answering"])
def test_a_tiny_encoder_for_head_plugins(tmp_path, task):
    """``plugtune.testing.tiny_encoder``: a BERT-style model every head class loads, which a
    head trains on in seconds (what a third party's head plugin tests on)."""
    from test_heads import GROUPS, head_recipe, toy_tags, toy_texts
    from test_question_answering import toy_qa

    from plugtune import testing

    records = {"sequence_classification": toy_texts, "token_classification": toy_tags,
               "question_answering": toy_qa}[task]()
    corpus = [" ".join(w for ws in GROUPS.values() for w in ws)] + [
        r.get("text") or " ".join(r.get("tokens") or [r["context"], r["question"]])
        for r in records]
    model = testing.tiny_encoder(tmp_path / "encoder", corpus=corpus)
    sections = {"train": {"max_length": 32, "lr": 1e-3, "max_steps": 20}}
    if task == "question_answering":
        sections["question_answering"] = {"stride": 8, "max_answer_length": 4}
    summary, run = testing.run(head_recipe(tmp_path, model, task, records, **sections))
    assert type(run.model).__name__.startswith("BertFor")
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
