"""Padding-free packing (`train.packing`): the examples of a micro-batch laid end to end in rows
of at most `train.max_length` tokens, positions restarting at each example. Each example's loss
is what it is alone, no token sees another example, and a packed run takes the same steps as a
padded one."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plugtune import hookimpl, loop, testing
from plugtune.data import REAL_TOKENS
from plugtune.errors import RecipeError
from plugtune.plugins import causal_lm, lm_family

WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle"]


def records(n=12):
    """Text, prompt/completion and chat records of 3 to about 60 tokens."""
    out = []
    for i in range(n):
        words = " ".join(WORDS[(i + j) % 8] for j in range(1 + (i * 37) % 40))
        kind = i % 3
        if kind == 0:
            out.append({"text": words})
        elif kind == 1:
            out.append({"prompt": f"Echo: {words}", "completion": f" {words.upper()}"})
        else:
            out.append({"messages": [{"role": "user", "content": f"Echo: {words}"},
                                     {"role": "assistant", "content": words.upper()}]})
    return out


class SGD:
    """Plain SGD: the update is the gradient itself (AdamW's first step is lr times its sign)."""

    @hookimpl
    def plugtune_build_optimizer(self, params, recipe):
        return torch.optim.SGD(params, lr=recipe.train.lr)


@pytest.fixture
def mixed(make_recipe, tmp_path):
    data = testing.write_jsonl(tmp_path / "mixed.jsonl", records())

    def make(name, plugins=("causal_lm", "full"), **train):
        extra = {"lora": {"dropout": 0.0}} if "lora" in plugins else {}
        return make_recipe(f"{name}.yaml", plugins=list(plugins), **extra,
                           data={"train": str(data), "validation": str(data)},
                           train={"max_steps": 1, "lr": 0.5, "max_grad_norm": None,
                                  "eval_every": None, "batch_size": 12, "max_length": 128,
                                  **train},
                           output={"name": name})
    return make


def per_example_sums(model, batch, spans):
    """Each example's summed next-token loss, read off one forward pass of ``batch``; ``spans``
    is ``(row, start, end)`` per example."""
    inputs = {k: v for k, v in batch.items() if k != "labels" and not k.startswith("_")}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float()
    out = []
    for row, start, end in spans:
        lg, lb = logits[row, start:end - 1], batch["labels"][row, start + 1:end]
        out.append(torch.nn.functional.cross_entropy(lg, lb, ignore_index=-100,
                                                     reduction="sum").item())
    return out


def packed_spans(examples, width, one_row=True):
    """``(row, start, end)`` of each example as the packed collator lays them: all in one row
    (SDPA, flash attention) or in rows of at most ``width`` (eager)."""
    lengths = [len(e["input_ids"]) for e in examples]
    layout = [list(range(len(examples)))] if one_row else causal_lm.rows(lengths, width)
    spans = []
    for r, row in enumerate(layout):
        start = 0
        for i in row:
            spans.append((i, r, start, start + len(examples[i]["input_ids"])))
            start += len(examples[i]["input_ids"])
    return [s[1:] for s in sorted(spans)]


def test_packed_rows_hold_every_token_once_within_max_length(mixed):
    """Eager attention (whose cost is a row's width squared): rows of at most max_length."""
    recipe, pm = testing.load_recipe(mixed("rows", packing=True, max_length=64))
    recipe.model.attn_implementation = "eager"
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    examples = run.data["train"].examples
    batch = run.data["train"].collate(examples)
    assert "attention_mask" not in batch and batch["input_ids"].shape[1] <= 64
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch[REAL_TOKENS].item() == sum(lengths)
    assert batch["input_ids"].shape[0] < len(examples)  # examples share rows
    layout = causal_lm.rows(lengths, 64)
    assert sorted(i for row in layout for i in row) == list(range(len(examples)))
    for r, row in enumerate(layout):  # positions restart at each example
        expected = [p for i in row for p in range(lengths[i])]
        assert batch["position_ids"][r, :len(expected)].tolist() == expected


def test_sdpa_packs_a_micro_batch_in_one_row_and_attends_per_example(mixed):
    """SDPA (the default): one row, no position wasted (positions computed per real token is
    exactly 1), and the model attends one example at a time (lm_family.PACKED_SDPA)."""
    recipe, pm = testing.load_recipe(mixed("one-row", packing=True, max_length=64))
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    examples = run.data["train"].examples
    batch = run.data["train"].collate(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (1, sum(lengths)) == (1, batch[REAL_TOKENS].item())
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert run.model.config._attn_implementation == lm_family.PACKED_SDPA
    assert lm_family.segment_lengths(batch["position_ids"]) == lengths


def test_each_packed_example_has_the_loss_it_has_alone(mixed):
    """float32: every example's loss in the packed batch equals its loss run on its own."""
    recipe, pm = testing.load_recipe(mixed("alone", packing=True))
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    model, examples = run.model.eval(), run.data["train"].examples
    packed = per_example_sums(model, run.data["train"].collate(examples),
                              packed_spans(examples, 128))
    plain = causal_lm.collator(run.tokenizer.pad_token_id)
    alone = [per_example_sums(model, plain([e]), [(0, 0, len(e["input_ids"]))])[0]
             for e in examples]
    assert packed == pytest.approx(alone, rel=1e-5, abs=1e-5)
    assert min(alone) > 0


def test_no_token_attends_across_an_example_boundary(mixed):
    """Change one example's tokens: its row neighbours' logits stay the same. Without the
    restarting positions (one long sequence) they change: the check can fail."""
    recipe, pm = testing.load_recipe(mixed("boundary", packing=True))
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    model, examples = run.model.eval(), run.data["train"].examples
    collate = run.data["train"].collate
    spans = packed_spans(examples, 128)
    # an example that starts a row another example shares
    first = next(i for i, (r, s, _) in enumerate(spans)
                 if s == 0 and sum(x[0] == r for x in spans) > 1)
    row, start, end = spans[first]
    neighbours = [s for s in spans if s[0] == row and s[1] > start]
    changed = [dict(e) for e in examples]
    changed[first]["input_ids"] = [(t + 1) % 50 + 3 for t in examples[first]["input_ids"]]

    def logits(batch, positions=True):
        inputs = {"input_ids": batch["input_ids"], "use_cache": False}
        if positions:
            inputs["position_ids"] = batch["position_ids"]
        with torch.no_grad():
            return model(**inputs).logits

    before, after = logits(collate(examples)), logits(collate(changed))
    assert not torch.allclose(before[row, start:end], after[row, start:end])
    for _, s, e in neighbours:
        assert torch.allclose(before[row, s:e], after[row, s:e], atol=1e-6)
    leaky = logits(collate(examples), False), logits(collate(changed), False)
    assert any(not torch.allclose(leaky[0][row, s:e], leaky[1][row, s:e], atol=1e-6)
               for _, s, e in neighbours)


@pytest.mark.parametrize("plugins,accum", [
    (("causal_lm", "full"), 1),
    (("causal_lm", "lora", "gradient_checkpointing"), 3),
    (("causal_lm", "nf4", "lora"), 2),
])
def test_a_packed_run_takes_the_same_step_as_a_padded_one(mixed, plugins, accum):
    """Packing changes how a step's examples are laid out, not which examples it sees or its
    objective: the trained weights agree (float32, SGD-like lr, one step of 12 examples)."""
    trained = {}
    for packing in (False, True):
        summary, _ = testing.run(mixed(f"p{packing}{len(plugins)}", plugins, packing=packing,
                                       batch_size=12 // accum, grad_accum=accum),
                                 extra_plugins=[SGD()])
        path = Path(summary["artifact"])
        trained[packing] = load_file(next(path.glob("*.safetensors")))
        log = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text()
               .splitlines()]
        trained[f"loss{packing}"] = log[0]["loss"]
    assert trained["lossTrue"] == pytest.approx(trained["lossFalse"], rel=1e-5)
    assert max((trained[True][k] - trained[False][k]).abs().max().item()
               for k in trained[True]) < 1e-5


@pytest.mark.parametrize("plugins,key", [
    (["sequence_classification", "full"], "train.packing"),
    (["causal_lm", "prompt_tuning"], "train.packing"),
])
def test_packing_is_refused_where_it_cannot_apply(make_recipe, tmp_path, plugins, key):
    data = testing.write_jsonl(tmp_path / "labelled.jsonl",
                               [{"text": w, "label": w[0]} for w in WORDS])
    recipe = make_recipe(plugins=plugins, data={"train": str(data), "validation": str(data)},
                         train={"packing": True})
    with pytest.raises(RecipeError, match=key):
        testing.load_recipe(recipe)


@pytest.mark.parametrize("plugins", [("causal_lm", "full"), ("causal_lm", "lora")])
def test_the_chunked_loss_equals_the_plain_one_in_value_and_gradient(mixed, plugins):
    """causal_lm.loss_chunk_tokens: the same loss and gradients (float32, <= 1e-5), chunked
    in pieces smaller than a micro-batch's labelled tokens, with packed and padded batches."""
    from plugtune.plugins.causal_lm import output_layer

    for packing in (False, True):
        results = []
        for chunk in (None, 7):
            recipe, pm = testing.load_recipe(
                mixed(f"chunk{packing}{chunk}", plugins, packing=packing),
                [f"causal_lm.loss_chunk_tokens={'null' if chunk is None else chunk}"])
            run = loop.setup(recipe, pm, echo=lambda *a: None)
            made = []  # the output layer's largest result: chunked, never the whole batch
            handle = output_layer(run.model).register_forward_hook(
                lambda m, a, out: made.append(out.shape[:-1].numel()))
            batch = run.data["train"].collate(run.data["train"].examples)
            loss = loop.loss_of(run, run.model, batch)
            (loss.sum / loss.count).backward()  # the step objective: the token mean
            handle.remove()
            grads = {n: p.grad.clone() for n, p in run.model.named_parameters()
                     if p.grad is not None}
            results.append((loss.sum.item(), int(loss.count), grads, max(made)))
        (plain, n, g_plain, widest), (chunked, m, g_chunked, chunk_widest) = results
        assert n == m and chunked == pytest.approx(plain, rel=1e-5)
        assert chunk_widest == 7 and widest > 100
        assert g_plain.keys() == g_chunked.keys()
        assert max((g_plain[k] - g_chunked[k]).abs().max().item() for k in g_plain) < 1e-5


def test_the_loss_is_chunked_by_default_only_for_large_vocabularies(mixed):
    from plugtune.plugins.causal_lm import chunk_tokens

    recipe, pm = testing.load_recipe(mixed("auto"))
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    assert chunk_tokens(recipe, run.model) is None  # the tiny model's 400 tokens
    run.model.config.vocab_size = 49152
    head = run.model.get_output_embeddings()
    head.out_features = 49152
    assert chunk_tokens(recipe, run.model) == 512  # <= 128 MiB of float32 logits
    head.out_features = 128256
    assert chunk_tokens(recipe, run.model) == 256


def test_two_processes_pack_and_chunk_to_the_same_step_as_one(mixed, tmp_path):
    """torchrun, 2 CPU processes x 6 examples, packed, loss in chunks of 7 tokens (through the
    DDP wrapper) == 1 process x 12 padded, plain loss (SGD-sized update, float32)."""
    import os
    import subprocess
    import sys

    def weights(name):
        return load_file(tmp_path / "runs" / name / "model" / "model.safetensors")

    over = ["train.lr=1e-3"]
    testing.run(mixed("single", batch_size=12, packing=False),
                over + ["causal_lm.loss_chunk_tokens=null"])
    recipe = mixed("double", batch_size=6, packing=True)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "plugtune.cli", "run", str(recipe), *over, "causal_lm.loss_chunk_tokens=7"],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = weights("single"), weights("double")
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5


def tiny_config(model_type, **extra):
    """A 2-layer, 64-wide config of ``model_type`` (its own defaults for everything else)."""
    from transformers import AutoConfig

    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 128,
             "max_position_embeddings": 256, "pad_token_id": 0, **extra}
    config = AutoConfig.for_model(model_type, **small)
    for key, value in (("n_embd", 64), ("n_layer", 2), ("n_head", 4), ("ffn_dim", 128),
                       ("word_embed_proj_dim", 64), ("ffn_hidden_size", 128)):
        if hasattr(config, key):  # the architectures that name them their own way
            setattr(config, key, value)
    return config


def leak(model_type, packed_sdpa=False):
    """How far an example's logits move when another example is packed before it in its row
    (positions restarting at it), against the example alone: float32, eval mode.
    ``packed_sdpa``: a model on SDPA runs the per-example SDPA packing gives it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    if packed_sdpa and lm_family.packed_attention(model):
        model.set_attn_implementation(lm_family.packed_attention(model))
    first, second = torch.randint(3, 100, (1, 7)), torch.randint(3, 100, (1, 9))
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        packed = model(input_ids=torch.cat([first, second], 1), position_ids=positions,
                       use_cache=False).logits[0, 7:]
        alone = model(input_ids=second, use_cache=False).logits[0]
    return (packed - alone).abs().max().item()


@pytest.mark.parametrize("model_type", sorted(causal_lm.PACKABLE) + ["opt", "bloom", "mamba"])
def test_packing_is_allowed_exactly_for_architectures_that_keep_examples_apart(model_type):
    """The allow-list is the truth for the installed transformers: every listed type keeps a
    packed example's logits what they are alone; OPT, BLOOM and Mamba (refused) do not."""
    if model_type in causal_lm.PACKABLE:
        assert leak(model_type) < 1e-5
    else:
        assert leak(model_type) > 1e-3


@pytest.mark.parametrize("model_type", sorted(causal_lm.PACKABLE))
def test_per_example_sdpa_keeps_every_packable_architecture_apart(model_type):
    assert leak(model_type, packed_sdpa=True) < 1e-5


@pytest.mark.parametrize("model_type", ["opt", "bloom", "falcon_h1"])
def test_packing_is_refused_before_loading_a_model_that_would_mix_examples(
        make_recipe, tmp_path, model_type):
    """One line naming train.packing and the model type, from the config alone: the model
    directory holds no weights to load."""
    model = tmp_path / model_type
    tiny_config(model_type).save_pretrained(model)
    recipe = make_recipe(model=str(model), train={"packing": True})
    with pytest.raises(RecipeError) as refused:
        testing.load_recipe(recipe)
    lines = str(refused.value).splitlines()
    assert [line for line in lines if "train.packing" in line] == [
        line for line in lines if model_type in line]
    assert sum("train.packing" in line for line in lines) == 1
    testing.load_recipe(make_recipe(model=str(model), train={"packing": False}))
