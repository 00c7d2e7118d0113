"""``--fit``: the first combination that fits a budget, trying the variants every installed
plugin offers (``plugtune_fit_variants``) in order of their quality rank, each as is, with the
memory savers, then with smaller micro-batches. The core names no method."""
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError
from .api import Variant
from .budget import size
from .moments import Estimate, estimate

if TYPE_CHECKING:
    from ..manager import PluginInfo
    from ..recipe import Recipe


@dataclass
class Candidate:
    label: str
    tree: dict[str, Any]
    estimate: Estimate
    batch_size: int
    grad_accum: int
    involved: set[str] = field(default_factory=set)  # the plugins any variant names

    @property
    def total(self) -> float:
        return self.estimate.total()


def offered(recipe: "Recipe", blocks: int,
            discovered: "dict[str, PluginInfo]") -> tuple[list[Variant], list[Variant]]:
    """``(methods, savers)``: every installed plugin's :class:`Variant` s, methods by rank (a
    variant whose plugins are not all installed is left out)."""
    from .. import manager

    pm, _ = manager.inspect_all(discovered)
    variants = [v for answer in pm.hook.plugtune_fit_variants(recipe=recipe, blocks=blocks)
                for v in answer or ()]
    variants = [v for v in variants if all(p in discovered for p in v.plugins)]
    methods = sorted((v for v in variants if not v.saver), key=lambda v: v.rank)
    return methods, [v for v in variants if v.saver]


def ladder(recipe: "Recipe", methods: list[Variant]) -> list[Variant]:
    """The methods to try, from the recipe's own one on (it is never 'upgraded' past it); where
    the recipe uses a method whose variants set sections of their own (``override``), the
    recipe's own settings of it come first."""
    involved = {p for v in methods for p in v.plugins}
    chosen = {p for p in recipe.plugins if p in involved}
    start = next((i for i, v in enumerate(methods) if set(v.plugins) == chosen), None)
    if start is None:
        return methods
    methods = methods[start:]
    if any(v.override and set(v.plugins) == chosen for v in methods):
        own = methods[0]
        methods.insert(0, Variant(f"{' + '.join(own.plugins)} (as the recipe says)", own.rank,
                                  own.plugins))
    return methods


def variant(tree: dict[str, Any], method: Variant, savers: Sequence[Variant],
            involved: set[str]) -> dict[str, Any]:
    """``tree`` with the plugins any variant names replaced by ``method``'s (and ``savers``'),
    and their sections."""
    import copy

    out = copy.deepcopy(tree)
    names = list(method.plugins) + [p for s in savers for p in s.plugins]
    out["plugins"] = [p for p in out.get("plugins") or [] if p not in involved] + names
    for name in involved - set(names):
        out.pop(name, None)
    for v in (method, *savers):
        for name, section in v.sections.items():
            if name not in tree or v.override:  # the recipe's own settings win
                out[name] = section
    return out


def micro_batches(batch: int, accum: int) -> list[tuple[int, int]]:
    """``(micro-batch, grad_accum)`` pairs with the same effective batch, largest first."""
    effective = batch * accum
    return [(b, effective // b) for b in range(batch, 0, -1) if effective % b == 0]


def search(recipe: "Recipe", blocks: int, budget: float, device: str,
           discovered: "dict[str, PluginInfo]", echo: Callable[[str], object] = print
           ) -> tuple[Candidate | None, Candidate | None]:
    """``(the first Candidate that fits budget or None, the least demanding one tried)``;
    ``echo`` reports each combination tried."""
    from .. import recipe as recipes

    methods, savers = offered(recipe, blocks, discovered)
    involved = {p for v in methods + savers for p in v.plugins}
    tree = recipe.raw
    own_savers = all(p in recipe.plugins for s in savers for p in s.plugins)
    smallest: Candidate | None = None
    with tempfile_dir() as tmp:
        for method in ladder(recipe, methods):
            # the recipe's micro-batch as it is, then with the savers (gradient checkpointing),
            # then the savers with smaller micro-batches (the effective batch kept)
            batches = micro_batches(recipe.train.batch_size, recipe.train.grad_accum)
            steps: list[tuple[Sequence[Variant], list[tuple[int, int]]]] = \
                [((), batches[:1])] if not (savers and own_savers) else []
            if savers:
                steps.append((savers, batches))
            for extra, sizes in steps:
                t = variant(tree, method, extra, involved)
                path = Path(tmp) / "candidate.yaml"
                path.write_text(yaml_dump(t))
                name = " + ".join([method.label, *(s.label for s in extra)])
                try:
                    loaded, pm = recipes.load_recipe(
                        path, discovered=discovered,
                        trust_remote_code=recipe.model.trust_remote_code, check_hardware=False)
                    est = estimate(loaded, pm, device)
                except RecipeError as exc:  # a combination the plugins refuse (loha + nf4)
                    echo(f"  {name}: not allowed: {'; '.join(exc.problems)}")
                    continue
                for b, accum in sizes:
                    train = {**(t.get("train") or {}), "batch_size": b, "grad_accum": accum}
                    c = Candidate(name, {**t, "train": train}, est.with_batch(b, accum), b, accum,
                                  involved)
                    if smallest is None or c.total < smallest.total:
                        smallest = c
                    fits = c.total <= budget
                    echo(f"  {name}, micro-batch {b} x {accum} accumulated: {size(c.total)}"
                         + (": fits" if fits else ""))
                    if fits:
                        return c, smallest
    return None, smallest


@contextmanager
def tempfile_dir() -> Iterator[str]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="plugtune-plan-") as tmp:
        yield tmp


def yaml_dump(tree: dict[str, Any], header: str = "") -> str:
    import yaml

    return header + yaml.safe_dump(tree, sort_keys=False)


def changes(recipe: "Recipe", chosen: Candidate) -> list[str]:
    """What --fit changed, in words."""
    out = []
    t, old, involved = chosen.tree, recipe.raw, chosen.involved
    before = [p for p in old.get("plugins") or [] if p in involved]
    after = [p for p in t["plugins"] if p in involved]
    if before != after:
        out.append(f"plugins: {' + '.join(before) or '(none)'} -> {' + '.join(after)}")
    for name in sorted(k for k in t if k not in ("plugins", "train")):  # sections set too
        if t.get(name) != old.get(name):
            out.append(f"{name}: {t[name] or 'defaults'}")
    tr = recipe.train
    if (chosen.batch_size, chosen.grad_accum) != (tr.batch_size, tr.grad_accum):
        out.append(f"train.batch_size {tr.batch_size} -> {chosen.batch_size}, train.grad_accum "
                   f"{tr.grad_accum} -> {chosen.grad_accum} (effective batch "
                   f"{chosen.batch_size * chosen.grad_accum} kept)")
    return out
