"""Greedy/sampled next-token decoding for causal models (the AR baselines), with or without a KV cache.

This is not a second diffusion loop: it decodes a *causal* model left to right, one token per forward pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from dreamlm.errors import DreamError
from dreamlm.model import KVCache
from dreamlm.sampling.generate import sampler_logits

if TYPE_CHECKING:
    from dreamlm.model import DreamModel


@torch.no_grad()
def ar_generate(model: "DreamModel", input_ids: torch.Tensor, max_new_tokens: int, use_cache: bool = True,
                temperature: float = 0.0, stop_at_eos: bool = True, generator: torch.Generator | None = None,
                on_token: Callable[[int, torch.Tensor], None] | None = None) -> tuple[torch.Tensor, int]:
    """Append up to max_new_tokens to each row; returns (ids (B, P + n), forward passes). Rows that ended get EOS.
    `on_token(n, x)` is called after the n-th new token is written (x: the canvas; later slots hold EOS)."""
    if not model.causal:
        raise DreamError("ar_generate decodes causal models; this one is bidirectional (use diffusion_generate)")
    if max_new_tokens < 1 or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise DreamError("ar_generate needs a (batch, length >= 1) prompt and max_new_tokens >= 1")
    B, P = input_ids.shape
    N = P + max_new_tokens
    if N > model.config.context_length:
        raise DreamError(f"prompt + output needs {N} tokens, more than the model's context of "
                         f"{model.config.context_length}")
    eos = model.config.eos_token_id
    fill = eos if eos is not None else 0
    x = torch.full((B, N), fill, dtype=torch.long, device=model.device)
    x[:, :P] = input_ids.to(model.device)
    kv = KVCache(len(model.model.layers)) if use_cache else None
    ended = torch.zeros(B, dtype=torch.bool, device=x.device)
    passes = 0
    for pos in range(P, N):
        if kv is None:
            logits = model(x[:, :pos], select=(torch.arange(B), torch.full((B,), pos - 1)))
        elif pos == P:
            logits = model(x, cache=kv, select=(torch.arange(B), torch.full((B,), pos - 1)))  # prefill
        else:
            logits = model(x[:, pos - 1:pos], cache=kv, start=pos - 1)[:, 0]
        passes += 1
        logits = sampler_logits(logits)
        if temperature > 0:
            token = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
        else:
            token = logits.argmax(-1)
        x[:, pos] = torch.where(ended, torch.full_like(token, fill), token)
        if eos is not None:
            ended |= token == eos
        if on_token is not None:
            on_token(pos - P + 1, x)
        if stop_at_eos and eos is not None and bool(ended.all()):
            break
    return x, passes
