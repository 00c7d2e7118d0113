"""`plugtune plan --processes N --shard fsdp|zero2|zero3`: what one of N data-parallel processes
holds, against byte counts worked out from the tiny Llama's parameters; the shipped recipe for
two 24 GiB GPUs plans to fit each of them and not one alone."""
import math

import pytest

from plugtune import cli, plan, testing


@pytest.fixture
def plans(make_recipe):
    """``plans(**sections) -> {shard: Estimate}``: the tiny Llama recipe (AdamW, micro-batch
    2 x 32 tokens, 2 micro-batches a step) for one process and one of 4."""
    def make(**sections):
        recipe, pm = testing.load_recipe(make_recipe(
            train={"batch_size": 2, "max_length": 32, "grad_accum": 2}, **sections))
        ways = {"one": (1, None), "ddp": (4, None), "zero2": (4, "zero2"),
                "zero3": (4, "zero3"), "fsdp": (4, "fsdp")}
        return {name: plan.estimate(recipe, pm, "cuda", *way) for name, way in ways.items()}
    return make


def by_moment(est):
    return {m.name: m.parts for m in est.moments()}


@pytest.mark.parametrize("plugins", [["causal_lm", "full"], ["causal_lm", "lora"]])
def test_each_strategy_divides_what_it_shards_among_the_processes(plans, plugins):
    ests = plans(plugins=plugins)
    one = ests["one"]
    params = one.plan.params
    weights = sum(p.bytes for p in params)
    grads = sum(p.numel * p.dtype.itemsize for p in params if p.trainable)
    state = one.plan.optimizer.state
    assert state == 2 * grads  # AdamW: two float32 states
    # gathered whole at the peak: the final norm with the output layer (accelerate's tail unit,
    # kept from forward into backward) and two blocks; the (untied) embeddings are not
    assert not one.plan.model.config.tie_word_embeddings
    blocks = {}
    for p in params:
        if p.block is not None:
            blocks[p.block] = blocks.get(p.block, 0) + p.bytes
    tail = sum(p.bytes for p in params if p.block is None and p.module != "Embedding")
    assert tail == sum(p.bytes for p in params if "lm_head" in p.name or p.name.endswith(
        "model.norm.weight"))
    gathered = tail + sum(sorted(blocks.values())[-2:])
    expected = {"one": (weights, grads, state), "ddp": (weights, grads, state),
                "zero2": (weights, grads / 4, state / 4),
                "zero3": (math.ceil(weights / 4) + gathered, grads / 4, state / 4)}
    expected["fsdp"] = expected["zero3"]
    for shard, (w, g, s) in expected.items():
        est = ests[shard]
        assert est.weights == w, shard
        parts = by_moment(est)["optimizer step"]
        assert (parts["weights"], parts["optimizer state"]) == (w, s), shard
        assert parts["gradients"] == pytest.approx(g, abs=4), shard  # whole bytes per block
        # DeepSpeed's engine keeps float32 masters of the trained parameters, partitioned
        masters = 4 * sum(p.numel for p in params if p.trainable) / 4
        assert parts.get("master weights (ZeRO)") == (masters if shard.startswith("zero")
                                                      else None), shard
        # activations (and the logits) are each process's own micro-batch's: as on one
        for name, moment in by_moment(est).items():
            mine = by_moment(one)[name]
            assert moment["activations"] == mine["activations"], (shard, name)
            assert moment["logits and loss buffers"] == mine["logits and loss buffers"]


def test_4bit_weights_packed_in_uint8_stay_whole_on_every_process(plans):
    """accelerate leaves a 4-bit weight packed in uint8 out of FSDP; in bfloat16 it shards."""
    packed = plans(plugins=["causal_lm", "nf4", "lora"])["fsdp"]
    floated = plans(plugins=["causal_lm", "nf4", "lora"],
                    nf4={"quant_storage": "bfloat16"})["fsdp"]
    quantized = [p for p in packed.plan.params if p.storage == "nf4"]
    assert quantized and not any(p.shardable for p in quantized)
    assert all(p.shardable for p in floated.plan.params if p.storage == "nf4")
    nf4 = sum(p.bytes for p in quantized)
    others = sum(p.bytes for p in packed.plan.params if p.storage != "nf4")
    assert packed.weights == nf4 + math.ceil(others / 4) + packed.gathered()
    everything = sum(p.bytes for p in floated.plan.params)
    assert floated.weights == math.ceil(everything / 4) + floated.gathered()


def test_plan_command_shows_one_process_of_n(make_recipe, capsys):
    recipe = make_recipe(train={"max_length": 32})
    assert cli.main(["plan", str(recipe), "--processes", "2", "--shard", "fsdp",
                     "--gpu", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "per process, one of 2: FSDP full shard (ZeRO-3): weights, gradients and " \
           "optimizer state divided among them; activations as on one" in out
    assert cli.main(["plan", str(recipe), "--processes", "2", "--shard", "fsdp", "--fit",
                     "--gpu", "24GiB"]) == 2
    assert "--fit plans one process" in capsys.readouterr().err


def test_the_two_gpu_recipe_fits_each_24gib_gpu_and_not_one(capsys):
    def peak(*args):
        code = cli.main(["plan", "qwen25-32b-qlora-2gpu", "--gpu", "24GiB", *args])
        out = capsys.readouterr().out
        return code, next(x for x in out.splitlines() if x.startswith("peak total"))
    assert peak("--processes", "2", "--shard", "fsdp")[0] == 0
    assert peak()[0] == 1


def test_the_qwen25_32b_catalog_entry_gives_its_published_size():
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(plan.read_config("Qwen/Qwen2.5-32B-Instruct"))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(32.5e9, rel=0.01)
