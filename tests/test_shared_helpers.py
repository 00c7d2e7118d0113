"""What used to be written several times has one home each: the ignore index, padding,
evaluation's batch size, an exception's first line, and the ``--fit`` quality ranks."""
import pytest
import torch

from plugtune import Variant, loss, testing
from plugtune.data import eval_batch_size, pad
from plugtune.errors import first_line
from plugtune.plugins import head_family, peft_family, token_classification


def test_the_ignore_index_is_one_constant():
    assert loss.IGNORE == -100 == torch.nn.CrossEntropyLoss().ignore_index
    assert head_family.IGNORE is loss.IGNORE and token_classification.heads.IGNORE is loss.IGNORE


def test_pad_fills_rows_on_the_right_or_the_left():
    assert pad([[1, 2, 3], [4]], 0).tolist() == [[1, 2, 3], [4, 0, 0]]
    assert pad([[1, 2, 3], [4]], -100, left=True).tolist() == [[1, 2, 3], [-100, -100, 4]]


def test_evaluation_batches_default_to_the_training_micro_batch(make_recipe):
    recipe, _ = testing.load_recipe(make_recipe(train={"batch_size": 3}))
    assert eval_batch_size(recipe) == 3
    recipe, _ = testing.load_recipe(make_recipe(train={"batch_size": 3, "eval_batch_size": 5}))
    assert eval_batch_size(recipe) == 5


@pytest.mark.parametrize("exc, expected", [(ValueError("first\nsecond"), "first"),
                                           (ValueError(""), "ValueError"),
                                           (OSError("  padded  "), "padded")])
def test_first_line_quotes_one_line_of_an_error(exc, expected):
    assert first_line(exc) == expected
    assert first_line(ValueError("x" * 500), 200) == "x" * 200
    assert first_line(ValueError(), empty="(no message)") == "(no message)"


def test_fit_ranks_are_named_and_ordered():
    ranks = [Variant.FULL, Variant.FREEZE, Variant.ADAPTER, Variant.ADAPTER_8BIT,
             Variant.ADAPTER_4BIT]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)

    class Lora:  # a validated recipe that uses the lora method, as fit_variants reads it
        plugins = ["causal_lm", "lora"]
        roles = {"adapter": ["lora"], "task": ["causal_lm"]}

    variants = peft_family.fit_variants("lora", Lora())
    assert [v.rank for v in variants] == [Variant.ADAPTER, Variant.ADAPTER_8BIT,
                                          Variant.ADAPTER_4BIT]
