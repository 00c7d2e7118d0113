"""PEFT's other methods (ia3, adalora, loha, lokr, oft, vera, prompt_tuning): each learns the
task while only its adapter trains, saves an adapter that plain peft reloads with the trained
logits, merges where peft can, is counted by the planner, and refuses the combinations it
cannot make sense of with what to use instead."""
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import echo_records
from test_plan import small  # noqa: F401  (fixture)
from plugtune import artifacts, cli, hookimpl, loop, plan, testing

IDS = torch.tensor([[3, 17, 42, 5, 99, 23, 7, 64]])

#: method -> (its section in the test runs, its learning rate, the substring of every
#: parameter it trains)
METHODS = {
    "ia3": ({}, 0.5, ".ia3_l."),
    "adalora": ({"init_r": 6, "target_r": 4, "tinit": 1, "tfinal": 1}, 5e-2, ".lora_"),
    "loha": ({"r": 4}, 5e-2, ".hada_"),
    "lokr": ({}, 5e-2, ".lokr_"),
    "oft": ({"block_size": 16}, 5e-2, ".oft_"),
    "vera": ({"r": 32}, 5e-2, ".vera_lambda_"),
    "prompt_tuning": ({"num_virtual_tokens": 4}, 5e-1, "prompt_encoder."),
}
MERGEABLE = [m for m in METHODS if m != "prompt_tuning"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama):
    """``trained(method) -> (summary, run)``: 8 steps on the tiny Llama, once per module and
    method."""
    tmp = tmp_path_factory.mktemp("peft")
    records = echo_records()
    train = testing.write_jsonl(tmp / "train.jsonl", records)
    validation = testing.write_jsonl(tmp / "validation.jsonl", records[::4])
    runs = {}

    def make(method):
        if method not in runs:
            section, lr, _ = METHODS[method]
            recipe = testing.write_recipe(
                tmp / f"{method}.yaml", model=str(tiny_llama), plugins=["causal_lm", method],
                data={"train": str(train), "validation": str(validation)},
                train={"max_steps": 8, "lr": lr, "batch_size": 8},
                causal_lm={"exact_match": False}, **{method: section},
                output={"dir": str(tmp / "runs"), "name": method})
            runs[method] = testing.run(recipe)
        return runs[method]
    return make


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.mark.parametrize("method", METHODS)
def test_learns_and_trains_only_its_adapter(trained, tiny_llama, method):
    summary, run = trained(method)
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"] - 0.1
    marker = METHODS[method][2]
    trains = [n for n, p in run.model.named_parameters() if p.requires_grad]
    assert trains and all(marker in n for n in trains), trains
    assert summary["trainable"] < 0.2 * summary["total"]
    # the base inside the adapted model is the checkpoint, bit for bit
    inside = {k.replace(".base_layer", ""): v
              for k, v in run.model.get_base_model().state_dict().items()}
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).state_dict()
    assert all(torch.equal(v, inside[k]) for k, v in base.items())
    names = {p.name for p in (run.dir / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names


@pytest.mark.parametrize("method", METHODS)
def test_adapter_reloads_in_plain_peft_with_the_trained_logits(trained, tiny_llama, method):
    _, run = trained(method)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, run.dir / "adapter")
    torch.testing.assert_close(logits(loaded), logits(run.model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", MERGEABLE)
def test_merged_export_gives_the_trained_logits(trained, tmp_path, method):
    _, run = trained(method)
    out = tmp_path / "merged"
    assert cli.main(["export", str(run.dir), str(out), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(merged), logits(run.model), rtol=0, atol=1e-4)


def test_prompt_tuning_has_nothing_to_merge(trained, tmp_path, capsys):
    _, run = trained("prompt_tuning")
    assert cli.main(["export", str(run.dir), str(tmp_path / "merged"), "--merge"]) != 0
    assert "nothing to merge" in capsys.readouterr().err
    assert artifacts.load(run.dir).kind == "adapter"  # and it loads for eval/generate


def test_adalora_shares_out_its_rank_budget(trained):
    """update_and_allocate ran every step: the final ranks (saved for reloading) sum to the
    budget, target_r per adapted layer, not init_r."""
    _, run = trained("adalora")
    config = run.model.peft_config["default"]
    assert config.total_step == 8 and config.rank_pattern
    ranks = [int(sum(mask)) for mask in config.rank_pattern.values()]
    assert sum(ranks) <= 4 * len(ranks) < 6 * len(ranks)


def test_prompt_tuning_text_init_starts_from_the_words(make_recipe):
    text = "Echo the word"
    recipe = make_recipe(plugins=["causal_lm", "prompt_tuning"],
                         prompt_tuning={"num_virtual_tokens": 6, "init": "text",
                                        "init_text": text},
                         train={"max_steps": 1}, causal_lm={"exact_match": False},
                         output={"save_model": False})

    class Capture:
        @hookimpl(trylast=True)
        def plugtune_train_start(self, run):
            self.start = run.model.prompt_encoder["default"].embedding.weight.detach().clone()
            ids = run.tokenizer(text, add_special_tokens=False)["input_ids"]
            self.words = run.model.get_input_embeddings().weight[(ids * 6)[:6]].detach()

    capture = Capture()
    testing.run(recipe, extra_plugins=[capture])
    torch.testing.assert_close(capture.start, capture.words)


@pytest.mark.parametrize("method", METHODS)
def test_the_planner_counts_what_the_run_trains(make_recipe, method):
    """The planner runs the model phases on a meta-device model: the same adapters."""
    recipe, pm = testing.load_recipe(make_recipe(plugins=["causal_lm", method],
                                                 **{method: METHODS[method][0]}))
    planned = sum(p.numel for p in plan.estimate(recipe, pm, "cpu").plan.trainable())
    model = loop.setup_model(pm.hook, recipe, echo=lambda *a: None)
    assert planned == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


@pytest.mark.parametrize("method, plugins, sections", [
    ("vera", ["nf4"], {}),
    ("loha", ["int8"], {}),
    ("ia3", ["nf4", "gradient_checkpointing"], {}),
    ("prompt_tuning", ["gradient_checkpointing"], {"gradient_checkpointing":
                                                   {"use_reentrant": True}}),
])
def test_allowed_combinations_learn_and_train_only_the_adapter(make_recipe, method, plugins,
                                                               sections):
    section, lr, marker = METHODS[method]
    summary, run = testing.run(make_recipe(plugins=["causal_lm", *plugins, method],
                                           train={"max_steps": 4, "lr": lr},
                                           causal_lm={"exact_match": False},
                                           **{method: section}, **sections))
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    trains = [n for n, p in run.model.named_parameters() if p.requires_grad]
    assert trains and all(marker in n for n in trains)


@pytest.mark.parametrize("method", ["oft", "prompt_tuning"])
def test_with_a_classification_head_the_head_trains_and_is_saved(tmp_path, tiny_llama, method):
    from test_heads import head_recipe, toy_texts

    recipe = head_recipe(tmp_path, tiny_llama, "sequence_classification", toy_texts(),
                         plugins=["sequence_classification", method],
                         train={"max_steps": 10, "lr": METHODS[method][1]},
                         **{method: METHODS[method][0]})
    summary, run = testing.run(recipe)
    assert summary["eval_after"]["accuracy"] > summary["eval_before"]["accuracy"]
    assert any(".score.modules_to_save." in n for n, p in run.model.named_parameters()
               if p.requires_grad)


@pytest.mark.parametrize("plugins, sections, says", [
    (["ia3", "full"], {}, "plugins: `ia3` and `full` both fill the role `trainable`"),
    (["oft", "freeze"], {"freeze": {"last_n_blocks": 1}},
     "plugins: `oft` and `freeze` both fill the role `trainable`"),
    (["lora", "vera"], {}, "plugins: `lora` and `vera` both fill the role `adapter`"),
    (["loha", "nf4"], {}, "plugins: `loha` cannot adapt the `nf4` base"),
    (["token_classification", "prompt_tuning"], {},
     "plugins: `prompt_tuning` adds virtual tokens to the input, which token_classification "
     "would have to tag"),
    (["prompt_tuning"], {"prompt_tuning": {"init": "text"}}, "prompt_tuning.init_text: give it "
                                                             "exactly when"),
    (["adalora"], {"adalora": {"init_r": 4, "target_r": 8}}, "adalora.target_r: 8 is above "
                                                             "adalora.init_r=4"),
    (["adalora"], {"adalora": {"tinit": 20, "tfinal": 10}}, "adalora.tinit + adalora.tfinal: "
                                                            "20 + 10 leaves no step"),
    (["ia3"], {"ia3": {"target_modules": ["k_proj"]}}, "ia3.feedforward_modules: give it with"),
    (["vera"], {"vera": {"r": 0}}, "vera.r: Input should be greater than 0"),
    (["lokr"], {"lokr": {"alhpa": 4}}, "lokr.alhpa: unknown key (did you mean 'alpha'?)"),
    (["nf4"], {}, "nothing would train; add lora (adapters on the frozen quantized base) or "
                  "another adapter method"),
])
def test_rejected_recipes_name_the_key(make_recipe, capsys, plugins, sections, says):
    path = make_recipe(plugins=["causal_lm", *plugins], **sections)
    assert cli.main(["validate", str(path)]) == 2
    assert says in capsys.readouterr().err


def test_plan_fit_keeps_the_recipes_adapter_method(small, capsys, tmp_path):
    """--fit moves an ia3 recipe down to int8 + ia3 (never to lora), and skips what the
    combination rules refuse (loha + nf4) instead of stopping."""
    from test_plan import fit, searched

    path, total = small
    ia3 = make_variant(path, tmp_path, "ia3")
    budget = total(batch=1, accum=8, plugins=["causal_lm", "int8", "ia3",
                                              "gradient_checkpointing"]) + 1
    code, text, written = fit(capsys, ia3, budget, tmp_path / "out.yaml")
    assert code == 0 and searched(text)[-1].startswith("int8 + ia3")
    assert {"int8", "ia3"} <= set(written["plugins"]) and "lora" not in written["plugins"]
    loha = make_variant(path, tmp_path, "loha", "gradient_checkpointing")
    code, text, _ = fit(capsys, loha, 1, tmp_path / "no.yaml")
    assert code == 1 and "nf4 + loha + gradient checkpointing: not allowed: plugins: `loha` cannot adapt" in text


def make_variant(path, tmp_path, *plugins):
    import yaml

    tree = yaml.safe_load(path.read_text())
    tree["plugins"] = ["causal_lm", *plugins]
    return testing.write_recipe(tmp_path / f"{plugins[0]}.yaml", **tree)


@pytest.mark.parametrize("method", ["prompt_tuning", "vera"])
def test_eval_and_generate_load_the_saved_adapter(trained, capsys, method):
    summary, run = trained(method)
    assert cli.main(["eval", str(run.dir)]) == 0
    out = capsys.readouterr().out
    assert f"{summary['eval_after']['eval_loss']:.4f}" in out  # the run's own held-out figure
    assert cli.main(["generate", str(run.dir), "Echo: apple", "--temperature", "5",
                     "--max-new-tokens", "8", "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip()



def test_adalora_orthogonality_penalty_is_in_the_training_loss_only(trained):
    """peft adds it only to a loss computed from labels inside its forward; plugtune adds it to
    the task plugin's Loss: training sees task loss + weight x penalty, evaluation the task's."""
    import torch

    from plugtune import loop
    from plugtune.plugins.adalora import orthogonality_penalty

    _, run = trained("adalora")
    data = run.data["validation"]
    batch = data.collate(data.examples[:4])
    weight = run.recipe["adalora"].orth_reg_weight
    with torch.no_grad():
        run.model.eval()
        task = loop.loss_of(run, run.model, batch)
        run.model.train()
        training = loop.loss_of(run, run.model, batch)
        penalty = orthogonality_penalty(run.model).item()
    run.model.eval()
    assert weight > 0 and penalty > 0
    assert training.mean.item() == pytest.approx(task.mean.item() + weight * penalty, rel=1e-4)


def documented_method():
    """The stranger's FourierFT plugin of docs/plugins.md, "A peft method in ten lines", as a
    module named ``fourierft``."""
    import re
    import types
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    section = doc.split("## A peft method in ten lines", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("fourierft")
    exec(compile(code, "docs/plugins.md", "exec"), module.__dict__)
    return module


def test_the_documented_ten_line_method_trains_only_its_adapter_and_saves_it(make_recipe):
    snapshot = testing.WeightSnapshot()
    summary, run = testing.run(
        make_recipe(plugins=["causal_lm"], train={"max_steps": 2}, fourierft={"n_frequency": 64}),
        extra_plugins=[documented_method(), snapshot])
    changed = snapshot.changed(run.model)
    assert changed and all(".fourierft_spectrum" in name for name in changed), changed
    config = (run.dir / "adapter" / "adapter_config.json").read_text()
    assert '"peft_type": "FOURIERFT"' in config and '"n_frequency": 64' in config
