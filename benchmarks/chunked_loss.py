"""The loss of a LoRA step on its own: `plugtune.loss.chunked_cross_entropy` (what the
`causal_lm` plugin runs, in its chunks) against torch's `cross_entropy` on the full logits of
the labelled positions (what a hand-written loop does: peer f of benchmarks/peers.py), forward
and backward, through a frozen output layer of SmolLM2-135M's shape (576 -> 49,152, random
weights: the cost does not depend on them). Sides alternate; each figure is the min / median of
--repeats timings of one loss + backward, in wall seconds and in CPU seconds of this process
(the CPU figure is not inflated by time the host of a virtual machine gives to others).

    python benchmarks/chunked_loss.py                     # 901 labelled tokens, chunks of 512
    python benchmarks/chunked_loss.py --tokens 2048 --repeats 9
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from plugtune.loss import chunked_cross_entropy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import torch_loss  # noqa: E402  (beside this file: peer f's loss)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=901, help="labelled tokens (default 901)")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49_152)
    ap.add_argument("--chunk", type=int, default=512, help="tokens per chunk (causal_lm's "
                    "auto for this vocabulary: 512)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False).requires_grad_(False)
    states = torch.randn(1, args.tokens, args.hidden)
    labels = torch.randint(0, args.vocab, (1, args.tokens))
    sides = {"torch cross_entropy": lambda h: torch_loss(h, head, labels),
             "plugtune chunked": lambda h: chunked_cross_entropy(h, head, labels,
                                                                 args.chunk).sum}
    values, grads, wall, cpu = {}, {}, {k: [] for k in sides}, {k: [] for k in sides}
    for turn in range(args.repeats + 1):  # the first round warms up
        for name, loss_of in sides.items():
            hidden = states.clone().requires_grad_()
            w, c = time.perf_counter(), time.process_time()
            value = loss_of(hidden)
            value.backward()
            w, c = time.perf_counter() - w, time.process_time() - c
            if turn:
                wall[name].append(w)
                cpu[name].append(c)
            values[name], grads[name] = value.item(), hidden.grad
    a, b = sides
    print(f"{args.tokens} labelled tokens, output layer {args.hidden} -> {args.vocab}, chunks of "
          f"{args.chunk}, {args.repeats} timings each (min / median):")
    for name in sides:
        print(f"  {name:20s} wall {min(wall[name]):.3f} / {statistics.median(wall[name]):.3f} s"
              f"   CPU {min(cpu[name]):.3f} / {statistics.median(cpu[name]):.3f} s")
    print(f"  {b} is {statistics.median(wall[a]) / statistics.median(wall[b]):.2f}x faster "
          f"(wall, medians), {statistics.median(cpu[a]) / statistics.median(cpu[b]):.2f}x (CPU)")
    print(f"  same loss: {abs(values[a] - values[b]) / abs(values[a]):.1e} relative; gradients "
          f"differ by at most {float((grads[a] - grads[b]).abs().max()):.1e}")


if __name__ == "__main__":
    main()
