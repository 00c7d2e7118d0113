"""``plugtune.loss.chunked_cross_entropy`` alone, on plain tensors: chunk borders anywhere, chunks
that hold no target (every position ignored: the GPU path chunks every position), and a batch
with no target at all. The sum, the count and the gradients equal the plain loss's."""
import pytest
import torch

from plugtune.loss import IGNORE, chunked_cross_entropy, cross_entropy

VOCAB, HIDDEN = 11, 6


def problem(mask):
    """Hidden states, an output layer and labels with ``mask`` (True: ignored) over 2 x 9."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, HIDDEN, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(HIDDEN, VOCAB, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (2, 9), generator=g)
    labels[torch.as_tensor(mask)] = IGNORE
    return hidden, head, labels


def grads(loss, hidden, head):
    return torch.autograd.grad(loss.sum, [hidden, head.weight, head.bias])


MASKS = {
    "none ignored": [[False] * 9] * 2,
    "a prompt": [[True] * 5 + [False] * 4, [True] * 2 + [False] * 7],
    "first row ignored": [[True] * 9, [False] * 9],
    "scattered": [[i % 3 == 0 for i in range(9)], [i % 4 != 1 for i in range(9)]],
}


@pytest.mark.parametrize("select", [True, False], ids=["cpu path", "every position"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 7, 9, 10, 18, 1000])
@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
def test_chunks_equal_the_plain_loss_at_every_border(mask, chunk, select):
    hidden, head, labels = problem(mask)
    plain = cross_entropy(head(hidden), labels, shift=True)
    chunked = chunked_cross_entropy(hidden, head, labels, chunk, shift=True, select=select)
    assert float(chunked.count) == float(plain.count)
    assert chunked.sum.item() == pytest.approx(plain.sum.item(), rel=1e-6)
    for a, b in zip(grads(chunked, hidden, head), grads(plain, hidden, head)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("select", [True, False], ids=["cpu path", "every position"])
def test_no_target_at_all_is_a_zero_that_backpropagates(select):
    hidden, head, labels = problem([[True] * 9] * 2)
    loss = chunked_cross_entropy(hidden, head, labels, 4, shift=True, select=select)
    assert float(loss.count) == 0 and loss.sum.item() == 0
    for g in grads(loss, hidden, head):
        assert torch.count_nonzero(g) == 0


HEADS = {
    "a linear layer": lambda: torch.nn.Linear(HIDDEN, VOCAB, dtype=torch.float64),
    "a module around it": lambda: torch.nn.Sequential(
        torch.nn.Linear(HIDDEN, VOCAB, dtype=torch.float64)),
    # tanh keeps its output for its backward: the loss must not write over it
    "one that keeps its output": lambda: torch.nn.Sequential(
        torch.nn.Linear(HIDDEN, VOCAB, dtype=torch.float32), torch.nn.Tanh()),
    "a bfloat16 layer": lambda: torch.nn.Linear(HIDDEN, VOCAB, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("select", [True, False], ids=["cpu path", "every position"])
@pytest.mark.parametrize("chunk", [1, 4, 9, 1000])
@pytest.mark.parametrize("make_head", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
def test_an_output_layer_with_nothing_to_train_gets_the_plain_loss_and_gradient(
        mask, make_head, chunk, select, softcap):
    """LoRA's case: the output layer is frozen, so each chunk's gradient is taken in the
    forward pass (log-probabilities written over the logits): the value and the hidden
    states' gradient are the plain loss's, whatever the layer and whichever rows are ignored."""
    hidden, _, labels = problem(mask)
    torch.manual_seed(0)
    head = make_head().requires_grad_(False)
    states = hidden.to(next(head.parameters()).dtype).detach().requires_grad_()

    def plain_logits(x):
        logits = head(x).float()
        return logits if softcap is None else torch.tanh(logits / softcap) * softcap

    plain = cross_entropy(plain_logits(states), labels, shift=True)
    chunked = chunked_cross_entropy(states, head, labels, chunk, shift=True, select=select,
                                    softcap=softcap)
    assert float(chunked.count) == float(plain.count)
    assert chunked.sum.item() == pytest.approx(plain.sum.item(), rel=1e-6)
    (got,) = torch.autograd.grad(chunked.sum * 3, states)
    (want,) = torch.autograd.grad(plain.sum * 3, states)
    # bfloat16: the stored gradient is rounded before it is scaled (one unit in the last place)
    rtol, atol = {torch.bfloat16: (3e-2, 1e-3), torch.float32: (1e-5, 1e-6)}.get(
        states.dtype, (1e-5, 1e-7))
    assert torch.allclose(got.float(), want.float(), rtol=rtol, atol=atol)
