"""The ``plugtune`` command: run, resume, reproduce, validate, plan, plugins, recipes, export,
generate, eval, new-plugin."""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import traceback

from . import __version__, loop, manager, recipe as recipes, rundir
from .errors import InputError, PluginError, PlugtuneError, first_line
from .report import report, throughput  # noqa: F401  (their home before 0.3)
from .signals import Terminated, terminate_raises

#: Set to show the traceback behind an error (as ``-v`` does).
TRACEBACK_ENV = "PLUGTUNE_TRACEBACK"


def cmd_run(args: argparse.Namespace) -> int:
    echo = print if rundir.is_main_process() else (lambda *a, **k: None)
    recipe, pm = recipes.load_recipe(args.recipe, args.overrides,
                                     trust_remote_code=args.trust_remote_code)
    echo(f"recipe: {recipe.path} (plugins: {', '.join(recipe.plugins)})")
    from . import plan

    plan.preflight(recipe, pm, echo=echo)  # before anything is loaded
    run = loop.setup(recipe, pm, echo=echo)
    report(loop.train(run, echo=echo), run, echo)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from . import resume

    echo = print if rundir.is_main_process() else (lambda *a, **k: None)
    summary, run = resume.resume(args.run_dir, force=args.force, echo=echo,
                                 trust_remote_code=args.trust_remote_code,
                                 overrides=args.overrides)
    report(summary, run, echo)
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from . import resume

    identical, message, new = resume.reproduce(args.run_dir, steps=args.steps,
                                               trust_remote_code=args.trust_remote_code)
    print(f"reproduce {args.run_dir} -> {new}: {message}")
    return 0 if identical else 1


def cmd_validate(args: argparse.Namespace) -> int:
    recipe, _ = recipes.load_recipe(args.recipe, args.overrides,
                                    trust_remote_code=args.trust_remote_code)
    print(f"{recipe.path}: ok (plugins: {', '.join(recipe.plugins)})")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    """Every installed plugin with its hooks, roles and plugin API range; a broken one (it
    fails to import, breaks the hook contract, needs another plugin API, or shares its name
    with another distribution's) is listed with its error, every healthy one still is, and the
    exit status is 3."""
    broken: dict[str, manager.BrokenPlugin] = {}
    discovered = manager.discover(broken=broken)
    pm, invalid = manager.inspect_all(discovered)
    broken.update(invalid)
    for name, info in discovered.items():
        if name in broken:
            continue
        default = " [default]" if info.default else ""
        print(f"{name}{default}  ({info.dist} {info.version})  {info.doc}")
        print(f"    hooks: {', '.join(manager.hooks_of(pm, name)) or '-'}")
        print(f"    {contract(info)}")
    for name, bad in broken.items():
        what = re.sub(r"^plugin '[^']*' \([^)]*\):? ", "", bad.error.splitlines()[0])
        print(f"{name}  ({f'{bad.dist} {bad.version}'.strip()})  BROKEN: {what}")
        print(f"    skip it with {manager.SKIP_ENV}={name}, or fix or uninstall {bad.dist}")
        print(f"plugtune: error: {bad.error}", file=sys.stderr)
    return PluginError.exit_code if broken else 0


def contract(info: manager.PluginInfo) -> str:
    """``roles: adapter, trainable  replaces: -  API: >=1.0,<2`` of one plugin (``any``: no
    ``PLUGTUNE_API``)."""
    roles = ", ".join(sorted(info.roles)) or "-"
    replaces = "; ".join(f"{name}'s {', '.join(sorted(hooks))}"
                         for name, hooks in info.replaces.items())
    return (f"roles: {roles}" + (f"  replaces: {replaces}" if replaces else "")
            + f"  API: {info.api or 'any'}")


def cmd_recipes(args: argparse.Namespace) -> int:
    shipped = sorted(recipes.shipped_recipes().items())
    width = max((len(name) for name, _ in shipped), default=0) + 2
    for name, path in shipped:
        try:
            description = recipes.load_tree(path).get("description", "")
        except PlugtuneError as exc:
            description = f"(unreadable: {exc})"
        print(f"{name:<{width}}{description}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import artifacts

    fmt = args.format or (f"gguf:{args.gguf}" if args.gguf else None)
    if fmt is not None:
        if args.merge or (args.format and args.gguf):
            raise InputError("give one of --merge, --gguf TYPE and --format NAME[:OPTION]")
        notes, lines = artifacts.export_format(args.run_dir, args.out, fmt,
                                               trust_remote_code=args.trust_remote_code)
    else:
        notes = artifacts.export(args.run_dir, args.out, merge=args.merge,
                                 trust_remote_code=args.trust_remote_code)
        what = "merged model (transformers save_pretrained)" if args.merge else "saved artifact"
        lines = [f"wrote the {what} of {args.run_dir} to {args.out}"]
    for note in notes:
        print(f"note: {note}")
    for line in lines:
        print(line)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from transformers import set_seed

    from . import artifacts

    artifact = artifacts.load(args.run_dir, trust_remote_code=args.trust_remote_code)
    for note in artifact.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.seed is not None:
        set_seed(args.seed)
    print(artifacts.generate(artifact, args.prompt, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p,
                             chat_template=not args.no_chat_template))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from . import evaluation

    record, path = evaluation.evaluate(args.run_dir, args.data, args.baseline,
                                       trust_remote_code=args.trust_remote_code,
                                       split=args.split)
    if path is None:  # not the main process
        return 0
    what = "base model (before fine-tuning)" if args.baseline else "fine-tuned model"
    data = {"validation": "its held-out data", "test": "its test data"}[args.split]
    print(f"{what} of {args.run_dir} on {args.data or data}:")
    for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
            print(f"  {key}: {value:.4f}")
    print(f"wrote {path}")
    return 0


def cmd_new_plugin(args: argparse.Namespace) -> int:
    from . import scaffold

    root = scaffold.new_plugin(args.name, args.dir)
    print(f"wrote {root}: pyproject.toml (entry point {args.name}), "
          f"plugtune_{args.name}.py, test_{args.name}.py, README.md")
    print(f"next: cd {root} && python -m pip install -e . && python -m pytest")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from . import plan

    return plan.command(args)


def add_trust_remote_code(sp: argparse.ArgumentParser) -> None:
    """The one way to let a model's own Python code run (``auto_map`` models): a flag on each
    command that loads (or checks) a model. ``recipe.model.trust_remote_code`` is set from it
    alone; a recipe that says ``trust_remote_code: true`` without it is refused."""
    sp.add_argument("--trust-remote-code", action="store_true",
                    help="run Python code that comes with the model (read it first); without "
                    "this flag a model that needs it, or a recipe asking for it, is refused")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plugtune", description=__doc__)
    p.add_argument("--version", action="version", version=f"plugtune {__version__}")
    p.add_argument("-v", "--verbose", action="store_true",
                   help=f"show the traceback behind an error (or set {TRACEBACK_ENV}=1)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, func, text in (("run", cmd_run, "fine-tune as a recipe says"),
                             ("validate", cmd_validate, "check a recipe; load no model")):
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("recipe", help="recipe file, or the name of a shipped recipe")
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override recipe keys, e.g. train.lr=1e-4 output.name=try2")
        add_trust_remote_code(sp)
        sp.set_defaults(func=func)
    sp = sub.add_parser("plan", help="say whether a recipe fits a GPU, component by component",
                        description="Plan a recipe's memory from the model's config alone (no "
                        "weights): weights, gradients, optimizer state, activations, logits, "
                        "overhead; the peak; whether it fits. Exit status 0 when it fits, 1 "
                        "when not. --fit writes a recipe that fits.")
    sp.add_argument("recipe", help="recipe file, or the name of a shipped recipe")
    sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override recipe keys")
    sp.add_argument("--gpu", metavar="SIZE|NAME", help="the memory to fit: 24GiB, 16GB, or a "
                    "GPU name (rtx4090, rtx3090, a100-40g, a100-80g, h100-80g, t4, l4, ...; "
                    "an unknown name lists them all); default the GPU this machine has")
    sp.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="plan for a CUDA GPU (default) or a CPU run")
    sp.add_argument("--fit", action="store_true", help="find the plugins and settings with the "
                    "least quality cost that fit, and write that recipe")
    sp.add_argument("--out", help="where --fit writes the recipe (default RECIPE.fit.yaml)")
    sp.add_argument("--processes", type=int, default=1, metavar="N",
                    help="plan one of N data-parallel processes (GPUs), e.g. under accelerate")
    sp.add_argument("--shard", choices=["fsdp", "zero2", "zero3"],
                    help="how the N processes divide the state: fsdp/zero3 weights, gradients "
                    "and optimizer state; zero2 gradients and optimizer state (default: none, "
                    "as DDP)")
    add_trust_remote_code(sp)
    sp.set_defaults(func=cmd_plan)
    sp = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint",
                        description="Continue the run in RUN_DIR from its newest intact "
                        "checkpoint (checksums verified) with its own recipe.yaml, appending to "
                        "its metrics.jsonl. Refuses while another process uses RUN_DIR, and when "
                        "recipe.yaml, the model, a data file or an active plugin changed since "
                        "(--force goes on with the changes and records them in the manifest).")
    sp.add_argument("run_dir", help="the run directory (runs/NAME)")
    sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="change recipe keys "
                    "from here on, e.g. train.max_steps=200 (recorded in recipe.yaml)")
    sp.add_argument("--force", action="store_true", help="resume despite a hand-edited "
                    "recipe.yaml, a changed model, data or plugins")
    add_trust_remote_code(sp)
    sp.set_defaults(func=cmd_resume)
    sp = sub.add_parser("reproduce", help="run a run's recipe again and compare the loss",
                        description="Run RUN_DIR's recorded recipe into a new run directory "
                        "beside it, warn about any version or data difference, and compare the "
                        "loss step by step: exit 0 when identical, 1 at the first step that "
                        "differs.")
    sp.add_argument("run_dir", help="the run directory (runs/NAME)")
    sp.add_argument("--steps", type=int, metavar="K", help="compare only the first K steps")
    add_trust_remote_code(sp)
    sp.set_defaults(func=cmd_reproduce)
    sub.add_parser("plugins", help="list installed plugins").set_defaults(func=cmd_plugins)
    sub.add_parser("recipes", help="list shipped recipes").set_defaults(func=cmd_recipes)
    sp = sub.add_parser("new-plugin", help="write an installable plugin skeleton",
                        description="Write ./plugtune-NAME/: a pyproject.toml with the entry "
                        "point, plugtune_NAME.py with a recipe section and a documented hook, "
                        "and a pytest test using plugtune.testing that passes once installed.")
    sp.add_argument("name", help="the plugin's name (the one recipes list in plugins:)")
    sp.add_argument("--dir", default=".", help="where to write plugtune-NAME/ (default: here)")
    sp.set_defaults(func=cmd_new_plugin)
    sp = sub.add_parser("export", help="write a run's model: its adapter, merged, or GGUF",
                        description="Write a run's model to OUT: the adapter or model as saved, "
                        "with --merge the adapter merged into its base as a model that "
                        "transformers' from_pretrained loads, or with --gguf TYPE the merged "
                        "model as OUT/model-TYPE.gguf (llama.cpp, Ollama, LM Studio) with an "
                        "Ollama Modelfile (docs/export.md).")
    sp.add_argument("run_dir", help="the run directory (runs/NAME)")
    sp.add_argument("out", help="a new directory")
    sp.add_argument("--merge", action="store_true", help="merge the adapter into the base")
    sp.add_argument("--gguf", metavar="TYPE", help="write GGUF: f16, bf16, q8_0 or q4_0 "
                    "(Llama, Mistral, Qwen2, SmolLM2 causal LMs)")
    sp.add_argument("--format", metavar="NAME[:OPTION]", help="a format an installed plugin "
                    "writes (--gguf TYPE is --format gguf:TYPE)")
    add_trust_remote_code(sp)
    sp.set_defaults(func=cmd_export)
    sp = sub.add_parser("generate", help="sample from a run's fine-tuned model",
                        description="Sample a reply to PROMPT from a run's fine-tuned model "
                        "(the prompt goes in as a user turn where the tokenizer has a chat "
                        "template).")
    sp.add_argument("run_dir", help="the run directory (runs/NAME)")
    sp.add_argument("prompt")
    sp.add_argument("--max-new-tokens", type=int, default=128)
    sp.add_argument("--temperature", type=float, default=0.7, help="0 decodes greedily")
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--seed", type=int, default=None, help="for a repeatable sample")
    sp.add_argument("--no-chat-template", action="store_true", help="use the prompt as is")
    add_trust_remote_code(sp)
    sp.set_defaults(func=cmd_generate)
    sp = sub.add_parser("eval", help="evaluate a run's model (or its base) on a data file",
                        description="Evaluate a finished run's model on a data file with its "
                        "task's metrics, print them and write RUN_DIR/eval-NAME.json; "
                        "--baseline evaluates the untouched base model the same way.")
    sp.add_argument("run_dir", help="the run directory (runs/NAME)")
    sp.add_argument("--data", metavar="FILE", help="default: the run's held-out data (or, with "
                    "--split test, its data.test)")
    sp.add_argument("--split", choices=["validation", "test"], default="validation",
                    help="the run's split to evaluate (test: data.test, reported as test_*)")
    sp.add_argument("--baseline", action="store_true",
                    help="evaluate the base model as loaded before training")
    add_trust_remote_code(sp)
    sp.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    # KEY=VALUE overrides may also come after options (`plan R --gpu 24GiB train.batch_size=1`)
    if extra and (not hasattr(args, "overrides")
                  or any(e.startswith("-") or "=" not in e for e in extra)):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        with terminate_raises():
            return args.func(args)
    except PlugtuneError as exc:
        if args.verbose or os.environ.get(TRACEBACK_ENV):
            traceback.print_exception(exc)
        exc = _disk_full(exc) or _out_of_memory(exc) or exc  # also where a plugin was blamed
        print(f"plugtune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print("plugtune: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("plugtune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `plugtune plugins | head`: the reader has gone, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # a bug (ours or a plugin's): one line, the traceback on request
        if args.verbose or os.environ.get(TRACEBACK_ENV):
            traceback.print_exc()
        known = _disk_full(exc) or _out_of_memory(exc)
        if known is not None:
            print(f"plugtune: error: {known}", file=sys.stderr)
            return known.exit_code
        what = first_line(exc, empty="(no message)")
        print(f"plugtune: internal error: {type(exc).__name__}: {what} (a bug in plugtune or a "
              f"plugin; {TRACEBACK_ENV}=1 shows the traceback for a report)", file=sys.stderr)
        return INTERNAL_ERROR


#: Exit status of an unexpected exception (EX_SOFTWARE); bad input exits 2.
INTERNAL_ERROR = 70


def _disk_full(exc: BaseException | None) -> PlugtuneError | None:
    """A :class:`~plugtune.rundir.DiskFull` for an error that a full disk caused (however a
    plugin or the loop wrapped it), else None."""
    while exc is not None:
        if isinstance(exc, rundir.DiskFull):
            return exc
        if rundir.is_disk_full(exc):
            return rundir.DiskFull(getattr(exc, "filename", None) or "the run directory")
        exc = exc.__cause__ or exc.__context__
    return None


def _out_of_memory(exc: BaseException) -> PlugtuneError | None:
    """A :class:`PlugtuneError` for an allocation that failed (a recipe asking for far too
    much, such as ``lora.r=1e12``; a plugin's hook may have been blamed for it), else None."""
    cause: BaseException | None = exc
    while cause is not None and not _allocation_failed(cause):
        cause = cause.__cause__
    if cause is not None:
        text = first_line(cause, empty="(no message)")
        return PlugtuneError(f"out of memory: {text}; a recipe setting may ask for far too much "
                             "(an adapter's r, train.batch_size, train.max_length); `plugtune "
                             "plan RECIPE` estimates what a recipe needs")
    return None


def _allocation_failed(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or \
        "can't allocate memory" in first_line(exc, empty="(no message)")


if __name__ == "__main__":
    sys.exit(main())
