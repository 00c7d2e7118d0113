"""The ``plugtune`` command: run, validate, plugins, recipes."""
import argparse
import sys

from . import __version__, loop, manager, recipe as recipes
from .errors import PlugtuneError


def cmd_run(args):
    recipe, pm = recipes.load_recipe(args.recipe, args.overrides)
    print(f"recipe: {recipe.path} (plugins: {', '.join(recipe.plugins)})")
    run = loop.setup(recipe, pm)
    summary = loop.train(run)
    before, after = summary["eval_before"], summary["eval_after"]
    print(f"done: {summary['steps']} steps in {summary['seconds']:.0f}s; run directory {run.dir}")
    for key in after:
        if key != "step" and isinstance(after[key], (int, float)):
            print(f"  held-out {key}: {before.get(key, float('nan')):.4f} -> {after[key]:.4f}")
    return 0


def cmd_validate(args):
    recipe, _ = recipes.load_recipe(args.recipe, args.overrides)
    print(f"{recipe.path}: ok (plugins: {', '.join(recipe.plugins)})")
    return 0


def cmd_plugins(args):
    discovered = manager.discover()
    pm = manager.make_manager(list(discovered), discovered)
    for name, info in discovered.items():
        default = " [default]" if info.default else ""
        print(f"{name}{default}  ({info.dist} {info.version})  {info.doc}")
        print(f"    hooks: {', '.join(manager.hooks_of(pm, name)) or '-'}")
    return 0


def cmd_recipes(args):
    for name, path in sorted(recipes.shipped_recipes().items()):
        try:
            description = recipes.load_tree(path).get("description", "")
        except PlugtuneError as exc:
            description = f"(unreadable: {exc})"
        print(f"{name:<24} {description}")
    return 0


def parser():
    p = argparse.ArgumentParser(prog="plugtune", description=__doc__)
    p.add_argument("--version", action="version", version=f"plugtune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, func, text in (("run", cmd_run, "fine-tune as a recipe says"),
                             ("validate", cmd_validate, "check a recipe; load no model")):
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("recipe", help="recipe file, or the name of a shipped recipe")
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override recipe keys, e.g. train.lr=1e-4 output.name=try2")
        sp.set_defaults(func=func)
    sub.add_parser("plugins", help="list installed plugins").set_defaults(func=cmd_plugins)
    sub.add_parser("recipes", help="list shipped recipes").set_defaults(func=cmd_recipes)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except PlugtuneError as exc:
        print(f"plugtune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("plugtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
