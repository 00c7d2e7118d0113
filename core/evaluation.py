"""``plugtune eval``: evaluate a finished run's model, or the untouched base model it started
from, on a data file, through the same hooks as the evaluations during training (so every task
reports its own metrics: accuracy and F1 for heads, perplexity and exact match for causal LM)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed

from . import artifacts, chat, loop, recipe as recipes, rundir
from .errors import DataError


def evaluate(run_dir: str | Path, data: str | None = None, baseline: bool = False,
             trust_remote_code: bool = False, split: str = "validation"
             ) -> tuple[dict[str, Any], Path | None]:
    """Evaluate the run in ``run_dir`` and write the result beside it.

    :param data: a data file; default the run's own held-out split.
    :param baseline: evaluate the base model as the run loaded it before training (with a task
        head, that head is new: initialised from the run's seed, as in training).
    :return: ``(record, path)``: the metrics (as logged during training) and the JSON file
        written into the run directory, ``eval-NAME.json`` or ``eval-NAME-baseline.json``.
    :param trust_remote_code: the command line's ``--trust-remote-code``.
    :param split: ``"validation"``, or ``"test"``: the run's ``data.test`` (or ``data``),
        reported as ``test_*`` and written to ``eval-test.json``.
    """
    run_dir = Path(run_dir)
    artifacts.find(run_dir)  # says clearly when this is no finished run
    recipe, pm = recipes.load_recipe(run_dir / "recipe.yaml", data_overrides(run_dir, data, split),
                                     check_files=False, trust_remote_code=trust_remote_code)
    h = pm.hook
    set_seed(recipe.train.seed)
    if baseline:
        tokenizer = chat.load_tokenizer(h, recipe)
        model, step = loop.load_base(h, recipe, tokenizer), 0
    else:
        artifact = artifacts.load(run_dir, trust_remote_code=trust_remote_code)
        model, tokenizer = artifact.model, artifact.tokenizer
        step = json.loads((run_dir / "manifest.json").read_text()).get("steps", 0)
    try:
        splits = loop.first(h.plugtune_read_data, "read the data", recipe=recipe)
    except FileNotFoundError as exc:
        raise DataError(f"{exc.filename}: not found (the run's data moved?); give the file to "
                        "evaluate on with --data FILE") from exc
    run = loop.Run(recipe, pm, Accelerator(mixed_precision=recipe.train.mixed_precision),
                   tokenizer=tokenizer)
    run.data[split] = loop.first(h.plugtune_tokenize, "tokenize records", recipe=recipe,
                                 records=splits.validation, tokenizer=tokenizer, split=split)
    run.model = run.accelerator.prepare_model(model, evaluation_mode=True)
    record = loop.evaluate(run, step, split)
    name = Path(data).stem if data else split
    path = run_dir / f"eval-{name}{'-baseline' if baseline else ''}.json"
    if not run.is_main:  # under torchrun every process evaluates its share; one writes
        return record, None
    rundir.atomic_write(path, json.dumps({
        "model": "baseline" if baseline else "fine-tuned",
        "data": [f if isinstance(f, str) else f.model_dump(exclude_none=True)
                 for f in recipe.data.validation or recipe.data.train],
        "records": len(splits.validation), "metrics": record}, indent=2) + "\n")
    return record, path


def data_overrides(run_dir: str | Path, data: str | None, split: str = "validation") -> list[str]:
    """Recipe overrides that make the data phase read only what is evaluated: ``data`` (or the
    run's files of ``split``) as both splits, so no training file is needed."""
    if data is None:
        saved = recipes.load_tree(Path(run_dir) / "recipe.yaml").get("data") or {}
        files = saved.get(split)
        if split == "test" and not files:
            raise DataError("--split test: the run has no data.test; give the file to test on "
                            "with --data FILE")
        if split == "test":
            files = json.dumps(files)
            return [f"data.train={files}", f"data.validation={files}", "data.test=null", *ONCE]
        return [f"data.train={json.dumps(files)}", "data.test=null", *ONCE] if files else \
            ["data.test=null"]
    if not Path(data).is_file():
        raise DataError(f"--data: file not found: {data}")
    quoted = json.dumps(str(Path(data).resolve()))
    return [f"data.train={quoted}", f"data.validation={quoted}", "data.test=null", *ONCE]


#: A training mixture's weights (and streaming) are not the evaluated files': read each once.
ONCE = ["data.mix=concat", "data.weights=null", "data.streaming=false"]
