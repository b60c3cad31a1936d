"""GRPO: the loss against hand-computed values, advantages, the reference pass, and train_grpo end to end."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from audio_rft.model import add_lora, core_model
from audio_rft.rollout import completion_logprobs
from audio_rft.train.common import COMPLETE, STATE_DIR, is_complete
from audio_rft.train.grpo import GRPOConfig, group_advantages, grpo_loss, train_grpo
from helpers import (  # noqa: F401 (fixtures)
    one_thread,
    PLUGIN, adapter_weights, assert_same_weights, assert_same_weights_but_adam_noise, load_tiny, perturb_lora,
    plugin_dir, prompt_batch, read_metrics, samples_of, synth_data, tiny_model, with_plugin, without_timing,
)

# ---------------------------------------------------------------- the loss, by hand


def one_token(ratios, advantages, **kwargs):
    """grpo_loss on N one-token completions with given ratios π/π_old; returns loss, stats, d loss / d log π."""
    logprobs = torch.log(torch.tensor(ratios, dtype=torch.float64)).requires_grad_()
    old = torch.zeros(len(ratios), 1, dtype=torch.float64)
    loss, stats = grpo_loss(logprobs[:, None], old, None, torch.tensor(advantages, dtype=torch.float64),
                            torch.ones(len(ratios), 1), beta=0.0, **kwargs)
    loss.backward()
    return loss, stats, logprobs.grad


@pytest.mark.parametrize("ratio, advantage, per_token, clipped", [
    (1.5, +1.0, -1.2, True),  # above 1+ε with A > 0: clipped at 1.2, no gradient
    (0.5, -1.0, +0.8, True),  # below 1-ε with A < 0: clipped at 0.8, no gradient
    (1.5, -1.0, +1.5, False),  # above 1+ε with A < 0: the unclipped term is the minimum
    (0.5, +1.0, -0.5, False),  # below 1-ε with A > 0: unclipped
    (1.1, +2.0, -2.2, False),  # inside the range
    (0.9, -2.0, +1.8, False),
    (1.0, 0.0, 0.0, False),
])
def test_clipping_each_side(ratio, advantage, per_token, clipped):
    loss, stats, grad = one_token([ratio], [advantage])
    assert float(loss) == pytest.approx(per_token)
    assert stats["clip_ratio"] == (1.0 if clipped else 0.0)
    # d(-ρA)/d log π = -ρA where unclipped; 0 where the clipped constant is the minimum
    assert float(grad[0]) == pytest.approx(0.0 if clipped else -ratio * advantage)


def test_asymmetric_clip_range_and_clip_ratio():
    ratios, advantages = [1.25, 1.35, 0.85, 0.95], [1.0, 1.0, -1.0, -1.0]
    loss, stats, grad = one_token(ratios, advantages, epsilon_low=0.1, epsilon_high=0.3)
    # 1.25 < 1.3 unclipped; 1.35 clipped to 1.3; 0.85 < 0.9 clipped to 0.9; 0.95 unclipped
    expected = [-1.25, -1.3, 0.9, 0.95]
    assert float(loss) == pytest.approx(sum(expected) / 4)
    assert stats["clip_ratio"] == pytest.approx(0.5)
    assert grad.tolist() == pytest.approx([-1.25 / 4, 0.0, 0.0, 0.95 / 4])


def test_kl_estimator():
    logprobs = torch.tensor([[math.log(0.5), math.log(0.2)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.4)]])
    loss, stats = grpo_loss(logprobs, None, ref, torch.zeros(1), torch.ones(1, 2), beta=0.1)
    # k3: exp(ref - logp) - (ref - logp) - 1, always >= 0
    kl = [0.5 - math.log(0.5) - 1, 2.0 - math.log(2.0) - 1]
    assert stats["kl"] == pytest.approx(sum(kl) / 2, rel=1e-6)
    assert float(loss) == pytest.approx(0.1 * sum(kl) / 2, rel=1e-6)
    same, stats = grpo_loss(logprobs, None, logprobs.clone(), torch.zeros(1), torch.ones(1, 2), beta=0.1)
    assert float(same) == 0.0 and stats["kl"] == 0.0
    no_beta, stats = grpo_loss(logprobs, None, ref, torch.zeros(1), torch.ones(1, 2), beta=0.0)
    assert float(no_beta) == 0.0 and stats["kl"] == 0.0


def reference_loss(logprobs, old, ref, advantages, mask, beta, eps_low, eps_high, loss_type, max_len):
    """The docstring's formulas, in plain Python floats."""
    N, T = len(logprobs), len(logprobs[0])
    per = [[0.0] * T for _ in range(N)]
    for i in range(N):
        for t in range(T):
            rho = math.exp(logprobs[i][t] - old[i][t])
            a = advantages[i]
            per[i][t] = -min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
            d = ref[i][t] - logprobs[i][t]
            per[i][t] += beta * (math.exp(d) - d - 1)
    masked = [[per[i][t] * mask[i][t] for t in range(T)] for i in range(N)]
    if loss_type == "sequence":
        return sum(sum(row) / sum(m) for row, m in zip(masked, mask)) / N
    if loss_type == "token":
        return sum(map(sum, masked)) / sum(map(sum, mask))
    return sum(map(sum, masked)) / (N * max_len)


@pytest.mark.parametrize("loss_type", ["sequence", "token", "constant"])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_aggregation_modes(loss_type, beta):
    logprobs = [[-0.5, -1.0, -2.0, -0.1], [-0.3, -0.7, -9.0, -9.0], [-1.5, -9.0, -9.0, -9.0]]
    old = [[-0.6, -0.8, -2.0, -0.4], [-0.1, -0.9, -9.0, -9.0], [-1.2, -9.0, -9.0, -9.0]]
    ref = [[-0.4, -1.1, -1.0, -0.2], [-0.6, -0.5, -9.0, -9.0], [-2.0, -9.0, -9.0, -9.0]]
    mask = [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]
    advantages = [1.0, -0.5, 2.0]
    expected = reference_loss(logprobs, old, ref, advantages, mask, beta, 0.2, 0.28, loss_type, 6)
    T = torch.tensor
    loss, _ = grpo_loss(T(logprobs), T(old), T(ref), T(advantages), T(mask), beta=beta, epsilon_low=0.2,
                        epsilon_high=0.28, loss_type=loss_type, max_completion_length=6)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_constant_mode_defaults_to_completion_width():
    loss, _ = grpo_loss(torch.zeros(2, 5), None, None, torch.tensor([1.0, 1.0]),
                        torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]), beta=0.0, loss_type="constant")
    assert float(loss) == pytest.approx(-4 / (2 * 5))


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown loss_type"):
        grpo_loss(torch.zeros(1, 1), None, None, torch.zeros(1), torch.ones(1, 1), loss_type="mean")


@pytest.mark.parametrize("loss_type", ["sequence", "token", "constant"])
def test_tokens_after_the_first_eos_are_masked(loss_type):
    """Whatever sits after the mask (even values whose exp overflows) changes neither loss nor gradient."""
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    base = torch.tensor([[-0.5, -1.0, -2.0, -3.0], [-0.2, -0.4, -0.6, -0.8]])
    ref = torch.tensor([[-0.4, -0.9, -1.0, -1.0], [-0.3, -0.5, -0.5, -0.5]])
    garbage = torch.where(mask.bool(), base, torch.tensor(-1e4))
    results = []
    for logprobs in (base, garbage):
        logprobs = logprobs.clone().requires_grad_()
        old = logprobs.detach() + torch.where(mask.bool(), 0.05, 500.0)
        loss, stats = grpo_loss(logprobs, old, ref, torch.tensor([1.0, -1.0]), mask, beta=0.04, loss_type=loss_type)
        loss.backward()
        results.append((loss.detach(), logprobs.grad, stats))
    (loss_a, grad_a, stats_a), (loss_b, grad_b, stats_b) = results
    assert torch.isfinite(loss_b) and torch.isfinite(grad_b).all()
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(grad_a, grad_b)
    assert (grad_a[~mask.bool()] == 0).all()
    assert stats_a == pytest.approx(stats_b)


# ---------------------------------------------------------------- the loss family: GSPO, CISPO, DAPO, KL × ρ


def family_reference(logprobs, old, ref, advantages, mask, beta, eps_low, eps_high, loss_type, importance_sampling,
                     kl_bias_correction, num_tokens):
    """grpo_loss's options written from their equations, one completion and one token at a time (float64 scalars
    that keep autograd, so the gradient is checked too); nothing vectorised is shared with grpo_loss."""
    N, T = logprobs.shape
    total = logprobs.new_zeros(())
    for i in range(N):
        active = [t for t in range(T) if mask[i, t]]
        if importance_sampling == "sequence":  # s_i = exp(mean_t (log π − log π_old))
            s_i = torch.exp(sum(logprobs[i, t] - old[i, t] for t in active) / len(active))
        row = logprobs.new_zeros(())
        for t in active:
            rho = s_i if importance_sampling == "sequence" else torch.exp(logprobs[i, t] - old[i, t])
            a = advantages[i]
            if loss_type == "cispo":
                ell = -torch.minimum(rho, torch.tensor(eps_high, dtype=rho.dtype)).detach() * a * logprobs[i, t]
            else:
                ell = -torch.minimum(rho * a, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * a)
            d = ref[i, t] - logprobs[i, t]
            kl = torch.exp(d) - d - 1
            ell = ell + beta * (kl * rho if kl_bias_correction else kl)
            row = row + ell
        total = total + (row / len(active) if loss_type == "sequence" else row)
    if loss_type == "sequence":
        return total / N
    if loss_type == "token":
        return total / mask.sum()
    return total / num_tokens  # dapo, cispo


FAMILY = [  # (loss_type, importance_sampling, kl_bias_correction, epsilon_high)
    ("sequence", "sequence", False, 0.28), ("token", "sequence", False, 0.28), ("dapo", "sequence", True, 0.28),
    ("dapo", "token", False, 0.28), ("dapo", "token", True, 0.28), ("sequence", "token", True, 0.28),
    ("cispo", "token", False, 1.1), ("cispo", "token", True, 1.1), ("cispo", "sequence", False, 1.1),
]


def family_inputs():
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.float64)
    logprobs = -torch.rand(4, 4, generator=g, dtype=torch.float64) * 2
    old = logprobs + (torch.rand(4, 4, generator=g, dtype=torch.float64) - 0.5) * 1.2  # ratios from ~0.55 to ~1.8
    ref = logprobs + (torch.rand(4, 4, generator=g, dtype=torch.float64) - 0.5)
    return logprobs, old, ref, torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64), mask


@pytest.mark.parametrize("loss_type, importance_sampling, kl_bias_correction, epsilon_high", FAMILY)
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_loss_family_against_the_equations(loss_type, importance_sampling, kl_bias_correction, epsilon_high, beta):
    logprobs, old, ref, advantages, mask = family_inputs()
    num_tokens = float(mask.sum()) if loss_type in ("dapo", "cispo") else None
    mine = logprobs.clone().requires_grad_()
    loss, stats = grpo_loss(mine, old, ref, advantages, mask, beta=beta, epsilon_low=0.2, epsilon_high=epsilon_high,
                            loss_type=loss_type, importance_sampling=importance_sampling,
                            kl_bias_correction=kl_bias_correction, num_tokens=num_tokens)
    theirs = logprobs.clone().requires_grad_()
    expected = family_reference(theirs, old, ref, advantages, mask, beta, 0.2, epsilon_high, loss_type,
                                importance_sampling, kl_bias_correction, num_tokens)
    loss.backward()
    expected.backward()
    assert float(loss) == pytest.approx(float(expected), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-10, atol=1e-12)
    assert (mine.grad[~mask.bool()] == 0).all()
    if beta == 0 and loss_type != "cispo":
        assert 0 < stats["clip_ratio"] < 1  # the inputs exercise both sides of the clip


def test_gspo_clips_once_per_sequence():
    """A completion whose mean log-ratio is past 1 + ε_high has every token clipped (no gradient) even where its
    own token ratio is inside the range, and the other way round."""
    mask = torch.ones(2, 2, dtype=torch.float64)
    old = torch.zeros(2, 2, dtype=torch.float64)
    logprobs = torch.log(torch.tensor([[1.0, 2.0], [1.5, 0.9]], dtype=torch.float64)).requires_grad_()
    loss, stats = grpo_loss(logprobs, old, None, torch.ones(2, dtype=torch.float64), mask, beta=0.0,
                            importance_sampling="sequence")
    loss.backward()
    # s_0 = sqrt(1·2) = 1.414 > 1.2: clipped, token 0 (ρ = 1) included; s_1 = sqrt(1.35) = 1.162: inside, token 0
    # (ρ = 1.5) included. The loss holds −s_1/2 (N = 2), and ∂s_1/∂log π_1t = s_1/2: the gradient is −s_1/4
    assert stats["clip_ratio"] == pytest.approx(0.5)
    assert logprobs.grad[0].tolist() == [0.0, 0.0]
    assert logprobs.grad[1].tolist() == pytest.approx([-math.sqrt(1.35) / 4] * 2)
    assert float(loss) == pytest.approx(-(1.2 + math.sqrt(1.35)) / 2)


def test_cispo_keeps_the_gradient_of_capped_tokens():
    """PPO's clip drops a token's gradient past 1 + ε; CISPO only caps its weight: −min(ρ, ε_high)·A·∇log π."""
    old = torch.zeros(1, 2, dtype=torch.float64)
    logprobs = torch.log(torch.tensor([[1.5, 0.5]], dtype=torch.float64)).requires_grad_()
    loss, stats = grpo_loss(logprobs, old, None, torch.ones(1, dtype=torch.float64), torch.ones(1, 2), beta=0.0,
                            loss_type="cispo", epsilon_high=1.2, num_tokens=2.0)
    loss.backward()
    assert logprobs.grad[0].tolist() == pytest.approx([-1.2 / 2, -0.5 / 2])
    assert stats["clip_ratio"] == pytest.approx(0.5)


@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
def test_global_token_losses_need_the_token_count(loss_type):
    with pytest.raises(ValueError, match="needs num_tokens"):
        grpo_loss(torch.zeros(1, 1), None, None, torch.zeros(1), torch.ones(1, 1), loss_type=loss_type)


@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
def test_dapo_loss_and_gradient_do_not_depend_on_the_micro_batch_split(loss_type):
    """One batch whole (grad_accum 1) and in two micro-batches of unequal token counts (grad_accum 2), each with
    the whole batch's token count: the summed losses and gradients are the same. The per-micro-batch token mean
    ("token") is not, which is why DAPO's normaliser is counted before the passes."""
    logprobs, old, ref, advantages, mask = family_inputs()
    kwargs = dict(beta=0.1, epsilon_high=1.1 if loss_type == "cispo" else 0.28, loss_type=loss_type,
                  num_tokens=float(mask.sum()))
    whole_lp = logprobs.clone().requires_grad_()
    whole, _ = grpo_loss(whole_lp, old, ref, advantages, mask, **kwargs)
    whole.backward()
    split_lp = logprobs.clone().requires_grad_()
    parts = [grpo_loss(split_lp[rows], old[rows], ref[rows], advantages[rows], mask[rows], **kwargs)[0]
             for rows in (slice(0, 1), slice(1, 4))]  # 4 tokens, then 6
    sum(parts).backward()
    assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-12)
    torch.testing.assert_close(split_lp.grad, whole_lp.grad, rtol=1e-12, atol=1e-14)
    token_parts = [grpo_loss(logprobs[rows], old[rows], ref[rows], advantages[rows], mask[rows], beta=0.1,
                             loss_type="token")[0] for rows in (slice(0, 1), slice(1, 4))]
    token_whole = grpo_loss(logprobs, old, ref, advantages, mask, beta=0.1, loss_type="token")[0]
    assert float(sum(token_parts)) / 2 != pytest.approx(float(token_whole), rel=1e-3)


# ---------------------------------------------------------------- advantages and the policy gradient


def test_group_advantages():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0])
    scaled = group_advantages(rewards, 4)
    assert scaled[:4].tolist() == [0.0] * 4  # equal rewards: no signal
    std = math.sqrt(1 / 3)  # unbiased std of (0, 1, 0, 1)
    assert scaled[4:8].tolist() == pytest.approx([-0.5 / (std + 1e-4), 0.5 / (std + 1e-4)] * 2)
    assert scaled[8:].tolist() == pytest.approx([1.5 / (1.0 + 1e-4)] + [-0.5 / (1.0 + 1e-4)] * 3)
    plain = group_advantages(rewards, 4, scale=False)  # Dr. GRPO
    assert plain.tolist() == pytest.approx([0, 0, 0, 0, -0.5, 0.5, -0.5, 0.5, 1.5, -0.5, -0.5, -0.5])


@pytest.mark.parametrize("loss_type", ["sequence", "token", "constant"])
def test_equal_reward_group_gives_no_policy_gradient(loss_type):
    rewards = torch.tensor([0.5, 0.5, 0.5, 1.0, 0.0, 0.0])
    advantages = group_advantages(rewards, 3)
    logprobs = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
    mask = torch.ones(6, 4)
    loss, _ = grpo_loss(logprobs, None, None, advantages, mask, beta=0.0, loss_type=loss_type)
    loss.backward()
    assert (logprobs.grad[:3] == 0).all()
    assert (logprobs.grad[3:].abs() > 0).all()


@pytest.mark.parametrize("loss_type", ["sequence", "token"])
def test_beta0_mu1_gradient_is_the_plain_policy_gradient(loss_type):
    """With β = 0 and μ = 1 (ρ ≡ 1), ∇L = -(1/N) Σ_i A_i (1/|o_i|) Σ_t ∇log π(o_it) (token: one normaliser)."""
    g = torch.Generator().manual_seed(0)
    N, T, vocab, width = 6, 5, 7, 3
    features = torch.randn(N, T, width, generator=g)
    tokens = torch.randint(0, vocab, (N, T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor([5, 3, 1, 4, 2, 5])[:, None]).float()
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0]), 3)
    policy = torch.nn.Linear(width, vocab)

    def logprobs():
        return policy(features).log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)

    loss, _ = grpo_loss(logprobs(), None, None, advantages, mask, beta=0.0, loss_type=loss_type)
    grads = torch.autograd.grad(loss, list(policy.parameters()))
    lp = logprobs()
    if loss_type == "sequence":
        estimator = -(advantages * (lp * mask).sum(1) / mask.sum(1)).mean()
    else:
        estimator = -(advantages[:, None] * lp * mask).sum() / mask.sum()
    expected = torch.autograd.grad(estimator, list(policy.parameters()))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    if loss_type == "sequence":
        assert float(loss) == pytest.approx(0.0, abs=1e-6)  # advantages sum to zero per group and ρ ≡ 1


def test_reference_pass_with_adapter_disabled_is_the_base_model(tiny_model, synth_data):
    processor, base = load_tiny(tiny_model)
    folder = synth_data / "train"
    batch = prompt_batch(processor, folder, samples_of(folder, ids=[3, 4]))
    completions = torch.randint(10, 300, (4, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = completion_logprobs(base, batch, completions, 2)
    _, model = load_tiny(tiny_model)
    model = add_lora(model, rank=4, train_projector=True)
    perturb_lora(model, seed=2, scale=0.3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.2)
    model.eval()
    core = core_model(model)
    with torch.no_grad():
        policy = completion_logprobs(core, batch, completions, 2)
        with model.disable_adapter():
            reference = completion_logprobs(core, batch, completions, 2)
        again = completion_logprobs(core, batch, completions, 2)
    assert (policy - expected).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, policy)  # and comes back afterwards


# ---------------------------------------------------------------- train_grpo end to end

METRIC_KEYS = {"step", "loss", "reward", "reward_std", "rewards/accuracy", "rewards/format", "kl", "clip_ratio",
               "completion_length", "lr", "step_seconds", "grad_norm", "frac_reward_zero_std"}


def grpo_config(tiny_model, synth_data, out, **overrides) -> GRPOConfig:
    values = dict(model=str(tiny_model), data=str(synth_data / "train"), out=str(out), max_steps=3, batch_size=2,
                  grad_accum=1, num_generations=4, max_completion_length=6, save_every=1, report_to=[], device="cpu",
                  lr=5e-3, temperature=1.0, rewards=["accuracy", "format", PLUGIN], beta=0.04, num_iterations=2,
                  log_completions_every=1, seed=0)
    values.update(overrides)
    return GRPOConfig(**values)


@pytest.fixture(scope="module")
def grpo_runs(tiny_model, synth_data, plugin_dir, tmp_path_factory):
    """Three steps in one go, and the same run stopped after two then continued to three."""
    sys.path.insert(0, str(plugin_dir))
    try:
        root = tmp_path_factory.mktemp("grpo")
        whole = train_grpo(grpo_config(tiny_model, synth_data, root / "whole"))
        train_grpo(grpo_config(tiny_model, synth_data, root / "split", max_steps=2))
        stopped = {"metrics": read_metrics(root / "split"), "final": adapter_weights(root / "split" / "final")}
        split = train_grpo(grpo_config(tiny_model, synth_data, root / "split", max_steps=3))
    finally:
        sys.path.remove(str(plugin_dir))
    return whole, split, stopped


def test_train_grpo_writes_metrics_checkpoints_and_final(grpo_runs):
    whole, _, _ = grpo_runs
    out = whole.parent
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for record in metrics:
        assert METRIC_KEYS | {f"rewards/{PLUGIN}"} <= set(record)
        assert all(math.isfinite(record[k]) for k in METRIC_KEYS)
        assert 1 <= record["completion_length"] <= 6 and 0 <= record["clip_ratio"] <= 1 and record["kl"] >= 0
        assert record["lr"] == pytest.approx(5e-3)
    assert any(m["reward_std"] > 0 for m in metrics)  # the plugin makes groups unequal: real updates
    assert metrics[-1]["kl"] > 0  # the policy moved away from the reference
    checkpoint = out / "checkpoint-2"
    assert is_complete(checkpoint)
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "processor_config.json",
                 "chat_template.jinja", "README.md", COMPLETE, f"{STATE_DIR}/dcp/.metadata", f"{STATE_DIR}/scheduler.pt",
                 f"{STATE_DIR}/rng-0.pt", f"{STATE_DIR}/state.json"):
        assert (checkpoint / name).is_file(), name
    assert json.loads((checkpoint / STATE_DIR / "state.json").read_text())["step"] == 2
    assert is_complete(whole) and not (whole / STATE_DIR).exists()
    card = (whole / "README.md").read_text()
    assert "library_name: peft" in card and f"base_model: {json.loads((out / 'run.json').read_text())['config']['model']}" in card
    assert "step 3" in card
    completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == 3 * 2 * 4 and {"step", "id", "answer", "completion", "reward"} <= set(completions[0])


def test_saved_grpo_adapter_loads_in_plain_peft(grpo_runs, tiny_model):
    from peft import PeftModel
    from transformers import Qwen2AudioForConditionalGeneration

    whole, _, _ = grpo_runs
    model = PeftModel.from_pretrained(Qwen2AudioForConditionalGeneration.from_pretrained(str(tiny_model)), str(whole))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


def test_grpo_resume_gives_identical_weights_and_metrics(grpo_runs):
    whole, split, stopped = grpo_runs
    assert_same_weights(adapter_weights(whole), adapter_weights(split), atol=1e-6)
    assert [without_timing(m) for m in read_metrics(whole.parent)] == [without_timing(m) for m in read_metrics(split.parent)]
    # the two-step run really stopped at two, and its metrics are the first two lines of the whole run
    assert [without_timing(m) for m in stopped["metrics"]] == [without_timing(m) for m in read_metrics(whole.parent)][:2]
    assert any(not torch.equal(stopped["final"][k], adapter_weights(whole)[k]) for k in stopped["final"])


def test_grpo_resumes_after_a_crash_mid_run(tiny_model, synth_data, with_plugin, tmp_path, monkeypatch, grpo_runs):
    """A run killed during step 3 (after checkpoint-2) continues from checkpoint-2 to the same weights."""
    import audio_rft.train.grpo as grpo

    whole, _, _ = grpo_runs
    calls = {"n": 0}
    real = grpo.score_completions

    def crash_on_third_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo, "score_completions", crash_on_third_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_grpo(grpo_config(tiny_model, synth_data, tmp_path / "run"))
    assert not (tmp_path / "run" / "final").exists() and (tmp_path / "run" / "checkpoint-2").is_dir()
    monkeypatch.setattr(grpo, "score_completions", real)
    final = train_grpo(grpo_config(tiny_model, synth_data, tmp_path / "run"))
    assert_same_weights(adapter_weights(whole), adapter_weights(final), atol=1e-6)
    assert [without_timing(m) for m in read_metrics(whole.parent)] == [without_timing(m) for m in read_metrics(final.parent)]


def test_groups_with_equal_rewards_are_skipped(tiny_model, synth_data, tmp_path):
    """An untrained model scores 0 accuracy everywhere: with skip_equal_groups nothing is trained."""
    final = train_grpo(grpo_config(tiny_model, synth_data, tmp_path / "run", max_steps=1, rewards=["accuracy"],
                                   skip_equal_groups=True, save_every=0, log_completions_every=0))
    (record,) = read_metrics(tmp_path / "run")
    assert record["frac_reward_zero_std"] == 1.0 and record["reward_std"] == 0.0
    assert record["loss"] == 0.0 and record["grad_norm"] == 0.0 and record["time/policy"] < 1.0
    assert all(not v.any() for k, v in adapter_weights(final).items() if "lora_B" in k)  # B still zero: no step


def test_dapo_trains_the_same_for_grad_accum_1_and_2(tiny_model, synth_data, with_plugin, tmp_path):
    """The same 4 prompts per step as one micro-batch or as two: the trainer counts the step's active tokens
    before the policy passes, so loss, gradient norm and weights agree (the token counts of the two halves
    differ, so a per-micro-batch normaliser would not)."""
    runs = {}
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        out = tmp_path / f"accum-{grad_accum}"
        final = train_grpo(grpo_config(tiny_model, synth_data, out, max_steps=2, batch_size=batch_size,
                                       grad_accum=grad_accum, loss_type="dapo", num_iterations=1, save_every=0,
                                       log_completions_every=0, rewards=["accuracy", "format", with_plugin],
                                       lora_dropout=0.0))
        runs[grad_accum] = read_metrics(out), adapter_weights(final)
    (one, weights_one), (two, weights_two) = runs[1], runs[2]
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], rel=1e-5, abs=1e-7)
    assert [m["grad_norm"] for m in two] == pytest.approx([m["grad_norm"] for m in one], rel=1e-4)
    assert all(m["grad_norm"] > 0 for m in one)
    assert_same_weights_but_adam_noise(weights_one, weights_two, lr=5e-3)


# ---------------------------------------------------------------- learning (measured, slow)


@pytest.mark.slow
def test_grpo_raises_accuracy_from_a_warmed_up_base(tiny_model, synth_data, tmp_path):
    """Measured: a short full-parameter SFT warm-up (format learned, answers near chance), then 90 GRPO steps.

    48 training items in batches of 8: each fifth of the run (18 steps) is exactly three epochs, so the first
    and last fifths average over the same items and differ only by what the policy learned (per-batch
    difficulty varies a lot). Seen here: the mean accuracy reward went from 0.32 to 0.55; the test asks for +0.08.
    """
    from audio_rft.train.sft import SFTConfig, train_sft

    warm = train_sft(SFTConfig(model=str(tiny_model), data=str(synth_data / "train"), out=str(tmp_path / "warm"),
                               max_steps=40, batch_size=16, lr=3e-3, lora=False, save_every=0, report_to=[],
                               device="cpu"))
    steps = 90
    train_grpo(grpo_config(warm, synth_data, tmp_path / "grpo", max_steps=steps, lora=False, lr=2e-4, batch_size=8,
                           num_generations=8, max_completion_length=8, temperature=0.7, beta=0.0, num_iterations=1,
                           loss_type="token", skip_equal_groups=True, save_every=0, rewards=["accuracy", "format"],
                           log_completions_every=0))
    metrics = read_metrics(tmp_path / "grpo")
    accuracy = [m["rewards/accuracy"] for m in metrics]
    fifth = steps // 5
    first, last = sum(accuracy[:fifth]) / fifth, sum(accuracy[-fifth:]) / fifth
    assert last > first + 0.08, (first, last, accuracy)
    assert sum(m["rewards/format"] for m in metrics[-fifth:]) / fifth > 0.8  # the format was kept


# ---------------------------------------------------------------- what breaks at full size, shown small


@pytest.fixture(scope="module")
def warm_adapter(tiny_model, tmp_path_factory):
    """A LoRA adapter far from the base (random A and B), as a warm-up would leave: the policy a run starts from."""
    _, model = load_tiny(tiny_model)
    model = add_lora(model, rank=8)
    perturb_lora(model, seed=3, scale=0.3)
    folder = tmp_path_factory.mktemp("adapter") / "warm"
    model.save_pretrained(folder)
    return folder


def test_a_run_from_an_adapter_has_that_adapter_as_its_reference(tiny_model, synth_data, with_plugin, warm_adapter,
                                                                  tmp_path):
    """KL is 0 at the first step (policy = reference = the adapter), not the distance from the raw base."""
    config = grpo_config(tiny_model, synth_data, tmp_path / "run", adapter=str(warm_adapter), max_steps=1,
                         num_iterations=1, save_every=0, log_completions_every=0, lora_dropout=0.05)
    final = train_grpo(config)
    (record,) = read_metrics(tmp_path / "run")
    assert record["kl"] == 0.0 and record["reward_std"] > 0
    # the saved adapter is the trained one alone, not its frozen reference copy
    assert not any("reference" in key for key in adapter_weights(final))
    assert not (final / "reference").exists()


def test_the_first_inner_update_has_ratio_exactly_one_with_lora_dropout(tiny_model, synth_data, with_plugin, tmp_path,
                                                                         monkeypatch, warm_adapter):
    """μ = 2, lora_dropout 0.05: π_old and the policy pass run the same network before the first update, so the
    ratio is exactly 1 and nothing is clipped. With dropout=true (dropout in every such pass) it is not. (From an
    adapter: a fresh LoRA's B is zero, so its dropout changes nothing yet.)"""
    import audio_rft.train.grpo as grpo

    real, seen = grpo.grpo_loss, []

    def recording(logprobs, old_logprobs, *args, **kwargs):
        loss, stats = real(logprobs, old_logprobs, *args, **kwargs)
        seen.append((float((logprobs.detach() - old_logprobs).abs().max()), stats["clip_ratio"]))
        return loss, stats

    monkeypatch.setattr(grpo, "grpo_loss", recording)
    for dropout in (False, True):
        seen.clear()
        train_grpo(grpo_config(tiny_model, synth_data, tmp_path / f"dropout-{dropout}", max_steps=1, num_iterations=2,
                               adapter=str(warm_adapter), lora_dropout=0.05, dropout=dropout, epsilon_low=0.0, epsilon_high=0.0, save_every=0,
                               log_completions_every=0))
        first_gap, first_clipped = seen[0]
        if dropout:
            assert first_gap > 0 and first_clipped > 0
        else:
            assert first_gap == 0.0 and first_clipped == 0.0
            assert seen[1][0] > 0  # the second inner update follows a real step


def test_a_grpo_prompt_over_max_prompt_tokens_is_a_one_line_error(tiny_model, synth_data, tmp_path):
    from audio_rft import UserError

    with pytest.raises(UserError) as caught:
        train_grpo(grpo_config(tiny_model, synth_data, tmp_path / "run", max_prompt_tokens=10, rewards=["accuracy"]))
    assert "max_prompt_tokens=10" in str(caught.value) and "\n" not in str(caught.value)
