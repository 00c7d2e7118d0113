"""`plugtune export RUN OUT --gguf TYPE`: the GGUF file that transformers' own GGUF loader reads
back gives the merged model's logits (f16 to float16 rounding, q8_0 and q4_0 within their
quantization error) and the same token ids; the chat template travels in the file and as an
Ollama Modelfile; what cannot be written is refused in one line."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, Qwen2Config

from conftest import CORPUS, echo_records
from plugtune import artifacts, cli, testing

IDS = torch.tensor([[3, 17, 42, 5, 99, 23, 7, 64, 120, 250, 11, 8]])
TEXTS = ["Echo: apple APPLE", "hello 12345 world!  two  spaces\n", "tiger <|im_end|> piano",
         "<|im_start|>user\nEcho: lemon<|im_end|>\n<|im_start|>assistant\n"]
#: max |Δ logit| allowed against the merged float32 model (logits of size ~1 to 3 here);
#: measured: tiny Llama (LoRA merged) f16 1.6e-3, q8_0 4.8e-3, q4_0 0.50 (64-wide rows quantize
#: coarsely); tiny Qwen2 f16 3.4e-4, bf16 2.6e-3; tiny Mistral q8_0 7.0e-3.
TOLERANCE = {"f16": 5e-3, "bf16": 2e-2, "q8_0": 5e-2, "q4_0": 1.0}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama):
    """``runs(name) -> run directory``: short runs made once per module: ``lora`` (the tiny
    Llama with a LoRA adapter to merge), ``qwen2`` (a tiny Qwen2 with tied embeddings and q/k/v
    biases) and ``mistral``, fully trained, ``gpt2`` (an architecture GGUF export does not
    write)."""
    tmp = tmp_path_factory.mktemp("gguf")
    records = echo_records()
    train = testing.write_jsonl(tmp / "train.jsonl", records)
    made = {}

    def make(name):
        if name not in made:
            model, plugins = {"lora": (tiny_llama, ["lora"]), "gpt2": (testing.tiny_model(
                tmp / "gpt2", "gpt2", CORPUS), ["full"])}.get(name) or (tiny(tmp, name), ["full"])
            recipe = testing.write_recipe(
                tmp / f"{name}.yaml", model=str(model), plugins=["causal_lm", *plugins],
                data={"train": str(train), "validation": str(train)},
                train={"max_steps": 3, "lr": 3e-2, "batch_size": 8},
                causal_lm={"exact_match": False},
                output={"dir": str(tmp / "runs"), "name": name})
            made[name] = testing.run(recipe)[1].dir
        return made[name]
    return make


def tiny(tmp, arch):
    """A tiny random Qwen2 (tied embeddings, q/k/v biases) or Mistral, saved with a tokenizer."""
    torch.manual_seed(0)
    tok = testing.tiny_tokenizer(CORPUS)
    config = {"qwen2": Qwen2Config, "mistral": MistralConfig}[arch](
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=arch == "qwen2", bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp / arch)
    tok.save_pretrained(tmp / arch)
    return tmp / arch


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits.float()


def export(run_dir, out, qtype):
    assert cli.main(["export", str(run_dir), str(out), "--gguf", qtype]) == 0
    return out / f"model-{qtype}.gguf"


@pytest.mark.parametrize("name,qtype", [("lora", "f16"), ("lora", "q8_0"), ("lora", "q4_0"),
                                        ("qwen2", "f16"), ("qwen2", "bf16"), ("mistral", "q8_0")])
def test_gguf_reads_back_with_the_merged_models_logits(runs, tmp_path, name, qtype):
    run_dir = runs(name)
    path = export(run_dir, tmp_path / "out", qtype)
    read = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32)
    merged = artifacts.load(run_dir, merge=True).model
    # llama.cpp writes Mistral as a Llama (the same computation); transformers reads it so
    assert read.config.model_type == {"mistral": "llama"}.get(name, merged.config.model_type)
    assert read.config.tie_word_embeddings == merged.config.tie_word_embeddings
    delta = (logits(read) - logits(merged)).abs().max().item()
    assert delta < TOLERANCE[qtype], f"{name} {qtype}: max |Δ logit| {delta:.2e}"
    stored = json.loads((path.parent / "export.json").read_text())["tensor_types"]
    assert set(stored) == {"F32", qtype.upper()} | ({"Q8_0"} if qtype == "q4_0" else set())


def test_tokenizer_and_chat_template_travel_in_the_file(runs, tmp_path):
    run_dir = runs("lora")
    path = export(run_dir, tmp_path / "out", "q8_0")
    ours = artifacts.load(run_dir).tokenizer
    read = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert read(text)["input_ids"] == ours(text)["input_ids"], text
    assert read.chat_template == ours.chat_template
    messages = [{"role": "user", "content": "Echo: stone"}]
    assert read.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (read.eos_token, read.bos_token) == (ours.eos_token, ours.bos_token)


def test_modelfile_and_manifest_say_what_was_written(runs, tmp_path, capsys):
    out = tmp_path / "out"
    path = export(runs("lora"), out, "q8_0")
    printed = capsys.readouterr().out
    assert f"wrote {path}" in printed and "ollama create" in printed
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export.json",
                                                     "model-q8_0.gguf"]
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf" in modelfile
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["type"] == "q8_0" and manifest["ollama_template"] == "chatml"
    assert manifest["chat_template"] == testing.CHATML
    assert manifest["tensor_types"]["Q8_0"] == 16 and manifest["tensor_types"]["F32"] == 5


def test_a_template_plugtune_cannot_translate_is_left_to_ollama(runs):
    from plugtune.plugins import gguf_export

    tok = artifacts.load(runs("lora")).tokenizer
    tok.chat_template = "{% for m in messages %}### {{ m['content'] }}\n{% endfor %}"
    text, shape = gguf_export.ollama_modelfile("model-f16.gguf", tok)
    assert shape is None and "# TEMPLATE omitted" in text
    assert not any(line.startswith("TEMPLATE") for line in text.splitlines())
    assert "FROM ./model-f16.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text


def test_smollm2_template_gives_chatml_with_its_default_system_prompt():
    from plugtune.plugins import gguf_export

    tok = testing.tiny_tokenizer(CORPUS)
    tok.chat_template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are SmolLM.<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    assert gguf_export.template_shape(tok) == ("chatml", "You are SmolLM.")


LLAMA3 = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role']"
          " + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def test_a_llama_3_template_gives_the_llama_3_modelfile():
    from plugtune.plugins import gguf_export

    tok = testing.tiny_tokenizer(CORPUS)
    tok.chat_template = LLAMA3  # Meta-Llama-3-8B-Instruct's
    text, shape = gguf_export.ollama_modelfile("model-q8_0.gguf", tok)
    assert shape == "llama-3" and "SYSTEM" not in text
    assert ('TEMPLATE """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>'
            '\n\n{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>'
            '\n\n"""') in text
    assert 'PARAMETER stop "<|eot_id|>"' in text


@pytest.mark.parametrize("args,message", [
    (["--gguf", "q5_k"], "--gguf q5_k: not a GGUF type written here; use one of f16, bf16, "
                         "q8_0, q4_0"),
    (["--format", "onnx"], "--format onnx: no plugin writes this format (known: gguf)"),
    (["--gguf", "f16", "--merge"], "give one of --merge, --gguf TYPE and --format"),
])
def test_bad_type_or_format_is_one_line_and_writes_nothing(runs, tmp_path, capsys, args,
                                                           message):
    assert cli.main(["export", str(runs("lora")), str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("plugtune: error: ") and message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_an_architecture_it_does_not_write_is_refused(runs, tmp_path, capsys):
    run_dir = runs("gpt2")
    capsys.readouterr()
    assert cli.main(["export", str(run_dir), str(tmp_path / "out"), "--gguf", "f16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading bars
    assert err.startswith("plugtune: error: GGUF export supports Llama, Mistral, Qwen2 and "
                          "SmolLM2") and "'gpt2'" in err
    assert list(tmp_path.iterdir()) == []


def test_a_task_head_is_refused(tmp_path, tiny_llama, capsys):
    from transformers import AutoModelForSequenceClassification

    from plugtune.plugins import gguf_export

    head = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=2)
    with pytest.raises(Exception) as refused:
        gguf_export.check_model(head)
    assert refused.value.exit_code == 2
    assert "a LlamaForSequenceClassification (a task head" in str(refused.value)


@pytest.mark.slow
def test_smollm2_exports_to_f16_with_its_logits(tmp_path, smollm2):
    """The quickstart's real model (one LoRA step, so there is an adapter to merge) exported at
    f16: transformers reads it back with the trained model's logits on two chat prompts.
    (The full comparison, greedy answers on the held-out prompts at f16, q8_0 and q4_0, is
    benchmarks/gguf_export.py: docs/export.md.)"""
    recipe = testing.write_recipe(
        tmp_path / "r.yaml", model=smollm2, plugins=["causal_lm", "lora"],
        data={"train": str(testing.write_jsonl(tmp_path / "t.jsonl", echo_records()[:8])),
              "validation": str(testing.write_jsonl(tmp_path / "v.jsonl", echo_records()[:2]))},
        train={"max_steps": 1, "batch_size": 8, "lr": 1e-3, "eval_every": None},
        causal_lm={"exact_match": False}, output={"dir": str(tmp_path / "runs"), "name": "smol"})
    run = testing.run(recipe)[1]
    path = export(run.dir, tmp_path / "out", "f16")
    read = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32)
    assert read.config.tie_word_embeddings
    for prompt in ("What is the capital of France?", "Echo: tiger"):
        text = run.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 tokenize=False, add_generation_prompt=True)
        ids = run.tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            a, b = run.model.eval()(input_ids=ids).logits, read(input_ids=ids).logits
        assert (a.float() - b).abs().max().item() < 0.25  # logits -31..39; measured 0.09
    assert "SYSTEM" in (tmp_path / "out" / "Modelfile").read_text()


def sentencepiece_style_tokenizer(add_bos_token):
    """A Llama 2 / Mistral-style tokenizer: BPE over ``▁``-joined words with byte fallback."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    model = json.loads(bpe.to_str())["model"]
    return LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                          add_bos_token=add_bos_token)


@pytest.mark.parametrize("add_bos_token", [True, False])
def test_a_sentencepiece_style_vocabulary_reads_back_with_the_same_ids(tmp_path, add_bos_token):
    from transformers import LlamaConfig

    from plugtune.plugins import gguf_export

    tok = sentencepiece_style_tokenizer(add_bos_token)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tok) + 3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2))  # 3 ids no token has: [PADn]
    info = gguf_export.convert(model, tok, tmp_path / "m.gguf", "f16")
    assert info["tokenizer"] == "llama"
    read = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in TEXTS + ["tiger é ☃ piano", " leading space"]:  # é, ☃: byte fallback
        assert read(text)["input_ids"] == tok(text)["input_ids"], text
    assert (tok("a")["input_ids"][0] == tok.bos_token_id) == add_bos_token
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    assert (logits(back) - logits(model)).abs().max().item() < TOLERANCE["f16"]


def test_llama_3_1_rope_is_written_as_llama_cpp_frequency_factors(tmp_path):
    """Llama 3.1+ (rope_type llama3) gets llama.cpp's ``rope_freqs`` tensor, checked against
    convert_hf_to_gguf.py's own formula. (transformers' GGUF reader ignores that tensor, so this
    file is not compared by logits.)"""
    import math

    import gguf
    from transformers import LlamaConfig

    from plugtune.plugins import gguf_export

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=400, hidden_size=256, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=131072,
        rope_parameters=rope))
    gguf_export.convert(model, testing.tiny_tokenizer(CORPUS), tmp_path / "m.gguf", "f16")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    written = tensors["rope_freqs.weight"].data
    expected = []  # llama.cpp's LlamaModel.generate_extra_tensors
    for freq in 1.0 / (rope["rope_theta"] ** (torch.arange(0, 128, 2).float() / 128)):
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4.0:
            expected.append(1.0)
        elif wavelen > 8192 / 1.0:
            expected.append(8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append(1 / ((1 - smooth) / 8.0 + smooth))
    assert written.shape == (64,) and len(set(expected)) > 3  # the smooth band is there
    torch.testing.assert_close(torch.tensor(written), torch.tensor(expected), rtol=1e-5,
                               atol=0)
