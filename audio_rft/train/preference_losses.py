"""Preference-optimisation losses as pure functions of per-sequence log-probabilities.

Notation, per example: log π(y|x) is the policy's log-probability of completion y given the prompt
(audio + question), summed over y's tokens unless said otherwise; log π_ref the same under the reference
policy (the base model, or the disabled LoRA adapter); y_w / y_l the chosen / rejected completion.
Every function returns per-example losses (the caller averages them) and the implicit rewards the
trainer logs. Where a paper leaves a choice open, TRL's trainer decides unless the docstring says otherwise
and why (ORPO's NLL span).

BNF (Mao et al. 2024) works per token, on the policy's and the reference's token log-probs and one V-wide
term: it is written as its first author implemented it in sail-sg/oat (see bnf_loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("dpo", "kto", "orpo", "bnf")


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum and mean of token log-probs over the mask (N, T) -> (N,), (N,)."""
    mask = mask.to(token_logps.dtype)
    total = (token_logps * mask).sum(-1)
    return total, total / mask.sum(-1).clamp(min=1)


def mean_token_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """−Σ m·log p / Σ m over every token of the batch: SFT's loss (sft.sft_nll), ORPO's NLL term."""
    mask = mask.to(token_logps.dtype)
    return -(token_logps * mask).sum() / mask.sum().clamp(min=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO, sigmoid loss (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7):

        h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))
        L = −log σ(β·h)

    Implicit rewards r = β·(log π(y) − log π_ref(y)), detached (TRL's DPOTrainer logs the same).
    At π = π_ref, h = 0 and L = ln 2; when y_w = y_l, h is 0 for every π, so the gradient is 0.
    Defaults: β = 0.1 (TRL DPOConfig), no label smoothing. Log-probs are summed over tokens.
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(beta * h)
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def kto_reference_point(mismatched_log_ratios: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean(log π(y'|x) − log π_ref(y'|x))), detached.

    (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", §4.1: a biased
    estimate of KL(π‖π_ref) from mismatched pairs (x, y') whose y' was written for another prompt.)
    As in TRL's KTOTrainer: y' is the completion of the previous example in the batch, and no gradient
    flows through z0. `mismatched_log_ratios` are those of the whole batch of every process, gathered by the
    caller: the mean comes first and the clamp after it, as in the paper and TRL (clamping each process's
    mean before averaging over processes biases z0 upwards: means of +3 and −2.5 give 1.5, not 0.25).
    """
    return mismatched_log_ratios.detach().mean().clamp(min=0)


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor | float,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO on unpaired, labelled completions (Ethayarajh et al. 2024, eq. 8; TRL's loss_type="kto"):

        r = log π(y) − log π_ref(y)
        desirable y:    L = λ_D·(1 − σ(β·(r − z0)))
        undesirable y:  L = λ_U·(1 − σ(β·(z0 − r)))

    z0 from kto_reference_point (detached). Defaults as TRL's KTOConfig: β = 0.1, λ_D = λ_U = 1
    (the paper asks for λ_D·n_D / (λ_U·n_U) in [1, 4/3]; balanced singles keep it at 1).
    Returns per-example losses and the implicit rewards β·r (detached). Log-probs are summed.
    The same completion labelled once desirable and once undesirable gives a constant total
    λ·(2 − σ(a) − σ(−a)) = λ when λ_D = λ_U = λ: zero gradient, as DPO's identical pair.
    """
    desirable = desirable.bool()
    r = policy - ref
    z0 = torch.as_tensor(z0, dtype=r.dtype, device=r.device).detach()
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    return losses, beta * r.detach()


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, nll: torch.Tensor, lam: float = 0.1
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", eq. 6-7):

        odds(y)  = P(y) / (1 − P(y)),  with log P(y) the length-normalised (mean per token) log-prob
        log OR   = log odds(y_w) − log odds(y_l)
        L        = L_NLL(y_w) + λ·(−log σ(log OR))

    L_NLL is the mean token NLL of the chosen sequences, passed in by the caller since it needs the token
    log-probs; its span is PreferConfig.nll_tokens: `completion` (our default: the answer tokens only, what
    SFT minimises, sft.sft_nll; an audio prompt is mostly placeholders and a fixed instruction, and learning
    to predict the question text is not what the comparison with SFT measures) or `all` (the prompt's text
    tokens too, as TRL's ORPOTrainer and the ORPO authors' code do). No reference model. λ = 0.1 as TRL's ORPOConfig
    (its `beta`); log(1 − P) is computed as log(−expm1(log P)), the same value as TRL's
    log1p(−exp(log P)) but exact near P = 1. Implicit rewards as TRL logs them: λ·log P(y) (mean).
    Returns the scalar loss, the per-pair log OR, and the chosen / rejected rewards (detached).
    With y_w = y_l the log OR is 0 for every π: only the NLL term's gradient remains.
    """
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    loss = nll - lam * F.logsigmoid(log_odds).mean()
    return loss, log_odds, lam * chosen_mean.detach(), lam * rejected_mean.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x < 0; at x = 0 (a certain completion) the odds are infinite."""
    return torch.log(-torch.expm1(x))


def bnf_target(token_logps: torch.Tensor, ref_token_logps: torch.Tensor, eps: float = 1e-6
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """BNF's target distribution q at each response token t (detached), as two numbers per token:

        q(t)  = sg(min(p(t) / r(t), 1))                         the response token's target mass
        q(v)  = c · sg(p(v)) for v ≠ t,  c = sg((1 − q(t)) / (1 − p(t)))   the rest, spread like p

    so Σ_v q(v) = q(t) + c·(1 − p(t)) = 1. p(t) / r(t) is formed in log space and 1 − x as −expm1(log x);
    `eps` (oat's 1e-6) guards the division when p(t) → 1. Returns q(t) and c.
    """
    token_logps, ref_token_logps = token_logps.detach(), ref_token_logps.detach()
    log_q = (token_logps - ref_token_logps).clamp(max=0)
    scale = -torch.expm1(log_q) / (-torch.expm1(token_logps)).clamp(min=eps)
    return log_q.exp(), scale


def bnf_loss(token_logps: torch.Tensor, ref_token_logps: torch.Tensor, neg_entropy: torch.Tensor, mask: torch.Tensor,
             desirable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BNF, "As Simple as Fine-tuning: LLM Alignment via Bidirectional Negative Feedback Loss" (Mao et al.,
    arXiv 2410.04834, ICLR 2025), as its first author implemented it (sail-sg/oat, oat/learners/loss.py,
    `BNFLoss`; the paper's Appendix B has the same structure). Per response token t_i, with p the policy's
    probabilities, r the frozen reference's, s = +1 for a desirable response and −1 for an undesirable one,
    and q from bnf_target:

        l_i = −s · [ q(t_i) log p(t_i) + Σ_{v≠t_i} q(v) log p(v) ]
            = −s · [ q(t_i) log p(t_i) + c · (Σ_v sg(p(v)) log p(v) − sg(p(t_i)) log p(t_i)) ]
        L_y = Σ_i m_i l_i / Σ_i m_i          (per response: its own length, so the loss of a response does
                                              not depend on the batch it is in)

    a cross-entropy to q for a desirable response and its negative for an undesirable one; no pairs, no
    hyper-parameter, a frozen reference. The gradient w.r.t. the logit z_v is s · (p(v) − q(v)): for the
    response token p(1 − r)/r when p < r and 1 − p when p ≥ r (the target is then one-hot and a desirable
    response's loss is its NLL), largest at p = r: the "bidirectional negative feedback".

    `neg_entropy` is Σ_v sg(p(v)) log p(v) at each position (rollout.token_neg_entropy, in chunks): its
    gradient w.r.t. the logits is p − p·Σ_v p(v) = 0, so it may come detached; it sets the loss's value, not
    its gradient. Shapes (N, L); desirable (N,). Returns per-response losses and the mean target mass of the
    response tokens q(t) per response (detached).
    """
    valid = mask.bool()  # what sits after a response (padding) never reaches an exp or a division
    token_logps, ref_token_logps = token_logps.masked_fill(~valid, 0.0), ref_token_logps.masked_fill(~valid, 0.0)
    neg_entropy = neg_entropy.masked_fill(~valid, 0.0)
    q_token, scale = bnf_target(token_logps, ref_token_logps)
    p_token = token_logps.detach().exp()
    sign = desirable.to(token_logps.dtype) * 2 - 1
    per_token = -sign[:, None] * (q_token * token_logps + scale * (neg_entropy - p_token * token_logps))
    mask = mask.to(token_logps.dtype)
    lengths = mask.sum(-1).clamp(min=1)
    return (per_token * mask).sum(-1) / lengths, (q_token * mask).sum(-1) / lengths
