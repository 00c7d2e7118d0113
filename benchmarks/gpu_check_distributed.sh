#!/usr/bin/env bash
# The distributed part of the GPU check (benchmarks/gpu_check.sh calls it; it also runs alone):
# FSDP2 through accelerate on two CUDA GPUs with NCCL, as docs/distributed.md describes it:
# tests/test_fsdp.py with accelerate choosing FSDP itself (no CPU switch): full fine-tuning,
# LoRA and QLoRA (NF4 packed in bfloat16, sharded) against one process, evaluation over uneven
# shares, SIGTERM + `plugtune resume`, FSDP1 refused; DeepSpeed ZeRO-2 and ZeRO-3 the same way
# (tests/test_deepspeed.py, fp32 and bf16); then the per-process memory plan of the shipped
# 2-GPU recipe. Tiny models built from configs: nothing is downloaded. About 3 minutes.
#
#   bash benchmarks/gpu_check_distributed.sh        # from the repository root, venv active
#
# Exit status: 0 all passed; 1 a check failed; 2 no CUDA (stops at once, nothing run);
# 3 fewer than 2 GPUs (FSDP needs 2 processes on 2 GPUs; nothing run).
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" HF_HUB_OFFLINE=1
gpus=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if [ "$gpus" = "0" ]; then
  echo "gpu_check_distributed: no CUDA GPU here (torch.cuda.is_available() is False): nothing run" >&2
  exit 2
fi
if [ "$gpus" -lt 2 ]; then
  echo "gpu_check_distributed: $gpus CUDA GPU here; the FSDP checks need 2: nothing run" >&2
  exit 3
fi
echo "== FSDP2 on 2 of $gpus GPUs: tests/test_fsdp.py (PLUGTUNE_FSDP_ON_GPUS=1)"
status=0
CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0,1}" PLUGTUNE_FSDP_ON_GPUS=1 \
  timeout 900 python -m pytest -q -x -p no:cacheprovider tests/test_fsdp.py || status=1
echo "== DeepSpeed ZeRO-2 and ZeRO-3 on 2 of $gpus GPUs: tests/test_deepspeed.py (PLUGTUNE_DEEPSPEED_ON_GPUS=1)"
# accelerate counts GPU processes itself (no CPU switch). Full fine-tuning and LoRA, ZeRO-2/3,
# against one process (losses per step, checkpoints, saved model / adapter, merged export:
# 1e-5 in float32, 1e-3 in bf16), a NaN step skipped, SIGTERM + `plugtune resume` (1e-6), the
# refusal of a task without an up-front count. Skipped, and said, where deepspeed is not installed (pip install deepspeed).
if python -c "import deepspeed" 2>/dev/null; then
  CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0,1}" PLUGTUNE_DEEPSPEED_ON_GPUS=1 \
    timeout 900 python -m pytest -q -x -p no:cacheprovider tests/test_deepspeed.py || status=1
else
  echo "gpu_check_distributed: deepspeed is not installed: the DeepSpeed checks did not run" >&2
  status=1
fi
echo "== the per-process plan of the 2-GPU recipe (planned, for the record)"
plugtune plan qwen25-32b-qlora-2gpu --gpu 24GiB --processes 2 --shard fsdp | grep -E "^(per process|peak total|budget)" || status=1
exit $status
