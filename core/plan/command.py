"""``plugtune plan``: print the plan of a recipe, check it against a budget, and with ``--fit``
write a recipe that fits."""
import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import RecipeError
from .budget import default_budget, parse_budget, size
from .fit import changes, search, yaml_dump
from .moments import estimate
from .render import describe

if TYPE_CHECKING:
    from ..manager import PluginInfo


def command(args: argparse.Namespace, echo: Callable[[str], object] = print,
            discovered: "dict[str, PluginInfo] | None" = None) -> int:
    """``plugtune plan``: 0 when the recipe fits (or no budget is known), 1 when it does not.
    ``discovered``: the installed plugins (``manager.discover()`` by default)."""
    from .. import manager, recipe as recipes

    discovered = manager.discover() if discovered is None else discovered
    recipe, pm = recipes.load_recipe(args.recipe, args.overrides, discovered=discovered,
                                     trust_remote_code=getattr(args, "trust_remote_code", False),
                                     check_hardware=False)  # plans for --device, not here
    budget, label = parse_budget(args.gpu) if args.gpu else default_budget(args.device)
    if args.fit and budget is None:
        raise RecipeError(["--fit needs a budget: --gpu 24GiB, or a GPU name such as rtx4090"])
    processes, shard = getattr(args, "processes", 1), getattr(args, "shard", None)
    if processes < 1:
        raise RecipeError([f"--processes {processes}: give 1 or more"])
    if (processes > 1 or shard) and args.fit:
        raise RecipeError(["--fit plans one process: drop --processes/--shard"])
    est = estimate(recipe, pm, args.device, processes, shard)
    for line in describe(est, budget, label):
        echo(line)
    if budget is None:
        echo("no budget known: add --gpu 24GiB (or a GPU name) to check the fit")
        return 0
    if est.total() <= budget:
        if args.fit:
            echo("fits as it is: nothing to change")
        return 0
    if not args.fit:
        echo(f"hint: `plugtune plan {args.recipe} --gpu {args.gpu or '...'} --fit` finds the "
             "plugins and settings that fit")
        return 1
    echo("")
    echo(f"searching for a combination that fits {size(budget)}:")
    chosen, least = search(recipe, len(est.acts.blocks), budget, args.device, discovered, echo)
    if least is None:  # every combination refused (said above), or none offered
        echo(f"does NOT fit {size(budget)}, and the installed plugins offer no combination "
             "that could be tried; `plugtune plugins` lists them")
        return 1
    if chosen is None:
        weights = least.estimate.weights
        echo(f"does NOT fit {size(budget)} with any combination: the least it needs is "
             f"{size(least.total)} ({least.label}, micro-batch {least.batch_size} x "
             f"{least.grad_accum}), of which the weights alone are {size(weights)}. "
             "Use a GPU with more memory, a smaller model, or a shorter train.max_length "
             "(activations grow with it).")
        return 1
    out = Path(args.out) if args.out else Path(recipe.path).with_suffix(".fit.yaml")
    if not args.out and not os.access(out.parent, os.W_OK):  # a shipped recipe
        out = Path.cwd() / out.name
    what = changes(recipe, chosen)
    header = (f"# Written by `plugtune plan {args.recipe} --gpu {args.gpu} --fit`: {chosen.label}"
              f" needs {size(chosen.total)} of {size(budget)}.\n"
              + "".join(f"# changed: {c}\n" for c in what)
              + f"# Run it with: plugtune run {out}\n")
    out.write_text(yaml_dump(chosen.tree, header))
    echo("")
    echo(f"the plan of {out}:")
    for line in describe(chosen.estimate, budget, label):
        echo(line)
    echo("")
    echo(f"wrote {out}; changed:")
    for c in what:
        echo(f"  - {c}")
    echo(f"why: as written the recipe needs {size(est.total())} and the budget is "
         f"{size(budget)}; the combinations above were tried in order of least quality cost "
         "(the variants the installed plugins offer, by their quality rank; each first as is, "
         "then with the memory savers, then smaller micro-batches) and this is the first "
         "that fits")
    return 0
