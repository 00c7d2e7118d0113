"""The memory planner: each component of a plan against byte counts worked out by hand for the
tiny Llama, the catalog against published parameter counts, `plugtune plan` and its exit
status, and `--fit` choosing the first combination that fits a budget."""
import math

import pytest
import yaml

from plugtune import cli, plan, testing
from plugtune.errors import RecipeError

MiB = 2**20


@pytest.fixture
def estimate(make_recipe):
    """``estimate(device="cpu", **sections) -> Estimate`` of the tiny Llama recipe (micro-batch
    2 x 32 tokens unless ``train`` says otherwise)."""
    def make(device="cpu", **sections):
        train = {"batch_size": 2, "max_length": 32, **sections.pop("train", {})}
        recipe, pm = testing.load_recipe(make_recipe(train=train, **sections))
        return plan.estimate(recipe, pm, device)
    return make


@pytest.fixture(scope="session")
def shape(tiny_llama):
    """The tiny Llama's sizes, from its config."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(tiny_llama)
    head = c.hidden_size // c.num_attention_heads
    return {"V": c.vocab_size, "h": c.hidden_size, "i": c.intermediate_size,
            "L": c.num_hidden_layers, "heads": c.num_attention_heads,
            "kv": c.num_key_value_heads * head, "tied": c.tie_word_embeddings}


def linears(s):
    """``{name: (out, in)}`` of one block's linear layers."""
    h, i, kv = s["h"], s["i"], s["kv"]
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def block_params(s):
    return sum(o * i for o, i in linears(s).values()) + 2 * s["h"]  # + two RMSNorm scales


def model_params(s):
    return (1 if s["tied"] else 2) * s["V"] * s["h"] + s["L"] * block_params(s) + s["h"]


# ---------------------------------------------------------------------------------------------
# Components against hand-computed byte counts
# ---------------------------------------------------------------------------------------------


def test_full_weights_gradients_and_adamw_state(estimate, shape):
    est = estimate()
    n = model_params(shape)
    assert est.weights == 4 * n  # float32
    assert est.grads()[0] == 4 * n  # every parameter trains
    assert est.plan.optimizer.state == 8 * n  # AdamW: two float32 moments
    assert est.grads()[2] == [4 * block_params(shape)] * shape["L"]


def test_freeze_trains_only_the_last_block(estimate, shape):
    est = estimate(plugins=["causal_lm", "freeze"], freeze={"last_n_blocks": 1})
    assert sum(p.numel for p in est.plan.trainable()) == block_params(shape)
    assert est.grads()[0] == 4 * block_params(shape)
    # frozen blocks under frozen embeddings keep nothing for backward
    assert est.acts.blocks[0] == 0 and est.acts.blocks[-1] > 0


def test_lora_adapters(estimate, shape):
    r = 4
    est = estimate(plugins=["causal_lm", "lora"], lora={"r": r})
    adapters = shape["L"] * sum(r * (o + i) for o, i in linears(shape).values())
    assert sum(p.numel for p in est.plan.trainable()) == adapters
    assert all(p.added for p in est.plan.trainable())
    assert est.weights == 4 * (model_params(shape) + adapters)
    assert est.plan.optimizer.state == 8 * adapters


def test_nf4_weights_with_block_constants(estimate, shape):
    est = estimate(plugins=["causal_lm", "nf4", "lora"])

    def nf4(n):  # 4 bits a weight, uint8 absmax per 64, fp32 per 256 absmax, code books
        blocks = math.ceil(n / 64)
        return n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 * 16

    quantized = {p.name: p for p in est.plan.params if p.storage == "nf4"}
    assert len(quantized) == 7 * shape["L"]  # every linear layer of the blocks, not lm_head
    assert all(p.bytes == nf4(p.numel) for p in quantized.values())
    assert not any("lm_head" in name for name in quantized)
    dense = [p for p in est.plan.params if not p.storage]
    assert all(p.bytes == 4 * p.numel for p in dense)


def test_int8_weights_with_row_scales_keep_their_inputs(estimate, shape):
    int8 = estimate(plugins=["causal_lm", "int8", "lora"])
    rows = {p.name: p for p in int8.plan.params if p.storage == "int8"}
    assert len(rows) == 7 * shape["L"]
    assert all(p.bytes == p.numel + 4 * p.shape[0] and p.keeps_input for p in rows.values())
    lora = estimate(plugins=["causal_lm", "lora"])
    # LLM.int8 keeps the input of each frozen layer for backward: at least the MLP's down_proj
    # input (intermediate size, float32) per token that LoRA alone does not keep
    assert int8.acts.blocks[-1] - lora.acts.blocks[-1] >= 4 * shape["i"]


def test_adamw_8bit_state(estimate, shape):
    est = estimate(plugins=["causal_lm", "full", "adamw_8bit"])

    def state(n):  # tensors under 4096 values keep 32-bit state
        return 8 * n if n < 4096 else 2 * n + 8 * math.ceil(n / 256)

    assert est.plan.optimizer.state == sum(state(p.numel) for p in est.plan.params)
    assert "AdamW8bit" in est.plan.optimizer.name


def test_activations_per_block_and_token(estimate, shape):
    """A Llama block keeps, per token: 3 x hidden for each of its two RMSNorms (input, normed,
    output) and one rsqrt each; q and the attention output (2 x hidden; the fused kernels write
    the output so that o_proj reads it without a copy); k and v (grouped, 2 x kv); 4 x
    intermediate in the MLP (gate, up, act, product); and a float32 log-sum-exp per head --
    never the attention matrix."""
    s = shape
    est = estimate()
    per_token = 4 * (6 * s["h"] + 2 * s["h"] + 2 * s["kv"] + 4 * s["i"] + 2) + 4 * s["heads"]
    assert est.acts.blocks[-1] == per_token
    assert est.acts.logits == 4 * s["V"] and est.acts.logits_fp32 == 4 * s["V"]
    ckpt = estimate(plugins=["causal_lm", "full", "gradient_checkpointing"])
    assert ckpt.plan.checkpointed == set(range(s["L"]))
    assert ckpt.acts.inputs[-1] == 4 * s["h"]  # a checkpointed block keeps only its input
    assert ckpt.peak().parts["activations"] < est.peak().parts["activations"]


def test_activations_scale_with_the_micro_batch_and_grad_accum_holds_gradients(estimate):
    est = estimate(train={"batch_size": 4})
    half = est.with_batch(2, 2)
    forward = {m.name: m for m in est.moments()}["end of forward"]
    forward_half = {m.name: m for m in half.moments()}["end of forward"]
    assert forward_half.parts["activations"] * 2 == forward.parts["activations"]
    assert forward.parts["gradients"] == 0
    assert forward_half.parts["gradients"] == est.grads()[0]  # kept between micro-batches


def test_a_chunked_loss_holds_one_chunk_of_logits_and_packing_its_mask(estimate, shape):
    """causal_lm.loss_chunk_tokens: the logits buffers are those of one chunk, whatever the
    micro-batch; train.packing adds SDPA's boolean mask over the one packed row ((2 x 32)^2)."""
    plain = estimate(causal_lm={"loss_chunk_tokens": None})
    chunked = estimate(causal_lm={"loss_chunk_tokens": 16})
    start = {m.name: m for m in plain.moments()}["start of backward"]
    start_chunked = {m.name: m for m in chunked.moments()}["start of backward"]
    logits = start.parts["logits and loss buffers"]
    assert logits == 2 * 2 * 32 * shape["V"] * 4  # two float32 copies of 2 x 32 tokens
    assert start_chunked.parts["logits and loss buffers"] * 4 == logits  # 16 of 64 tokens
    assert chunked.plan.loss_chunk_tokens == 16
    packed = estimate(train={"packing": True})
    assert {m.name: m.bytes for m in packed.plan.extra}["packed attention mask"] == (2 * 32) ** 2


def test_the_peak_is_the_largest_moment_plus_overhead(estimate):
    est = estimate()
    moments = est.moments()
    assert est.peak().total == max(m.total for m in moments)
    fixed, share = plan.OVERHEAD["cpu"]
    assert est.total() == est.peak().total + int(fixed + share * est.peak().total)


def test_budgets_and_gpu_names():
    assert plan.parse_budget("24GiB")[0] == 24 * 2**30
    assert plan.parse_budget("16GB")[0] == 16 * 10**9
    assert plan.parse_budget("rtx4090")[0] == 24564 * MiB
    assert plan.parse_budget("A100-80G")[0] == 81920 * MiB
    with pytest.raises(RecipeError, match="--gpu rtx9090.*rtx4090"):
        plan.parse_budget("rtx9090")


# Parameter counts as published on the models' pages.
PUBLISHED = {"meta-llama/Meta-Llama-3-8B": 8.03e9, "meta-llama/Llama-2-7b-hf": 6.74e9,
             "meta-llama/Llama-2-13b-hf": 13.0e9, "mistralai/Mistral-7B-v0.1": 7.24e9,
             "Qwen/Qwen2.5-0.5B": 0.494e9, "Qwen/Qwen2.5-1.5B": 1.54e9,
             "Qwen/Qwen2.5-7B": 7.61e9, "microsoft/Phi-3-mini-4k-instruct": 3.82e9,
             "openai-community/gpt2": 124e6, "openai-community/gpt2-medium": 355e6,
             "openai-community/gpt2-large": 774e6, "openai-community/gpt2-xl": 1.56e9,
             "HuggingFaceTB/SmolLM2-135M": 135e6, "HuggingFaceTB/SmolLM2-360M": 362e6,
             "HuggingFaceTB/SmolLM2-1.7B": 1.71e9}


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED))
def test_catalog_configs_give_the_published_sizes(hub_id):
    import torch
    from transformers import AutoModelForCausalLM

    config = plan.read_config(hub_id)  # offline: from the shipped catalog
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(PUBLISHED[hub_id], rel=0.01)


def test_a_gguf_header_gives_the_shapes(smollm2, make_recipe):
    recipe, pm = testing.load_recipe(make_recipe(model=smollm2, train={"max_length": 16}))
    est = plan.estimate(recipe, pm, "cpu")
    assert sum(p.numel for p in est.plan.params) == 134_515_008  # SmolLM2-135M, tied
    assert len(est.acts.blocks) == 30


# ---------------------------------------------------------------------------------------------
# `plugtune plan`
# ---------------------------------------------------------------------------------------------


def plan_cli(capsys, *args):
    code = cli.main(["plan", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_prints_the_components_and_exits_0_when_it_fits(make_recipe, capsys):
    code, out, _ = plan_cli(capsys, make_recipe(), "--gpu", "24GiB")
    assert code == 0
    for component in ("weights", "trainable parameters", "gradients", "optimizer state",
                      "activations", "per block and token", "logits and loss buffers",
                      "framework overhead", "peak total"):
        assert component in out
    assert "fits, headroom" in out


def test_plan_exits_1_when_it_does_not_fit(make_recipe, capsys):
    code, out, _ = plan_cli(capsys, make_recipe(), "--gpu", "100MiB")
    assert code == 1
    assert "does NOT fit" in out and "--fit" in out


def test_overrides_may_follow_the_options(make_recipe, capsys):
    _, out, _ = plan_cli(capsys, make_recipe(), "--gpu", "24GiB")
    _, smaller, _ = plan_cli(capsys, make_recipe(), "--gpu", "24GiB", "train.batch_size=1")
    assert "micro-batch 8 x" in out and "micro-batch 1 x" in smaller
    with pytest.raises(SystemExit):
        plan_cli(capsys, make_recipe(), "--gpu", "24GiB", "--no-such-option")


def test_plan_rejects_an_unknown_gpu_with_the_known_names(make_recipe, capsys):
    code, _, err = plan_cli(capsys, make_recipe(), "--gpu", "voodoo5")
    assert code == 2
    assert "--gpu voodoo5" in err and "h100-80g" in err


def test_run_prints_the_plan_before_loading(make_recipe, capsys):
    assert cli.main(["run", str(make_recipe(train={"max_steps": 1}))]) == 0
    lines = capsys.readouterr().out.splitlines()
    memory = next(i for i, line in enumerate(lines) if line.startswith("memory plan:"))
    assert "no CUDA GPU" in lines[memory]  # this CPU: said, and the fit is not checked
    assert not any(line.startswith("data:") for line in lines[:memory])  # nothing loaded yet


# ---------------------------------------------------------------------------------------------
# --fit
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path, make_recipe):
    """A recipe for a config-only Llama (no weights anywhere: the planner needs none), full
    fine-tuning at micro-batch 8 x 256 tokens; ``total(**sections)`` plans a variant of it."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, vocab_size=8000,
                max_position_embeddings=512).save_pretrained(tmp_path / "small")
    path = make_recipe("small.yaml", model=str(tmp_path / "small"),
                       train={"batch_size": 8, "max_length": 256})

    def total(batch=8, accum=1, **sections):
        recipe, pm = testing.load_recipe(make_recipe("variant.yaml", model=str(tmp_path / "small"),
                                                     train={"max_length": 256}, **sections))
        return plan.estimate(recipe, pm, "cuda").with_batch(batch, accum).total()
    return path, total


def fit(capsys, path, budget, out):
    code, text, err = plan_cli(capsys, path, "--gpu", f"{budget}B", "--fit", "--out", out)
    written = yaml.safe_load(out.read_text()) if out.exists() else None
    return code, text, written


def searched(text):
    """The combinations --fit reports trying, and which fitted."""
    lines = text[text.index("searching for a combination"):].splitlines()[1:]
    return [line.strip() for line in lines[:lines.index("")] if line.startswith("  ")]


def test_fit_keeps_a_recipe_that_fits(small, capsys, tmp_path):
    path, total = small
    code, text, written = fit(capsys, path, total(plugins=["causal_lm", "full"]) + MiB,
                              tmp_path / "out.yaml")
    assert code == 0 and "fits as it is" in text and written is None


def test_fit_adds_gradient_checkpointing_first(small, capsys, tmp_path):
    path, total = small
    with_ckpt = total(plugins=["causal_lm", "full", "gradient_checkpointing"])
    assert total(plugins=["causal_lm", "full"]) > with_ckpt + MiB
    code, text, written = fit(capsys, path, with_ckpt + MiB, tmp_path / "out.yaml")
    assert code == 0
    assert written["plugins"] == ["causal_lm", "full", "gradient_checkpointing"]
    assert written["train"]["batch_size"] == 8  # the micro-batch is kept when it can be
    assert searched(text)[-1].endswith(": fits")


def test_fit_then_shrinks_the_micro_batch_keeping_the_effective_batch(small, capsys, tmp_path):
    path, total = small
    ckpt = {"plugins": ["causal_lm", "full", "gradient_checkpointing"]}
    budget = total(batch=2, accum=4, **ckpt) + MiB
    assert total(**ckpt) > budget
    code, text, written = fit(capsys, path, budget, tmp_path / "out.yaml")
    assert code == 0
    assert (written["train"]["batch_size"], written["train"]["grad_accum"]) == (2, 4)
    assert "effective batch 8 kept" in text


def test_fit_moves_down_the_methods_when_full_cannot_fit(small, capsys, tmp_path):
    path, total = small
    # below every full fine-tuning variant: micro-batch 1 with checkpointing is full's least
    budget = total(batch=1, accum=8, plugins=["causal_lm", "full", "gradient_checkpointing"]) - 1
    code, text, written = fit(capsys, path, budget, tmp_path / "out.yaml")
    assert code == 0
    tried = searched(text)
    assert all(line.startswith("full") and not line.endswith("fits") for line in tried[:-1]
               if line.startswith("full"))
    assert tried[-1].endswith(": fits") and not tried[-1].startswith("full")
    assert "full" not in written["plugins"]
    assert cli.main(["validate", str(tmp_path / "out.yaml")]) == 0  # the written recipe is valid
    capsys.readouterr()


def test_fit_says_what_the_minimum_is_when_nothing_fits(small, capsys, tmp_path):
    path, _ = small
    code, text, written = fit(capsys, path, 520 * MiB, tmp_path / "out.yaml")
    assert code == 1 and written is None
    assert "does NOT fit" in text
    least = text[text.index("the least it needs is"):]
    assert "nf4 + lora + gradient checkpointing, micro-batch 1 x 8" in least


def test_fit_says_so_when_no_combination_can_be_tried(small, make_recipe, tmp_path, capsys):
    """No installed plugin offers a variant (none of full, lora, freeze, ...): --fit has
    nothing to try and says so in a line (it used to end in a traceback)."""
    import argparse

    from plugtune import manager

    # `small` wrote the config-only model tmp_path/small; this recipe names no trainer
    path = make_recipe("bare.yaml", model=str(tmp_path / "small"), plugins=["causal_lm"],
                       train={"batch_size": 8, "max_length": 256})
    bare = manager.Discovered({name: info for name, info in manager.discover().items()
                               if not hasattr(info.obj, "plugtune_fit_variants")})
    assert "causal_lm" in bare and "lora" not in bare and "full" not in bare
    said = []
    args = argparse.Namespace(recipe=str(path), overrides=[], gpu="1MiB", device="cuda",
                              fit=True, out=str(tmp_path / "out.yaml"))
    code = plan.command(args, echo=said.append, discovered=bare)
    assert code == 1 and not (tmp_path / "out.yaml").exists()
    assert "offer no combination that could be tried" in said[-1]
