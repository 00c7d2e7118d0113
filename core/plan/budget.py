"""Memory budgets: ``--gpu`` sizes and GPU names, the memory this machine has, and sizes in
words (``1.5 GiB``)."""
import re
from pathlib import Path

import torch

from ..errors import RecipeError

KiB, MiB, GiB = 2**10, 2**20, 2**30

GPUS = {
    "t4": ("NVIDIA T4 16 GB", 15360),
    "v100-16g": ("NVIDIA V100 16 GB", 16384),
    "v100-32g": ("NVIDIA V100 32 GB", 32768),
    "rtx3060": ("NVIDIA GeForce RTX 3060 12 GB", 12288),
    "rtx3090": ("NVIDIA GeForce RTX 3090 24 GB", 24576),
    "rtx4080": ("NVIDIA GeForce RTX 4080 16 GB", 16376),
    "rtx4090": ("NVIDIA GeForce RTX 4090 24 GB", 24564),
    "a10g": ("NVIDIA A10G 24 GB", 23028),
    "l4": ("NVIDIA L4 24 GB", 23034),
    "a6000": ("NVIDIA RTX A6000 48 GB", 49140),
    "l40s": ("NVIDIA L40S 48 GB", 46068),
    "a100-40g": ("NVIDIA A100 40 GB", 40960),
    "a100-80g": ("NVIDIA A100 80 GB", 81920),
    "h100-80g": ("NVIDIA H100 80 GB", 81559),
    "h200": ("NVIDIA H200 141 GB", 143771),
}
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
         "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": KiB, "mib": MiB, "gib": GiB, "tib": 2**40}


def parse_budget(text: str) -> tuple[int, str]:
    """``(bytes, label)`` for ``24GiB``, ``24GB`` (decimal), ``16000MiB`` or a GPU name."""
    key = text.strip().lower().replace("_", "-")
    if key in GPUS:
        name, mib = GPUS[key]
        return mib * MiB, f"{key}: {name}, {mib * MiB / GiB:.1f} GiB"
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", key)
    if not match or match.group(2) not in UNITS:
        raise RecipeError([f"--gpu {text}: give a size such as 24GiB or 16GB, or a GPU name: "
                           + ", ".join(GPUS)])
    return int(float(match.group(1)) * UNITS[match.group(2)]), text.strip()


def size(n: float) -> str:
    """Bytes for people: ``1.5 GiB``."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if abs(n) < 10 * scale else f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def default_budget(device: str) -> tuple[int, str] | tuple[None, None]:
    """``(bytes, label)`` of the memory this machine has, or ``(None, None)``."""
    if device == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return total, f"this GPU ({torch.cuda.get_device_name()})"
    meminfo = Path("/proc/meminfo")
    if device == "cpu" and meminfo.exists():
        found = re.search(r"MemAvailable:\s+(\d+)", meminfo.read_text())
        assert found, "/proc/meminfo without MemAvailable"  # every Linux since 3.14
        kib = int(found.group(1))
        return kib * KiB, "this machine's available RAM"
    return None, None
