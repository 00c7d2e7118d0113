"""What the peft adapter plugins (``lora``, ``ia3``, ``adalora``, ``loha``, ``lokr``, ``oft``,
``vera``, ``prompt_tuning``) share; not a plugin itself.

Each method is a plugin of its own, named as a recipe names it, with its own section (peft's
options in the recipe's words). They share: the fields every method has (where the adapters
go, modules trained in full beside them), the combination rules (an adapter method freezes the
base, so ``full`` and ``freeze`` make no sense with it, and peft wraps a model with one method
here), wrapping with ``peft.get_peft_model`` and saving the adapter in PEFT format, which
``peft.PeftModel.from_pretrained`` loads.

A method module imports the hook implementations at the end (``plugtune_save_model``), so they
are registered as its own.
"""
import re
import warnings

from pydantic import Field, field_validator

from plugtune import hookimpl
from plugtune.recipe import Section

#: Every adapter plugin, in the order the docs list them.
ADAPTERS = ("lora", "ia3", "adalora", "loha", "lokr", "oft", "vera", "prompt_tuning")
TASK_TYPES = {"SequenceClassification": "SEQ_CLS", "TokenClassification": "TOKEN_CLS",
              "QuestionAnswering": "QUESTION_ANS"}
HEADS = ("score", "classifier", "qa_outputs")  # the layers transformers' head classes add


def target_modules_field(default, what="adapters"):
    return Field(default, description=f"where the {what} go: module names (a list, matched at "
                 "the end of the name), a regular expression (a string, matched against the "
                 "full name), all-linear (every linear layer but the output layer)"
                 + (", or null for peft's default for the architecture" if default is None
                    else ""))


class AdapterSection(Section):
    """Fields every weight-adapting method has (prompt tuning has only ``modules_to_save``)."""

    target_modules: list[str] | str | None = target_modules_field("all-linear")
    modules_to_save: list[str] = Field([], description="modules trained in full and saved "
                                       "with the adapter, e.g. [lm_head]")

    @field_validator("target_modules")
    @classmethod
    def _regex_compiles(cls, value):
        if isinstance(value, str) and value != "all-linear":
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{value!r} is not a regular expression: {exc}") from exc
        return value


class LycorisSection(AdapterSection):
    """LoHa's and LoKr's fields (both come from LyCORIS)."""

    r: int = Field(8, gt=0, description="rank of the factors")
    alpha: float = Field(8, gt=0, description="scale: the update is multiplied by alpha / r")
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on each rank of the "
                                "update during training")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="probability of leaving a "
                                  "whole adapted layer out of a training step")


def lycoris_options(s):
    return {**common(s), "r": s.r, "alpha": s.alpha, "rank_dropout": s.rank_dropout,
            "module_dropout": s.module_dropout}


def common(section):
    """The peft config arguments of :class:`AdapterSection`'s fields."""
    return {"target_modules": section.target_modules,
            "modules_to_save": section.modules_to_save or None}


def active_adapters(recipe):
    return [p for p in recipe.plugins if p in ADAPTERS]


def check(recipe, name, what):
    """Combination problems every adapter method has. ``what`` says in words what ``name``
    trains (``"IA3 scaling vectors"``), for the messages."""
    problems = []
    if "full" in recipe.plugins:
        problems.append(f"plugins: `{name}` trains {what} on a frozen base and `full` trains "
                        f"every weight: use one (drop full for {name}, or drop {name} for full "
                        "fine-tuning)")
    if "freeze" in recipe.plugins:
        where = ("" if name == "prompt_tuning" else
                 f" choose where adapters go with {name}.target_modules, and")
        problems.append(f"plugins: `{name}` already freezes every base weight, so `freeze` has "
                        f"nothing to add; drop freeze;{where} use {name}.modules_to_save to "
                        "train a whole module")
    return problems + other_adapters(recipe, name)


def adapter_for_fit(recipe):
    """The adapter method ``plan --fit`` keeps: the recipe's own, else lora."""
    return next((a for a in active_adapters(recipe) if a != "lora"), "lora")


def fit_variants(name, recipe):
    """``plan --fit`` variants of adapter method ``name`` when the recipe uses it: on the
    16/32-bit base, an 8-bit and a 4-bit one (a combination the plugins refuse, such as loha
    on nf4, is skipped by the search). LoRA's own are offered by lora, int8 and nf4."""
    from plugtune.plan import Variant

    if name == "lora" or adapter_for_fit(recipe) != name:
        return []
    return [Variant(name, 20, [name], {name: {}}),
            Variant(f"int8 + {name}", 30, ["int8", name], {name: {}}),
            Variant(f"nf4 + {name}", 40, ["nf4", name], {name: {}})]


def other_adapters(recipe, name):
    """Two adapter methods in one recipe: reported once, by the one listed last."""
    active = active_adapters(recipe)
    if len(active) < 2 or active[-1] != name:
        return []
    return [f"plugins: {', '.join(f'`{a}`' for a in active)} are adapter methods and a model "
            f"is wrapped with one here: keep one of them"]


def no_4bit_base(recipe, name):
    """The problem of a LyCORIS method (LoHa, LoKr) asked to adapt a 4-bit base: it computes
    its update in the shape of the layer's weight, which bitsandbytes packs into another shape
    for 4-bit (the first forward fails); an int8 weight keeps its shape and works."""
    if "nf4" not in recipe.plugins:
        return []
    return [f"plugins: `{name}` cannot adapt the `nf4` base: peft's {name} builds its update in "
            "the shape of the layer's weight, which a 4-bit base packs into another shape; use "
            f"int8 with {name}, or lora, ia3, adalora, oft, vera or prompt_tuning on nf4"]


def task_type(model):
    """peft's task type for the model class (a classifier's new head is then saved too)."""
    name = type(model).__name__
    return next((t for k, t in TASK_TYPES.items() if k in name), "CAUSAL_LM")


def linear_layers(model, but=()):
    """Names of the model's linear layers (``nn.Linear``, GPT-2's ``Conv1D``), except those
    whose last name part is in ``but``."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))
            and n.rsplit(".", 1)[-1] not in but]


def wrap(model, config_class, **options):
    """``peft.get_peft_model(model, config_class(task_type=..., **options))``."""
    from peft import get_peft_model

    task = task_type(model)
    if task != "CAUSAL_LM" and options.get("target_modules") == "all-linear":
        # the new head trains in full (modules_to_save), so no adapter on it; peft's all-linear
        # keeps a token classifier's head, and then refuses to save it in full
        options["target_modules"] = linear_layers(model, but=HEADS)
    config = config_class(task_type=task, **options)
    with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        return get_peft_model(model, config)


# ---------------------------------------------------------------------------------------------
# Hook implementations every adapter method shares.
# ---------------------------------------------------------------------------------------------


@hookimpl
def plugtune_save_model(model, tokenizer, path):
    """Save only the adapter (and ``modules_to_save``), in PEFT format, with the tokenizer."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return "adapter"
