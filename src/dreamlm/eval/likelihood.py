"""Likelihoods as Dream's evaluation computes them: a Monte-Carlo ELBO, and the greedy-match flag.

Vocabulary: `x` the sequence context + continuation (L,); only the continuation is ever noised. Each MC batch of `b`
samples draws one u0 ~ U(0, 1) and uses the stratified times t_i = (u0 + i/b) mod 1, masking probability
p_i = eps + (1 - eps) t_i; a continuation token is masked with probability p_i and scored by its cross-entropy
under the shifted logits, divided by p_i (the 1/t weighting). Position 0 (BOS) is never masked, and, as in Dream's
scripts, neither is the sequence's last position: the harness appends EOS to the continuation, so that EOS stays
visible and every continuation token is scored (see `keep_last`).
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import torch

from dreamlm.errors import DreamError
from dreamlm.sampling import Constraints, diffusion_generate
from dreamlm.training.objective import mask_tokens, masked_ce

if TYPE_CHECKING:
    from dreamlm.model import DreamModel


def request_seed(seed: int, ids: list[int]) -> int:
    """A seed for one request from the run's seed and the request's own tokens, so a request draws the same
    numbers whichever process, shard or batch it lands in."""
    return (seed * 1_000_003 + zlib.crc32(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())) % 2**63


def maskable_positions(length: int, context_len: int, keep_last: bool = True) -> torch.Tensor:
    """(L,) bool: the continuation, minus position 0 and, with `keep_last`, minus the last position."""
    maskable = torch.zeros(length, dtype=torch.bool)
    maskable[context_len:] = True
    maskable[0] = False
    if keep_last:
        maskable[-1] = False
    return maskable


@torch.no_grad()
def mc_elbo(model: "DreamModel", context: list[int], continuation: list[int], mc_num: int = 128,
            batch_size: int = 32, eps: float = 1e-3, keep_last: bool = True, seed: int = 0) -> float:
    """Monte-Carlo ELBO of log p(continuation | context) in nats, as Dream's evaluation computes it.

    max(mc_num // batch_size, 1) batches of min(batch_size, mc_num) samples; the estimate is the mean over batches
    of -(sum of CE / p over masked tokens) / b. `keep_last=True` is Dream's script: the last position (the EOS the
    harness appends) is never masked; False lets it be masked and scored too."""
    if not context:
        raise DreamError("the context must hold at least one token (position 0 is never masked); add a BOS")
    if not continuation:
        raise DreamError("the continuation is empty")
    if mc_num < 1 or batch_size < 1:
        raise DreamError(f"mc_num and batch_size must be >= 1, got {mc_num} and {batch_size}")
    if not 0 < eps < 1:
        raise DreamError(f"eps must be in (0, 1), got {eps}")
    device = model.device
    x = torch.tensor(context + continuation, dtype=torch.long)
    maskable = maskable_positions(len(x), len(context), keep_last)
    b = min(batch_size, mc_num)
    batches = max(mc_num // b, 1)
    gen = torch.Generator().manual_seed(request_seed(seed, context + continuation))
    total = 0.0
    for _ in range(batches):
        u0 = torch.rand(1, generator=gen)
        t = (u0 + torch.arange(b) / b) % 1
        p_mask = (1 - eps) * t + eps  # (b,)
        xb = x.expand(b, -1).to(device)
        noisy, masked = mask_tokens(xb, maskable.expand(b, -1).to(device), p_mask, model.config.mask_token_id, gen)
        if not bool(masked.any()):
            continue
        ce = masked_ce(model, noisy, xb, masked).cpu()  # (M,) row-major
        rows = masked.nonzero(as_tuple=True)[0].cpu()
        total += float((ce / p_mask[rows]).sum()) / b
    return -total / batches


@torch.no_grad()
def greedy_match(model: "DreamModel", context: list[int], continuation: list[int],
                 banned_token_ids: list[int] | None = None) -> bool:
    """True when decoding the continuation's slots one token a step, most confident first (p(x0), temperature 0,
    as Dream's `suffix_greedy_prediction`), writes exactly the continuation."""
    n = len(continuation)
    ids = torch.tensor([context], dtype=torch.long)
    out = diffusion_generate(model, ids, max_new_tokens=n, steps=n, alg="maskgit_plus", temperature=0.0,
                             threshold=1.0, constraints=Constraints(banned_token_ids=list(banned_token_ids or [])))
    return out[0, len(context):].tolist() == list(continuation)
