"""Helpers for testing plugtune and plugins for it (as ``tox.pytest`` is for tox plugins).

- :func:`tiny_model` writes a tiny Llama- or GPT-2-style model with random weights and a
  byte-level BPE tokenizer (with a ChatML chat template) trained on the spot: no download;
  :func:`tiny_encoder` a tiny BERT-style encoder with a WordPiece tokenizer, for head plugins.
- :class:`HookRecorder` implements every hook and records the order they are called in.
- :class:`WeightSnapshot` tells which weights a run changed (frozen ones must not).
- :func:`write_recipe` writes a recipe for a tiny model, and :func:`run` runs one in-process.
"""
import json
from collections.abc import Callable, Generator, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import hookimpl, hookspecs, loop, manager, recipe as recipes

if TYPE_CHECKING:
    import pluggy
    import torch
    from transformers import PreTrainedTokenizerFast

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(corpus: Iterable[str], vocab_size: int = 400) -> "PreTrainedTokenizerFast":
    """A byte-level BPE tokenizer trained on ``corpus`` (strings), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token="<|im_start|>",
                                   chat_template=CHATML)


def tiny_model(path: str | Path, arch: str = "llama", corpus: Iterable[str] = ("hello world",),
               layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """Write a tiny random-weight model and its tokenizer to ``path`` (save_pretrained)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(list(corpus))
    common = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config: PretrainedConfig
    if arch == "llama":
        config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, **common)
    elif arch == "gpt2":
        config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **common)
    else:
        raise ValueError(f"arch must be llama or gpt2, not {arch!r}")
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def tiny_encoder(path: str | Path, corpus: Iterable[str] = ("hello world",), layers: int = 2,
                 hidden: int = 64, seed: int = 0) -> Path:
    """Write a tiny random-weight BERT-style encoder (``save_pretrained``, loadable by every
    ``AutoModelFor...`` head class) and its WordPiece tokenizer, trained on ``corpus``, to
    ``path``: what a task-head plugin's tests load (``model: {name: PATH}``)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import AutoModel, BertConfig, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(list(corpus), trainers.WordPieceTrainer(vocab_size=200,
                                                                    special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                        pad_token="[PAD]", cls_token="[CLS]",
                                        sep_token="[SEP]", mask_token="[MASK]")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=2 * hidden,
                        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    AutoModel.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def write_recipe(path: str | Path, **sections: Any) -> Path:
    """Write a recipe YAML file from keyword sections (``model=..., train={...}``)."""
    Path(path).write_text(yaml.safe_dump(sections, sort_keys=False))
    return Path(path)


def write_jsonl(path: str | Path, records: Iterable[Any]) -> Path:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))
    return Path(path)


#: The distribution name :func:`with_plugins` gives the plugins it adds.
TESTING_DIST = "plugtune.testing"


def run(recipe_path: str | Path, overrides: Sequence[str] = (), extra_plugins: Iterable[Any] = (),
        echo: Callable[..., object] = lambda *a: None) -> tuple[dict[str, Any], "loop.Run"]:
    """Validate and run a recipe in-process, with ``extra_plugins`` active as in
    :func:`load_recipe`. Returns ``(summary, run)``."""
    recipe, pm = load_recipe(recipe_path, overrides, extra_plugins)
    run_ = loop.setup(recipe, pm, echo=echo)
    return loop.train(run_, echo=echo), run_


def load_recipe(recipe_path: str | Path, overrides: Sequence[str] = (),
                extra_plugins: Iterable[Any] = (),
                check_files: bool = True) -> tuple[recipes.Recipe, "pluggy.PluginManager"]:
    """``plugtune.recipe.load_recipe`` with ``extra_plugins`` (modules, classes or instances
    implementing hooks) installed and appended to the recipe's ``plugins:``, so they see the
    recipe phase too and answer firstresult hooks instead of the recipe's plugins, as if each
    declared ``PLUGTUNE_REPLACES`` for the hooks it implements (roles are checked as for any
    plugin). ``check_files=False`` reloads a run's ``recipe.yaml`` (its directory exists).
    Returns ``(recipe, plugin_manager)``."""
    found = with_plugins(extra_plugins)
    extra = [name for name, info in found.items() if info.dist == TESTING_DIST]
    if extra:
        tree = recipes.apply_overrides(recipes.load_tree(recipes.find_recipe(recipe_path)),
                                       overrides)
        requested = tree.get("plugins") or []
        if isinstance(requested, list):
            overrides = [*overrides, "plugins=" + json.dumps(requested + extra)]
    return recipes.load_recipe(recipe_path, overrides, found, check_files=check_files)


def with_plugins(plugins: Iterable[Any],
                 discovered: "dict[str, manager.PluginInfo] | None" = None) -> "manager.Discovered":
    """The discovered plugins (``manager.discover()`` by default) plus ``plugins`` as if
    installed, each named after its ``__name__`` (or its class's), answering before the others
    (``PluginInfo.overrides``)."""
    base_found = manager.discover() if discovered is None else discovered
    found = manager.Discovered(base_found)
    found.disabled = dict(getattr(base_found, "disabled", {}))
    for plugin in plugins:
        base = getattr(plugin, "__name__", type(plugin).__name__)
        name, n = base, 1
        while name in found:
            n += 1
            name = f"{base}-{n}"
        found[name] = manager.PluginInfo(name, plugin, TESTING_DIST, "test", overrides=True)
    return found


class WeightSnapshot:
    """A plugin that copies the model's state dict when training starts; :meth:`changed` then
    names the tensors that differ, bit for bit (quantized weights compared as stored)."""

    def __init__(self) -> None:
        self.before: "dict[str, torch.Tensor] | None" = None

    @hookimpl
    def plugtune_train_start(self, run: "loop.Run") -> None:
        model: Any = run.model  # a torch module by now (train_start)
        self.before = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def changed(self, model: "torch.nn.Module") -> list[str]:
        import torch

        assert self.before is not None, "changed() before the run's train_start"
        after = model.state_dict()
        return sorted(k for k, v in self.before.items()
                      if v.dtype != after[k].dtype or not torch.equal(v, after[k]))


def hook_names() -> list[str]:
    """Every hook name in the spec module, in the order the module defines them."""
    return [n for n in vars(hookspecs) if n.startswith("plugtune_")]


class HookRecorder:
    """A plugin implementing every hook; ``calls`` lists hook names in call order.

    Its implementations are wrappers that run first (``tryfirst``) and change nothing, so it
    sees every call and answers no firstresult hook (the real plugins do)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        for name in hook_names():
            setattr(self, name, self._recorder(name))

    def _recorder(self, name: str) -> Callable[[], Generator[None, Any, Any]]:
        import pluggy

        def record() -> Generator[None, Any, Any]:
            self.calls.append(name)
            return (yield)

        record.__name__ = name
        return pluggy.HookimplMarker(manager.GROUP)(tryfirst=True, wrapper=True)(record)
