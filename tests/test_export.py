"""What a run leaves a user: a PEFT adapter that plain peft loads, a merged model that plain
transformers loads (both giving the trained model's logits), and `plugtune generate`."""
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import echo_records
from plugtune import artifacts, cli, testing

IDS = torch.tensor([[3, 17, 42, 5, 99, 23, 7, 64]])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama):
    """``trained(name, plugins) -> run``: a short run on the tiny Llama, made once per module."""
    tmp = tmp_path_factory.mktemp("export")
    records = echo_records()
    train = testing.write_jsonl(tmp / "train.jsonl", records)
    validation = testing.write_jsonl(tmp / "validation.jsonl", records[::4])
    runs = {}

    def make(name, plugins):
        if name not in runs:
            recipe = testing.write_recipe(
                tmp / f"{name}.yaml", model=str(tiny_llama), plugins=["causal_lm", *plugins],
                data={"train": str(train), "validation": str(validation)},
                train={"max_steps": 6, "lr": 3e-2, "batch_size": 8},
                causal_lm={"exact_match": False},
                output={"dir": str(tmp / "runs"), "name": name})
            runs[name] = testing.run(recipe)[1]
        return runs[name]
    return make


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def test_adapter_loads_with_plain_peft_and_gives_the_trained_logits(trained, tiny_llama):
    run = trained("lora", ["lora"])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, run.dir / "adapter")
    # float32 on one CPU: the same computation, so equal to rounding (atol 1e-5)
    torch.testing.assert_close(logits(loaded), logits(run.model), rtol=0, atol=1e-5)


def test_merged_export_loads_with_plain_transformers(trained, tmp_path, capsys):
    run = trained("lora", ["lora"])
    out = tmp_path / "merged"
    assert cli.main(["export", str(run.dir), str(out), "--merge"]) == 0
    assert "merged model" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged), logits(run.model), rtol=0, atol=1e-5)


def test_quantized_base_merges_into_a_dequantized_copy(trained, tmp_path, capsys):
    run = trained("nf4", ["nf4", "lora"])
    out = tmp_path / "merged"
    assert cli.main(["export", str(run.dir), str(out), "--merge"]) == 0
    printed = capsys.readouterr().out
    assert "trained quantized (4-bit nf4)" in printed and "de-quantized float32 copy" in printed
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(merged.config, "quantization_config", None) is None
    assert type(merged.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    # The 4-bit product and the merged float product differ only by float rounding.
    torch.testing.assert_close(logits(merged), logits(run.model), rtol=0, atol=1e-4)


def test_export_without_merge_copies_the_adapter(trained, tmp_path, capsys):
    run = trained("lora", ["lora"])
    out = tmp_path / "adapter"
    assert cli.main(["export", str(run.dir), str(out)]) == 0
    assert (out / "adapter_config.json").is_file()
    assert cli.main(["export", str(run.dir), str(out)]) == 1  # never over a user's files
    assert "exists and is not an empty directory" in capsys.readouterr().err


def generated(capsys, run, *options):
    capsys.readouterr()  # drop what the run printed
    assert cli.main(["generate", str(run.dir), "Echo: apple", *options]) == 0
    return capsys.readouterr().out.rstrip("\n")


@pytest.mark.parametrize("name, plugins", [("lora", ["lora"]), ("full", ["full"])])
def test_generate_prints_a_sample(trained, capsys, name, plugins):
    run = trained(name, plugins)
    hot = ["--temperature", "5", "--max-new-tokens", "8", "--seed", "3"]
    sample = generated(capsys, run, *hot)
    assert sample.strip() and sample == generated(capsys, run, *hot)  # text; a seed repeats it


def test_generate_answers_the_chat_turn_of_the_fine_tuned_model(trained, tiny_llama, capsys):
    run = trained("lora", ["lora"])
    greedy = generated(capsys, run, "--temperature", "0", "--max-new-tokens", "6")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama),
                                      run.dir / "adapter").eval()
    tok = run.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "Echo: apple"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert greedy == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_generate_names_what_is_missing(tmp_path, capsys):
    assert cli.main(["generate", str(tmp_path), "hi"]) == 1
    assert "not a run directory" in capsys.readouterr().err
