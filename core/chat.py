"""Chat templates: the named templates plugtune ships (Jinja files in ``plugtune/templates/chat``),
what ``data.chat_template`` may say (a name, a Jinja string, or a ``.jinja`` file), and setting
the chosen template on a tokenizer as it loads, so that training, evaluation, ``generate`` and
``export`` all render conversations the same way (the saved tokenizer carries it)."""
from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import InputError

#: Each named template and the token that ends its turns (``None``: the tokenizer's eos token).
TEMPLATES: dict[str, str | None] = {
    "chatml": "<|im_end|>", "llama-3": "<|eot_id|>", "llama-2": None, "mistral": None,
    "qwen2.5": "<|im_end|>", "phi-3": "<|end|>", "smollm2": "<|im_end|>",
    "gemma": "<end_of_turn>", "alpaca": None,
}

#: Other tools' names for them (axolotl's ``chat_template``, LLaMA-Factory's ``template``).
ALIASES = {
    "llama3": "llama-3", "llama2": "llama-2", "mistral_v1": "mistral", "mistral_v2v3": "mistral",
    "qwen_25": "qwen2.5", "qwen": "qwen2.5", "qwen2": "qwen2.5", "phi_3": "phi-3",
    "phi3": "phi-3", "phi": "phi-3", "gemma2": "gemma", "smollm": "smollm2",
}

#: Tokens that end a turn in the templates models ship with, besides the eos token: a turn's
#: end (what ``data.train_on_eos`` decides about) is the first of these after its content.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eom_id|>")


def canonical(name: str) -> str:
    return ALIASES.get(name, name)


def is_jinja(value: str) -> bool:
    """A value of ``data.chat_template`` that is a template itself, not a name or a path."""
    return "{{" in value or "{%" in value


def is_path(value: str) -> bool:
    return not is_jinja(value) and value.endswith(".jinja")


def named(name: str) -> str:
    """The text of a named template."""
    return (resources.files("plugtune.templates") / "chat" / f"{canonical(name)}.jinja"
            ).read_text(encoding="utf-8")


def problem(value: str) -> str | None:
    """What is wrong with a ``data.chat_template`` value (None: nothing): an unknown name, a
    missing file, a Jinja syntax error (with its file:line)."""
    from .errors import did_you_mean

    if is_path(value):
        if not Path(value).is_file():
            return (f"file not found: {value}; a .jinja path is relative to the recipe file")
        return syntax_problem(Path(value).read_text(encoding="utf-8"), value)
    if is_jinja(value):
        return syntax_problem(value, "the template")
    if canonical(value) not in TEMPLATES:
        return (f"unknown template {value!r}{did_you_mean(value, TEMPLATES)}; give one of "
                f"{', '.join(TEMPLATES)}, a Jinja template string, or a .jinja file")
    return None


def syntax_problem(text: str, where: str) -> str | None:
    import jinja2

    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except jinja2.TemplateSyntaxError as exc:
        return f"{where}:{exc.lineno}: not a valid Jinja template ({exc.message})"
    return None


def text_of(value: str) -> str:
    """The Jinja text ``data.chat_template`` stands for (assumed valid: :func:`problem`)."""
    if is_path(value):
        return Path(value).read_text(encoding="utf-8")
    return value if is_jinja(value) else named(value)


def end_of_turn(value: str | None, tokenizer: Any) -> str | None:
    """The text of the token that ends a turn of ``value``'s template on ``tokenizer``."""
    if value is None or is_jinja(value) or is_path(value):
        return None
    return TEMPLATES[canonical(value)] or tokenizer.eos_token


def use_template(tokenizer: Any, value: str | None) -> Any:
    """Set ``data.chat_template`` (``value``) on ``tokenizer``; None keeps the tokenizer's
    own. A named template whose end-of-turn token the tokenizer has as one token makes that
    token the tokenizer's eos token (as the chat models that ship the template do), so
    generation stops where a turn ends; one the tokenizer would split is refused."""
    if value is None:
        return tokenizer
    tokenizer.chat_template = text_of(value)
    end = end_of_turn(value, tokenizer)
    if end is None or end == tokenizer.eos_token:
        return tokenizer
    ids = tokenizer(end, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise InputError(
            f"data.chat_template: {value} ends each turn with {end!r}, which this tokenizer "
            f"does not know as one token (it splits it into {len(ids)}), so the model could not "
            "learn to stop; choose a template built on the model's own tokens (llama-2, "
            f"mistral and alpaca end turns with its eos token {tokenizer.eos_token!r}) or a "
            "Jinja template")
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        tokenizer.pad_token = tokenizer.eos_token  # keep padding off the new end token
    tokenizer.eos_token = end
    return tokenizer


def load_tokenizer(hook: Any, recipe: Any) -> Any:
    """The run's tokenizer: ``plugtune_load_tokenizer``'s, with ``data.chat_template`` set."""
    from .state import first

    tokenizer = first(hook.plugtune_load_tokenizer, "load the tokenizer", recipe=recipe)
    return use_template(tokenizer, chosen(recipe, tokenizer))


def chosen(recipe: Any, tokenizer: Any) -> str | None:
    """The template to set: ``data.chat_template``; for ``data.format: alpaca`` on a tokenizer
    without a template (a base model's), Stanford Alpaca's prompt (``alpaca``); else None."""
    value = recipe.data.chat_template
    if value is None and recipe.data.format == "alpaca" and not tokenizer.chat_template:
        return "alpaca"
    return value


def describe(tokenizer: Any, value: str | None) -> dict[str, Any]:
    """What a manifest records of the chat template a run used."""
    text = getattr(tokenizer, "chat_template", None)
    source = ("tokenizer" if value is None else "file" if is_path(value)
              else "jinja" if is_jinja(value) else canonical(value))
    if source == "tokenizer":  # or a named template (the alpaca format's, a reloaded run's)
        source = next((n for n in TEMPLATES if text == named(n)), source)
    return {"source": source, "path": value if source == "file" else None,
            "sha256": hashlib.sha256(text.encode()).hexdigest() if isinstance(text, str)
            else None}


def save(run_dir: str | Path, tokenizer: Any, value: str | None) -> None:
    """Say in the manifest where the run's chat template came from and, unless it is the
    tokenizer's own, keep it beside the recipe (``chat_template.jinja``); the saved tokenizer
    carries it too."""
    from . import rundir

    text = getattr(tokenizer, "chat_template", None)
    if not isinstance(text, str):
        return
    described = describe(tokenizer, value)
    if described["source"] != "tokenizer":
        rundir.atomic_write(Path(run_dir) / "chat_template.jinja", text)
    rundir.update_manifest(run_dir, chat_template=described)


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """The token ids generation stops at: the model's own eos id(s) and the tokenizer's eos
    token (the template's end of turn, where :func:`use_template` made it so)."""
    config = getattr(model, "generation_config", None)
    own = getattr(config, "eos_token_id", None)
    ids = list(own) if isinstance(own, (list, tuple)) else [own]
    return [i for i in dict.fromkeys(ids + [tokenizer.eos_token_id]) if i is not None]
