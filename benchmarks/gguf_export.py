"""What a GGUF export loses: export a quickstart run at each TYPE, read the file back with
transformers' GGUF loader, and compare with the merged model: max |delta logit| over the held-out
prompts' positions, greedy answers (16 tokens, as the quickstart scores them) identical to the
merged model's, held-out exact match, and the tokenizer rebuilt from the file (same ids).

    python benchmarks/gguf_export.py RUN_DIR OUT_DIR N [TYPE ...]
    python benchmarks/gguf_export.py runs/quickstart /tmp/gguf 40 f16 q8_0 q4_0

RUN_DIR: a finished run of recipes/quickstart.yaml; N: how many of its held-out prompts.
"""
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from plugtune import artifacts, cli
from plugtune.plugins.generation_metrics import normalize

HELD_OUT = Path(__file__).parent.parent / "recipes" / "data" / "quickstart_eval.jsonl"


def main(run, outdir, n, types):
    records = [json.loads(line) for line in HELD_OUT.open()][:n]
    merged = artifacts.load(run, merge=True)
    tok, ref = merged.tokenizer, merged.model.float().eval()
    prompts = [tok(tok.apply_chat_template(r["messages"][:-1], tokenize=False,
                                           add_generation_prompt=True),
                   add_special_tokens=False, return_tensors="pt").input_ids for r in records]
    refs = [r["messages"][-1]["content"] for r in records]

    def answers(model):
        out, logits = [], []
        with torch.no_grad():
            for ids in prompts:
                logits.append(model(input_ids=ids).logits.float())
                g = model.generate(ids, max_new_tokens=16, do_sample=False,
                                   pad_token_id=tok.pad_token_id)
                out.append(tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True))
        return out, logits

    def exact(xs):
        return sum(normalize(a) == normalize(b) for a, b in zip(xs, refs)) / len(refs)

    base, base_logits = answers(ref)
    low = min(x.min().item() for x in base_logits)
    high = max(x.max().item() for x in base_logits)
    print(f"merged model: exact match {exact(base):.3f} on {len(refs)} held-out prompts")
    for qtype in types:
        out = outdir / qtype
        start = time.time()
        assert cli.main(["export", str(run), str(out), "--gguf", qtype]) == 0
        seconds = time.time() - start
        path = out / f"model-{qtype}.gguf"
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name,
                                                     dtype=torch.float32).eval()
        read = AutoTokenizer.from_pretrained(out, gguf_file=path.name)
        texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in records]
        same_ids = sum(read(x)["input_ids"] == tok(x)["input_ids"] for x in texts)
        got, logits = answers(model)
        delta = max((a - b).abs().max().item() for a, b in zip(logits, base_logits))
        same = sum(a == b for a, b in zip(got, base))
        print(f"{qtype}: export {seconds:.0f}s, {path.stat().st_size / 2**20:.1f} MiB; max |d "
              f"logit| {delta:.4f} (logits {low:.1f}..{high:.1f}); greedy answers identical to "
              f"the merged model's {same}/{len(got)}; exact match {exact(got):.3f} (merged "
              f"{exact(base):.3f}); tokenizer from the file: same ids on {same_ids}/{len(texts)} "
              f"conversations, template equal: {read.chat_template == tok.chat_template}")
        for a, b in zip(got, base):
            if a != b:
                print(f"   differs: {b!r} -> {a!r}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:] or ["f16", "q8_0"])
