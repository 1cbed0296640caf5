"""GRPO's arithmetic: group-normalised advantages, the k3 KL estimator and the clipped surrogate loss.

Shapes: rewards (P, G) for P prompts with G completions each; per-unit log-likelihoods (B, K) with a mask (B, K)
(K = canvas positions for token-level estimators, 1 for sequence-level ones; see `estimators.LogLik`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ADVANTAGE_EPS = 1e-4  # keeps a near-uniform group's advantages finite (as GRPO's reference implementations do)


def group_advantages(rewards: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """(r - mean of its group) / (population std of its group + 1e-4) per completion, (P, G) -> (P, G); without
    `scale` only the mean is removed (Dr. GRPO). A group whose rewards are all equal gets zeros."""
    rewards = rewards.double()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred.float()
    return (centred / (rewards.std(dim=1, unbiased=False, keepdim=True) + ADVANTAGE_EPS)).float()


def informative(rewards: torch.Tensor) -> torch.Tensor:
    """(P, G) rewards -> (P,) bool: the groups whose rewards are not all equal (the only ones with an advantage)."""
    return rewards.max(dim=1).values > rewards.min(dim=1).values


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(policy || reference) per unit: exp(r) - r - 1 with r = ref_logp - logp (>= 0,
    unbiased for samples from the policy)."""
    r = ref_logp - logp
    return torch.exp(r) - r - 1


@dataclass
class LossParts:
    """The loss to backpropagate (already divided by `denominator`) and detached statistics (sums over the
    batch's sequences, to be divided by the sequence count)."""

    loss: torch.Tensor
    kl_sum: float
    clipped_sum: float
    sequences: int


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, mask: torch.Tensor,
              advantages: torch.Tensor, clip_eps: float, beta: float, denominator: float) -> LossParts:
    """Clipped surrogate -min(ρA, clip(ρ, 1 ± ε)A) + β·k3 per unit (ρ = exp(logp - old_logp)), averaged over each
    sequence's units, summed over sequences and divided by `denominator` (the sequence count of the whole
    optimizer step, so micro-batches and ranks split a step without changing it)."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages.to(logp.device)[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    per_unit = -surrogate
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta > 0:
        kl = k3_kl(logp, ref_logp)
        per_unit = per_unit + beta * kl
    units = mask.sum(1).clamp(min=1)
    per_sequence = (per_unit * mask).sum(1) / units
    clipped = (((ratio - 1).abs() > clip_eps).to(logp.dtype) * mask).sum(1) / units
    return LossParts(per_sequence.sum() / max(denominator, 1e-12), float(((kl.detach() * mask).sum(1) / units).sum()),
                     float(clipped.sum()), int(logp.shape[0]))
