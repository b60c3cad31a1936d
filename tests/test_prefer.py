"""Preference optimisation: the losses by hand, the pair builder, and the `prefer` trainer end to end."""

from __future__ import annotations

import math

import pytest
import torch

from audio_rft.train.preference_losses import (dpo_loss, kto_loss, kto_reference_point, mean_token_nll, orpo_loss,
                                               sequence_logps)
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
    assert float(kto_reference_point(policy, t(-2.0, -2.0))) == pytest.approx(0.4)  # mean(0.2, 0.6)
    assert not kto_reference_point(policy, t(-2.0, -2.0)).requires_grad
    assert float(kto_reference_point(t(-3.0, -2.5), t(-2.0, -2.0))) == 0.0  # mean −0.75, clamped at 0


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
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    if method == "dpo":
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert second["rewards/margin"] != 0.0  # the policy moved from its reference


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_on_the_same_global_batch(tiny_model, choice_pairs, plugin_dir, tmp_path, strategy):
    """DPO, LoRA and full: two processes with half the batch each end at the one-process weights.
    (KTO's mismatched pairs and ORPO's token-mean NLL are per micro-batch, so they depend on the split.)"""
    from test_distributed import final_weights, launch

    from audio_rft.train.prefer import train_prefer

    cases = {"lora": {}, "full": {"lora": False, "lr": 1e-4}}
    jobs, lrs = [], {}
    for name, extra in cases.items():
        config = dict(method="dpo", max_steps=2, threads=1, **extra)
        train_prefer(prefer_config(tiny_model, choice_pairs, tmp_path / "one" / name, **config))
        two = prefer_config(tiny_model, choice_pairs, tmp_path / strategy / name, batch_size=2, strategy=strategy, **config)
        jobs.append({"kind": "prefer", "config": __import__("dataclasses").asdict(two)})
        lrs[name] = two.lr
    launch(jobs, tmp_path, plugin_dir)
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
    bad = run_cli(["prefer", "method=bnf", f"model={tiny_model}", f"pairs={pairs}", f"out={out}"], timeout=60)
    assert bad.returncode == 2 and "BNF is not implemented" in bad.stderr
