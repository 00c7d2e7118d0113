"""``model.attn_implementation``: validated before any model loads (an unknown name, an
implementation this machine cannot train with, one that would mix packed examples: one line
each), passed to ``from_pretrained``, recorded in the manifest, counted by the planner; packed
examples stay apart under every implementation that trains on a CPU."""
import json

import pytest
import torch

from plugtune import attention, loop, testing
from plugtune.errors import RecipeError
from plugtune.plugins import causal_lm, lm_family

import test_packing
from test_packing import packed_spans, per_example_sums, tiny_config


def refused(recipe):
    """The lines of the RecipeError ``recipe`` raises at validate time."""
    with pytest.raises(RecipeError) as err:
        testing.load_recipe(recipe)
    return [line for line in str(err.value).splitlines() if "attn_implementation" in line]


def test_the_names_are_those_of_the_installed_transformers():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ours = {lm_family.PACKED_SDPA}  # registered by the causal-LM family for packed SDPA
    assert set(attention.ATTENTION) - ours == {"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()} - ours


def test_an_unknown_name_is_one_line_with_did_you_mean(make_recipe):
    lines = refused(make_recipe(model={"name": "x", "attn_implementation": "spda"}))
    assert len(lines) == 1 and "did you mean 'sdpa'?" in lines[0]
    assert "recipe.yaml: model.attn_implementation: unknown" in lines[0]


def test_a_top_level_key_of_another_tool_points_at_the_model_key(make_recipe):
    with pytest.raises(RecipeError) as err:
        testing.load_recipe(make_recipe(flash_attention=True))
    assert "did you mean 'model.attn_implementation'?" in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_flash_attention_without_cuda_or_its_package_is_one_line_saying_what_is_missing(
        make_recipe, tiny_llama):
    lines = refused(make_recipe(model={"name": str(tiny_llama),
                                       "attn_implementation": "flash_attention_2"}))
    assert len(lines) == 1 and "CUDA GPU" in lines[0]
    from transformers.utils import is_flash_attn_2_available
    assert ("flash-attn package" in lines[0]) != is_flash_attn_2_available()
    # what is missing, one by one: a CUDA machine without the package
    why = attention.unavailable("flash_attention_2", cuda=True)
    assert why is None or ("flash-attn package" in why and "CUDA" not in why.split(";")[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_flex_attention_cannot_train_on_a_cpu_and_says_so(make_recipe, tiny_llama):
    lines = refused(make_recipe(model={"name": str(tiny_llama),
                                       "attn_implementation": "flex_attention"}))
    assert len(lines) == 1 and "CPU" in lines[0] and "sdpa" in lines[0]


def test_an_implementation_that_mixes_packed_examples_is_refused_with_packing_only(
        make_recipe, tiny_llama):
    model = {"name": str(tiny_llama), "attn_implementation": "paged|eager"}
    lines = refused(make_recipe(model=model, train={"packing": True}))
    assert len(lines) == 1 and "packed examples" in lines[0] and "train.packing" in lines[0]
    testing.load_recipe(make_recipe(model=model, train={"packing": False}))


def leak(implementation):
    """test_packing.leak with ``implementation``: how far an example's logits move when another
    example is packed before it in its row."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"),
                                             attn_implementation=implementation).eval()
    first, second = torch.randint(3, 100, (1, 7)), torch.randint(3, 100, (1, 9))
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        packed = model(input_ids=torch.cat([first, second], 1), position_ids=positions,
                       use_cache=False).logits[0, 7:]
        alone = model(input_ids=second, use_cache=False).logits[0]
    return (packed - alone).abs().max().item()


@pytest.mark.parametrize("implementation", ["eager", "sdpa", "flex_attention", "paged|eager"])
def test_which_implementations_keep_packed_examples_apart(implementation):
    """The allow-list is the truth for the installed transformers (flex attention: its forward
    pass, the one that runs on a CPU)."""
    if implementation in attention.KEEPS_PACKED_APART:
        assert leak(implementation) < 1e-5
    else:
        assert leak(implementation) > 1e-3


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_each_packed_example_has_the_loss_it_has_alone_under(implementation, make_recipe,
                                                              tiny_llama, tmp_path):
    """float32, through plugtune's own loading and collation: every example's loss in the packed
    batch equals its loss alone (to 1e-5), and the model runs the chosen implementation."""
    data = testing.write_jsonl(tmp_path / "mixed.jsonl", test_packing.records())
    recipe, pm = testing.load_recipe(make_recipe(
        model={"name": str(tiny_llama), "attn_implementation": implementation},
        data={"train": str(data), "validation": str(data)},
        train={"packing": True, "batch_size": 12, "max_length": 128, "max_steps": 1}))
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    assert attention.in_use(run.model) == {"sdpa": lm_family.PACKED_SDPA}.get(implementation,
                                                                          implementation)
    model, examples = run.model.eval(), run.data["train"].examples
    packed = per_example_sums(model, run.data["train"].collate(examples),
                              packed_spans(examples, 128, one_row=implementation != "eager"))
    plain = causal_lm.collator(run.tokenizer.pad_token_id)
    alone = [per_example_sums(model, plain([e]), [(0, 0, len(e["input_ids"]))])[0]
             for e in examples]
    assert packed == pytest.approx(alone, rel=1e-5, abs=1e-5) and min(alone) > 0


def test_the_manifest_records_the_implementation_used(make_recipe, tiny_llama, tmp_path):
    for chosen, recorded in ((None, "sdpa"), ("eager", "eager")):
        name = f"run-{chosen}"
        recipe, pm = testing.load_recipe(make_recipe(
            model={"name": str(tiny_llama), "attn_implementation": chosen},
            train={"max_steps": 1, "eval_every": None}, output={"name": name}))
        loop.train(loop.setup(recipe, pm, echo=lambda *a: None), echo=lambda *a: None)
        manifest = json.loads((tmp_path / "runs" / name / "manifest.json").read_text())
        assert manifest["attn_implementation"] == recorded


def test_the_planner_counts_what_eager_attention_keeps(make_recipe, tiny_llama):
    """Eager attention keeps its probabilities (batch x heads x T^2) for backward and gets a
    float mask; SDPA keeps neither; flash attention plans as SDPA without its packed mask."""
    from plugtune import recipe as recipes
    from plugtune.plan import estimate

    def planned(implementation, packing=False):  # as `plugtune plan` loads it: for a GPU
        recipe, pm = recipes.load_recipe(make_recipe(
            model={"name": str(tiny_llama), "attn_implementation": implementation},
            train={"batch_size": 2, "max_length": 256, "packing": packing}),
            check_hardware=False)
        return estimate(recipe, pm, "cuda").peak().total

    b, heads, t, layers = 2, 4, 256, 2
    probabilities = b * heads * t * t * 4 * layers  # float32, each block's
    assert planned("eager") - planned("sdpa") >= probabilities
    # SDPA: one packed row of the micro-batch's b x t tokens, its block-diagonal mask
    assert planned("sdpa", packing=True) - planned("sdpa") == pytest.approx((b * t) ** 2)
    assert planned("flash_attention_2", packing=True) == planned("sdpa")
