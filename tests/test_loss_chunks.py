"""``causal_lm``'s chunked loss is the plain loss whatever an architecture does to its logits
after the output layer (rescaling it, soft-capping it), found by asking the model rather than
by a list of config keys; and a micro-batch with no target adds nothing, in both paths."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plugtune import testing
from plugtune.plugins import causal_lm
from plugtune.plugins.causal_lm import CausalLMSection, output_layer, plugtune_compute_loss
from test_packing import SGD, tiny_config


def loss_and_grads(model, batch, chunk):
    """The micro-batch's loss sum, count, the gradients of its token mean, and the most rows
    the output layer was given at once."""
    model.zero_grad(set_to_none=True)
    rows = []
    handle = output_layer(model).register_forward_hook(
        lambda m, a, out: rows.append(out.shape[:-1].numel()))
    loss = plugtune_compute_loss(model=model, batch=batch,
                                 recipe={"causal_lm": CausalLMSection(loss_chunk_tokens=chunk)})
    handle.remove()
    (loss.sum / max(int(loss.count), 1)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.sum.item(), int(loss.count), grads, max(rows)


def batch_of(lengths, vocab=100):
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)))
    labels = ids.clone()
    for row, n in enumerate(lengths):
        labels[row, n:] = -100
    mask = (labels != -100).long()
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.mark.parametrize("model_type,changes", [
    ("falcon_h1", {"lm_head_multiplier": 0.5}),     # logits * lm_head_multiplier
    ("cohere", {"logit_scale": 0.25}),              # logits * logit_scale
    ("granite", {"logits_scaling": 4.0}),           # logits / logits_scaling
    ("gemma2", {"final_logit_softcapping": 0.5}),   # tanh(logits / c) * c: chunked with it
])
def test_the_chunked_loss_keeps_what_the_model_does_to_its_logits(monkeypatch, model_type,
                                                                   changes):
    """float32: the loss in chunks of 5 tokens and its gradients equal the plain loss's, also
    with the planner's list of such config keys emptied (the model itself is asked)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(causal_lm, "CHANGES_LOGITS", ())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **changes))
    batch = batch_of([9, 14])
    plain, n, g_plain, widest = loss_and_grads(model, batch, None)
    chunked, m, g_chunked, chunk_widest = loss_and_grads(model, batch, 5)
    assert m == n == 21 and chunked == pytest.approx(plain, rel=1e-5)
    assert g_plain.keys() == g_chunked.keys()
    assert max((g_plain[k] - g_chunked[k]).abs().max().item() for k in g_plain) < 1e-5
    # soft-capping is repeated by the chunked loss, so it still chunks
    assert (chunk_widest <= 5) == (model_type == "gemma2") and widest >= 21


@pytest.mark.parametrize("chunk", [None, 5])
def test_a_micro_batch_without_targets_adds_a_zero_that_backpropagates(tiny_llama, chunk):
    """A lone end-of-sequence token (``{"text": ""}`` without a BOS token) has nothing to
    predict: loss 0 over 0 targets, finite zero gradients, in the plain and chunked loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    total, count, grads, _ = loss_and_grads(model, batch_of([1]), chunk)
    assert (total, count) == (0.0, 0)
    assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())


def test_an_empty_record_changes_nothing_in_the_step_that_holds_it(make_recipe, tmp_path):
    """Micro-batches of 1, 2 a step: an empty text beside a real one takes the step the real
    one takes alone, chunked or not (SGD, float32)."""
    real = {"text": "Echo: apple APPLE river stone"}
    both = testing.write_jsonl(tmp_path / "both.jsonl", [{"text": ""}, real])
    alone = testing.write_jsonl(tmp_path / "alone.jsonl", [real])
    trained = []
    for name, data, accum, chunk in (("alone", alone, 1, "null"), ("plain", both, 2, "null"),
                                     ("chunked", both, 2, "5")):
        recipe = make_recipe(f"{name}.yaml", data={"train": str(data), "validation": str(data)},
                             train={"max_steps": 1, "batch_size": 1, "grad_accum": accum,
                                    "lr": 0.5, "max_grad_norm": None, "eval_every": None},
                             output={"dir": str(tmp_path / "runs"), "name": name})
        summary, _ = testing.run(recipe, [f"causal_lm.loss_chunk_tokens={chunk}"],
                                 extra_plugins=[SGD()])
        path = Path(summary["artifact"])
        log = json.loads((path.parent / "metrics.jsonl").read_text().splitlines()[0])
        assert not log.get("skipped") and log["loss"] > 0
        trained.append((log["loss"], load_file(next(path.glob("*.safetensors")))))
    (loss, weights), *others = trained
    for other_loss, other in others:
        assert other_loss == pytest.approx(loss, rel=1e-5)
        assert max((weights[k] - other[k]).abs().max().item() for k in weights) < 1e-6
