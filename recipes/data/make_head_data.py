"""Generate the datasets of the task-head recipes (standard library only).

* ``support_intent_{train,validation}.jsonl`` -- ``{"text", "label"}``: customer-support messages
  labelled with their intent, one of ``billing``, ``shipping``, ``returns``, ``account`` and
  ``technical``, in unequal shares (billing, the largest class, is about a third, so always
  answering it scores about 0.3). Greetings, sign-offs, products and order numbers are shared by
  every intent, so only what the message asks tells the label. The held-out messages use
  requests worded in ways that no training message uses: a model has to know what the words
  mean, not match them.
* ``entities_{train,validation}.jsonl`` -- ``{"tokens", "tags"}``: short news sentences with BIO
  tags for people (``PER``), organisations (``ORG``) and places (``LOC``), many of them several
  words long. Held-out sentences use sentence frames, names, organisations and places that the
  training sentences never use.

Output is deterministic (fixed seed).

Usage::

    python recipes/data/make_head_data.py [--out-dir DIR]
"""
import argparse
import os
import random

from plugtune.recipes.data import write_jsonl

SEED = 5

# ------------------------------------------------------------------- intents
# Each intent: requests for training, then requests held out for validation.
INTENTS = {
    "billing": (0.32, [
        "I was charged twice for {item}",
        "my credit card was billed the wrong amount",
        "why is there an extra fee on my invoice",
        "can I get a copy of my receipt for {item}",
        "the payment for {item} failed but the money left my account",
        "I need to update the card you charge every month",
        "my subscription price went up without notice",
        "please stop the automatic renewal charge",
        "the discount code was not applied to my bill",
        "I see a pending charge I do not recognise",
    ], [
        "you took money from my account two times",
        "the total on my statement is higher than the price at checkout",
        "how do I pay the balance that is still outstanding",
        "I would like an invoice with my company tax number",
        "the bank shows a payment to you that I never made",
        "is VAT included in the price you billed me",
    ]),
    "shipping": (0.24, [
        "where is my package with {item}",
        "the tracking number for {item} has not updated in a week",
        "my delivery is late",
        "the courier left {item} at the wrong address",
        "can you ship {item} to a different address",
        "how long does express delivery take",
        "the parcel says delivered but nothing arrived",
        "do you deliver to {country}",
        "my order with {item} has not shipped yet",
        "can I collect {item} from a store instead of having it delivered",
    ], [
        "when will {item} get here",
        "the driver never came to my door",
        "is there a way to speed up the shipment",
        "tracking shows {item} stuck at the depot",
        "the postman says the address on my parcel is incomplete",
        "what does it cost to send {item} overnight",
    ]),
    "returns": (0.18, [
        "I want to return {item}",
        "how do I send back {item} that does not fit",
        "can I exchange {item} for a different size",
        "I need a return label for {item}",
        "what is your return policy for opened items",
        "{item} is broken and I want a replacement",
        "when will I get my refund for the returned {item}",
        "I changed my mind about {item}, can I give it back",
        "the wrong item was sent and I want to swap it",
        "is it too late to return {item} after forty days",
    ], [
        "{item} is not what I ordered, how do I get rid of it and get my money back",
        "can I bring {item} back to one of your shops",
        "please arrange a pickup so {item} goes back to you",
        "I would rather have a different colour of {item} than this one",
        "the seal on {item} is broken, I am sending it back",
        "do I pay the postage when I return {item}",
    ]),
    "account": (0.14, [
        "I forgot my password",
        "how do I change the email on my account",
        "I cannot log in to my account",
        "please delete my account and my data",
        "my account was locked after too many attempts",
        "how do I turn on two factor authentication",
        "I want to change my username",
        "someone else may have access to my profile",
        "the verification email never reached my inbox",
        "how do I merge two accounts",
    ], [
        "the reset link for my login does not work",
        "I want to update the phone number in my profile",
        "signing in keeps saying my credentials are wrong",
        "close my profile permanently please",
        "I never got the code to confirm my identity",
        "can I have two users on one membership",
    ]),
    "technical": (0.12, [
        "the app crashes when I open it",
        "{item} will not turn on",
        "the website shows an error when I search",
        "{item} does not connect to wifi",
        "the firmware update for {item} failed",
        "the screen on {item} keeps flickering",
        "the app is very slow on my phone",
        "{item} stopped syncing with my laptop",
        "how do I reset {item} to factory settings",
        "the battery of {item} drains in an hour",
    ], [
        "{item} freezes every few minutes",
        "the page keeps loading forever",
        "bluetooth pairing with {item} fails",
        "I get a blank screen since the latest update",
        "{item} makes a loud buzzing noise and then shuts down",
        "the software on {item} shows error code 43",
    ]),
}
ITEMS = ["the headphones", "my new phone", "the blender", "the smart watch", "the jacket",
         "the coffee machine", "the router", "the tablet", "the running shoes", "the speaker",
         "the printer", "the desk lamp", "the vacuum cleaner", "the camera"]
COUNTRIES = ["Canada", "Japan", "Brazil", "Norway", "Kenya", "Australia", "Portugal"]
OPENERS = ["", "", "Hi,", "Hello,", "Good morning,", "Hey there,", "Dear support,"]
CLOSERS = ["", "", "Thanks.", "Please help.", "Thank you in advance.", "Order {order}.",
           "This is urgent.", "Regards, a long-time customer."]


def intent_text(rng, request):
    core = request.format(item=rng.choice(ITEMS), country=rng.choice(COUNTRIES))
    opener = rng.choice(OPENERS)
    if not opener:
        core = core[0].upper() + core[1:]
    question = core.split()[0].lower() in {"why", "how", "can", "do", "where", "when", "what",
                                           "is"}
    closer = rng.choice(CLOSERS).format(order=f"#{rng.randint(10000, 99999)}")
    return " ".join(p for p in (opener, core + ("?" if question else "."), closer) if p)


def intents(n, rng, held_out):
    names = list(INTENTS)
    shares = [INTENTS[k][0] for k in names]
    rows, seen = [], set()
    while len(rows) < n:
        label = rng.choices(names, shares)[0]
        request = rng.choice(INTENTS[label][2 if held_out else 1])
        text = intent_text(rng, request)
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    return rows


# ------------------------------------------------------------------ entities
# Names, organisations and places: the first part for training, the rest held out.
FIRST = ["Maria", "John", "Aisha", "Kenji", "Olga", "Pedro", "Fatima", "Liam", "Chen", "Amara",
         "Sofia", "Dmitri", "Grace", "Tomas", "Priya", "Hugo", "Nadia", "Omar", "Elena", "Yusuf"]
LAST = ["Lopez", "Smith", "Khan", "Tanaka", "Ivanova", "Silva", "Haddad", "Murphy", "Wei",
        "Okafor", "Rossi", "Petrov", "Kim", "Novak", "Sharma", "Martin", "Berg", "Farah",
        "Costa", "Demir"]
ORGS = ["Acme Corporation", "Globex", "Red Cross", "Siemens", "Toyota", "Oxford University",
        "World Bank", "Nordic Airlines", "Banco Central", "Greenpeace", "Apex Mining Group",
        "Reuters", "Mercy Hospital", "United Nations", "Blue River Foods", "Tesla",
        "Harvard University", "Unilever", "Atlas Shipping Company", "Amnesty International"]
PLACES = ["Paris", "New York", "Berlin", "Tokyo", "Cape Town", "Nairobi", "Lima", "Oslo",
          "San Francisco", "Buenos Aires", "Hanoi", "Madrid", "Rio de Janeiro", "Cairo",
          "Toronto", "Mumbai", "Istanbul", "Quebec City", "Dublin", "Kuala Lumpur"]
TRAIN_SHARE = 0.7
FRAMES = [
    "{PER} works for {ORG} in {LOC} .",
    "{PER} flew from {LOC} to {LOC} on Monday .",
    "{ORG} opened a new office in {LOC} .",
    "Yesterday {PER} met {PER} at the {ORG} headquarters .",
    "The mayor of {LOC} , {PER} , praised {ORG} .",
    "{ORG} hired {PER} as its new chief executive .",
    "{PER} was born in {LOC} and studied at {ORG} .",
    "Shares of {ORG} rose after {PER} announced the deal .",
    "A storm hit {LOC} on Tuesday , {ORG} said .",
    "{PER} and {PER} will visit {LOC} next week .",
    "Police in {LOC} questioned {PER} about the fire .",
    "{ORG} sued {ORG} over a patent .",
]
HELD_OUT_FRAMES = [
    "According to {PER} , {ORG} will leave {LOC} .",
    "{PER} moved to {LOC} to join {ORG} .",
    "Fans in {LOC} cheered for {PER} .",
    "{ORG} and {ORG} signed a contract in {LOC} .",
]


def split(items):
    cut = round(len(items) * TRAIN_SHARE)
    return items[:cut], items[cut:]


def entity_record(rng, frame, pools):
    tokens, tags = [], []
    for word in frame.split():
        kind = word[1:-1] if word.startswith("{") else None
        if kind is None:
            tokens.append(word)
            tags.append("O")
            continue
        if kind == "PER":
            first, last = pools["FIRST"], pools["LAST"]
            name = rng.choice([f"{rng.choice(first)} {rng.choice(last)}", rng.choice(last)])
        else:
            name = rng.choice(pools[kind])
        words = name.split()
        tokens += words
        tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
    return {"tokens": tokens, "tags": tags}


def entities(n, rng, held_out):
    part = 1 if held_out else 0
    pools = {"FIRST": split(FIRST)[part], "LAST": split(LAST)[part], "ORG": split(ORGS)[part],
             "LOC": split(PLACES)[part]}
    frames = HELD_OUT_FRAMES if held_out else FRAMES
    rows, seen = [], set()
    while len(rows) < n:
        row = entity_record(rng, rng.choice(frames), pools)
        key = " ".join(row["tokens"])
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args(argv)
    rng = random.Random(SEED)
    outputs = {"support_intent_train.jsonl": intents(600, rng, held_out=False),
               "support_intent_validation.jsonl": intents(150, rng, held_out=True),
               "entities_train.jsonl": entities(400, rng, held_out=False),
               "entities_validation.jsonl": entities(100, rng, held_out=True)}
    os.makedirs(args.out_dir, exist_ok=True)
    for name, rows in outputs.items():
        write_jsonl(os.path.join(args.out_dir, name), rows)
        print(f"wrote {len(rows)} records to {os.path.join(args.out_dir, name)}")


if __name__ == "__main__":
    main()
