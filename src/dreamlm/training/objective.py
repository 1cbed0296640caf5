"""Training objectives: masked diffusion (spec §3) and plain next-token AR, plus the Monte-Carlo ELBO likelihood.

Shapes: x (B, L) clean ids; maskable (B, L) bool, positions the forward process may mask; t (B,) noise level;
masked (B, L) bool. Logits follow Dream's shift: the model's output at j - 1 scores the token at j.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

import torch
import torch.nn.functional as F

from dreamlm.errors import DreamError
from dreamlm.model import DreamModel


class Weighting(str, Enum):
    """Per-token loss weight of the diffusion objective."""

    ELBO = "elbo"  # 1/t: the evidence lower bound (Dream's default)
    LINEAR = "linear"  # 1 - t
    CART = "cart"  # context-adaptive: weight from the distance to clean tokens, never changes the masking
    NONE = "none"  # constant 1


@dataclass
class DiffusionObjective:
    """Settings of the masked-diffusion loss."""

    weighting: Weighting = Weighting.ELBO
    cart_p: float = 0.1
    focal_gamma: float = 0.0  # 0 turns the focal factor off
    focal_alpha: float = 0.25
    eps: float = 1e-3

    def __post_init__(self) -> None:
        try:
            self.weighting = Weighting(self.weighting)
        except ValueError:
            raise DreamError(f"unknown weighting {self.weighting!r}; use one of "
                             f"{', '.join(w.value for w in Weighting)}") from None
        if not 0 < self.cart_p < 1:
            raise DreamError(f"cart_p must be in (0, 1), got {self.cart_p}")
        if self.focal_gamma < 0 or self.focal_alpha <= 0:
            raise DreamError("focal_gamma must be >= 0 and focal_alpha > 0")
        if not 0 < self.eps < 1:
            raise DreamError(f"eps must be in (0, 1), got {self.eps}")


@dataclass
class LossOutput:
    """A loss to backpropagate and what it was made of."""

    loss: torch.Tensor  # weighted sum divided by `denominator`
    weighted_sum: torch.Tensor
    count: int  # masked (diffusion) or target (AR) tokens in this batch


def sample_times(batch: int, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """t (B,) ~ U(eps, 1)."""
    return (1 - eps) * torch.rand(batch, generator=generator) + eps


def mask_tokens(x: torch.Tensor, maskable: torch.Tensor, t: torch.Tensor, mask_token_id: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each maskable token independently with probability t of its row: (noisy (B, L), masked (B, L))."""
    u = torch.rand(x.shape, generator=generator)
    masked = (u < t.cpu()[:, None]).to(x.device) & maskable
    return torch.where(masked, torch.full_like(x, mask_token_id), x), masked


def mask_span(maskable: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One run of max(1, round(t * n)) consecutive maskable positions per row (n: the row's maskable count), its
    start uniform: masked (B, L). Consecutive in the order of the maskable positions, which are contiguous in packed
    blocks and SFT responses. The same t as independent masking, so the same share of tokens is masked, in one hole:
    the shape of an infilling problem."""
    masked = torch.zeros_like(maskable)
    for row in range(maskable.shape[0]):
        where = maskable[row].nonzero(as_tuple=True)[0]
        if not len(where):
            continue
        k = min(len(where), max(1, round(float(t[row]) * len(where))))
        start = int(torch.randint(len(where) - k + 1, (1,), generator=generator))
        masked[row, where[start:start + k]] = True
    return masked


@dataclass(frozen=True)
class LengthStates:
    """DreamOn's training augmentation (its `masking_merge` in our words): teach a model the `<|expand|>` and
    `<|delete|>` states, so that at sampling a mask can become two masks or vanish.

    For an example it picks a middle span of the maskable tokens (length uniform in 1..max_middle), appends
    d ~ U{0..max_delete} delete tokens after it, masks each middle token with probability t and every delete, then
    merges each masked run: every adjacent pair of masked middle tokens is joined with probability p (DreamOn's
    merge_prob 0.5; with probability 1 - static_share scaled by the unmasked share, its "dynamic_inverse"
    schedule), and a joined group of g >= 2 tokens becomes ONE masked slot whose target is `<|expand|>`. Prefix and
    suffix stay clean (the infilling shape DreamOn trains on). The loss is the usual masked CE on the augmented
    sequence; the deletes of a row share one token's weight (DreamOn averages its delete/EOS loss apart from the
    rest, `weight_eos`), so a long run of easy deletes does not drown the text."""

    mask_id: int
    expand_id: int
    delete_id: int
    max_delete: int = 16
    max_middle: int = 64
    merge_p: float = 0.5
    static_share: float = 0.5


@dataclass
class Augmented:
    """One augmented row: z (the clean targets, with expand/delete tokens), masked (bool, same length) and sizes
    (how many original tokens each position of z stands for: 1, g >= 2 for an expand, 0 for a delete)."""

    z: list[int]
    masked: list[bool]
    sizes: list[int]


def augment_lengths(x: list[int], maskable: list[bool], t: float, states: LengthStates,
                    generator: torch.Generator | None = None) -> Augmented:
    """The DreamOn augmentation of one row (see `LengthStates`); len(z) = len(x) - sum(g - 1) + d. Deterministic
    for a given generator. A row with no maskable token comes back unchanged."""
    where = [i for i, m in enumerate(maskable) if m]
    if not where:
        return Augmented(list(x), [False] * len(x), [1] * len(x))

    def uniform() -> float:
        return float(torch.rand(1, generator=generator))

    # a contiguous run of maskable positions: packed blocks and SFT responses keep them contiguous
    n = min(len(where), max(1, int(uniform() * states.max_middle) + 1))
    start = where[int(uniform() * (len(where) - n + 1))]
    lo, hi = start, start + n
    deletes = int(uniform() * (states.max_delete + 1))
    hidden = [uniform() < t for _ in range(n)]
    share = sum(hidden) / n
    p = states.merge_p if uniform() < states.static_share else states.merge_p * (1 - share)
    z, masked, sizes = list(x[:lo]), [False] * lo, [1] * lo
    i = 0
    while i < n:
        g = 1
        while hidden[i] and i + g < n and hidden[i + g] and uniform() < p:
            g += 1
        z.append(states.expand_id if g > 1 else x[lo + i])
        masked.append(hidden[i])
        sizes.append(g)
        i += g
    z += [states.delete_id] * deletes
    masked += [True] * deletes
    sizes += [0] * deletes
    z += list(x[hi:])
    masked += [False] * (len(x) - hi)
    sizes += [1] * (len(x) - hi)
    return Augmented(z, masked, sizes)


def restore_lengths(augmented: Augmented, source: list[int], states: LengthStates) -> list[int]:
    """The inverse of `augment_lengths`: each expand becomes the g tokens it merged (read from `source` at the
    same offset), each delete disappears, every other token stays; gives back the original row."""
    out: list[int] = []
    for token, size in zip(augmented.z, augmented.sizes):
        if token == states.delete_id:
            continue
        if token == states.expand_id:
            out.extend(source[len(out):len(out) + size])
        else:
            out.append(token)
    return out


def fit_length(augmented: Augmented, length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z and masked cut or right-padded (with `pad_id`, never masked) to `length`, so rows batch as before."""
    z, masked = augmented.z[:length], augmented.masked[:length]
    extra = length - len(z)
    return (torch.tensor(z + [pad_id] * extra, dtype=torch.long),
            torch.tensor(masked + [False] * extra, dtype=torch.bool))


@lru_cache(maxsize=16)
def _decay_matrix(length: int, p: float, device: str) -> torch.Tensor:
    d = (torch.arange(length)[:, None] - torch.arange(length)[None, :]).abs()
    m = p * (1 - p) ** (d.double() - 1)
    m.fill_diagonal_(0.0)
    return m.float().to(device)


def cart_weights(masked: torch.Tensor, p: float = 0.1) -> torch.Tensor:
    """CART weight per position (B, L): ½ Σ_{i clean, i≠n} p(1−p)^{|n−i|−1} (defined everywhere, used where masked)."""
    clean = (~masked).float()
    return 0.5 * clean @ _decay_matrix(masked.shape[1], p, str(masked.device)).T


def token_weights(objective: DiffusionObjective, t: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Loss weight (B, L) of each position under the objective's weighting."""
    if objective.weighting is Weighting.CART:
        return cart_weights(masked, objective.cart_p)
    per_row = {Weighting.ELBO: 1 / t, Weighting.LINEAR: 1 - t, Weighting.NONE: torch.ones_like(t)}[objective.weighting]
    return per_row[:, None].expand(masked.shape).to(masked.device)


def masked_ce(model: DreamModel, noisy: torch.Tensor, x: torch.Tensor, masked: torch.Tensor,
              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy (M,) at the masked positions, in row-major order, with Dream's shift."""
    rows, cols = masked.nonzero(as_tuple=True)
    if bool((cols == 0).any()):
        raise DreamError("position 0 was masked; it can never be predicted under Dream's shift")
    logits = model(noisy, attention_mask, select=(rows, cols - 1))  # (M, V)
    return F.cross_entropy(logits.float(), x[rows, cols], reduction="none")


def diffusion_loss(model: DreamModel, x: torch.Tensor, maskable: torch.Tensor, objective: DiffusionObjective,
                   t: torch.Tensor, masked: torch.Tensor, denominator: float | None = None,
                   scale: torch.Tensor | None = None) -> LossOutput:
    """Weighted CE over the masked tokens of a prepared (t, masked) draw, divided by the masked count; `scale`
    (B, L) multiplies the weights (the length states' deletes share one token's weight)."""
    mask_id = model.config.mask_token_id
    if mask_id is None:
        raise DreamError("the model has no mask_token_id; convert it to a diffusion model first")
    noisy = torch.where(masked, torch.full_like(x, mask_id), x)
    ce = masked_ce(model, noisy, x, masked)
    w = token_weights(objective, t.to(x.device), masked)
    if scale is not None:
        w = w * scale.to(w.device)
    w = w[masked]
    if objective.focal_gamma > 0:
        ce = objective.focal_alpha * (1 - torch.exp(-ce.detach())) ** objective.focal_gamma * ce
    total = (w * ce).sum()
    count = int(masked.sum())
    return LossOutput(total / max(denominator or count, 1), total.detach(), count)


def ar_loss(model: DreamModel, x: torch.Tensor, targets: torch.Tensor,
            denominator: float | None = None) -> LossOutput:
    """Next-token CE of a causal model on the positions where `targets` (B, L) is true (never position 0)."""
    rows, cols = targets.nonzero(as_tuple=True)
    if bool((cols == 0).any()):
        raise DreamError("position 0 cannot be an AR target")
    logits = model(x, select=(rows, cols - 1))
    ce = F.cross_entropy(logits.float(), x[rows, cols], reduction="none")
    total = ce.sum()
    count = int(targets.sum())
    return LossOutput(total / max(denominator or count, 1), total.detach(), count)


@torch.no_grad()
def elbo_loglik(model: DreamModel, context: list[int], continuation: list[int], mc_num: int = 128,
                batch_size: int = 32, eps: float = 1e-3, seed: int = 0) -> float:
    """Monte-Carlo ELBO of log p(continuation | context) in nats (a lower bound; stratified t, only the
    continuation is noised): mean over samples of Σ_masked log p / t."""
    if not context:
        raise DreamError("the context must hold at least one token (position 0 is never masked)")
    if mc_num < 1 or not continuation:
        raise DreamError("mc_num must be >= 1 and the continuation non-empty")
    mask_id = model.config.mask_token_id
    gen = torch.Generator().manual_seed(seed)
    device = model.device
    x = torch.tensor(context + continuation, device=device)
    maskable = torch.zeros(len(x), dtype=torch.bool, device=device)
    maskable[len(context):] = True
    t_all = eps + (1 - eps) * (torch.arange(mc_num) + torch.rand(mc_num, generator=gen)) / mc_num  # stratified
    total = 0.0
    for start in range(0, mc_num, batch_size):
        t = t_all[start:start + batch_size]
        xb = x.expand(len(t), -1)
        noisy, masked = mask_tokens(xb, maskable.expand(len(t), -1), t, mask_id, gen)
        if not bool(masked.any()):
            continue
        ce = masked_ce(model, noisy, xb, masked)
        rows = masked.nonzero(as_tuple=True)[0]
        total -= float((ce / t.to(device)[rows]).sum())
    return total / mc_num


def bits_per_token(nll_nats: float, tokens: int) -> float:
    """Nats over a span to bits per token."""
    return nll_nats / tokens / math.log(2)
