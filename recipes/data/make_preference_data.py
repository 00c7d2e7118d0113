"""Generate the preference pairs of ``smollm2-dpo`` and ``smollm2-orpo`` from the quickstart
data (standard library only).

Each quickstart chat becomes ``{"prompt": [user turn], "chosen": right answer, "rejected":
wrong answer}``: the user's turn as a message list (rendered with the model's chat template),
the reference answer as ``chosen`` and, as ``rejected``, a wrong answer of the kind a small
model gives: the other sentiment, another topic, or the order number in the wrong form (the
bare number, or one digit off). Output is deterministic (fixed seed); the held-out pairs come
from the quickstart's held-out chats.

Usage::

    python recipes/data/make_preference_data.py [--out-dir DIR]
"""
import argparse
import json
import os
import random

from plugtune.recipes.data import write_jsonl

SEED = 4321
TOPICS = ["sports", "weather", "food", "music", "tech"]


def wrong(answer, rng):
    """A wrong answer in the task's own terms."""
    if answer in ("positive", "negative"):
        return "negative" if answer == "positive" else "positive"
    if answer in TOPICS:
        return rng.choice([t for t in TOPICS if t != answer])
    number = answer.removeprefix("ORD-")
    if rng.random() < 0.5:
        return number
    i = rng.randrange(len(number))
    digit = str((int(number[i]) + rng.randrange(1, 10)) % 10)
    return f"ORD-{number[:i]}{digit}{number[i + 1:]}"


def pairs(path, rng):
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            messages = json.loads(line)["messages"]
            answer = messages[-1]["content"]
            out.append({"prompt": messages[:-1], "chosen": answer,
                        "rejected": wrong(answer, rng)})
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=here)
    args = parser.parse_args()
    rng = random.Random(SEED)
    for source, target in (("quickstart_train.jsonl", "preference_train.jsonl"),
                           ("quickstart_eval.jsonl", "preference_eval.jsonl")):
        rows = pairs(os.path.join(here, source), rng)
        write_jsonl(os.path.join(args.out_dir, target), rows)
        print(f"{target}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
