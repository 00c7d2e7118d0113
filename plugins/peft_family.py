"""What peft adapter plugins share (plugin API 1.1): the built-in ``lora``, ``ia3``,
``adalora``, ``loha``, ``lokr``, ``oft``, ``vera`` and ``prompt_tuning`` use it, and a stranger's
peft method can too. Not a plugin itself.

Each method is a plugin of its own, named as a recipe names it, with its own section (peft's
options in the recipe's words), declaring ``PLUGTUNE_ROLES = {"adapter"}``: the core then
refuses a second adapter method, ``full`` or ``freeze`` beside it (they fill the role
``trainable`` an adapter implies), and ``int8``/``nf4`` find it by its role. The methods share
the fields every method has (where the adapters go, modules trained in full beside them),
wrapping with ``peft.get_peft_model``, and saving the adapter in PEFT format, which
``peft.PeftModel.from_pretrained`` loads.

As peft registers a method with ``register_peft_method(name=..., config_cls=...,
model_cls=...)``, a method module here is one declaration, :func:`method`: its name, its
section class, its peft config class, the function turning the section into the config's
arguments, and what it refuses (a 4-bit base, its own checks). It returns the four hook
implementations the module assigns to the hook names::

    plugtune_recipe_sections, plugtune_check_recipe, plugtune_wrap_model, plugtune_fit_variants = (
        adapters.method("loha", LohaSection, "LoHaConfig", adapters.lycoris_options, no_4bit=True))

The module imports the hooks every method shares as they are (``plugtune_save_model``,
``plugtune_load_artifact`` and ``plugtune_merge_artifact``: ``plugtune export``, ``generate``
and ``eval`` load and merge the adapter through them), so they are registered as its own.
"""
import re
import warnings
from collections.abc import Callable, Collection
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from plugtune import PlugtuneError, Section, active_roles, hookimpl

if TYPE_CHECKING:
    import torch

    from plugtune import Recipe, Variant

TASK_TYPES = {"SequenceClassification": "SEQ_CLS", "TokenClassification": "TOKEN_CLS",
              "QuestionAnswering": "QUESTION_ANS"}
HEADS = ("score", "classifier", "qa_outputs")  # the layers transformers' head classes add


def target_modules_field(default: str | None, what: str = "adapters") -> Any:
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
    def _regex_compiles(cls, value: list[str] | str | None) -> list[str] | str | None:
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


def lycoris_options(s: LycorisSection) -> dict[str, Any]:
    return {**common(s), "r": s.r, "alpha": s.alpha, "rank_dropout": s.rank_dropout,
            "module_dropout": s.module_dropout}


def common(section: AdapterSection) -> dict[str, Any]:
    """The peft config arguments of :class:`AdapterSection`'s fields."""
    return {"target_modules": section.target_modules,
            "modules_to_save": section.modules_to_save or None}


def adapter_of(recipe: "Recipe") -> str | None:
    """The active adapter method of ``recipe`` (the plugin filling the role ``adapter``), or
    None."""
    return next(iter(active_roles(recipe).get("adapter", [])), None)


def check(recipe: "Recipe", name: str, what: str) -> list[str]:
    """Combination problems every adapter method has: none the method checks itself, now that
    the core refuses two plugins in the roles ``adapter`` or ``trainable`` (``full``,
    ``freeze``, a second method). Kept for methods written for plugin API 1.0."""
    return []


def fit_variants(name: str, recipe: "Recipe", without_adapter: bool = False) -> "list[Variant]":
    """``plan --fit`` variants of adapter method ``name``: on the 16/32-bit base, an 8-bit and
    a 4-bit one (a combination the plugins refuse, such as loha on nf4, or one whose quantizer
    is not installed, is skipped by the search). Offered when the recipe uses the method, or,
    with ``without_adapter``, when it uses none (lora: the method ``--fit`` reaches for)."""
    from plugtune import Variant

    own = adapter_of(recipe)
    if own != name and not (own is None and without_adapter):
        return []
    return [Variant(name, Variant.ADAPTER, [name], {name: {}}),
            Variant(f"int8 + {name}", Variant.ADAPTER_8BIT, ["int8", name], {name: {}}),
            Variant(f"nf4 + {name}", Variant.ADAPTER_4BIT, ["nf4", name], {name: {}})]


def no_4bit_base(recipe: "Recipe", name: str) -> list[str]:
    """The problem of a LyCORIS method (LoHa, LoKr) asked to adapt a 4-bit base: it computes
    its update in the shape of the layer's weight, which bitsandbytes packs into another shape
    for 4-bit (the first forward fails); an int8 weight keeps its shape. The quantizer says
    so by the descriptive role ``packed-weights``."""
    packed = active_roles(recipe).get("packed-weights", [])
    if not packed:
        return []
    return [f"plugins: `{name}` cannot adapt the `{packed[0]}` base: peft's {name} builds its "
            "update in the shape of the layer's weight, which a 4-bit base packs into another "
            f"shape; use int8 with {name}, or lora, ia3, adalora, oft, vera or prompt_tuning on "
            f"{packed[0]}"]


def task_type(model: "torch.nn.Module") -> str:
    """peft's task type for the model class (a classifier's new head is then saved too)."""
    name = type(model).__name__
    return next((t for k, t in TASK_TYPES.items() if k in name), "CAUSAL_LM")


def linear_layers(model: "torch.nn.Module", but: Collection[str] = ()) -> list[str]:
    """Names of the model's linear layers (``nn.Linear``, GPT-2's ``Conv1D``), except those
    whose last name part is in ``but``."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))
            and n.rsplit(".", 1)[-1] not in but]


def wrap(model: "torch.nn.Module", config_class: type, **options: Any) -> Any:
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


#: The adapter name under which a frozen copy of the starting adapter (``model.adapter``) is
#: loaded beside the trained one (``"default"``) where an objective needs it as its reference
#: (the preference family); never saved with the trained adapter.
REFERENCE_ADAPTER = "reference"


def start_adapter(recipe: "Recipe") -> Path | None:
    """The adapter directory the run starts from (``model.adapter``, a run directory resolved
    to its saved adapter: :func:`plugtune.models.adapter_dir`), or None."""
    from plugtune.models import adapter_dir

    name = recipe.model.adapter
    return None if name is None else adapter_dir(name)


def _peft_type(config: str | type) -> str:
    name = config if isinstance(config, str) else config.__name__
    return name.removesuffix("Config").replace("_", "").lower()


def start_adapter_problems(recipe: "Recipe", name: str, config: str | type) -> list[str]:
    """``model.adapter``'s adapter is not of method ``name`` (whose peft config class is
    ``config``): one line. A path that holds no adapter is the core's to report."""
    import json

    from plugtune import RecipeError

    try:
        path = start_adapter(recipe)
    except RecipeError:
        return []
    if path is None:
        return []
    try:
        saved = json.loads((path / "adapter_config.json").read_text()).get("peft_type", "")
    except (OSError, ValueError):
        return [f"model.adapter: {path}/adapter_config.json cannot be read as JSON"]
    if str(saved).replace("_", "").lower() != _peft_type(config):
        return [f"model.adapter: {path} holds a {saved} adapter, not {name}; put its method "
                f"among the plugins instead of {name}"]
    return []


def load_trainable(model: "torch.nn.Module", path: str | Path) -> Any:
    """``model`` wrapped with the saved adapter at ``path`` (a run directory or an adapter
    directory), trainable: ``peft.PeftModel.from_pretrained(..., is_trainable=True)``."""
    from peft import PeftModel

    from plugtune.models import adapter_dir

    with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        if next(model.parameters()).device.type == "meta":  # the planner: the shapes only
            from peft import PeftConfig, get_peft_model

            config = PeftConfig.from_pretrained(str(adapter_dir(path)))
            config.inference_mode = False
            return get_peft_model(model, config)
        return PeftModel.from_pretrained(model, adapter_dir(path), is_trainable=True)


# ---------------------------------------------------------------------------------------------
# The declaration of a method: its own four hook implementations.
# ---------------------------------------------------------------------------------------------

#: What :func:`method` returns: ``plugtune_recipe_sections``, ``plugtune_check_recipe``,
#: ``plugtune_wrap_model`` and ``plugtune_fit_variants``, in this order.
MethodHooks = tuple[Callable[..., None], Callable[..., list[str]], Callable[..., Any],
                    Callable[..., "list[Variant]"]]


class Method:
    """The hook implementations of the peft method ``name`` that :func:`method` declares (a
    class, as :class:`plugtune.plugins.head_family.Head`: one instance per method)."""

    def __init__(self, name: str, section: type[Section], config: str | type,
                 options: Callable[[Any], dict[str, Any]], no_4bit: bool = False,
                 without_adapter: bool = False,
                 check: "Callable[[Recipe], list[str]] | None" = None) -> None:
        self.name, self.section, self.config, self.options = name, section, config, options
        self.no_4bit, self.without_adapter, self.check = no_4bit, without_adapter, check

    @hookimpl
    def plugtune_recipe_sections(self, register: Callable[[str, type[Section]], None]) -> None:
        register(self.name, self.section)

    @hookimpl
    def plugtune_check_recipe(self, recipe: "Recipe") -> list[str]:
        problems = no_4bit_base(recipe, self.name) if self.no_4bit else []
        problems += start_adapter_problems(recipe, self.name, self.config)
        return problems + (self.check(recipe) if self.check else [])

    @hookimpl
    def plugtune_wrap_model(self, model: "torch.nn.Module", recipe: "Recipe") -> Any:
        if recipe.model.adapter is not None:
            return load_trainable(model, recipe.model.adapter)
        # a name is looked up in peft only now: importing peft takes seconds
        config = getattr(import_module("peft"), self.config) if isinstance(self.config, str) \
            else self.config
        return wrap(model, config, **self.options(recipe[self.name]))

    @hookimpl
    def plugtune_fit_variants(self, recipe: "Recipe") -> "list[Variant]":
        """``plan --fit``: the method on a 16/32-bit, an 8-bit and a 4-bit base, when the
        recipe uses it (or, with ``without_adapter``, no adapter method)."""
        return fit_variants(self.name, recipe, without_adapter=self.without_adapter)


def method(name: str, section: type[Section], config: str | type,
           options: Callable[[Any], dict[str, Any]], *, no_4bit: bool = False,
           without_adapter: bool = False,
           check: "Callable[[Recipe], list[str]] | None" = None) -> MethodHooks:
    """Declare the peft adapter method ``name`` (its recipe section's name and plugin name):
    ``section`` its recipe fields (an :class:`AdapterSection` usually), ``config`` peft's
    config class or its name in ``peft`` (``"LoraConfig"``), ``options(section)`` the config's
    arguments (:func:`common` gives the shared fields'). ``no_4bit``: refuse a 4-bit base
    (:func:`no_4bit_base`); ``without_adapter``: ``plan --fit`` offers the method to a recipe
    with no adapter method too (one method may); ``check(recipe)``: the method's own recipe
    problems, one line each. Returns the hook implementations to assign, in the module, to
    ``plugtune_recipe_sections, plugtune_check_recipe, plugtune_wrap_model,
    plugtune_fit_variants``."""
    m = Method(name, section, config, options, no_4bit, without_adapter, check)
    return (m.plugtune_recipe_sections, m.plugtune_check_recipe, m.plugtune_wrap_model,
            m.plugtune_fit_variants)


# ---------------------------------------------------------------------------------------------
# Hook implementations every adapter method shares.
# ---------------------------------------------------------------------------------------------


@hookimpl
def plugtune_save_model(model: Any, tokenizer: Any, path: Path,
                        state_dict: dict[str, Any] | None) -> str:
    """Save only the adapter (and ``modules_to_save``), in PEFT format, with the tokenizer (not
    a :data:`REFERENCE_ADAPTER` loaded beside it; under FSDP, PEFT picks the adapter out of the
    gathered ``state_dict``)."""
    names = [n for n in getattr(model, "peft_config", {}) if n != REFERENCE_ADAPTER]
    model.save_pretrained(path, selected_adapters=names or None, state_dict=state_dict)
    tokenizer.save_pretrained(path)
    return "adapter"


@hookimpl
def plugtune_load_artifact(path: Path, base: Any) -> Any:
    """The saved adapter onto its base: ``peft.PeftModel.from_pretrained``."""
    from peft import PeftModel

    with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        return PeftModel.from_pretrained(base, path)


@hookimpl
def plugtune_merge_artifact(model: Any, path: Path) -> Any:
    """``merge_and_unload``; a prompt-learning method has no weights to merge into."""
    if not hasattr(model.base_model, "merge_and_unload"):  # prompt learning
        raise PlugtuneError(f"{path}: a {model.peft_config['default'].peft_type.value} "
                            "adapter adds to the model's input, not to its weights: nothing "
                            "to merge; export it without --merge (peft loads it onto the "
                            "base)")
    return model.merge_and_unload()
