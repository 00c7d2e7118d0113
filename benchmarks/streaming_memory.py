"""Peak memory of ``data.streaming`` against the size of the data: the same short run (a tiny
random Llama, ``--steps`` steps of 8 records) on a JSONL file of N records and of 10 x N, with
``data.streaming: true`` and, for comparison, read whole (``--whole``). Each run is a fresh
``plugtune run`` process; its peak resident memory (``ru_maxrss``) is reported.

    OMP_NUM_THREADS=1 python benchmarks/streaming_memory.py              # N = 20,000
    OMP_NUM_THREADS=1 python benchmarks/streaming_memory.py --records 50000 --whole
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from plugtune import testing

WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle"]


def write_data(path, n):
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(WORDS[(i + k) % 8] for k in range(40))
            f.write(json.dumps({"text": f"{i} {words}"}) + "\n")
    return path


def peak_rss(recipe):
    """Peak RSS (MiB) and seconds of one ``plugtune run`` in a child process."""
    script = ("import resource, sys; from plugtune import cli; code = cli.main(['run', "
              f"{str(recipe)!r}]); print('PEAK', resource.getrusage(resource.RUSAGE_SELF)"
              ".ru_maxrss); sys.exit(code)")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    kib = int(next(x for x in out.stdout.splitlines() if x.startswith("PEAK")).split()[1])
    return kib / 1024, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=20000, help="N (the larger file has 10 x N)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--whole", action="store_true", help="also read the data whole")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="plugtune-stream-"))
    model = testing.tiny_model(tmp / "model", "llama", [" ".join(WORDS)])
    validation = write_data(tmp / "validation.jsonl", 16)
    modes = [True, False] if args.whole else [True]
    print(f"{'records':>9} {'MiB file':>9} {'mode':>9} {'peak RSS MiB':>13} {'seconds':>8}")
    for n in (args.records, 10 * args.records):
        data = write_data(tmp / f"train-{n}.jsonl", n)
        for streaming in modes:
            name = f"{'stream' if streaming else 'whole'}-{n}"
            recipe = testing.write_recipe(
                tmp / f"{name}.yaml", description="streaming memory", model=str(model),
                plugins=["causal_lm", "full"],
                data={"train": str(data), "validation": str(validation),
                      "streaming": streaming},
                train={"max_steps": args.steps, "batch_size": 8, "max_length": 128,
                       "eval_every": None},
                causal_lm={"exact_match": False},
                output={"dir": str(tmp / "runs"), "name": name, "save_model": False})
            mib, seconds = peak_rss(recipe)
            print(f"{n:>9,} {data.stat().st_size / 2**20:>9.1f} "
                  f"{'streamed' if streaming else 'whole':>9} {mib:>13.1f} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
