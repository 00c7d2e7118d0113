"""Load what a finished run saved, for ``plugtune export``, ``plugtune generate`` and evaluation.

A run saves one of the two formats the ecosystem reads: a PEFT adapter (``adapter/``, with
``adapter_config.json``) or a ``save_pretrained`` model (``model/``). A model loads as it is; an
adapter loads onto the base that the run's ``recipe.yaml`` names, loaded and prepared through
the same hooks as in training (so ``pkg:``/GGUF sources, quantization and task heads come back
as they were), then optionally merged into it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import recipe as recipes, sources
from .build import load_base
from .chat import stop_ids
from .errors import InputError, PlugtuneError
from .state import first

ARTIFACT_DIRS = ("adapter", "model")


@dataclass
class Artifact:
    """A run's fine-tuned model, ready to use (eval mode)."""

    model: Any
    tokenizer: Any
    kind: str  # "adapter" or "model": what the run saved
    path: Path  # the saved directory
    recipe: Any  # the run's recipe
    notes: list[str] = field(default_factory=list)  # what a user should know about how it loaded


def find(run_dir: str | Path) -> Path:
    """The saved artifact directory of ``run_dir`` (``adapter/`` or ``model/``)."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise PlugtuneError(f"{run_dir}: not a run directory (it has no recipe.yaml); give the "
                            "directory a run printed at its end")
    for name in ARTIFACT_DIRS:
        if (run_dir / name / "adapter_config.json").is_file() or (
                run_dir / name / "config.json").is_file():
            return run_dir / name
    adapter = run_dir / "adapter"  # an adapter method's own format (its load_artifact reads it)
    if adapter.is_dir() and any(adapter.iterdir()):
        return adapter
    raise PlugtuneError(f"{run_dir}: no saved model (adapter/ or model/); the run did not finish "
                        "or ran with output.save_model: false")


def run_recipe(run_dir: str | Path, trust_remote_code: bool = False,
               discovered: Any = None) -> tuple[Any, Any]:
    """``(recipe, plugin_manager)`` of a finished run, from its ``recipe.yaml`` (one that says
    ``trust_remote_code: true`` loads only with ``trust_remote_code``, the command's flag).
    ``discovered``: the installed plugins (default: ``plugtune.manager.discover()``)."""
    return recipes.load_recipe(Path(run_dir) / "recipe.yaml", discovered=discovered,
                               check_files=False, trust_remote_code=trust_remote_code)


def is_whole_model(path: Path) -> bool:
    """Whether ``path`` holds a ``save_pretrained`` model (which loads without its base)."""
    return (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()


def load(run_dir: str | Path, merge: bool = False, trust_remote_code: bool = False,
         discovered: Any = None) -> Artifact:
    """Load the fine-tuned model of ``run_dir``.

    :param merge: fold an adapter into its base, giving a plain transformers model. A base
        trained quantized (int8/nf4) is de-quantized first: the adapter is merged into a float
        copy of the quantized weights it was trained on (the original full-precision weights
        are not used), so the merged model reproduces the trained one.
    :param trust_remote_code: the command line's ``--trust-remote-code``.
    :param discovered: the installed plugins (default: ``plugtune.manager.discover()``).

    An adapter is loaded and merged by the plugin that saved it, through
    ``plugtune_load_artifact`` and ``plugtune_merge_artifact`` (the PEFT methods':
    ``plugtune.plugins.peft_family``).
    """
    import torch
    from transformers import AutoTokenizer

    path = find(run_dir)
    recipe, pm = run_recipe(run_dir, trust_remote_code, discovered)
    with sources.loading("run directory", path):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = getattr(torch, recipe.model.dtype)
    notes: list[str] = []
    if is_whole_model(path):
        with sources.loading("run directory", path):
            model = _load_model(path, dtype, trust_remote_code)
        if merge:
            notes.append("the run saved a whole model: nothing to merge")
        return Artifact(_place(model, merge), tokenizer, "model", path, recipe, notes)

    base = load_base(pm.hook, recipe, tokenizer)
    if merge and getattr(base, "is_quantized", False):
        method = getattr(base.config, "quantization_config", None)
        notes.append(f"the base was trained quantized ({_describe(method)}); the adapter is "
                     f"merged into a de-quantized {recipe.model.dtype} copy of those quantized "
                     "weights, not into the original full-precision ones")
        base = base.dequantize()
    with sources.loading("run directory", path):
        model = first(pm.hook.plugtune_load_artifact, "load the saved adapter", path=path,
                      base=base, recipe=recipe)
    if merge:
        model = first(pm.hook.plugtune_merge_artifact, "merge the adapter into its base",
                      model=model, path=path, recipe=recipe).to(dtype)
    elif getattr(base, "is_quantized", False):
        notes.append(f"the base is loaded quantized as in training "
                     f"({_describe(base.config.quantization_config)})")
    return Artifact(_place(model, merge), tokenizer, "adapter", path, recipe, notes)


def _place(model: Any, merge: bool) -> Any:
    """Eval mode, on the GPU where there is one (a quantized model is already placed there);
    a model loaded only to be merged and saved stays where it is."""
    import torch

    if torch.cuda.is_available() and not merge and not getattr(model, "hf_device_map", None):
        model.to("cuda")
    return model.eval()


def _describe(quantization_config: Any) -> str:
    q = quantization_config
    if q is None:
        return "quantized"
    if getattr(q, "load_in_4bit", False):
        return f"4-bit {q.bnb_4bit_quant_type}"
    return "8-bit" if getattr(q, "load_in_8bit", False) else type(q).__name__


def _load_model(path: Path, dtype: Any, trust_remote_code: bool = False) -> Any:
    """A ``save_pretrained`` model, as the class it was saved as (causal LM, classifier, ...)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    arch = (config.architectures or ["AutoModelForCausalLM"])[0]
    cls = getattr(transformers, arch, transformers.AutoModelForCausalLM)
    return cls.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)


def export(run_dir: str | Path, out: str | Path, merge: bool = False,
           trust_remote_code: bool = False, discovered: Any = None) -> list[str]:
    """Write the run's model to the new directory ``out``, atomically: the adapter or model as
    saved, or with ``merge`` a merged ``save_pretrained`` model. Returns the loading notes."""
    with _new_dir(out) as tmp:
        if merge:
            artifact = load(run_dir, merge=True, trust_remote_code=trust_remote_code,
                            discovered=discovered)
            artifact.model.save_pretrained(tmp)
            artifact.tokenizer.save_pretrained(tmp)
            return artifact.notes
        run_recipe(run_dir, trust_remote_code, discovered)  # refuses a run that needs the flag
        shutil.copytree(find(run_dir), tmp, dirs_exist_ok=True)
    return []


def export_format(run_dir: str | Path, out: str | Path, fmt: str,
                  trust_remote_code: bool = False,
                  discovered: Any = None) -> tuple[list[str], list[str]]:
    """Write the run's merged model in ``fmt`` (``NAME[:OPTION]``, e.g. ``gguf:q8_0``) into the
    new directory ``out``, atomically, with the writer a plugin names through
    ``plugtune_export_formats``. Returns ``(loading notes, the writer's lines)``."""
    name, _, option = fmt.partition(":")
    _, pm = run_recipe(run_dir, trust_remote_code, discovered)
    writers: dict[str, tuple[str, Any]] = {}
    for impl in pm.hook.plugtune_export_formats.get_hookimpls():
        for key, write in (impl.function() or {}).items():
            if key in writers:
                raise PlugtuneError(f"export format {key!r} is written by two plugins, "
                                    f"{writers[key][0]} and {impl.plugin_name}; uninstall one")
            writers[key] = (impl.plugin_name, write)
    if name not in writers:
        known = ", ".join(sorted(writers)) or "none installed"
        raise InputError(f"--format {name}: no plugin writes this format (known: {known})")
    loaded: list[Artifact] = []

    def merged() -> Artifact:
        loaded.append(load(run_dir, merge=True, trust_remote_code=trust_remote_code,
                           discovered=discovered))
        return loaded[-1]

    with _new_dir(out) as tmp:
        lines = writers[name][1](option=option or None, out=tmp, load=merged, name=Path(out))
    return (loaded[0].notes if loaded else []), list(lines or [])


@contextmanager
def _new_dir(out: str | Path) -> Iterator[Path]:
    """A temporary directory beside the new directory ``out``, renamed to it when the block
    ends without an error (and removed when it raises)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PlugtuneError(f"{out} exists and is not an empty directory; give a new directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    except OSError as exc:
        raise InputError(f"{out}: cannot create it ({exc.strerror}); give a new directory in "
                         "a writable folder") from exc
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def generate(artifact: Artifact, prompt: str, max_new_tokens: int = 128,
             temperature: float = 0.7, top_p: float = 1.0, chat_template: bool = True) -> str:
    """Sample a continuation of ``prompt`` (as a user turn of the chat template where the
    tokenizer has one and ``chat_template``); ``temperature`` 0 decodes greedily."""
    import torch

    tok, model = artifact.tokenizer, artifact.model
    if not model.can_generate():
        raise PlugtuneError(f"{artifact.path}: a {type(model).__name__} does not generate "
                            "text; `plugtune eval` scores a task head's run")
    if chat_template and tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")
    else:
        ids = tok(prompt, return_tensors="pt")
    ids = {k: v.to(model.device) for k, v in ids.items()}
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} \
        if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=stop_ids(model, tok), **sampling)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
