"""FLOP utilization: the model FLOPs per position (plugtune.flops) against torch's own count of
a forward and backward pass, and the achieved TFLOP/s, MFU and positions per real token a run
writes to metrics.jsonl and reports."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from plugtune import flops, loop, testing
from plugtune.cli import report, throughput

import test_packing
from test_packing import tiny_config


def tiny(tied=False, **extra):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config("llama", num_hidden_layers=4, hidden_size=128, intermediate_size=256,
                         vocab_size=512, tie_word_embeddings=tied, **extra)
    # eager: torch's counter sees attention's products as matrix multiplies (it does not
    # count the CPU's fused SDPA kernel)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def counted(model, rows=2, width=64):
    """torch's FLOP count of one forward and backward pass."""
    ids = torch.randint(3, 500, (rows, width))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False).logits.float().sum().backward()
    return counter.get_total_flops()


def test_a_full_fine_tune_is_6n_plus_attention_exactly_as_torch_counts_it():
    model = tiny()
    fm = flops.flop_model(model)
    assert fm.dense == 6 * fm.matmul_params  # 6N, N: the matrix-multiply weights
    assert fm.per_context == 12 * 4 * 128  # PaLM's 12 L H Q per position of context
    assert fm.micro_batch(2, 64) == pytest.approx(counted(model), rel=1e-9)


def test_6n_of_all_parameters_within_a_percent_for_a_tied_model():
    """With the output layer tied to the embeddings, N of every parameter is N of the matrix
    multiplies but for the norms."""
    model = tiny(tied=True)
    n = sum(p.numel() for p in model.parameters())
    assert flops.flop_model(model).dense == pytest.approx(6 * n, rel=0.01)


def test_lora_costs_the_frozen_forward_and_input_gradients_within_two_percent():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny(), LoraConfig(r=8, target_modules="all-linear"))
    fm = flops.flop_model(model)
    base = fm.matmul_params - fm.trainable_matmul_params
    assert 4 * base < fm.dense < 4.1 * base + 6 * fm.trainable_matmul_params
    assert fm.micro_batch(2, 64) == pytest.approx(counted(model), rel=0.02)


def test_training_only_the_last_block_costs_a_forward_pass_of_the_rest():
    model = tiny()
    for name, p in model.named_parameters():
        p.requires_grad = "layers.3." in name
    assert flops.flop_model(model).micro_batch(2, 64) == pytest.approx(counted(model), rel=0.02)


def test_the_peak_is_the_recipes_else_a_known_gpus():
    assert flops.peak_tflops("cpu") is None
    assert flops.peak_tflops("cpu", 2.5) == 2.5
    names = [part for part, _ in flops.PEAK_TFLOPS]
    assert names.index("H100 PCIe") < names.index("H100")  # the specific name matches first


def test_a_packed_row_counts_each_examples_attention_not_the_rows():
    """One row of examples of 24, 8 and 32 tokens (positions restarting) costs what the three
    cost run one by one, as torch counts them: attention within each example, not 64^2."""
    model = tiny()
    lengths = (24, 8, 32)
    alone = sum(counted(model, rows=1, width=n) for n in lengths)
    row = torch.cat([torch.arange(n) for n in lengths])[None]
    assert flops.squared_spans(row) == sum(n * n for n in lengths)
    assert flops.squared_spans(torch.arange(64).repeat(2, 1)) == 2 * 64 ** 2  # rows split
    count = flops.flop_model(model)
    assert count.micro_batch(1, 64, flops.squared_spans(row)) == pytest.approx(alone, rel=1e-9)
    assert count.micro_batch(1, 64) > alone * 1.05  # the whole row's square: more


@pytest.mark.parametrize("packing", [False, True])
def test_a_run_logs_tflops_mfu_and_positions_per_token(make_recipe, packing, capsys, tmp_path):
    data = testing.write_jsonl(tmp_path / "mixed.jsonl", test_packing.records())
    recipe, pm = testing.load_recipe(make_recipe(
        plugins=["causal_lm", "lora"], data={"train": str(data), "validation": str(data)},
        train={"max_steps": 2, "eval_every": None, "packing": packing, "peak_tflops": 0.5,
               "batch_size": 4, "max_length": 256}))
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    summary = loop.train(run, echo=lambda *a: None)
    records = [json.loads(line) for line in (run.dir / "metrics.jsonl").open()]
    steps = [r for r in records if "tflops" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["tflops"] > 0 and r["mfu"] == pytest.approx(r["tflops"] / 0.5)
        # records of 3 to 60 tokens: padding costs positions; 4 packed into one row, none
        assert r["positions_per_token"] == 1.0 if packing else r["positions_per_token"] > 1.2
    work = throughput(run)
    assert work["mean_tflops"] > 0 and work["mean_positions_per_token"] >= 1.0
    report(summary, run, print)
    line = next(x for x in capsys.readouterr().out.splitlines() if "throughput" in x)
    assert "model TFLOP/s" in line and "% MFU" in line and "positions computed per real" in line
