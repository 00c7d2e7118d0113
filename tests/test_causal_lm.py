"""``causal_lm``: what is learnt in each record format (all of a text, only the completion,
only the assistant turns, checked against the tokenizer's own chat template), truncation
counted and reported, unusable records named; and end to end on a tiny GPT-2 and a tiny
Llama, the loss falls."""
import json
from pathlib import Path

import pytest

from plugtune import loop, testing
from plugtune.data import Record
from plugtune.errors import DataError
from plugtune.plugins.causal_lm import IGNORE

CONVERSATION = [
    {"role": "system", "content": "Answer in capitals."},
    {"role": "user", "content": "Echo: apple"},
    {"role": "assistant", "content": "APPLE"},
    {"role": "user", "content": "Echo: river stone"},
    {"role": "assistant", "content": "RIVER STONE"},
]


@pytest.fixture
def tokenize(make_recipe):
    """``tokenize(*data, **train) -> (Tokenized, tokenizer)`` through the recipe's hooks."""
    def run(*data, **train):
        recipe, pm = testing.load_recipe(make_recipe(train=train))
        tokenizer = pm.hook.plugtune_load_tokenizer(recipe=recipe)
        records = [Record(d, "data.jsonl", i) for i, d in enumerate(data, 1)]
        return pm.hook.plugtune_tokenize(records=records, tokenizer=tokenizer, recipe=recipe,
                                         split="train"), tokenizer
    return run


def learnt_spans(example, tokenizer):
    """The decoded runs of tokens that carry a label."""
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    return [tokenizer.decode(s) for s in spans]


def test_text_is_learnt_whole_and_ends_with_eos(tokenize):
    data, tokenizer = tokenize({"text": "Echo: apple APPLE"})
    example = data.examples[0]
    assert tokenizer.decode(example["input_ids"]) == "Echo: apple APPLE<|im_end|>"
    assert example["labels"] == example["input_ids"]


def test_prompt_completion_learns_only_the_completion(tokenize):
    data, tokenizer = tokenize({"prompt": "Echo: apple\n", "completion": "APPLE"})
    example = data.examples[0]
    assert tokenizer.decode(example["input_ids"]) == "Echo: apple\nAPPLE<|im_end|>"
    assert learnt_spans(example, tokenizer) == ["APPLE<|im_end|>"]
    assert example["reference"] == "APPLE"
    assert tokenizer.decode(example["prompt_ids"]) == "Echo: apple\n"


def test_messages_learn_only_assistant_turns_of_the_chat_template(tokenize):
    data, tokenizer = tokenize({"messages": CONVERSATION})
    example = data.examples[0]
    assert example["input_ids"] == tokenizer.apply_chat_template(CONVERSATION)["input_ids"]
    assert learnt_spans(example, tokenizer) == ["APPLE<|im_end|>\n", "RIVER STONE<|im_end|>\n"]
    assert example["reference"] == "RIVER STONE"
    prompt = tokenizer.apply_chat_template(CONVERSATION[:-1], add_generation_prompt=True)
    assert example["prompt_ids"] == prompt["input_ids"]


def test_messages_ending_with_a_user_turn_have_no_reference(tokenize):
    data, tokenizer = tokenize({"messages": CONVERSATION[:4]})
    assert learnt_spans(data.examples[0], tokenizer) == ["APPLE<|im_end|>\n"]
    assert data.examples[0]["reference"] is None


@pytest.mark.parametrize("record, expected", [
    ({"question": "a", "answer": "b"}, "data.jsonl:1: a causal_lm record needs \"text\""),
    ({"messages": [{"role": "user"}]}, "data.jsonl:1: messages must be a list of"),
    ({"messages": "hello"}, "data.jsonl:1: messages must be a list of"),
    ({"messages": [{"role": "user", "content": "only a question"}]},
     "data.jsonl:1: this conversation has no assistant turn"),
], ids=["unknown fields", "turn without content", "not a list", "no assistant turn"])
def test_unusable_record_is_named(record, expected, tokenize):
    with pytest.raises(DataError) as info:
        tokenize(record)
    assert str(info.value).startswith(expected)


def test_truncation_is_counted_and_reported(make_recipe, tmp_path):
    long = "Echo: apple APPLE " * 10
    testing.write_jsonl(tmp_path / "long.jsonl", [{"text": long}] * 3 + [{"text": "short"}])
    recipe, pm = testing.load_recipe(make_recipe(data={"train": "long.jsonl",
                                                       "validation": "long.jsonl"},
                                                 train={"max_length": 8}))
    lines = []
    run = loop.setup(recipe, pm, echo=lines.append)
    assert run.data["train"].truncated == 3
    assert all(len(e["input_ids"]) <= 8 for e in run.data["train"].examples)
    assert any(line.startswith("data: train 4 records") and line.endswith(
        "3 truncated at 8 tokens") for line in lines)


def test_data_with_nothing_to_learn_is_refused_naming_its_file(tokenize):
    """Empty texts with a tokenizer that adds no BOS token are a lone end-of-sequence token:
    nothing predicts it. All of them: one line naming the file, not a run that trains nothing
    and blames the learning rate. One among others: kept (its micro-batch adds nothing)."""
    with pytest.raises(DataError) as refused:
        tokenize({"text": ""}, {"text": ""}, {"completion": "", "prompt": ""})
    assert str(refused.value).startswith("data.jsonl: no record has a token to learn")
    assert "\n" not in str(refused.value)
    data, _ = tokenize({"text": ""}, {"text": "Echo: apple APPLE"})
    assert len(data.examples) == 2


def test_truncation_that_cuts_off_the_whole_answer_is_an_error(tokenize):
    with pytest.raises(DataError, match="data.jsonl:1: nothing left to learn after truncation "
                                        "at train.max_length=4"):
        tokenize({"prompt": "Echo: apple river stone cloud", "completion": "APPLE"},
                 max_length=4)


def prompt_completion(tmp_path, name, records):
    return testing.write_jsonl(tmp_path / name, [
        {"prompt": r["messages"][0]["content"] + "\n", "completion": r["messages"][1]["content"]}
        for r in records])


@pytest.mark.parametrize("arch, fmt", [("gpt2", "messages"), ("llama", "prompt_completion")])
def test_loss_falls(arch, fmt, request, make_recipe, echo_data, tmp_path):
    data = {}
    if fmt == "prompt_completion":
        rows = [json.loads(line) for line in Path(echo_data[0]).read_text().splitlines()]
        data = {"train": str(prompt_completion(tmp_path, "pc_train.jsonl", rows)),
                "validation": str(prompt_completion(tmp_path, "pc_val.jsonl", rows[::4]))}
    recipe = make_recipe(model=str(request.getfixturevalue(f"tiny_{arch}")), data=data,
                         causal_lm={"exact_match": False})
    summary, run = testing.run(recipe)
    assert summary["eval_after"]["eval_loss"] < 0.5 * summary["eval_before"]["eval_loss"]
    losses = [json.loads(line)["loss"] for line in
              (run.dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 30 and sum(losses[-5:]) < 0.5 * sum(losses[:5])


@pytest.mark.slow
def test_real_chat_template_masks_exactly_the_assistant_turns(make_recipe, smollm2):
    """SmolLM2's own template (which adds a default system prompt when a conversation has none):
    the tokens match ``apply_chat_template`` and only the assistant answers (with their
    end-of-turn marker) are learnt, with and without a system prompt, over several turns."""
    recipe, pm = testing.load_recipe(make_recipe(model=smollm2))
    tokenizer = pm.hook.plugtune_load_tokenizer(recipe=recipe)
    conversations = [CONVERSATION, CONVERSATION[1:], CONVERSATION[1:3]]
    records = [Record({"messages": c}, "data.jsonl", i) for i, c in enumerate(conversations, 1)]
    data = pm.hook.plugtune_tokenize(records=records, tokenizer=tokenizer, recipe=recipe,
                                     split="train")
    for conversation, example in zip(conversations, data.examples):
        assert example["input_ids"] == tokenizer.apply_chat_template(conversation)["input_ids"]
        answers = [m["content"] for m in conversation if m["role"] == "assistant"]
        assert learnt_spans(example, tokenizer) == [f"{a}<|im_end|>\n" for a in answers]
    default_system = tokenizer.decode(data.examples[1]["input_ids"][:12])
    assert "system" in default_system  # the template's own system prompt is there, not learnt
