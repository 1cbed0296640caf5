"""Log-likelihood estimators of a completion under a DreamModel, for policy-gradient ratios and the KL term.

Shapes: x (B, N) the finished canvas (prompt + completion); `generated` (B, N) bool, the slots the policy wrote
(pinned slots and the prompt are context, never scored); `prompt` (B, N) bool, the prompt's positions. Logits follow
Dream's shift (the output at j - 1 scores the token at j), as in training (`objective.masked_ce`).

A diffusion LM has no exact log-likelihood, so each estimator is a *noise draw* (`draw`: which positions are masked
in which copy of the canvas, with what weight) followed by one forward over all copies (`loglik`). The draw is kept
apart so that the policy, the policy that made the rollouts and the frozen reference are scored on exactly the
same masks: their differences (the ratio, the KL) are then not drowned by mask noise.

- ONE_STEP (d1, diffu-GRPO): the whole completion masked, each prompt token (never position 0) masked with
  probability `prompt_mask_p`; token-level: log p(y_i | masked prompt, all-masked completion).
- COUPLED (DiffuCoder, coupled-GRPO): t ~ U(0, 1), mask m ~ Bernoulli(t) over the completion, and its complement
  1 - m in a second copy; every completion token is scored exactly once, with the other completion tokens masked
  at rate t (or 1 - t). Token-level.
- ELBO (ESPO, sequence-level): Monte Carlo over t of Σ_masked log p / t, in antithetic pairs (t with mask u < t,
  1 - t with the complementary mask u >= t: both halves are unbiased and each token is masked in exactly one);
  one value per sequence, divided by the completion's length, so ratios and KL are per token.
- EXACT: a causal (AR) model's exact log p(y_i | y_<i), token-level — the AR twin's plain GRPO.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F

from dreamlm.errors import DreamError
from dreamlm.model import DreamModel


class Estimator(str, Enum):
    """How a completion's log-likelihood is estimated."""

    ONE_STEP = "one_step"
    COUPLED = "coupled"
    ELBO = "elbo"
    EXACT = "exact"

    @classmethod
    def parse(cls, name: "str | Estimator") -> "Estimator":
        """The estimator of this name, else DreamError listing the names."""
        try:
            return cls(name)
        except ValueError:
            raise DreamError(f"unknown estimator {name!r}; use one of {', '.join(e.value for e in cls)}") from None

    @property
    def sequence_level(self) -> bool:
        """True when the estimate is one number per sequence (ratios and KL per sequence)."""
        return self is Estimator.ELBO


@dataclass
class EstimatorSettings:
    """Knobs of the estimators: d1's prompt masking rate, ELBO's number of antithetic pairs and its t floor."""

    prompt_mask_p: float = 0.15
    elbo_pairs: int = 2
    eps: float = 1e-3

    def __post_init__(self) -> None:
        if not 0 <= self.prompt_mask_p < 1:
            raise DreamError(f"prompt_mask_p must be in [0, 1), got {self.prompt_mask_p}")
        if self.elbo_pairs < 1:
            raise DreamError(f"elbo_pairs must be >= 1, got {self.elbo_pairs}")
        if not 0 < self.eps < 0.5:
            raise DreamError(f"eps must be in (0, 0.5), got {self.eps}")


@dataclass
class Draw:
    """The noise of one estimate: C copies of the batch, each with its masked positions (C, B, N) and the weight of
    each scored position (C, B, N); for EXACT no masks at all (C = 1, nothing masked, every generated slot scored)."""

    masked: torch.Tensor  # (C, B, N) bool: positions replaced by the mask token in copy c
    scored: torch.Tensor  # (C, B, N) bool: positions whose log-probability counts in copy c
    weight: torch.Tensor  # (C, B, N) float: the factor on each scored log-probability


@dataclass
class LogLik:
    """Per-unit log-likelihoods (B, K) and which units count (B, K): K = N for token-level estimators (the canvas
    positions, `mask` = the generated slots), K = 1 for sequence-level ones."""

    values: torch.Tensor
    mask: torch.Tensor


def draw(estimator: Estimator, generated: torch.Tensor, prompt: torch.Tensor, settings: EstimatorSettings,
         generator: torch.Generator) -> Draw:
    """The estimator's random masks for a batch (drawn on the CPU from `generator`, so every device draws alike)."""
    gen_cpu, prompt_cpu = generated.cpu(), prompt.cpu()
    B, N = gen_cpu.shape
    none = torch.zeros(1, B, N, dtype=torch.bool)
    if estimator is Estimator.EXACT:
        return Draw(none, gen_cpu[None].clone(), torch.ones(1, B, N))
    if estimator is Estimator.ONE_STEP:
        maskable_prompt = prompt_cpu.clone()
        maskable_prompt[:, 0] = False  # position 0 can never be predicted, so it is never masked
        u = torch.rand(B, N, generator=generator)
        masked = gen_cpu | (maskable_prompt & (u < settings.prompt_mask_p))
        return Draw(masked[None], gen_cpu[None].clone(), torch.ones(1, B, N))
    if estimator is Estimator.COUPLED:
        t = torch.rand(B, 1, generator=generator)
        u = torch.rand(B, N, generator=generator)
        first = gen_cpu & (u < t)
        second = gen_cpu & ~first
        masked = torch.stack([first, second])
        return Draw(masked, masked.clone(), torch.ones(2, B, N))
    # ELBO: pairs (t, mask u < t, weight 1/t) and (1 - t, mask u >= t, weight 1/(1 - t)); t in [eps, 1 - eps]
    masks, weights = [], []
    for _ in range(settings.elbo_pairs):
        t = settings.eps + (1 - 2 * settings.eps) * torch.rand(B, 1, generator=generator)
        u = torch.rand(B, N, generator=generator)
        first = gen_cpu & (u < t)
        masks += [first, gen_cpu & ~first]
        weights += [(1 / t).expand(B, N), (1 / (1 - t)).expand(B, N)]
    masked = torch.stack(masks)
    count = gen_cpu.sum(1, keepdim=True).clamp(min=1).float()  # per-token: the ELBO divided by the length
    weight = torch.stack(weights) / len(masks) / count
    return Draw(masked, masked.clone(), weight)


def loglik(model: DreamModel, x: torch.Tensor, generated: torch.Tensor, noise: Draw,
           estimator: Estimator) -> LogLik:
    """The estimate for canvas x under `model` with the draw's masks: one forward over all copies."""
    C = noise.masked.shape[0]
    B, N = x.shape
    device = x.device
    masked = noise.masked.to(device).reshape(C * B, N)
    scored = noise.scored.to(device).reshape(C * B, N)
    xs = x.repeat(C, 1)
    if estimator is not Estimator.EXACT:
        mask_id = model.config.mask_token_id
        if mask_id is None:
            raise DreamError("this estimator needs a diffusion model (a mask token); a causal model uses 'exact'")
        if bool(masked[:, 0].any()):
            raise DreamError("position 0 was masked; it can never be predicted under Dream's shift")
        xs = torch.where(masked, torch.full_like(xs, mask_id), xs)
    elif not model.causal:
        raise DreamError("the 'exact' estimator is for causal (AR) models; a diffusion model uses one_step, "
                         "coupled or elbo")
    rows, cols = scored.nonzero(as_tuple=True)
    if bool((cols == 0).any()):
        raise DreamError("position 0 cannot be scored (nothing predicts it)")
    logits = model(xs, select=(rows, cols - 1))  # (M, V)
    logp = token_logprobs(logits, x.repeat(C, 1)[rows, cols])
    per_copy = torch.zeros(C * B, N, device=device, dtype=torch.float32)
    per_copy = per_copy.index_put((rows, cols), logp * noise.weight.to(device).reshape(C * B, N)[rows, cols])
    total = per_copy.view(C, B, N).sum(0)  # (B, N): each token's (weighted) score summed over the copies
    gen = generated.to(device)
    if estimator.sequence_level:
        return LogLik(total.sum(1, keepdim=True), gen.any(1, keepdim=True))
    return LogLik(total, gen)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] in fp32, (M,) for logits (M, V) and targets (M,)."""
    return F.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
