"""Generate the dataset of the ``smollm2-summarize`` recipe (standard library only).

``summarize_{train,validation}.jsonl`` -- chat records: the user turn asks for a one-sentence
summary of meeting notes (who presented what, what was decided, when the next review is, among
sentences that do not matter), the assistant turn is that summary in the house style: ``NAME
presented TOPIC; the team agreed to DECISION, with the next review on DAY.`` The held-out notes
use names, topics and decisions that no training record uses, so a model has to learn what to
keep and the form to write it in, not the answers. Scored with ROUGE-L (and BLEU, chrF).

Output is deterministic (fixed seed).

Usage::

    python recipes/data/make_summarize_data.py [--out-dir DIR]
"""
import argparse
import os
import random

from plugtune.recipes.data import write_jsonl

SEED = 7
#: Each pool: values for training, then values held out for validation.
POOLS = {
    "name": (["Alice", "Bruno", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivan",
              "Julia", "Kofi", "Lena"],
             ["Marta", "Nikos", "Olga", "Pavel", "Rosa"]),
    "team": (["sales", "design", "finance", "support", "logistics"], ["research", "legal"]),
    "topic": (["the spring campaign", "the new logo", "the travel budget", "the help desk survey",
               "the warehouse layout", "the pricing page", "the onboarding guide"],
              ["the supplier contracts", "the mobile app release", "the office lease"]),
    "decision": (["hire two more people", "delay the launch by a week", "cut the print budget",
                  "test a cheaper courier", "move the team to the third floor",
                  "run a customer poll", "drop the old newsletter"],
                 ["open a second warehouse", "switch to monthly invoices",
                  "freeze new projects"]),
    "day": (["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"],
            ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]),
}
FILLER = [
    "Coffee and biscuits were served.",
    "The projector did not work at first.",
    "Two people joined by phone.",
    "The room was booked for an hour.",
    "Someone asked about the parking rules.",
    "The notes were taken by the office manager.",
    "It rained all morning.",
]


def notes(rng, held_out):
    v = {k: rng.choice(pool[held_out]) for k, pool in POOLS.items()}
    facts = [f"{v['name']} from {v['team']} presented {v['topic']}.",
             f"After some discussion the team agreed to {v['decision']}.",
             f"The next review is on {v['day']}."]
    sentences = facts + rng.sample(FILLER, rng.randint(1, 3))
    rng.shuffle(sentences)
    summary = (f"{v['name']} presented {v['topic']}; the team agreed to {v['decision']}, with "
               f"the next review on {v['day']}.")
    prompt = "Summarize these meeting notes in one sentence:\n" + " ".join(sentences)
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": summary}]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = p.parse_args(argv)
    rng = random.Random(SEED)
    train = [notes(rng, held_out=False) for _ in range(240)]
    validation = [notes(rng, held_out=True) for _ in range(24)]
    write_jsonl(os.path.join(args.out_dir, "summarize_train.jsonl"), train)
    write_jsonl(os.path.join(args.out_dir, "summarize_validation.jsonl"), validation)
    print(f"wrote {len(train)} training and {len(validation)} held-out records to {args.out_dir}")


if __name__ == "__main__":
    main()
