"""Preference-optimisation losses as pure functions of per-sequence log-probabilities.

Notation, per example: log π(y|x) is the policy's log-probability of completion y given the prompt
(audio + question), summed over y's tokens unless said otherwise; log π_ref the same under the reference
policy (the base model, or the disabled LoRA adapter); y_w / y_l the chosen / rejected completion.
Every function returns per-example losses (the caller averages them) and the implicit rewards the
trainer logs. Where a paper leaves a choice open, TRL's trainer decides, and the docstring says so.

BNF (Mao et al. 2024, arXiv 2410.04834) is not here: its loss could not be established from the paper
or the authors' code in the sources available when this was written, and it is not invented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("dpo", "kto", "orpo")


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


def kto_reference_point(policy_mismatched: torch.Tensor, ref_mismatched: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean(log π(y'|x) − log π_ref(y'|x))), detached.

    (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", §4.1: a biased
    estimate of KL(π‖π_ref) from mismatched pairs (x, y') whose y' was written for another prompt.)
    As in TRL's KTOTrainer: y' is the completion of the previous example in the batch, the mean is
    over the batch (and every process), clamped at 0, and no gradient flows through it.
    """
    return (policy_mismatched - ref_mismatched).detach().mean().clamp(min=0)


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

    L_NLL is the mean token NLL of the chosen completions (what SFT minimises: sft.sft_nll), passed in
    by the caller since it needs the token log-probs. No reference model. λ = 0.1 as TRL's ORPOConfig
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
