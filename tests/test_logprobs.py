"""rollout.token_logprobs: the chunked head + log-softmax that recomputes each chunk in backward."""

from __future__ import annotations

import pytest
import torch

from audio_rft.rollout import token_logprobs
from helpers import one_thread  # noqa: F401 (fixture)

N, H, V = 37, 16, 301  # 37 rows: no chunk size below divides them


def plain(head, hidden, ids, temperature):
    """Today's reference: all logits at once, in float32, kept for backward."""
    logits = head(hidden).float() / temperature
    return logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)


def setup(seed=0):
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=generator))
    hidden = torch.randn(N, H, generator=generator, requires_grad=True)
    ids = torch.randint(V, (N,), generator=generator)
    weights = torch.randn(N, generator=generator)
    return head, hidden, ids, weights


def grads(fn, head, hidden, ids, weights):
    head.zero_grad(set_to_none=True)
    hidden.grad = None
    values = fn(head, hidden, ids)
    (values * weights).sum().backward()
    return values.detach(), hidden.grad.clone(), head.weight.grad.clone()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [5, 16, 4096])
def test_chunked_logprobs_match_the_plain_computation(temperature, chunk):
    head, hidden, ids, weights = setup()
    expected = grads(lambda h, x, i: plain(h, x, i, temperature), head, hidden, ids, weights)
    got = grads(lambda h, x, i: token_logprobs(h, x, i, chunk, temperature), head, hidden, ids, weights)
    for name, a, b in zip(("values", "hidden grad", "head grad"), got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_chunk_elements_bound_the_rows_per_chunk():
    head, hidden, ids, weights = setup(1)
    calls = []
    hook = head.register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            got = token_logprobs(head, hidden, ids, chunk=4096, chunk_elements=10 * V)
    finally:
        hook.remove()
    assert calls == [10, 10, 10, 7]
    torch.testing.assert_close(got, plain(head, hidden, ids, 1.0).detach(), atol=1e-5, rtol=1e-5)


def test_batched_shape_and_bf16_head():
    head, hidden, ids, _ = setup(2)
    head = head.to(torch.bfloat16)
    hidden3, ids3 = hidden.detach().to(torch.bfloat16).view(1, N, H), ids.view(1, N)
    with torch.no_grad():
        got = token_logprobs(head, hidden3, ids3, chunk=8, temperature=0.7)
    assert got.shape == (1, N) and got.dtype == torch.float32
    torch.testing.assert_close(got, plain(head, hidden3, ids3, 0.7), atol=1e-5, rtol=1e-5)


def largest_saved(fn) -> int:
    """The largest tensor (in elements) autograd saves for backward while `fn` runs."""
    sizes = [0]

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return max(sizes), out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_no_vocabulary_wide_tensor_is_saved_for_backward(temperature):
    head, hidden, ids, weights = setup(3)
    reference, _ = largest_saved(lambda: plain(head, hidden, ids, temperature))
    assert reference >= N * V  # the check can see a (N, V) logits tensor
    size, out = largest_saved(lambda: token_logprobs(head, hidden, ids, 8, temperature))
    assert size < N * V and size < 8 * V, size
    (out * weights).sum().backward()  # and backward still works from what was kept
    assert hidden.grad is not None and head.weight.grad is not None


def test_no_grad_saves_nothing_and_skips_checkpointing(monkeypatch):
    from audio_rft import rollout

    head, hidden, ids, _ = setup(4)
    monkeypatch.setattr(rollout, "checkpoint", lambda *a, **k: pytest.fail("checkpointed without gradients"))
    with torch.no_grad():
        size, out = largest_saved(lambda: token_logprobs(head, hidden, ids, 8))
    assert size == 0 and not out.requires_grad
