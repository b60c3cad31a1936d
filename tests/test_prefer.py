"""Preference optimisation: the losses by hand, the pair builder, and the `prefer` trainer end to end."""

from __future__ import annotations

import math

import pytest
import torch

from audio_rft.train.preference_losses import (bnf_loss, bnf_target, dpo_loss, kto_loss, kto_reference_point,
                                               mean_token_nll, orpo_loss, sequence_logps)
from helpers import (  # noqa: F401 (fixtures)
    assert_same_weights_but_adam_noise, one_thread,
    load_tiny, perturb_lora, plugin_dir, prompt_batch, read_metrics, samples_of, synth_data, tiny_model, with_plugin,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------- the losses, by hand


def test_sequence_logps_sum_and_mean_over_the_mask():
    logps = t(-1.0, -2.0, -9.0)[None].repeat(2, 1)
    total, mean = sequence_logps(logps, torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert total.tolist() == [-3.0, -1.0] and mean.tolist() == [-1.5, -1.0]
    assert float(mean_token_nll(logps, torch.tensor([[1, 1, 0], [1, 0, 0]]))) == pytest.approx(4 / 3)


def test_dpo_by_hand():
    losses, chosen, rejected = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    # h = (−1 − −2) − (−3 − −2) = 2; L = −log σ(0.5·2) = log(1 + e^−1)
    assert float(losses) == pytest.approx(math.log(1 + math.exp(-1)))
    assert float(chosen) == pytest.approx(0.5) and float(rejected) == pytest.approx(-0.5)


def test_dpo_is_ln2_when_policy_equals_reference():
    policy_c, policy_r = t(-4.0, -0.5, -7.0), t(-2.0, -9.0, -7.0)
    losses, chosen, rejected = dpo_loss(policy_c, policy_r, policy_c.clone(), policy_r.clone(), beta=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 3)
    assert chosen.tolist() == [0.0] * 3 and rejected.tolist() == [0.0] * 3


def test_dpo_identical_pair_gives_zero_gradient():
    logp = t(-2.5).requires_grad_()
    losses, _, _ = dpo_loss(logp, logp, t(-1.0), t(-1.0), beta=0.3)
    losses.sum().backward()
    assert float(logp.grad) == 0.0 and float(losses.detach()) == pytest.approx(math.log(2))


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = t(-2.0).requires_grad_(), t(-2.0).requires_grad_()
    dpo_loss(chosen, rejected, t(-2.0), t(-2.0), beta=0.1)[0].sum().backward()
    # dL/d log π(y_w) = −β σ(−βh) = −0.05 at h = 0; the opposite for y_l
    assert float(chosen.grad) == pytest.approx(-0.05) and float(rejected.grad) == pytest.approx(0.05)


def test_kto_reference_point_is_a_clamped_detached_mean():
    policy = t(-1.8, -1.4).requires_grad_()
    assert float(kto_reference_point(policy - t(-2.0, -2.0))) == pytest.approx(0.4)  # mean(0.2, 0.6)
    assert not kto_reference_point(policy - t(-2.0, -2.0)).requires_grad
    assert float(kto_reference_point(t(-3.0, -2.5) - t(-2.0, -2.0))) == 0.0  # mean −0.75, clamped at 0
    # two processes' log-ratios, gathered: the mean of all first (0.25), not the mean of clamped means (1.5)
    assert float(kto_reference_point(torch.cat([t(3.0, 3.0), t(-2.5, -2.5)]))) == pytest.approx(0.25)


def test_kto_by_hand():
    losses, rewards = kto_loss(t(-1.0, -3.0), t(-2.0, -2.0), torch.tensor([True, False]), z0=0.4, beta=0.5,
                               desirable_weight=1.0, undesirable_weight=2.0)
    # r = [1, −1]; desirable: 1 − σ(0.5·(1 − 0.4)); undesirable: 2·(1 − σ(0.5·(0.4 + 1)))
    assert losses.tolist() == pytest.approx([1 - sigmoid(0.3), 2 * (1 - sigmoid(0.7))])
    assert rewards.tolist() == pytest.approx([0.5, -0.5])


def test_kto_same_completion_both_labels_gives_zero_gradient():
    logp = t(-2.0).requires_grad_()
    both = torch.cat([logp, logp])
    losses, _ = kto_loss(both, t(-2.7, -2.7), torch.tensor([True, False]), z0=0.3, beta=0.2)
    losses.sum().backward()
    assert float(losses.detach().sum()) == pytest.approx(1.0)  # λ(2 − σ(a) − σ(−a)) = λ
    assert float(logp.grad) == pytest.approx(0.0, abs=1e-12)


def test_orpo_by_hand():
    nll = t(0.7)
    loss, log_odds, chosen, rejected = orpo_loss(t(math.log(0.5)), t(math.log(0.25)), nll, lam=0.2)
    # odds: 0.5/0.5 = 1 and 0.25/0.75 = 1/3, so log OR = log 3 and −log σ(log 3) = log(4/3)
    assert float(log_odds) == pytest.approx(math.log(3))
    assert float(loss) == pytest.approx(0.7 + 0.2 * math.log(4 / 3))
    assert float(chosen) == pytest.approx(0.2 * math.log(0.5)) and float(rejected) == pytest.approx(0.2 * math.log(0.25))


def test_orpo_identical_pair_leaves_only_the_nll_gradient():
    mean = t(-0.8).requires_grad_()
    nll = -mean.sum()  # stands in for the NLL of the same chosen completion
    loss, log_odds, _, _ = orpo_loss(mean, mean, nll, lam=0.5)
    loss.backward()
    assert float(log_odds.detach()) == 0.0
    assert float(loss.detach()) == pytest.approx(0.8 + 0.5 * math.log(2))
    assert float(mean.grad) == pytest.approx(-1.0)  # d(−mean)/d mean; the odds-ratio term adds nothing


def test_orpo_nll_term_is_sfts_loss_on_the_chosen(tiny_model, synth_data):
    """ORPO's NLL, computed from the chosen rows of the one-pass [chosen, rejected] scoring, is sft_nll."""
    from audio_rft.model import core_model
    from audio_rft.rollout import completion_logprobs
    from audio_rft.train.sft import sft_nll, target_batch

    processor, model = load_tiny(tiny_model)
    core = core_model(model)
    folder = synth_data / "train"
    samples = samples_of(folder, 3)
    batch = prompt_batch(processor, folder, samples)
    chosen, chosen_mask = target_batch(processor, samples, "answer", 96)
    rejected, rejected_mask = target_batch(processor, samples[1:] + samples[:1], "answer", 96)
    width = max(chosen.shape[1], rejected.shape[1])
    pad = processor.tokenizer.pad_token_id

    def widen(x, value):
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    ids = torch.stack([widen(chosen, pad), widen(rejected, pad)], 1).flatten(0, 1)  # [chosen, rejected] per prompt
    mask = torch.stack([widen(chosen_mask, 0), widen(rejected_mask, 0)], 1).flatten(0, 1)
    with torch.no_grad():
        logps = completion_logprobs(core, batch, ids, 2)
        expected, _ = sft_nll(core, batch, chosen, chosen_mask)
    assert float(mean_token_nll(logps[0::2], mask[0::2])) == pytest.approx(float(expected), rel=1e-5)


# ---------------------------------------------------------------- BNF


def bnf_case(seed=0, rows=6, vocab=7):
    """Logits of one response token per row (float64), the token, and a reference log-prob per row placed
    below p on even rows (p ≥ r) and above it on odd rows (p < r); rows alternate desirable / undesirable
    in pairs so every combination occurs."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 1.5
    ids = torch.randint(0, vocab, (rows,), generator=g)
    logp = logits.log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1)
    shift = torch.rand(rows, generator=g, dtype=torch.float64) * 0.8 + 0.1
    ref = torch.where(torch.arange(rows) % 2 == 0, logp - shift, torch.minimum(logp + shift, t(-1e-3)))
    desirable = torch.tensor([True, True, False, False, True, False][:rows])
    return logits, ids, ref, desirable


def full_target(logits, ids, ref):
    """q over the whole vocabulary from bnf_target's two numbers: q(t) at the token, c·p(v) elsewhere."""
    p = logits.softmax(-1)
    q_token, scale = bnf_target(p.gather(-1, ids[:, None]).log().squeeze(-1), ref)
    q = scale[:, None] * p
    q[torch.arange(len(ids)), ids] = q_token
    return q


def test_bnf_target_is_a_distribution():
    logits, ids, ref, _ = bnf_case()
    q = full_target(logits, ids, ref)
    assert (q >= 0).all()
    assert q.sum(-1).tolist() == pytest.approx([1.0] * len(ids), rel=1e-12)
    p_token = logits.softmax(-1).gather(-1, ids[:, None]).squeeze(-1)
    below = p_token < ref.exp()  # p < r: the token's target is p/r, the rest spread like p
    assert q[torch.arange(len(ids)), ids][below].tolist() == pytest.approx((p_token / ref.exp())[below].tolist())


def test_bnf_target_is_one_hot_when_policy_reaches_reference_and_loss_is_the_nll():
    logps = torch.log(t(0.5, 0.3, 0.9)).view(1, 3)
    ref = torch.log(t(0.4, 0.3, 0.2)).view(1, 3)  # p ≥ r at every token (equal at the second)
    q_token, scale = bnf_target(logps, ref)
    assert q_token.tolist() == [[1.0, 1.0, 1.0]] and scale.tolist() == [[0.0, 0.0, 0.0]]
    neg_entropy = t(-0.7, -1.1, -0.3).view(1, 3)  # any value: its weight c is 0
    mask = torch.tensor([[1, 1, 1]])
    positive, _ = bnf_loss(logps, ref, neg_entropy, mask, torch.tensor([True]))
    negative, _ = bnf_loss(logps, ref, neg_entropy, mask, torch.tensor([False]))
    nll = -math.log(0.5 * 0.3 * 0.9) / 3  # per-token mean
    assert float(positive) == pytest.approx(nll) and float(negative) == pytest.approx(-nll)


@pytest.mark.parametrize("detached_entropy", [False, True])
def test_bnf_gradient_wrt_each_logit_is_s_times_p_minus_q(detached_entropy):
    """Autograd through bnf_loss gives s·(p − q) at every logit (with the V-wide term carrying its own, zero,
    gradient or detached as the trainer computes it), and a central finite difference of the cross-entropy
    to the frozen target, −s·Σ_v q(v) log softmax(z)_v, agrees."""
    logits, ids, ref, desirable = bnf_case()
    z = logits.clone().requires_grad_()
    logp_all = z.log_softmax(-1)
    neg_entropy = (logp_all.exp().detach() * logp_all).sum(-1)
    if detached_entropy:
        neg_entropy = neg_entropy.detach()
    token = logp_all.gather(-1, ids[:, None])
    losses, _ = bnf_loss(token, ref[:, None], neg_entropy[:, None], torch.ones(len(ids), 1), desirable)
    losses.sum().backward()
    s = desirable.double() * 2 - 1
    q = full_target(logits, ids, ref)
    torch.testing.assert_close(z.grad, s[:, None] * (logits.softmax(-1) - q), rtol=1e-9, atol=1e-12)

    def frozen_cross_entropy(values):
        return float((-s[:, None] * q * values.log_softmax(-1)).sum())

    h = 1e-6
    numeric = torch.zeros_like(logits)
    for i in range(logits.shape[0]):
        for v in range(logits.shape[1]):
            up, down = logits.clone(), logits.clone()
            up[i, v] += h
            down[i, v] -= h
            numeric[i, v] = (frozen_cross_entropy(up) - frozen_cross_entropy(down)) / (2 * h)
    torch.testing.assert_close(z.grad, numeric, rtol=1e-6, atol=1e-8)
    p_token = logits.softmax(-1).gather(-1, ids[:, None]).squeeze(-1)
    r = ref.exp()  # the response token's gradient size: p(1 − r)/r below the reference, 1 − p at or above it
    size = torch.where(p_token < r, p_token * (1 - r) / r, 1 - p_token)
    assert z.grad.gather(-1, ids[:, None]).squeeze(-1).abs().tolist() == pytest.approx(size.tolist(), rel=1e-9)


def test_bnf_loss_is_normalised_per_response():
    """A response's loss is the mean over its own tokens, whatever else shares the batch; padding is ignored."""
    g = torch.Generator().manual_seed(1)
    logps = -torch.rand(2, 5, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(2, 5, generator=g, dtype=torch.float64) * 3
    neg_entropy = -torch.rand(2, 5, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    desirable = torch.tensor([True, False])
    together, target = bnf_loss(logps, ref, neg_entropy, mask, desirable)
    for i in range(2):
        alone, _ = bnf_loss(logps[i:i + 1], ref[i:i + 1], neg_entropy[i:i + 1], mask[i:i + 1], desirable[i:i + 1])
        assert float(alone) == pytest.approx(float(together[i]), rel=1e-12)
    garbage = torch.where(mask.bool(), logps, torch.tensor(-1e4, dtype=torch.float64))
    assert bnf_loss(garbage, ref, neg_entropy, mask, desirable)[0].tolist() == pytest.approx(together.tolist())
    assert ((target > 0) & (target <= 1)).all()


def test_neg_entropy_of_the_completion_pass_is_the_plain_value_in_chunks(tiny_model, synth_data):
    """completion_logprobs(with_neg_entropy=True) gives Σ_v p log p of a plain forward's logits, in chunks of
    any size, with no gradient (the log-probs keep theirs)."""
    from audio_rft.model import add_lora, core_model
    from audio_rft.rollout import completion_logprobs, token_neg_entropy

    processor, model = load_tiny(tiny_model)
    model = add_lora(model, rank=4, dropout=0.0)
    perturb_lora(model, seed=1, scale=0.1)
    core = core_model(model).eval()
    folder = synth_data / "train"
    batch = prompt_batch(processor, folder, samples_of(folder, 2))
    ids = torch.randint(10, 300, (2, 4), generator=torch.Generator().manual_seed(0))
    logps, neg_entropy = completion_logprobs(core, batch, ids, 1, with_neg_entropy=True)
    assert logps.requires_grad and not neg_entropy.requires_grad and neg_entropy.shape == ids.shape
    with torch.no_grad():
        out = core(input_ids=torch.cat([batch.input_ids, ids], 1),
                   attention_mask=torch.cat([batch.attention_mask, torch.ones_like(ids)], 1),
                   input_features=batch.input_features, feature_attention_mask=batch.feature_attention_mask)
        logp = out.logits[:, batch.input_ids.shape[1] - 1:-1].float().log_softmax(-1)
        expected = (logp.exp() * logp).sum(-1)
        hidden = torch.randn(7, core.config.text_config.hidden_size)
        whole = token_neg_entropy(core.lm_head, hidden)
        plain = core.lm_head(hidden).log_softmax(-1)
    torch.testing.assert_close(neg_entropy, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole, (plain.exp() * plain).sum(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(token_neg_entropy(core.lm_head, hidden, chunk=3), whole)
    torch.testing.assert_close(token_neg_entropy(core.lm_head, hidden, chunk_elements=1), whole)


# ---------------------------------------------------------------- the pair builder


def build(tmp_path, name, **values):
    from audio_rft.train.pairs import PairsConfig, build_pairs, read_jsonl

    out = build_pairs(PairsConfig(out=str(tmp_path / name), device="cpu", **values))
    return (out, read_jsonl(out / "pairs.jsonl"), read_jsonl(out / "singles.jsonl"),
            __import__("json").loads((out / "manifest.json").read_text()))


def test_pick_pair_never_pairs_equal_rewards():
    from audio_rft.train.pairs import pick_pair

    assert pick_pair([1.0, 1.0, 1.0]) is None
    assert pick_pair([0.0, 2.0, 1.0, 2.0, 0.0]) == (1, 0)  # highest against lowest, first on ties
    assert pick_pair([0.5, 0.25]) == (0, 1)


def test_choice_pairs_prefer_the_correct_answer(synth_data, tmp_path):
    data = str(synth_data / "train")
    out, pairs, singles, manifest = build(tmp_path, "a", data=data, source="choices", seed=3)
    samples = {s.id: s for s in samples_of(synth_data / "train")}
    assert manifest["questions"] == len(samples) == manifest["pairs"] + sum(manifest["unpaired"].values())
    assert pairs and len(singles) == 2 * len(pairs) and manifest["desirable"] == len(pairs)
    for pair in pairs:
        s = samples[pair["id"]]
        assert pair["chosen"] == f"<answer>{s.answer}</answer>" and pair["rejected"] != pair["chosen"]
        assert pair["rejected"].removeprefix("<answer>").removesuffix("</answer>") in s.choices
        assert pair["chosen_reward"] > pair["rejected_reward"] and pair["prompt_mode"] == "answer"
    assert [s["label"] for s in singles[:2]] == [True, False] and singles[0]["completion"] == pairs[0]["chosen"]
    same = build(tmp_path, "b", data=data, source="choices", seed=3)[1]
    other = build(tmp_path, "c", data=data, source="choices", seed=4)[1]
    assert same == pairs and other != pairs  # the wrong choice is drawn per seed
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary folder left


def test_sampled_pairs_are_deterministic_per_seed_and_count_what_they_could_not_pair(
        tiny_model, synth_data, tmp_path, with_plugin):
    common = dict(data=str(synth_data / "train"), model=str(tiny_model), limit=6, num_generations=4,
                  max_completion_length=6, batch_size=4, threads=1)
    out, pairs, singles, manifest = build(tmp_path, "a", rewards=[with_plugin], seed=0, **common)
    assert pairs and manifest["pairs"] == len(pairs) and manifest["pairs"] + sum(manifest["unpaired"].values()) == 6
    assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    again = build(tmp_path, "b", rewards=[with_plugin], seed=0, batch_size=3,
                  **{k: v for k, v in common.items() if k != "batch_size"})
    assert (again[0] / "pairs.jsonl").read_bytes() == (out / "pairs.jsonl").read_bytes()  # batching does not matter
    assert build(tmp_path, "c", rewards=[with_plugin], seed=1, **common)[1] != pairs
    # accuracy alone: a random tiny model is never right, so no group has a contrast; each is counted
    _, none, _, counted = build(tmp_path, "d", rewards=["accuracy"], seed=0, **common)
    assert none == [] and counted["unpaired"] == {"no_contrast": 6} and counted["pairs"] == 0


# ---------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def choice_pairs(synth_data, tmp_path_factory):
    """Offline pairs for the first 4 questions (no model needed): every step sees the same few pairs."""
    from audio_rft.train.pairs import PairsConfig, build_pairs

    return build_pairs(PairsConfig(data=str(synth_data / "train"), out=str(tmp_path_factory.mktemp("pairs") / "p"),
                                   source="choices", limit=4))


def plain_logps(core, batch, ids, mask, repeats):
    """Summed completion log-probs from one ordinary forward over prompt + completion (no shared prefix)."""
    from audio_rft.rollout import PromptBatch

    expand = PromptBatch(*(t.repeat_interleave(repeats, 0) for t in (
        batch.input_ids, batch.attention_mask, batch.input_features, batch.feature_attention_mask)))
    out = core(input_ids=torch.cat([expand.input_ids, ids], 1),
               attention_mask=torch.cat([expand.attention_mask, torch.ones_like(ids)], 1),
               input_features=expand.input_features, feature_attention_mask=expand.feature_attention_mask)
    logits = out.logits[:, expand.input_ids.shape[1] - 1:-1].float()
    token = logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    return (token * mask).sum(-1)


@pytest.mark.parametrize("method", ["dpo", "kto"])  # orpo scores exactly what dpo does
def test_one_pass_logprobs_equal_a_plain_forward(tiny_model, synth_data, choice_pairs, method):
    from audio_rft.data.dataset import load_dataset
    from audio_rft.model import add_lora, core_model
    from audio_rft.rollout import completion_logprobs
    from audio_rft.train.pairs import read_jsonl
    from audio_rft.train.prefer import PreferConfig, prefer_inputs

    processor, model = load_tiny(tiny_model)
    model = add_lora(model, rank=4, dropout=0.0)
    perturb_lora(model, seed=1, scale=0.1)
    core = core_model(model).eval()
    folder = str(synth_data / "train")
    items = read_jsonl(choice_pairs / ("singles.jsonl" if method == "kto" else "pairs.jsonl"))[:3]
    by_id = {s.id: s for s in load_dataset(folder)}
    batch, ids, mask = prefer_inputs(processor, folder, by_id, items, method, PreferConfig(), "cpu")
    assert ids.shape[0] == 2 * len(items) and (mask[:, 0] == 1).all()
    with torch.no_grad():
        one_pass = (completion_logprobs(core, batch, ids, 2) * mask).sum(-1)
        plain = plain_logps(core, batch, ids, mask, 2)
    torch.testing.assert_close(one_pass, plain, atol=1e-5, rtol=1e-5)
    if method == "kto":  # the second completion of each prompt is the previous item's
        assert torch.equal(ids[1], ids[-2]) and torch.equal(ids[3], ids[0])


def one_process_engine(core):
    """What Engine.run does in one process without sharding: call the pass on the model."""
    from types import SimpleNamespace

    return SimpleNamespace(run=lambda fn, *args, **kwargs: fn(core, *args, **kwargs))


def test_kto_scores_its_mismatched_completions_without_a_graph(tiny_model, synth_data, choice_pairs):
    """The policy's log-probs of KTO's [own, mismatched] rows equal the one-pass scoring of both; only the own
    rows carry a gradient (z0 is detached, so the mismatched rows never needed one)."""
    from audio_rft.data.dataset import load_dataset
    from audio_rft.model import add_lora, core_model
    from audio_rft.rollout import completion_logprobs
    from audio_rft.train.pairs import read_jsonl
    from audio_rft.train.prefer import PreferConfig, policy_logps, prefer_inputs

    processor, model = load_tiny(tiny_model)
    model = add_lora(model, rank=4, dropout=0.0)
    perturb_lora(model, seed=1, scale=0.1)
    core = core_model(model).eval()
    folder = str(synth_data / "train")
    items = read_jsonl(choice_pairs / "singles.jsonl")[:3]
    by_id = {s.id: s for s in load_dataset(folder)}
    config = PreferConfig(method="kto")
    batch, ids, mask = prefer_inputs(processor, folder, by_id, items, "kto", config, "cpu")
    logps, needs = policy_logps(one_process_engine(core), config, batch, ids)
    assert needs == {} and logps.shape == ids.shape
    (logps[1::2] * mask[1::2]).sum().backward(retain_graph=True)  # the mismatched rows: nothing to follow
    assert all(p.grad is None or not p.grad.any() for p in model.parameters() if p.requires_grad)
    (logps[0::2] * mask[0::2]).sum().backward()
    assert any(p.grad is not None and p.grad.any() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        one_pass = completion_logprobs(core, batch, ids, 2)
    torch.testing.assert_close((logps * mask).detach(), one_pass * mask, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("nll_tokens", ["completion", "all"])
def test_orpo_nll_span_is_the_chosen_sequence_or_its_completion(tiny_model, synth_data, choice_pairs, nll_tokens):
    """nll_tokens=all: the mean NLL over the prompt's text tokens (not padding, not audio placeholders) and the
    chosen completion's, as one plain forward over prompt + chosen computes it; completion: the chosen's only."""
    from audio_rft.data.dataset import load_dataset
    from audio_rft.model import core_model
    from audio_rft.train.pairs import read_jsonl
    from audio_rft.train.prefer import PreferConfig, method_loss, policy_logps, prefer_inputs

    processor, model = load_tiny(tiny_model)
    core = core_model(model).eval()
    folder = str(synth_data / "train")
    items = read_jsonl(choice_pairs / "pairs.jsonl")[:3]
    by_id = {s.id: s for s in load_dataset(folder)}
    config = PreferConfig(method="orpo", nll_tokens=nll_tokens)
    batch, ids, mask = prefer_inputs(processor, folder, by_id, items, "orpo", config, "cpu")
    with torch.no_grad():
        logps, needs = policy_logps(one_process_engine(core), config, batch, ids)
        _, stats = method_loss(config, None, items, logps, None, mask, **needs)
        chosen, chosen_mask = ids[0::2], mask[0::2]
        out = core(input_ids=torch.cat([batch.input_ids, chosen], 1),
                   attention_mask=torch.cat([batch.attention_mask, chosen_mask], 1),
                   input_features=batch.input_features, feature_attention_mask=batch.feature_attention_mask)
        targets = torch.cat([batch.input_ids, chosen], 1)[:, 1:]
        token = out.logits[:, :-1].float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
        prompt_len = batch.input_ids.shape[1]
        keep = torch.cat([batch.attention_mask, chosen_mask], 1)
        keep = (keep[:, 1:] * keep[:, :-1]).bool() & (targets != core.config.audio_token_id)
        if nll_tokens == "completion":
            keep[:, :prompt_len - 1] = False
    expected = -(token * keep).sum() / keep.sum()
    assert float(stats["orpo/nll"]) == pytest.approx(float(expected), rel=1e-5)
    assert (keep[:, :prompt_len - 1].sum() > 0) == (nll_tokens == "all")


def prefer_config(tiny_model, pairs, out, **overrides):
    from audio_rft.train.prefer import PreferConfig

    values = dict(model=str(tiny_model), pairs=str(pairs), out=str(out), max_steps=6, batch_size=4, lr=5e-3,
                  lora_dropout=0.0, save_every=0, report_to=[], device="cpu", seed=0)
    values.update(overrides)
    return PreferConfig(**values)


@pytest.mark.parametrize("method, overrides", [
    ("dpo", {}),
    ("kto", {"batch_size": 8}),  # all 8 singles each step, so both labels are in every batch
    ("orpo", {}),
    ("orpo", {"nll_tokens": "all"}),
    ("bnf", {"batch_size": 8}),
    ("dpo", {"lora": False, "lr": 1e-3, "max_steps": 4}),  # full fine-tuning: the frozen copy is the reference
])
def test_short_run_moves_the_margin(tiny_model, choice_pairs, tmp_path, method, overrides):
    from audio_rft.train.prefer import train_prefer

    final = train_prefer(prefer_config(tiny_model, choice_pairs, tmp_path / "run", method=method, **overrides))
    metrics = read_metrics(tmp_path / "run")
    steps = overrides.get("max_steps", 6)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for m in metrics:
        assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "lr", "grad_norm",
                "step_seconds"} <= m.keys()
    margins = [m["rewards/margin"] for m in metrics]
    if method == "dpo":
        assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference at step 1
    assert margins[-1] > margins[0] + 0.01 and margins[-1] > 0, margins
    if method == "orpo":
        assert metrics[-1]["loss"] < metrics[0]["loss"], [m["loss"] for m in metrics]
    assert (final / ("adapter_config.json" if overrides.get("lora", True) else "config.json")).is_file()


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_a_run_from_an_adapter_starts_at_its_reference(tiny_model, choice_pairs, tmp_path, method):
    """From `adapter=` with lora=true the reference is that adapter's policy: at step 1 every implicit reward is 0
    and DPO's loss is ln 2 (with LoRA dropout 0.05 configured: dropout is off in both passes)."""
    from audio_rft.model import add_lora
    from audio_rft.train.prefer import train_prefer

    _, model = load_tiny(tiny_model)
    model = add_lora(model, rank=8, dropout=0.05)
    perturb_lora(model, seed=4, scale=0.3)
    model.save_pretrained(tmp_path / "adapter")
    train_prefer(prefer_config(tiny_model, choice_pairs, tmp_path / "run", method=method, adapter=str(tmp_path / "adapter"),
                               max_steps=2, lora_dropout=0.05, batch_size=8 if method == "kto" else 4))
    first, second = read_metrics(tmp_path / "run")
    # KTO's policy scores its own completions in a pass of their own (the mismatched ones without a graph), the
    # reference both in one: equal up to float summation order, where the raw base would be ~0.1 away.
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    if method == "dpo":
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert second["rewards/margin"] != 0.0  # the policy moved from its reference


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_on_the_same_global_batch(tiny_model, choice_pairs, plugin_dir, tmp_path, strategy):
    """DPO (LoRA and full) and BNF (LoRA): two processes with half the batch each log the one-process losses
    and end at its weights. (KTO's mismatched pairs and ORPO's token-mean NLL are per micro-batch, so they
    depend on the split.) KTO's z0 with real collectives: the mean over both processes, then the clamp."""
    from dataclasses import asdict

    from test_distributed import final_weights, launch

    from audio_rft.train.prefer import train_prefer

    cases = {"lora": {"method": "dpo"}, "full": {"method": "dpo", "lora": False, "lr": 1e-4},
             "bnf": {"method": "bnf"}}
    jobs, lrs = [], {}
    for name, extra in cases.items():
        config = dict(max_steps=2, threads=1, **extra)
        train_prefer(prefer_config(tiny_model, choice_pairs, tmp_path / "one" / name, **config))
        two = prefer_config(tiny_model, choice_pairs, tmp_path / strategy / name, batch_size=2, strategy=strategy, **config)
        jobs.append({"kind": "prefer", "config": asdict(two)})
        lrs[name] = two.lr
    z0_out = tmp_path / strategy / "z0"
    jobs.append({"kind": "kto_z0", "config": asdict(prefer_config(tiny_model, choice_pairs, z0_out, method="kto"))})
    launch(jobs, tmp_path, plugin_dir)
    for rank in (0, 1):  # (3 − 2.5) / 2; clamping each process's mean first would give (3 + 0) / 2
        assert __import__("json").loads((z0_out / f"z0-{rank}.json").read_text()) == pytest.approx(0.25)
    for name in cases:
        one, two = read_metrics(tmp_path / "one" / name), read_metrics(tmp_path / strategy / name)
        assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], abs=1e-5)
        a, b = final_weights(tmp_path / "one" / name), final_weights(tmp_path / strategy / name)
        assert_same_weights_but_adam_noise(a, b, lr=lrs[name])


def test_pairs_then_prefer_on_the_command_line(tiny_model, synth_data, tmp_path):
    from helpers import run_cli

    pairs = tmp_path / "pairs"
    done = run_cli(["pairs", f"data={synth_data / 'train'}", f"out={pairs}", "source=choices", "limit=4"], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(pairs) and (pairs / "manifest.json").is_file()
    out = tmp_path / "out"
    done = run_cli(["prefer", "method=orpo", f"model={tiny_model}", f"pairs={pairs}", f"out={out}", "max_steps=1"],
                   timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith(str(out / "final")) and len(read_metrics(out)) == 1
    bad = run_cli(["prefer", "method=ipo", f"model={tiny_model}", f"pairs={pairs}", f"out={out}"], timeout=180)
    assert bad.returncode == 2 and "choose dpo, kto, orpo, bnf" in bad.stderr and bad.stderr.count("\n") == 1
