"""rollout.token_logprobs: the chunked head + log-softmax that recomputes each chunk in backward."""

from __future__ import annotations

import gc

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


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [5, 4096])
def test_frozen_head_takes_its_gradient_in_the_forward(temperature, chunk, monkeypatch):
    """LoRA's case: the head is frozen, so the gradient with respect to the hidden rows is computed where the
    softmax is at hand; it equals autograd's, and backward neither recomputes nor calls the head."""
    from audio_rft import rollout

    head, hidden, ids, weights = setup(5)
    head.requires_grad_(False)

    def hidden_grad(fn):
        hidden.grad = None
        values = fn()
        (values * weights).sum().backward()
        return values.detach(), hidden.grad.clone()

    expected = hidden_grad(lambda: plain(head, hidden, ids, temperature))
    monkeypatch.setattr(rollout, "checkpoint", lambda *a, **k: pytest.fail("a frozen head was checkpointed"))
    calls = []
    hook = head.register_forward_pre_hook(lambda *_: calls.append("head"))
    size, _ = largest_saved(lambda: token_logprobs(head, hidden, ids, chunk, temperature))
    got = hidden_grad(lambda: token_logprobs(head, hidden, ids, chunk, temperature))
    hook.remove()
    for name, a, b in zip(("values", "hidden grad"), got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    assert size <= N * H  # an (N, H) direction per row, no V-wide tensor
    with torch.no_grad():  # the reference pass: values only
        torch.testing.assert_close(token_logprobs(head, hidden, ids, chunk, temperature), expected[0],
                                   atol=1e-5, rtol=1e-5)
    assert calls == []  # the weight is used directly, so no module call runs in forward or backward


def test_frozen_head_behind_a_wrapper_keeps_the_module_call():
    """A head whose weight is not all here (a sharded or wrapped head) goes through its own forward."""
    head, hidden, ids, weights = setup(6)
    head.requires_grad_(False)
    wrapped = torch.nn.Sequential(head)
    expected = plain(head, hidden, ids, 1.0)
    got = token_logprobs(wrapped, hidden, ids, 8)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    (got * weights).sum().backward()
    assert hidden.grad is not None


@pytest.mark.parametrize("block", [1024, 3, 2])  # one padded block; blocks of 3 and 2 (a whole block at −inf)
def test_inverse_cdf_draws_follow_the_softmax_and_never_a_banned_token(block, monkeypatch):
    """The sampler's draw, many times over a fixed row: frequencies within 4 standard errors of softmax(z);
    a token at −inf (suppressed) is never drawn, even beside a token of near-zero probability."""
    from audio_rft.rollout import _InverseCDF

    monkeypatch.setattr(_InverseCDF, "BLOCK", block)
    z = torch.tensor([2.0, 0.0, -1.0, float("-inf"), 1.0, -30.0, float("-inf"), float("-inf"), 0.5])
    expected = torch.softmax(z, -1)
    group, draws = 4, 5000
    sampler = _InverseCDF(group, [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)], "cpu")
    counts = torch.zeros_like(z)
    for _ in range(draws):
        tokens = sampler(z.repeat(2 * group, 1))
        counts += torch.bincount(tokens, minlength=z.numel()).float()
    n = draws * 2 * group
    frequency = counts / n
    assert counts[3] == 0 and counts[6] == 0 and counts[7] == 0
    error = (expected * (1 - expected) / n).sqrt()
    assert ((frequency - expected).abs() <= 4 * error + 1e-6).all(), (frequency, expected)


def test_inverse_cdf_rows_of_a_prompt_depend_only_on_its_generator():
    from audio_rft.rollout import _InverseCDF

    z = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    alone = _InverseCDF(3, [torch.Generator().manual_seed(7)], "cpu")(z.clone())
    beside = _InverseCDF(3, [torch.Generator().manual_seed(9), torch.Generator().manual_seed(7)], "cpu")(
        torch.cat([torch.randn(3, 50), z]))
    assert torch.equal(alone, beside[3:])


def test_frozen_linear_matches_the_plain_product_whatever_the_row_count():
    """The decode head and the frozen log-prob path go through frozen_linear: its numbers are the plain product's,
    and a row's logits are bit for bit the same whether it is computed alone or among others (completions must
    not depend on how prompts share a batch)."""
    from audio_rft.rollout import frozen_linear

    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(V, H, generator=generator)
    x = torch.randn(N, H, generator=generator)
    probs = torch.randn(N, V, generator=generator).softmax(-1)
    torch.testing.assert_close(frozen_linear(x, weight), x @ weight.t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(frozen_linear(probs, weight, transposed=True), probs @ weight, atol=1e-5, rtol=1e-5)
    together = frozen_linear(x, weight)
    for rows in (1, 2, 8, N - 1):
        assert torch.equal(frozen_linear(x[:rows], weight), together[:rows]), rows
    assert torch.equal(frozen_linear(x, weight), together)  # and the same on every call


def test_frozen_linear_follows_a_changed_weight_and_never_packs_a_training_one():
    from audio_rft import rollout

    generator = torch.Generator().manual_seed(8)
    weight = torch.randn(V, H, generator=generator)
    x = torch.randn(4, H, generator=generator)
    rollout.frozen_linear(x, weight)
    with torch.no_grad():
        weight.copy_(torch.randn(V, H, generator=generator))  # a checkpoint load writes in place
    torch.testing.assert_close(rollout.frozen_linear(x, weight), x @ weight.t(), atol=1e-5, rtol=1e-5)

    trained = torch.nn.Parameter(torch.randn(V, H, generator=generator))
    before = len(rollout._PACKED)
    rollout.frozen_linear(x, trained)
    assert len(rollout._PACKED) == before  # an engine may update it without moving its version counter
    alias = rollout.decode_weight(torch.nn.Linear(H, V, bias=False))
    assert not alias.requires_grad
    torch.testing.assert_close(rollout.frozen_linear(x, alias), x @ alias.t(), atol=1e-5, rtol=1e-5)
    if rollout._ONEDNN:
        assert len(rollout._PACKED) == before + 1  # packed for the decode loop that holds the alias...
    del alias
    gc.collect()
    assert len(rollout._PACKED) == before  # ...and gone with it
