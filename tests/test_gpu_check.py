"""benchmarks/gpu_check.sh: it cannot run without CUDA, so here it must stop at once with one
clear line; the recipes it would train are checked to validate (for a GPU) without one."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plugtune import recipe as recipes

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_the_gpu_check_stops_at_once_with_one_line(tmp_path):
    out = tmp_path / "report.txt"
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(out)], capture_output=True,
                          text=True, timeout=120, env={"PYTHON": sys.executable,
                                                       "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and not out.exists()


def test_every_configuration_of_the_gpu_check_validates(tmp_path, tiny_llama):
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    data = gpu_check.write_data(tmp_path, "long", 4)
    assert len(gpu_check.CONFIGS) >= 5
    for name, (plugins, sections, _) in gpu_check.CONFIGS.items():
        path = gpu_check.recipe(tmp_path, name, tiny_llama, plugins, sections, data)
        recipe, _ = recipes.load_recipe(path, check_hardware=False)
        assert recipe.train.max_length == gpu_check.LENGTH
