"""Every peft method plugin on the quickstart task, shortened: trainable parameters, held-out
eval loss and exact match before -> after, seconds per optimizer step, peak memory.

Each method runs its recipe, ``recipes/smollm2-METHOD.yaml`` (the quickstart's SmolLM2-135M-
Instruct, data, batch size, schedule and held-out set, with ``lora`` swapped for the method),
for ``--steps`` optimizer steps instead of the full epoch (45 steps), in a process of its own
so that its peak resident memory (``ru_maxrss``, loading included) is its own. Seconds per step are the
median gap between consecutive ``plugtune_step_end`` calls (evaluations excluded). The learning
rates are the method's usual order of magnitude, not tuned here: scaling-vector and prompt
methods train far fewer parameters and need larger steps.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/peft_methods.py --steps 15           # all
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/peft_methods.py --steps 15 ia3 vera  # some

(one torch thread: on a machine whose cores other jobs keep busy, two threads wait on each
other at every operation and run several times slower.)
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

#: every adapter method; each runs its shipped recipe, recipes/smollm2-METHOD.yaml: the
#: quickstart (whose own method is lora) with the method's section and learning rate
METHODS = ("lora", "ia3", "adalora", "loha", "lokr", "oft", "vera", "prompt_tuning")


def recipe(method):
    return "smollm2-" + method.replace("_", "-")


def overrides(steps, out, method):
    return [f"train.max_steps={steps}", f"output.dir={out}", f"output.name={method}"]


class StepTimer:
    """Times every optimizer step (from one step_end to the next)."""

    def __init__(self):
        self.times = []

    def plugtune_step_end(self, step):
        self.times.append(time.perf_counter())


def one(method, steps, out):
    """Run one method in this process; print its row as JSON."""
    from plugtune import testing

    timer = StepTimer()
    summary, _ = testing.run(recipe(method), overrides(steps, out, method),
                             extra_plugins=[timer], echo=print)
    gaps = [b - a for a, b in zip(timer.times, timer.times[1:])]
    before, after = summary["eval_before"], summary["eval_after"]
    print("RESULT " + json.dumps({
        "method": method, "trainable": summary["trainable"], "total": summary["total"],
        "eval_loss": [before["eval_loss"], after["eval_loss"]],
        "exact_match": [before.get("exact_match"), after.get("exact_match")],
        "s_per_step": statistics.median(gaps) if gaps else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("methods", nargs="*", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="plugtune-peft-")
    if args.one:
        return one(args.methods[0], args.steps, out)
    rows = []
    for method in args.methods:
        proc = subprocess.run([sys.executable, __file__, "--one", "--steps", str(args.steps),
                               "--out", out, method], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{method}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}", flush=True)
            continue
        rows.append(json.loads(line[len("RESULT "):]))
        print(line, flush=True)
    print(f"\n{args.steps} steps of 8 sequences (the quickstart trains 45)\n")
    print("| method | trainable parameters | held-out eval loss | held-out exact match | "
          "s/step | peak RSS |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        (l0, l1), (e0, e1) = r["eval_loss"], r["exact_match"]
        print(f"| `{r['method']}` | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.3f}%)"
              f" | {l0:.3f} -> **{l1:.3f}** | {e0:.3f} -> **{e1:.3f}** | "
              f"{r['s_per_step']:.2f} | {r['peak_rss_mb'] / 1024:.2f} GB |")


if __name__ == "__main__":
    main()
