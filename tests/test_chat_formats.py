"""Chat templates and data formats (issue 21): every named template learns the end-of-turn token
of each assistant turn and no prompt token; ``data.roles_to_train`` and ``data.train_on_eos``
change what is learnt as they say; ShareGPT, Alpaca, OpenAI, prompt/completion and text
records tokenize as their OpenAI-messages (or plain) equivalents; bad records and templates are
one line with file:line at ``plugtune validate``; the template is saved with the run and used
by ``plugtune generate``."""
import json
from pathlib import Path

import pytest

from plugtune import chat, cli, testing
from plugtune.data import Record
from plugtune.errors import DataError, InputError
from plugtune.plugins.causal_lm import IGNORE, encode_messages

from conftest import CORPUS

CONVERSATION = [
    {"role": "system", "content": "Answer in capitals."},
    {"role": "user", "content": "Echo: apple"},
    {"role": "assistant", "content": "APPLE"},
    {"role": "user", "content": "Echo: river stone"},
    {"role": "assistant", "content": "RIVER STONE"},
]
#: The special tokens of every named template, so each template's markers are single tokens.
MARKERS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "[INST]", "[/INST]", "<|user|>", "<|assistant|>",
           "<|system|>", "<|end|>", "<start_of_turn>", "<end_of_turn>"]


@pytest.fixture
def tokenizer():
    """A tiny BPE tokenizer that knows every template's markers, with Llama-2-style <s> and
    </s> as its bos and eos tokens (so ChatML, Llama 3, Phi-3 and Gemma end turns with a
    token other than its eos)."""
    tok = testing.tiny_tokenizer(CORPUS)
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    tok.bos_token, tok.eos_token = "<s>", "</s>"
    return tok


#: How well-known templates render CONVERSATION, as the models' own templates do.
RENDERED = {
    "chatml": "<|im_start|>system\nAnswer in capitals.<|im_end|>\n<|im_start|>user\nEcho: apple"
              "<|im_end|>\n<|im_start|>assistant\nAPPLE<|im_end|>\n<|im_start|>user\nEcho: "
              "river stone<|im_end|>\n<|im_start|>assistant\nRIVER STONE<|im_end|>\n",
    "llama-3": "<s><|start_header_id|>system<|end_header_id|>\n\nAnswer in capitals.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nEcho: apple<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nAPPLE<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nEcho: river stone<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nRIVER STONE<|eot_id|>",
    "llama-2": "<s>[INST] <<SYS>>\nAnswer in capitals.\n<</SYS>>\n\nEcho: apple [/INST] APPLE "
               "</s><s>[INST] Echo: river stone [/INST] RIVER STONE </s>",
    "mistral": "<s>[INST] Answer in capitals.\n\nEcho: apple [/INST]APPLE</s>[INST] Echo: river "
               "stone [/INST]RIVER STONE</s>",
}


def learnt_spans(ids, labels, tokenizer):
    """The decoded runs of tokens that carry a label (each label is its token)."""
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    return [tokenizer.decode(s) for s in spans]


@pytest.mark.parametrize("name", list(chat.TEMPLATES))
def test_each_named_template_learns_every_assistant_end_of_turn_and_no_prompt_token(
        name, tokenizer):
    chat.use_template(tokenizer, name)
    end = chat.end_of_turn(name, tokenizer)
    end_id = tokenizer.convert_tokens_to_ids(end)
    assert tokenizer.eos_token == end  # generation stops where a turn ends
    ids, labels = encode_messages(tokenizer, CONVERSATION, "data.jsonl:1")
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.decode(ids) == text and text == RENDERED.get(name, text)
    spans = learnt_spans(ids, labels, tokenizer)
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert len(spans) == len(answers), spans
    for span, answer in zip(spans, answers):
        assert span.strip().startswith(answer), span  # nothing of the prompt before it
        assert span.replace(answer, "", 1).strip() == end, span  # then only its end of turn
    ends = [i for i, t in enumerate(ids) if t == end_id]
    assert sum(labels[i] == end_id for i in ends) == len(answers)  # each assistant turn's
    unlearnt = tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE])
    for text in ("Answer in capitals.", "Echo: apple", "Echo: river stone"):
        assert text in unlearnt  # system and user turns whole, none of them learnt


def test_generation_stops_at_the_templates_end_of_turn(tokenizer, tiny_llama):
    """ChatML on a tokenizer whose eos is </s>: <|im_end|> becomes its eos token, and
    generation (evaluation's and ``plugtune generate``'s) stops at it as well as at the
    model's own eos."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    chat.use_template(tokenizer, "chatml")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token != "<|im_end|>"
    stops = chat.stop_ids(model, tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    assert model.generation_config.eos_token_id in stops


def test_a_template_the_tokenizer_would_split_is_refused(make_recipe):
    """The tiny test model's tokenizer has no <|eot_id|>: a Llama 3 template would teach it a
    string of pieces it never stops at."""
    recipe, pm = testing.load_recipe(make_recipe(data={"chat_template": "llama-3"}))
    with pytest.raises(InputError, match=r"data.chat_template: llama-3 ends each turn with "
                                         r"'<\|eot_id\|>'.*splits it into"):
        chat.load_tokenizer(pm.hook, recipe)


@pytest.mark.parametrize("setting, expected", [
    ({}, ["APPLE<|im_end|>\n", "RIVER STONE<|im_end|>\n"]),
    ({"train_on_eos": "none"}, ["APPLE", "RIVER STONE"]),
    ({"train_on_eos": "last"}, ["APPLE", "RIVER STONE<|im_end|>\n"]),
    ({"train_on_eos": "all"}, ["<|im_end|>\n", "<|im_end|>\n", "APPLE<|im_end|>\n",
                               "<|im_end|>\n", "RIVER STONE<|im_end|>\n"]),
    ({"roles_to_train": ["user", "assistant"]},
     ["Echo: apple<|im_end|>\n", "APPLE<|im_end|>\n", "Echo: river stone<|im_end|>\n",
      "RIVER STONE<|im_end|>\n"]),
    ({"roles_to_train": ["user"], "train_on_eos": "none"}, ["Echo: apple", "Echo: river stone"]),
], ids=["default", "none", "last", "all", "user-and-assistant", "user-only"])
def test_roles_to_train_and_train_on_eos(setting, expected, make_recipe):
    recipe, pm = testing.load_recipe(make_recipe(data={"chat_template": "chatml", **setting}))
    tokenizer = chat.load_tokenizer(pm.hook, recipe)
    data = pm.hook.plugtune_tokenize(records=[Record({"messages": CONVERSATION}, "d.jsonl", 1)],
                                     tokenizer=tokenizer, recipe=recipe, split="train")
    example = data.examples[0]
    assert learnt_spans(example["input_ids"], example["labels"], tokenizer) == expected


def test_an_inline_jinja_template(make_recipe):
    """``data.chat_template`` as a Jinja string: its turns end with the eos token, which is
    learnt with each answer."""
    template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    recipe, pm = testing.load_recipe(make_recipe(data={"chat_template": template}))
    tokenizer = chat.load_tokenizer(pm.hook, recipe)
    assert tokenizer.chat_template == template
    data = pm.hook.plugtune_tokenize(records=[Record({"messages": CONVERSATION}, "d.jsonl", 1)],
                                     tokenizer=tokenizer, recipe=recipe, split="train")
    example = data.examples[0]
    # "assistant: " + "APPLE" tokenizes as "assistant:", " APPLE": the space goes with the answer
    assert learnt_spans(example["input_ids"], example["labels"], tokenizer) == [
        " APPLE<|im_end|>", " RIVER STONE<|im_end|>"]


# --- data formats --------------------------------------------------------------------------

SHAREGPT = {"conversations": [{"from": "system", "value": "Answer in capitals."},
                              {"from": "human", "value": "Echo: apple"},
                              {"from": "gpt", "value": "APPLE"},
                              {"from": "human", "value": "Echo: river stone"},
                              {"from": "gpt", "value": "RIVER STONE"}]}
ALPACA = {"instruction": "Echo the word in capitals.", "input": "apple", "output": "APPLE"}
ALPACA_AS_MESSAGES = {"messages": [
    {"role": "user", "content": "Echo the word in capitals.\n\napple"},
    {"role": "assistant", "content": "APPLE"}]}


def tokenized(make_recipe, tmp_path, records, name="data.jsonl", **data):
    """The train examples of ``records`` (a JSONL file) read and tokenized through the
    recipe's hooks, with the ``data`` keys given."""
    path = testing.write_jsonl(tmp_path / name, records * 4)
    recipe, pm = testing.load_recipe(make_recipe(
        f"{name}.yaml", data={"train": str(path), "validation": str(path), **data}))
    tokenizer = chat.load_tokenizer(pm.hook, recipe)
    splits = pm.hook.plugtune_read_data(recipe=recipe)
    return pm.hook.plugtune_tokenize(records=splits.validation, tokenizer=tokenizer,
                                     recipe=recipe, split="validation").examples[0], tokenizer


def same_example(a, b):
    return (a["input_ids"], a["labels"]) == (b["input_ids"], b["labels"])


@pytest.mark.parametrize("fmt", ["sharegpt", "auto"])
def test_sharegpt_is_its_openai_conversation(fmt, make_recipe, tmp_path):
    got, _ = tokenized(make_recipe, tmp_path, [SHAREGPT], "sharegpt.jsonl", format=fmt)
    want, _ = tokenized(make_recipe, tmp_path, [{"messages": CONVERSATION}], "openai.jsonl",
                        format="openai")
    assert same_example(got, want)


def test_sharegpt_with_other_fields_and_tags(make_recipe, tmp_path):
    """LLaMA-Factory's column and tag maps: a ``dialog`` of ``speaker``/``text`` turns with
    ``bot`` for the assistant and a ``system`` column."""
    record = {"dialog": [{"speaker": "human", "text": "Echo: apple"},
                         {"speaker": "bot", "text": "APPLE"},
                         {"speaker": "human", "text": "Echo: river stone"},
                         {"speaker": "bot", "text": "RIVER STONE"}],
              "system": "Answer in capitals."}
    got, _ = tokenized(make_recipe, tmp_path, [record], "dialog.jsonl", format="sharegpt",
                       columns={"conversations": "dialog"}, roles={"assistant": "bot"},
                       message_fields={"role": "speaker", "content": "text"})
    want, _ = tokenized(make_recipe, tmp_path, [{"messages": CONVERSATION}], "openai.jsonl")
    assert same_example(got, want)


@pytest.mark.parametrize("fmt", ["alpaca", "auto"])
def test_alpaca_is_a_user_and_an_assistant_turn(fmt, make_recipe, tmp_path):
    got, tokenizer = tokenized(make_recipe, tmp_path, [ALPACA], "alpaca.jsonl", format=fmt)
    want, _ = tokenized(make_recipe, tmp_path, [ALPACA_AS_MESSAGES], "openai.jsonl")
    assert same_example(got, want)
    assert got["reference"] == "APPLE"


def test_alpaca_with_the_alpaca_template_is_stanford_alpacas_prompt(make_recipe, tmp_path):
    got, tokenizer = tokenized(make_recipe, tmp_path, [ALPACA], "alpaca.jsonl", format="alpaca",
                               chat_template="alpaca")
    assert tokenizer.decode(got["input_ids"]) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nEcho the word in capitals.\n\napple\n\n"
        "### Response:\nAPPLE<|im_end|>\n\n")
    assert learnt_spans(got["input_ids"], got["labels"], tokenizer) == ["APPLE<|im_end|>\n\n"]


def test_alpaca_on_a_tokenizer_without_a_template_is_the_alpaca_prompt(make_recipe, tmp_path):
    """A base model's tokenizer has no chat template: ``data.format: alpaca`` then renders
    Stanford Alpaca's prompt (the ``alpaca`` template), and the run keeps it."""
    model = testing.tiny_model(tmp_path / "base", "llama", CORPUS)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    path = testing.write_jsonl(tmp_path / "alpaca.jsonl", [ALPACA] * 8)
    recipe = make_recipe(model=str(model), data={"train": str(path), "validation": str(path),
                                                 "format": "alpaca"}, train={"max_steps": 1})
    summary, run = testing.run(recipe)
    example = run.data["validation"].examples[0]
    assert run.tokenizer.decode(example["input_ids"]).startswith("Below is an instruction")
    assert json.loads((run.dir / "manifest.json").read_text())["chat_template"]["source"] == \
        "alpaca"
    assert (run.dir / "chat_template.jinja").read_text() == chat.named("alpaca")


def test_alpaca_history_and_system_are_earlier_turns(make_recipe, tmp_path):
    record = {"instruction": "Echo: river stone", "output": "RIVER STONE",
              "system": "Answer in capitals.", "history": [["Echo: apple", "APPLE"]]}
    got, _ = tokenized(make_recipe, tmp_path, [record], "alpaca.jsonl", format="alpaca")
    want, _ = tokenized(make_recipe, tmp_path, [{"messages": CONVERSATION}], "openai.jsonl")
    assert same_example(got, want)


def test_a_turns_own_train_flag_overrides_roles_to_train(make_recipe, tmp_path):
    """axolotl's per-turn ``train``/``weight``: the first answer is not learnt, the user's
    second question is; ``weight: null`` (as OpenHermes writes it) is no flag."""
    turns = [{**m, "weight": None} for m in CONVERSATION]
    turns[2] = {**turns[2], "weight": 0}
    turns[3] = {**turns[3], "train": True}
    got, tokenizer = tokenized(make_recipe, tmp_path, [{"messages": turns}])
    assert learnt_spans(got["input_ids"], got["labels"], tokenizer) == [
        "Echo: river stone<|im_end|>\n", "RIVER STONE<|im_end|>\n"]


@pytest.mark.parametrize("fmt, record, spans", [
    ("prompt_completion", {"prompt": "Echo: apple\n", "completion": "APPLE"},
     ["APPLE<|im_end|>"]),
    ("text", {"text": "Echo: apple APPLE"}, ["Echo: apple APPLE<|im_end|>"]),
    ("completion", {"text": "Echo: apple APPLE"}, ["Echo: apple APPLE<|im_end|>"]),
])
def test_plain_formats(fmt, record, spans, make_recipe, tmp_path):
    got, tokenizer = tokenized(make_recipe, tmp_path, [record], format=fmt)
    assert learnt_spans(got["input_ids"], got["labels"], tokenizer) == spans


def test_sharegpt_trains(make_recipe, tmp_path):
    """A ShareGPT file with a named template trains: the loss falls."""
    records = [{"conversations": [{"from": "human", "value": f"Echo: {w}"},
                                  {"from": "gpt", "value": w.upper()}]}
               for w in ["apple", "river", "stone", "cloud"] * 4]
    path = testing.write_jsonl(tmp_path / "sharegpt.jsonl", records)
    summary, run = testing.run(make_recipe(data={
        "train": str(path), "validation": str(path), "format": "sharegpt",
        "chat_template": "smollm2"}, train={"max_steps": 12}))
    losses = [json.loads(line)["loss"] for line in
              (run.dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < 0.7 * losses[0]


# --- bad input at validate -----------------------------------------------------------------


def validate(capsys, recipe):
    code = cli.main(["validate", str(recipe)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("fmt, record, expected", [
    ("sharegpt", {"conversations": [{"from": "human", "value": "hi"},
                                    {"from": "bot", "value": "hello"}]},
     "bad.jsonl:2: conversations[1] has unknown role tag 'bot'"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "hi"},
                                    {"from": "gpt", "value": 3}]},
     'bad.jsonl:2: conversations[1] "value" must be a string, got a number 3'),
    ("sharegpt", {"messages": []}, "bad.jsonl:2: a data.format: sharegpt record needs "
                                   "'conversations'"),
    ("alpaca", {"instruction": "hi"}, "bad.jsonl:2: a data.format: alpaca record needs 'output'"),
    ("alpaca", {"instruction": ["hi"], "output": "x"},
     'bad.jsonl:2: "instruction" must be a string, got a list'),
    ("openai", {"messages": [{"role": "user", "content": "hi"}]},
     "bad.jsonl:2: this conversation has no assistant turn"),
    ("openai", {"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "x", "weight": 0.5}]},
     "bad.jsonl:2: messages[1] train/weight must be true/false or 1/0, got a number 0.5"),
    ("alpaca", {"instruction": "hi", "output": "x", "history": ["hi", "x"]},
     'bad.jsonl:2: "history" must be a list of [instruction, response] string pairs'),
], ids=["unknown tag", "wrong type", "missing conversations", "missing output",
        "instruction a list", "no assistant", "weight", "history"])
def test_bad_records_are_one_line_with_file_and_line(fmt, record, expected, make_recipe,
                                                      tmp_path, capsys):
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]} \
        if fmt == "sharegpt" else {"instruction": "hi", "output": "x"} if fmt == "alpaca" \
        else {"messages": [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "x"}]}
    path = testing.write_jsonl(tmp_path / "bad.jsonl", [good, record, good])
    held_out = testing.write_jsonl(tmp_path / "good.jsonl", [good])
    code, err = validate(capsys, make_recipe(data={"train": str(path), "validation":
                                                   str(held_out), "format": fmt}))
    assert code == 2 and err.startswith("plugtune: error: ") and "Traceback" not in err, err
    assert expected in err, err
    assert len([line for line in err.splitlines() if "bad.jsonl" in line]) == 1, err


def test_a_record_the_template_cannot_render_is_named_at_validate(make_recipe, tmp_path,
                                                                   capsys):
    """Llama 2's template wants user and assistant turns to alternate."""
    records = [{"messages": [{"role": "user", "content": "a"},
                             {"role": "assistant", "content": "b"}]},
               {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                             {"role": "assistant", "content": "c"}]}]
    path = testing.write_jsonl(tmp_path / "turns.jsonl", records)
    code, err = validate(capsys, make_recipe(data={"train": str(path), "chat_template":
                                                   "llama-2"}))
    assert code == 2 and "Traceback" not in err, err
    assert "turns.jsonl:2: the chat template cannot render this conversation (Conversation " \
           "roles must alternate" in err, err


@pytest.mark.parametrize("value, expected", [
    ("chatm", "data.chat_template: unknown template 'chatm' (did you mean 'chatml'?)"),
    ("missing.jinja", "data.chat_template: file not found:"),
    ("{% for m in messages %}{{ m.content }}", "data.chat_template: the template:1: not a "
                                                "valid Jinja template"),
    ("bad.jinja", "bad.jinja:2: not a valid Jinja template"),
])
def test_bad_chat_template_is_named_at_validate(value, expected, make_recipe, tmp_path, capsys):
    (tmp_path / "bad.jinja").write_text("{{ bos_token }}\n{% if %}\n")
    code, err = validate(capsys, make_recipe(data={"chat_template": value}))
    assert code == 2 and "Traceback" not in err, err
    assert expected in err, err


def test_roles_map_the_wrong_way_round_gets_a_hint(make_recipe, capsys):
    code, err = validate(capsys, make_recipe(data={"roles": {"gpt": "assistant"}}))
    assert code == 2 and "data.roles: 'gpt' is not a role" in err, err
    assert "did you mean {assistant: gpt}?" in err, err


# --- the template travels with the run -----------------------------------------------------


def test_template_from_a_file_is_saved_with_the_run_and_used_by_generate(make_recipe, tmp_path,
                                                                         capsys):
    """A .jinja file next to the recipe: the run directory keeps it (chat_template.jinja, the
    manifest, the saved tokenizer), and ``plugtune generate`` renders its prompt with it."""
    template = chat.named("alpaca").replace("### Response:", "### Answer:")
    (tmp_path / "mine.jinja").write_text(template)
    recipe = make_recipe(data={"chat_template": "mine.jinja"}, train={"max_steps": 2})
    summary, run = testing.run(recipe)
    assert (run.dir / "chat_template.jinja").read_text() == template
    manifest = json.loads((run.dir / "manifest.json").read_text())
    assert manifest["chat_template"]["source"] == "file"
    assert manifest["chat_template"]["path"] == str(tmp_path / "mine.jinja")
    from plugtune import artifacts

    artifact = artifacts.load(run.dir)
    assert artifact.tokenizer.chat_template == template
    prompt = artifact.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Echo: apple"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("### Instruction:\nEcho: apple\n\n### Answer:\n")
    code = cli.main(["generate", str(run.dir), "Echo: apple", "--max-new-tokens", "3",
                     "--temperature", "0"])
    assert code == 0, capsys.readouterr().err


def test_named_template_is_the_saved_tokenizers(make_recipe, tmp_path):
    summary, run = testing.run(make_recipe(data={"chat_template": "smollm2"},
                                           train={"max_steps": 1}))
    from plugtune import artifacts

    saved = artifacts.load(run.dir).tokenizer.chat_template
    assert saved == chat.named("smollm2") == (run.dir / "chat_template.jinja").read_text()
    assert json.loads((run.dir / "manifest.json").read_text())["chat_template"]["source"] == \
        "smollm2"
    assert json.loads(json.dumps(run.recipe.resolved()))["data"]["chat_template"] == "smollm2"


@pytest.mark.slow
def test_smollm2_template_renders_as_smollm2s_own(smollm2, make_recipe):
    """The shipped smollm2 template renders conversations exactly as SmolLM2-Instruct's own
    tokenizer template does."""
    recipe, pm = testing.load_recipe(make_recipe(model=smollm2))
    tokenizer = pm.hook.plugtune_load_tokenizer(recipe=recipe)
    for conversation in (CONVERSATION, CONVERSATION[1:]):
        for gen in (False, True):
            own = tokenizer.apply_chat_template(conversation, tokenize=False,
                                                add_generation_prompt=gen)
            named = tokenizer.apply_chat_template(conversation, tokenize=False,
                                                  add_generation_prompt=gen,
                                                  chat_template=chat.named("smollm2"))
            assert own == named


def test_a_tag_in_roles_to_train_is_named_with_its_role(make_recipe, capsys):
    """axolotl recipes often say roles_to_train: [gpt]; plugtune's roles are the roles."""
    code, err = validate(capsys, make_recipe(data={"roles_to_train": ["gpt"]}))
    assert code == 2 and "data.roles_to_train: 'gpt' is not a role" in err, err
    assert "the data's tag 'gpt' is the role 'assistant'" in err, err
