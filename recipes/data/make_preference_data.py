"""Generate the preference data the preference recipes train on (standard library only).

The questions are the quickstart's three short tasks (``recipes/data/make_quickstart_data.py``:
a review's sentiment, a snippet's topic, an order id as ``ORD-12345``), each with the right
answer (``chosen``) and a plausible wrong one (``rejected``): the other sentiment, another
topic, or the order id with one digit changed. The base SmolLM2-135M-Instruct prefers the
right answer only about half the time, so a reward model's held-out accuracy (and DPO's or
KTO's implicit rewards) have room to move.

Files written beside this script (``recipes/data``) (deterministic: seeded, no prompt of the held-out split in
the training split, and no prompt of the quickstart's own files, so SFT -> DPO on the
quickstart never sees a held-out question):

* ``preference_train.jsonl`` (300) / ``preference_eval.jsonl`` (60): ``{"prompt": [{"role":
  "user", "content": ...}], "chosen": ..., "rejected": ...}``, the prompt as a conversation
  (rendered with the model's chat template; the answers are the assistant's turn);
* ``preference_text_train.jsonl`` / ``preference_text_eval.jsonl``: the same pairs as three
  strings (no chat template);
* ``kto_train.jsonl`` (600) / ``kto_eval.jsonl`` (120): the same pairs unpaired, as TRL's
  ``unpair_preference_dataset`` does: ``{"prompt", "completion", "label"}``, the chosen answer
  with ``label: true`` and the rejected one with ``label: false``, shuffled.

Usage::

    python recipes/data/make_preference_data.py [--out-dir DIR]
"""
import argparse
import json
import os
import random

from plugtune.recipes.data import make_quickstart_data as quickstart, write_jsonl

SEED = 20
N_TRAIN = 300
N_EVAL = 60
DATA = os.path.dirname(os.path.abspath(__file__))


def wrong_order_id(rng, right):
    """``ORD-12345`` with one digit changed: the near miss a model makes."""
    digits = list(right.removeprefix("ORD-"))
    i = rng.randrange(len(digits))
    digits[i] = rng.choice([d for d in "0123456789" if d != digits[i] and (i or d != "0")])
    return "ORD-" + "".join(digits)


def pair(rng):
    """``(prompt, chosen, rejected)`` of one question; the tasks in the quickstart's mix."""
    make = quickstart.MAKERS[rng.randrange(len(quickstart.MAKERS))]
    prompt, right = make(rng)
    if make is quickstart.make_sentiment:
        wrong = "negative" if right == "positive" else "positive"
    elif make is quickstart.make_topic:
        wrong = rng.choice([t for t in quickstart.TOPICS if t != right])
    else:
        wrong = wrong_order_id(rng, right)
    return prompt, right, wrong


def quickstart_prompts(data_dir):
    """The user prompts of the quickstart's own files (kept out of these)."""
    seen = set()
    for name in ("quickstart_train.jsonl", "quickstart_eval.jsonl"):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                seen.update(json.loads(line)["messages"][0]["content"] for line in f)
    return seen


def pairs(n, rng, seen):
    out = []
    while len(out) < n:
        prompt, chosen, rejected = pair(rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, chosen, rejected))
    return out


def as_messages(rows):
    return [{"prompt": [{"role": "user", "content": p}], "chosen": c, "rejected": r}
            for p, c, r in rows]


def as_text(rows):
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows]


def as_kto(rows):
    """Each pair as two unpaired records, the chosen answer desirable and the rejected not,
    shuffled (seeded), so neighbouring records do not share a prompt."""
    rows = [{"prompt": [{"role": "user", "content": p}], "completion": answer, "label": label}
            for p, c, r in rows for answer, label in ((c, True), (r, False))]
    random.Random(SEED).shuffle(rows)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=DATA)
    args = ap.parse_args(argv)
    rng = random.Random(SEED)
    seen = quickstart_prompts(DATA)
    held_out = pairs(N_EVAL, rng, seen)  # first, so training never sees a held-out prompt
    train = pairs(N_TRAIN, rng, seen)
    os.makedirs(args.out_dir, exist_ok=True)
    for name, form in (("preference", as_messages), ("preference_text", as_text),
                       ("kto", as_kto)):
        for split, rows in (("train", train), ("eval", held_out)):
            write_jsonl(os.path.join(args.out_dir, f"{name}_{split}.jsonl"), form(rows))
    print(f"wrote {len(train)} train / {len(held_out)} held-out pairs (and their KTO form: "
          f"{2 * len(train)} / {2 * len(held_out)} records) to {args.out_dir}")


if __name__ == "__main__":
    main()
