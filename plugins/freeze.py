"""Freeze parts of the model: by name pattern, all but the last N transformer blocks, or the
embeddings; ``unfreeze`` patterns then make matching parameters train again.

Patterns are Python regular expressions searched in parameter names (``model.named_parameters()``).
"""
import re

from pydantic import Field, field_validator

from plugtune import Section, float16_training_problem, hookimpl
from plugtune.models import transformer_blocks

#: ``trainable``: the core refuses ``full`` or an adapter method beside it.
PLUGTUNE_ROLES = {"trainable"}


class FreezeSection(Section):
    last_n_blocks: int | None = Field(None, ge=0, description="train only the last N blocks")
    patterns: list[str] = Field([], description="freeze parameters whose name matches")
    embeddings: bool = Field(False, description="freeze the input embeddings (and a tied lm_head)")
    unfreeze: list[str] = Field([], description="train parameters whose name matches")

    @field_validator("patterns", "unfreeze")
    @classmethod
    def _compiles(cls, value):
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from exc
        return value


@hookimpl
def plugtune_recipe_sections(register):
    register("freeze", FreezeSection)


@hookimpl
def plugtune_check_recipe(recipe):
    s, problems = recipe["freeze"], []
    if s.last_n_blocks is None and not s.patterns and not s.embeddings:
        problems.append("freeze: says nothing to freeze; set freeze.last_n_blocks, "
                        "freeze.patterns or freeze.embeddings: true")
    if recipe.model.dtype == "float16":
        problems.append(float16_training_problem("`freeze` trains the weights it leaves"))
    return problems


@hookimpl
def plugtune_select_trainable(model, recipe):
    s = recipe["freeze"]
    named = dict(model.named_parameters())
    if s.last_n_blocks is not None:
        for p in named.values():
            p.requires_grad_(False)
        blocks = transformer_blocks(model)
        if not blocks:
            raise ValueError("freeze.last_n_blocks: this model has no list of transformer blocks")
        for block in blocks[len(blocks) - s.last_n_blocks:] if s.last_n_blocks else []:
            for p in block.parameters():
                p.requires_grad_(True)
    for name, p in named.items():
        if any(re.search(pat, name) for pat in s.patterns):
            p.requires_grad_(False)
    if s.embeddings:
        for p in model.get_input_embeddings().parameters():
            p.requires_grad_(False)
    for name, p in named.items():
        if any(re.search(pat, name) for pat in s.unfreeze):
            p.requires_grad_(True)


@hookimpl
def plugtune_fit_variants(blocks):
    """``plan --fit``: train the last half, quarter or eighth of the blocks (after ``full``,
    before adapters)."""
    from plugtune import Variant  # the planner loads only when asked

    counts = dict.fromkeys(max(1, blocks // d) for d in (2, 4, 8))
    return [Variant(f"freeze (train the last {n} of {blocks} blocks)", Variant.FREEZE + i,
                    ["freeze"], {"freeze": {"last_n_blocks": n}}, override=True)
            for i, n in enumerate(counts)]
