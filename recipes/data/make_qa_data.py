"""Generate the dataset of the ``minilm-qa`` recipe (standard library only).

``qa_{train,validation}.jsonl`` -- SQuAD-style records ``{"context", "question", "answers":
{"text": [...], "answer_start": [...]}}``: a short office memo of facts (who works as what and
where, whose pet is called what, when and where a meeting is) shuffled among filler sentences,
and a question whose answer is a span of it. About a third of the memos are longer than the
recipe's 128-token windows, so their answers lie in one window of several. Held-out records
use names, jobs, cities, pets and times that no training record uses: a model has to find the
span that answers the question, not remember answers.

Output is deterministic (fixed seed).

Usage::

    python recipes/data/make_qa_data.py [--out-dir DIR]
"""
import argparse
import os
import random

from plugtune.recipes.data import write_jsonl

SEED = 11
#: Each pool: values for training, then values held out for validation.
POOLS = {
    "name": (["Alice", "Bruno", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivan",
              "Julia", "Kofi", "Lena"],
             ["Marta", "Nikos", "Olga", "Pavel", "Quinn", "Rosa"]),
    "job": (["nurse", "pilot", "baker", "lawyer", "plumber", "teacher", "chemist", "architect"],
            ["dentist", "librarian", "carpenter", "journalist"]),
    "city": (["Lisbon", "Oslo", "Dublin", "Prague", "Vienna", "Madrid", "Warsaw", "Athens"],
             ["Helsinki", "Zagreb", "Tallinn", "Porto"]),
    "pet": (["cat", "dog", "parrot", "rabbit", "hamster"], ["tortoise", "goldfish"]),
    "pet_name": (["Biscuit", "Pepper", "Shadow", "Mango", "Ziggy", "Noodle", "Luna", "Rocket"],
                 ["Waffle", "Pickles", "Comet", "Truffle"]),
    "topic": (["the budget", "the new website", "hiring", "the office move", "safety"],
              ["the annual report", "customer support"]),
    "time": (["9 am", "10 am", "11 am", "2 pm", "3 pm", "4 pm"], ["8 am", "1 pm", "5 pm"]),
    "room": (["Room 12", "Room 4", "the blue room", "the library", "Room 31"],
             ["the green room", "Room 7"]),
}
FILLER = [
    "The coffee machine on the second floor has been repaired.",
    "Please remember to lock the back door when you leave.",
    "Parking spaces near the entrance are reserved for visitors.",
    "The printer in the hall is out of toner again.",
    "Lunch on Friday will be provided by the team.",
    "Everyone should update their password this month.",
    "The plants by the window need water twice a week.",
    "New chairs will arrive some time next week.",
    "The fire drill is planned for the end of the month.",
    "Holiday requests go to the office manager.",
]


def memo(rng, held_out):
    """``(context, question, answer)``: facts among fillers, one of them asked about."""
    v = {k: rng.choice(pool[held_out]) for k, pool in POOLS.items()}
    owner = rng.choice([n for n in POOLS["name"][held_out] if n != v["name"]])
    facts = [
        (f"{v['name']} works as a {v['job']} in {v['city']}.",
         [(f"What does {v['name']} work as?", v["job"]),
          (f"Where does {v['name']} work?", v["city"])]),
        (f"{owner} has a {v['pet']} called {v['pet_name']}.",
         [(f"What is the name of {owner}'s {v['pet']}?", v["pet_name"]),
          (f"What kind of pet does {owner} have?", v["pet"])]),
        (f"The meeting about {v['topic']} starts at {v['time']} in {v['room']}.",
         [(f"When does the meeting about {v['topic']} start?", v["time"]),
          (f"Where is the meeting about {v['topic']}?", v["room"])]),
    ]
    fillers = rng.sample(FILLER, rng.choice([1, 2, 3, 8, 10]))
    sentences = [f for f, _ in facts] + fillers
    rng.shuffle(sentences)
    sentence, questions = rng.choice(facts)
    question, answer = rng.choice(questions)
    context = " ".join(sentences)
    start = context.index(sentence) + sentence.index(answer)
    assert context[start:start + len(answer)] == answer
    return {"context": context, "question": question,
            "answers": {"text": [answer], "answer_start": [start]}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = p.parse_args(argv)
    rng = random.Random(SEED)
    train = [memo(rng, held_out=False) for _ in range(320)]
    validation = [memo(rng, held_out=True) for _ in range(80)]
    write_jsonl(os.path.join(args.out_dir, "qa_train.jsonl"), train)
    write_jsonl(os.path.join(args.out_dir, "qa_validation.jsonl"), validation)
    print(f"wrote {len(train)} training and {len(validation)} held-out records to {args.out_dir}")


if __name__ == "__main__":
    main()
