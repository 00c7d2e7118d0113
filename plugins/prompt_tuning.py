"""Prompt tuning (peft): learn a few virtual tokens' embeddings put before every input; the
whole model stays frozen and unchanged.

The virtual tokens start random, as the embeddings of tokens sampled from the vocabulary
(``sample_vocab``), or as the embeddings of ``prompt_tuning.init_text`` (``text``: a task
description, the usual best start). Saves a PEFT adapter (``adapter/``) that
``peft.PeftModel.from_pretrained`` loads; there is nothing to merge into the weights, so
``plugtune export --merge`` refuses. Composes with ``int8``/``nf4``, ``gradient_checkpointing``
and ``sequence_classification``; conflicts with ``full``, ``freeze``, ``token_classification``,
``question_answering`` and the other adapter methods (docs/combinations.md).
"""
from typing import Literal

from pydantic import Field

from plugtune import Section, active_roles, hookimpl
from plugtune.plugins import peft_family as adapters
from plugtune.plugins.peft_family import (  # noqa: F401  (shared hooks)
    plugtune_load_artifact, plugtune_merge_artifact, plugtune_save_model)  # noqa: F401

PLUGTUNE_ROLES = {"adapter"}

INIT = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "RANDOM"}


class PromptTuningSection(Section):
    num_virtual_tokens: int = Field(20, gt=0, description="how many virtual tokens")
    init: Literal["random", "sample_vocab", "text"] = Field(
        "random", description="start from random vectors, from the embeddings of random "
        "vocabulary tokens, or from those of init_text")
    init_text: str | None = Field(None, description="with init: text, e.g. 'Answer the "
                                  "question in one word:' (repeated or cut to the length)")
    modules_to_save: list[str] = Field([], description="modules trained in full and saved "
                                       "with the adapter")


def options(s: PromptTuningSection) -> dict:
    return {"num_virtual_tokens": s.num_virtual_tokens, "prompt_tuning_init": INIT[s.init],
            "modules_to_save": s.modules_to_save or None}


def check(recipe) -> list[str]:
    problems = []
    s = recipe["prompt_tuning"]
    if (s.init == "text") != bool(s.init_text):
        problems.append("prompt_tuning.init_text: give it exactly when prompt_tuning.init is "
                        "text (the words the virtual tokens start as)")
    for task in active_roles(recipe).get("position-targets", []):
        problems.append(f"plugins: `prompt_tuning` adds virtual tokens to the input, which "
                        f"{task} would have to tag or leave out of its target positions: use "
                        f"lora or another adapter method with {task}")
    if recipe.train.packing:
        problems.append("train.packing: prompt tuning puts its virtual tokens before each row, "
                        "which packed examples would share; set train.packing: false (or use "
                        "train.group_by_length) with prompt_tuning")
    return problems


plugtune_recipe_sections, plugtune_check_recipe, plugtune_wrap_model, plugtune_fit_variants = (
    adapters.method("prompt_tuning", PromptTuningSection, "PromptTuningConfig", options,
                    check=check))


@hookimpl
def plugtune_train_start(run):
    """``init: text``: the virtual tokens start as the embeddings of ``init_text``'s tokens
    (peft would load the tokenizer again by name, which a GGUF or ``pkg:`` source cannot)."""
    import torch

    s = run.recipe["prompt_tuning"]
    if s.init != "text":
        return
    model = run.accelerator.unwrap_model(run.model)
    ids = run.tokenizer(s.init_text, add_special_tokens=False)["input_ids"]
    ids = (ids * (s.num_virtual_tokens // len(ids) + 1))[:s.num_virtual_tokens]
    embeddings = model.get_input_embeddings()
    with torch.no_grad():
        words = embeddings(torch.tensor(ids, device=embeddings.weight.device))
        model.prompt_encoder["default"].embedding.weight.copy_(words)

