"""Generate the KTO data of ``smollm2-kto`` from the preference pairs (standard library only).

KTO learns from unpaired answers, each marked desirable or not. Each pair of
``preference_train.jsonl`` / ``preference_eval.jsonl`` (``make_preference_data.py``: the
quickstart's questions, the right answer chosen and a plausible wrong one rejected) becomes two
records, as TRL's ``unpair_preference_dataset`` makes them: ``{"prompt", "completion":
chosen, "label": true}`` and ``{"prompt", "completion": rejected, "label": false}``. The
records are shuffled (fixed seed), so neighbouring records do not share a prompt; the kto
plugin pairs each with the next record's completion for its KL estimate.

Usage::

    python recipes/data/make_kto_data.py [--out-dir DIR]
"""
import argparse
import json
import os
import random

from plugtune.recipes.data import write_jsonl

SEED = 20


def unpaired(path, rng):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            pair = json.loads(line)
            for answer, label in ((pair["chosen"], True), (pair["rejected"], False)):
                rows.append({"prompt": pair["prompt"], "completion": answer, "label": label})
    rng.shuffle(rows)
    return rows


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=here)
    args = parser.parse_args(argv)
    rng = random.Random(SEED)
    for source, target in (("preference_train.jsonl", "kto_train.jsonl"),
                           ("preference_eval.jsonl", "kto_eval.jsonl")):
        rows = unpaired(os.path.join(here, source), rng)
        write_jsonl(os.path.join(args.out_dir, target), rows)
        print(f"{target}: {len(rows)} records")


if __name__ == "__main__":
    main()
