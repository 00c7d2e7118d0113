"""LoRA: only the adapters train, the base stays bit-identical, the recipe's options reach
peft, and the combinations LoRA cannot make sense of are refused with what to use instead."""
import pytest

from plugtune import cli, loop, testing


def test_lora_trains_only_adapters_and_saves_a_peft_adapter(make_recipe):
    snapshot = testing.WeightSnapshot()
    summary, run = testing.run(make_recipe(plugins=["causal_lm", "lora"],
                                           train={"max_steps": 8, "lr": 5e-2},
                                           causal_lm={"exact_match": False}),
                               extra_plugins=[snapshot])
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"] - 0.3
    changed = snapshot.changed(run.model)
    adapters = [k for k in snapshot.before if ".lora_A." in k or ".lora_B." in k]
    assert sorted(adapters) == changed  # every adapter matrix trained, nothing else changed
    assert summary["trainable"] == sum(snapshot.before[k].numel() for k in adapters)
    adapter = run.dir / "adapter"
    assert summary["artifact"] == str(adapter)
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert not (run.dir / "model").exists()


def wrapped(make_recipe, **lora):
    """The model as the run would train it (loaded, wrapped, trainable parameters chosen)."""
    recipe, pm = testing.load_recipe(make_recipe(plugins=["causal_lm", "lora"], lora=lora))
    return loop.setup_model(pm.hook, recipe, echo=lambda *a: None)


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_target_modules_as_names_and_as_regex(make_recipe):
    by_name = trainable(wrapped(make_recipe, target_modules=["q_proj", "v_proj"]))
    by_regex = trainable(wrapped(make_recipe, target_modules=r".*\.1\.self_attn\.(q|v)_proj"))
    assert by_name and all(("q_proj" in n or "v_proj" in n) and ".lora_" in n for n in by_name)
    assert by_regex == {n for n in by_name if ".layers.1." in n}


def test_layers_to_transform_and_modules_to_save(make_recipe):
    model = wrapped(make_recipe, layers_to_transform=[1], modules_to_save=["lm_head"], r=4,
                    target_modules=["q_proj", "v_proj", "down_proj"])
    names = trainable(model)
    assert not any(".layers.0." in n for n in names)
    assert any(".layers.1." in n and ".lora_A." in n for n in names)
    assert any("lm_head.modules_to_save" in n for n in names)
    lora_a = next(p for n, p in model.named_parameters() if ".lora_A." in n)
    assert lora_a.shape[0] == 4


@pytest.mark.parametrize("option", [{"use_rslora": True}, {"use_dora": True},
                                    {"init": "gaussian"}, {"init": "orthogonal"},
                                    {"bias": "lora_only"}])
def test_options_reach_peft(make_recipe, option):
    config = wrapped(make_recipe, **option).peft_config["default"]
    key, value = next(iter(option.items()))
    expected = {"init": ("init_lora_weights", value)}.get(key, (key, value))
    assert getattr(config, expected[0]) == expected[1]


def test_gpt2_conv1d_layers_get_adapters(make_recipe, tiny_gpt2):
    summary, run = testing.run(make_recipe(model=str(tiny_gpt2), plugins=["causal_lm", "lora"],
                                           train={"max_steps": 6, "lr": 2e-2},
                                           causal_lm={"exact_match": False}))
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    assert any("c_attn.lora_A" in n for n in trainable(run.model))


def test_lora_with_gradient_checkpointing_still_trains_adapters(make_recipe):
    """The known trap: checkpointing a frozen base can leave adapters without gradients."""
    snapshot = testing.WeightSnapshot()
    summary, run = testing.run(make_recipe(plugins=["causal_lm", "gradient_checkpointing",
                                                    "lora"],
                                           gradient_checkpointing={"use_reentrant": True},
                                           train={"max_steps": 4, "lr": 5e-2},
                                           causal_lm={"exact_match": False}),
                               extra_plugins=[snapshot])
    assert run.model.base_model.model.is_gradient_checkpointing
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    changed = snapshot.changed(run.model)
    assert any(".layers.0." in k for k in changed) and all(".lora_" in k for k in changed)


@pytest.mark.parametrize("plugins, sections, says", [
    (["lora", "full"], {}, "plugins: `lora` and `full` both fill the role `trainable`"),
    (["lora", "freeze"], {"freeze": {"last_n_blocks": 1}},
     "plugins: `lora` and `freeze` both fill the role `trainable` (the plugin that decides which "
     "of the base model's weights train), which one plugin fills in a run: keep one of them (an "
     "adapter method already freezes the base"),
    (["lora"], {"lora": {"init": "orthogonal", "r": 5}},
     "lora.init: orthogonal needs an even lora.r, got r=5"),
    (["lora"], {"lora": {"target_modules": "q_proj("}}, "lora.target_modules: "),
    (["lora"], {"lora": {"layers_to_transform": [1]}},
     "lora.layers_to_transform: peft needs lora.target_modules as a list of module names"),
])
def test_rejected_lora_recipes(make_recipe, capsys, plugins, sections, says):
    path = make_recipe(plugins=["causal_lm", *plugins], **sections)
    assert cli.main(["validate", str(path)]) == 2
    assert says in capsys.readouterr().err
