"""Synthetic prompt/completion records whose lengths spread like instruction data: from a dozen
to about 450 tokens (SmolLM2's tokenizer), most of them short, a long tail; seeded, nothing
downloaded. `benchmarks/peers.py` trains on them.

Each record is one of a few rewriting tasks whose answer follows from the prompt (sort, reverse,
capitalise, pick out the numbers, count, keep the first sentence, continue a count), so the loss
has something to learn; the tasks differ in where the length goes (a long prompt and a short
answer, or the other way round), as real instruction data does. A record's size is drawn from a
log-normal distribution (median about 110 tokens) clipped to the range.

    python benchmarks/make_sft_data.py --records 2000 --seed 0 --out sft.jsonl
"""
import argparse
import json
import math
import random
import sys

WORDS = """time year people way day man thing woman life child world school state family
student group country problem hand part place case week company system program question work
government number night point home water room mother area money story fact month lot right
study book eye job word business issue side kind head house service friend father power hour
game line end member law car city community name president team minute idea kid body
information back parent face others level office door health person art war history party
result change morning reason research girl guy moment air teacher force education river garden
window letter paper market table music field road bread light stone cloud winter summer
village engine bridge island forest valley animal horse bird flower orange apple yellow green
purple silver copper planet ocean desert mountain harbor castle kitchen blanket candle mirror
pencil ladder basket wallet ticket button pocket jacket rocket camera engineer doctor farmer
singer painter sailor pilot writer""".split()
NAMES = "Ada Ben Chloe Dev Emma Farid Grace Hugo Iris Jonas Kiri Liam Mara Noor Omar Pia".split()
VERBS = "found built painted carried opened watched cleaned moved sold visited fixed drew".split()

# Tokens a unit of each task costs in prompt + completion (SmolLM2's tokenizer, measured on
# these generators): what turns a drawn length into a task size.
COST = {"sort": 4.0, "reverse": 4.0, "capitals": 2.5, "numbers": 4.0, "count": 1.0,
        "first_sentence": 8.6, "continue": 4.0}
FIXED = 12  # the instruction's own tokens, about


def sentence(rng):
    a, b = rng.sample(WORDS, 2)
    return f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {a} near the {b}."


def sort_task(rng, n):
    words = rng.sample(WORDS, min(n, len(WORDS)))
    return f"Sort these words alphabetically: {', '.join(words)}", ", ".join(sorted(words))


def reverse_task(rng, n):
    words = [rng.choice(WORDS) for _ in range(n)]
    return f"Write this list in reverse order: {', '.join(words)}", ", ".join(words[::-1])


def capitals_task(rng, n):
    text = " ".join(sentence(rng) for _ in range(max(1, n // 8)))
    return f"Rewrite in capital letters: {text}", text.upper()


def numbers_task(rng, n):
    parts, numbers = [], []
    for _ in range(max(1, n // 4)):
        k = rng.randint(2, 9999)
        numbers.append(str(k))
        parts.append(f"{rng.choice(NAMES)} counted {k} {rng.choice(WORDS)}s.")
    return f"List the numbers in this text: {' '.join(parts)}", ", ".join(numbers)


def count_task(rng, n):
    words = [rng.choice(WORDS) for _ in range(n)]
    return f"How many words are in this text? {' '.join(words)}", str(n)


def first_sentence_task(rng, n):
    text = [sentence(rng) for _ in range(max(2, n))]
    return f"Summarise this paragraph with its first sentence: {' '.join(text)}", text[0]


def continue_task(rng, n):
    start = rng.randint(1, 500)
    shown = " ".join(str(start + i) for i in range(3))
    rest = " ".join(str(start + i) for i in range(3, 3 + n))
    return f"Continue this count for {n} more numbers: {shown}", rest


TASKS = {"sort": sort_task, "reverse": reverse_task, "capitals": capitals_task,
         "numbers": numbers_task, "count": count_task, "first_sentence": first_sentence_task,
         "continue": continue_task}


def target_length(rng, low=20, high=430, median=110, sigma=0.75):
    """A record's length in tokens: log-normal, clipped to ``[low, high]``."""
    return min(high, max(low, round(rng.lognormvariate(math.log(median), sigma))))


def records(n, seed=0, longest=430):
    """``n`` ``{"prompt", "completion"}`` records, the same for the same seed; ``longest``:
    the most tokens a record aims at (it may come out about 15% over)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        task = rng.choice(sorted(TASKS))
        size = max(1, round((target_length(rng, high=longest) - FIXED) / COST[task]))
        prompt, completion = TASKS[task](rng, size)
        out.append({"prompt": prompt + "\n", "completion": completion})
    return out


ADJECTIVES = """small large old new quiet bright heavy light narrow wide warm cold soft hard
round flat early late simple careful""".split()
DEF_COST = 21  # tokens one definition costs (SmolLM2's tokenizer, measured on this generator)


def definition(rng, word):
    a, b = rng.sample(WORDS, 2)
    text = (f"{word} (noun): a {rng.choice(ADJECTIVES)} {a} that someone {rng.choice(VERBS)} "
            f"near the {b}")
    for _ in range(rng.choice((0, 0, 1, 2))):  # longer entries: a usage clause or two
        text += f", often {rng.choice(VERBS)} by a {rng.choice(WORDS)} in the {rng.choice(WORDS)}"
    return text + "."


def definitions(n, seed=0, longest=512):
    """``n`` dictionary records, a second length mix (issue 22's user data): each asks for 1 to
    24 words' definitions (fewer where ``longest`` allows fewer: 20 at peers.py's 430), most
    records a few (at 430: 19 to about 520 tokens, median about 80, mean 121), the length
    almost all in the completion."""
    rng = random.Random(seed)
    out = []
    most = max(1, min(24, (longest - 8) // DEF_COST))
    for _ in range(n):
        k = min(most, max(1, round(rng.lognormvariate(math.log(3.2), 1.0))))
        words = rng.sample(WORDS, k)
        out.append({"prompt": f"Define: {', '.join(words)}\n",
                    "completion": "\n".join(definition(rng, w) for w in words)})
    return out


KINDS = {"tasks": records, "definitions": definitions}


def write(path, n, seed=0, longest=430, kind="tasks"):
    with open(path, "w", encoding="utf-8") as f:
        for record in KINDS[kind](n, seed, longest):
            f.write(json.dumps(record) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--longest", type=int, default=430, help="tokens a record aims at, at most")
    ap.add_argument("--kind", choices=sorted(KINDS), default="tasks",
                    help="tasks: seven rewriting tasks (default); definitions: dictionary records")
    ap.add_argument("--out", default="-", help="JSONL file (default: standard output)")
    args = ap.parse_args(argv)
    if args.out == "-":
        for record in KINDS[args.kind](args.records, args.seed, args.longest):
            print(json.dumps(record))
    else:
        write(args.out, args.records, args.seed, args.longest, args.kind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
