"""Generate the quickstart instruction dataset (standard library only).

The task is a mix of three short, self-contained jobs whose answer can be
read off the prompt, so a small model learns them from a few hundred
examples without needing world knowledge:

* ``sentiment`` -- label a short product review as ``positive`` or
  ``negative``;
* ``topic`` -- label a one-sentence news snippet as one of ``sports``,
  ``weather``, ``food``, ``music`` or ``tech``;
* ``order`` -- pull the order number out of a customer message and write it
  in the fixed form ``ORD-12345``.

Half the records are ``sentiment`` (the slowest to learn), a quarter each
``topic`` and ``order``.  Each answer is a single word or code (a handful of
tokens).  The base
instruct model tends to answer verbosely or in its own format, so its exact
match is low before training and high after.

Every record is a chat: ``{"messages": [{"role": "user", ...},
{"role": "assistant", ...}]}``; the assistant message is the reference
answer.  Output is deterministic (fixed seed) and the eval prompts never
appear in the train file.

Usage::

    python recipes/data/make_quickstart_data.py [--out-dir DIR]
"""

import argparse
import os
import random

from plugtune.recipes.data import write_jsonl

SEED = 1234
N_TRAIN = 360
N_EVAL = 40

# ---------------------------------------------------------------- sentiment
PRODUCTS = [
    "headphones", "blender", "backpack", "phone case", "desk lamp", "kettle",
    "running shoes", "keyboard", "coffee maker", "water bottle", "umbrella",
    "jacket", "vacuum cleaner", "charger", "frying pan", "office chair",
    "tent", "toaster", "mouse", "suitcase", "watch", "speaker", "pillow",
]
POS_PHRASES = [
    "works perfectly", "is excellent", "exceeded my expectations",
    "is great value for money", "arrived quickly and works well",
    "is sturdy and well made", "is exactly what I wanted",
    "is a joy to use", "has been fantastic so far", "is really comfortable",
]
NEG_PHRASES = [
    "broke after two days", "is terrible", "stopped working within a week",
    "is a waste of money", "arrived damaged", "feels cheap and flimsy",
    "is nothing like the picture", "is very uncomfortable",
    "has been a disappointment", "never worked properly",
]
POS_TAILS = ["Highly recommend.", "Would buy again.", "Five stars.",
             "Very happy with it.", "Love it."]
NEG_TAILS = ["Do not buy.", "I want a refund.", "One star.",
             "Very disappointed.", "Avoid it."]
SENT_PROMPTS = [
    "Classify the sentiment of this review as positive or negative.\n\nReview: {text}",
    "Is the following review positive or negative?\n{text}",
    "Review: {text}\nSentiment (positive or negative)?",
    "Label this customer review as positive or negative: {text}",
]


def make_sentiment(rng):
    label = rng.choice(["positive", "negative"])
    product = rng.choice(PRODUCTS)
    if label == "positive":
        phrase, tail = rng.choice(POS_PHRASES), rng.choice(POS_TAILS)
    else:
        phrase, tail = rng.choice(NEG_PHRASES), rng.choice(NEG_TAILS)
    opener = rng.choice(["This", "The", "My new"])
    text = f"{opener} {product} {phrase}. {tail}".strip()
    return rng.choice(SENT_PROMPTS).format(text=text), label


# -------------------------------------------------------------------- topic
TOPIC_SENTENCES = {
    "sports": [
        "The home team won the match in extra time.",
        "The striker scored twice in the second half.",
        "The tennis final went to five sets.",
        "The coach announced the squad for the next game.",
        "The marathon runner set a new course record.",
        "The goalkeeper saved a penalty in the last minute.",
        "The league season opens next weekend.",
        "The swimmer took gold in the relay.",
    ],
    "weather": [
        "Heavy rain is expected across the region tomorrow.",
        "Temperatures will drop below freezing tonight.",
        "A storm warning has been issued for the coast.",
        "Sunny skies and light winds are forecast for the weekend.",
        "Snow is likely in the hills by Friday morning.",
        "The heatwave will continue until Thursday.",
        "Thick fog delayed drivers on the motorway this morning.",
        "Strong winds brought down trees overnight.",
    ],
    "food": [
        "The new bakery sells fresh bread every morning.",
        "This recipe for tomato soup takes twenty minutes.",
        "The restaurant added three vegan dishes to its menu.",
        "Chefs recommend resting the steak before slicing it.",
        "The festival offered cheese and wine tastings.",
        "Add a pinch of salt to bring out the sweetness.",
        "The cafe now serves breakfast all day.",
        "Fresh pasta cooks in about three minutes.",
    ],
    "music": [
        "The band released its third album on Friday.",
        "The orchestra will play two symphonies tonight.",
        "The singer announced a world tour for next year.",
        "Tickets for the jazz festival sold out in an hour.",
        "The guitarist recorded the solo in a single take.",
        "Her new single topped the charts this week.",
        "The choir rehearses every Tuesday evening.",
        "The drummer left the group after ten years.",
    ],
    "tech": [
        "The company released a software update for its laptops.",
        "The new phone has a faster processor and a bigger battery.",
        "Developers can now try the beta version of the app.",
        "The startup launched a cloud storage service.",
        "A security patch fixes a bug in the web browser.",
        "The chip maker unveiled a more efficient processor.",
        "The update adds dark mode to the email app.",
        "Engineers improved the speed of the home router.",
    ],
}
TOPICS = sorted(TOPIC_SENTENCES)
TOPIC_PREFIXES = ["", "", "Breaking: ", "Update: ", "Local news: ", "Today: "]
TOPIC_PROMPTS = [
    "What is the topic of this sentence? Choose from sports, weather, food, music, tech.\n\n{text}",
    "Classify the topic (sports, weather, food, music or tech): {text}",
    "Sentence: {text}\nTopic (sports/weather/food/music/tech)?",
    "Which category does this headline belong to: sports, weather, food, music or tech?\n{text}",
]


def make_topic(rng):
    label = rng.choice(TOPICS)
    text = rng.choice(TOPIC_PREFIXES) + rng.choice(TOPIC_SENTENCES[label])
    return rng.choice(TOPIC_PROMPTS).format(text=text), label


# -------------------------------------------------------------------- order
NAMES = ["Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo",
         "Ines", "Jonas", "Kim", "Liam", "Maya", "Noah", "Olga", "Pedro"]
ORDER_MESSAGES = [
    "Hi, this is {name}. My order {num} has not arrived yet.",
    "Hello, I would like to return the items from order number {num}. Thanks, {name}",
    "{name} here: order #{num} arrived with a missing part.",
    "Can you check the status of order {num}? Regards, {name}",
    "Dear support, I was charged twice for order no. {num}. {name}",
    "Order {num} was delivered to the wrong address. - {name}",
]
ORDER_PROMPTS = [
    "Extract the order number from this message and write it as ORD-<number>.\n\n{text}",
    "Customer message: {text}\nOrder ID in the form ORD-<number>?",
    "Give the order ID (format ORD-<number>) mentioned here: {text}",
]


def make_order(rng):
    num = str(rng.randint(10000, 99999))
    text = rng.choice(ORDER_MESSAGES).format(name=rng.choice(NAMES), num=num)
    return rng.choice(ORDER_PROMPTS).format(text=text), f"ORD-{num}"


# sentiment is the hardest of the three to learn, so it gets half the records
MAKERS = [make_sentiment, make_topic, make_sentiment, make_order]


def record(prompt, answer):
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}]}


def generate(n, rng, seen):
    """``n`` records with prompts not in ``seen`` (updated in place); the
    tasks take turns in the fixed ``MAKERS`` order, so the mix is stable."""
    out = []
    i = 0
    while len(out) < n:
        prompt, answer = MAKERS[i % len(MAKERS)](rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append(record(prompt, answer))
        i += 1
    rng.shuffle(out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args(argv)
    rng = random.Random(SEED)
    seen = set()
    # eval first, then train excludes every eval prompt
    eval_rows = generate(N_EVAL, rng, seen)
    train_rows = generate(N_TRAIN, rng, seen)
    os.makedirs(args.out_dir, exist_ok=True)
    write_jsonl(os.path.join(args.out_dir, "quickstart_train.jsonl"), train_rows)
    write_jsonl(os.path.join(args.out_dir, "quickstart_eval.jsonl"), eval_rows)
    print(f"wrote {len(train_rows)} train / {len(eval_rows)} eval records to {args.out_dir}")


if __name__ == "__main__":
    main()
