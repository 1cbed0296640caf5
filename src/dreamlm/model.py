"""DreamModel: the Qwen2 decoder with bidirectional attention (or causal, for AR baselines).

Shape legend: B batch, L sequence (canvas) length, H query heads, K key/value heads, D head dim, E hidden size,
V vocabulary. Parameter names are those of HF `Qwen2ForCausalLM`, verbatim, so AR and Dream checkpoints load as-is.
Logits are *not* shifted here: the output at position i scores the token at i + 1 (see `shift_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dreamlm.config import DreamConfig
from dreamlm.errors import DreamError

if TYPE_CHECKING:
    from dreamlm.sampling.generate import DreamGenerationOutput
    from dreamlm.tokenizer import DreamTokenizer

# CPU BLAS (MKL) rounds the rows of a very small matmul differently from the same rows in a larger one; from 16 rows
# on, a row's result no longer depends on how many rows share the call. The head and the sampler's shared forward
# keep at least this many rows so that a row's logits are the same bits alone or batched.
MIN_MATMUL_ROWS = 16
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like Qwen2."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = h.dtype
        h = h.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_cos_sin(position_ids: torch.Tensor, dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, L, D) for the given positions (B, L)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.int64).float() / dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, L, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, L, D) by the (B, L, D) tables."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass
class Packing:
    """Canvases of different shapes in one forward: their tokens concatenated into one sequence (1, T) for the
    linear layers, attention run per canvas (canvases of one length without a mask share an SDPA call), so each
    canvas attends exactly as it would alone. `spans[i]` = (offset in T, B, N); `masks[i]` (B, 1, N, N) or None."""

    spans: list[tuple[int, int, int]]
    masks: list[torch.Tensor | None]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
               extra: dict[str, Any]) -> torch.Tensor:
        """SDPA over (1, heads, T, D) packed q/k/v, canvas by canvas; returns (1, H, T, D)."""
        def rows(t: torch.Tensor, i: int) -> torch.Tensor:  # canvas i's (B, heads, N, D)
            offset, B, N = self.spans[i]
            return t[0, :, offset:offset + B * N].unflatten(1, (B, N)).transpose(0, 1)

        groups: dict[object, list[int]] = {}
        for i, ((_, _, N), mask) in enumerate(zip(self.spans, self.masks)):
            groups.setdefault(N if mask is None else ("masked", i), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(self.spans)
        for members in groups.values():
            mask = self.masks[members[0]]
            qs, ks, vs = (torch.cat([rows(t, i) for i in members]) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=is_causal and mask is None,
                                               **extra)  # (sum B, H, N, D)
            for i, part in zip(members, o.split([self.spans[i][1] for i in members])):
                out[i] = part.transpose(0, 1).flatten(1, 2)  # (H, B * N, D)
        return torch.cat(out, dim=1)[None]


class Attention(nn.Module):
    """Grouped-query attention through SDPA; q/k/v with bias, o_proj without."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.dim_per_head
        E, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(E, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(E, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(E, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, E, bias=False)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, cache: "LayerCache | None" = None, start: int = 0,
                packing: Packing | None = None) -> torch.Tensor:
        B, L, _ = h.shape
        q = self.q_proj(h).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(h).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, L, D)
        v = self.v_proj(h).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, start)  # (B, K, N, D): cached keys around the fresh span
        if self.n_kv != self.n_heads and not _SDPA_HAS_GQA:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        extra = {"enable_gqa": True} if self.n_kv != self.n_heads and _SDPA_HAS_GQA else {}
        if packing is not None:
            out = packing.attend(q, k, v, is_causal, extra)  # (1, H, T, D)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **extra)  # (B, H, L, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))


class LayerCache:
    """One layer's keys/values for the whole canvas (B, K, N, D): filled by a full pass, then spans overwrite
    their slice and read the rest (positions outside the span are as of the last full pass)."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the span's k/v at `start` and return the keys/values to attend to."""
        if self.k is None or (start == 0 and k.shape[2] == self.k.shape[2]):
            self.k, self.v = k.contiguous(), v.contiguous()  # a full pass: attend to exactly what it computed
            return k, v
        self.k[:, :, start:start + k.shape[2]] = k
        self.v[:, :, start:start + v.shape[2]] = v
        return self.k, self.v


class KVCache:
    """Per-layer caches for block-wise decoding (prefix or dual) and AR decoding."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerCache() for _ in range(num_layers)]

    @property
    def length(self) -> int:
        """Canvas length N held (0 before the first full pass)."""
        k = self.layers[0].k
        return 0 if k is None else k.shape[2]


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(h)) * up(h))."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class DecoderLayer(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, cache: LayerCache | None = None, start: int = 0,
                packing: Packing | None = None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, is_causal, cache, start, packing)
        return h + self.mlp(self.post_attention_layernorm(h))


class DreamBackbone(nn.Module):
    """Embedding, decoder layers and final norm (HF's `model.` prefix)."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def check_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """DreamError unless input_ids is a (B, L) integer tensor of ids in 0..vocab_size-1 (an id past the table
    would be an IndexError on the CPU and a device-side assert, which ends the process, on a GPU)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long,
                                                                                                  torch.int32):
        what = f"a {input_ids.dim()}-d {input_ids.dtype} tensor" if isinstance(input_ids, torch.Tensor) else \
            type(input_ids).__name__
        raise DreamError(f"input_ids must be a (batch, length) tensor of token ids (torch.long), got {what}")
    if torch.compiler.is_compiling() or input_ids.numel() == 0:
        return
    if bool(((input_ids < 0) | (input_ids >= vocab_size)).any()):
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)][0].item()
        raise DreamError(f"input_ids holds {bad}, which is not a token id of this model (0..{vocab_size - 1})")


def padding_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L) for a left-padded 0/1 mask: each row's first real token gets 0, pads a dummy 1."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 1)


def padding_attention(attention_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean attention (B, 1, L, L) from a 0/1 mask: real tokens see real tokens, pads only themselves."""
    keep = attention_mask.bool()
    allowed = keep[:, None, :, None] & keep[:, None, None, :]
    L = attention_mask.shape[-1]
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=keep.device).tril()
    # a pad row with no allowed key would give NaN from softmax; letting it see itself keeps it finite and harmless
    return allowed | torch.eye(L, dtype=torch.bool, device=keep.device)


class DreamModel(nn.Module):
    """Dream (bidirectional Qwen2) language model: `forward(x) -> logits (B, L, V)` and `diffusion_generate`."""

    def __init__(self, config: DreamConfig, causal: bool | None = None) -> None:
        super().__init__()
        self.config = config
        self.causal = config.causal if causal is None else causal
        self.model = DreamBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.tokenizer: DreamTokenizer | None = None  # set by from_pretrained when the directory has one
        self.activation_checkpointing = False  # recompute each block in backward (training memory for time)

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the parameters."""
        return self.lm_head.weight.dtype

    def init_weights(self, seed: int | None = None) -> "DreamModel":
        """Random init as HF does (normal(0, initializer_range), zero biases, unit norms)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    w = torch.empty(module.weight.shape).normal_(0.0, std, generator=gen)
                    module.weight.copy_(w)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
                elif isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                select: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Logits (B, L, V) for ids (B, L); with `select=(rows, cols)` only those positions' logits (M, V).

        `attention_mask` is a left-padding 0/1 mask (B, L) or a prepared boolean mask (B, 1, L, L); with a 0/1
        mask and no `position_ids`, positions restart at each row's first real token. `select` saves the head's
        cost where a loss needs few positions (it is an argument, not a method, so FSDP's hooks still run).
        With `cache`, a full pass (start 0, the whole canvas) fills it; afterwards `input_ids` may be a span
        x[:, start:start + S] that attends to the cached canvas (masks and positions still given for all N).
        """
        if cache is not None and cache.length and not (start == 0 and input_ids.shape[1] == cache.length):
            return self._span_forward(input_ids, attention_mask, position_ids, select, cache, start)
        check_ids(input_ids, self.config.vocab_size)
        B, L = input_ids.shape
        if L > self.config.context_length:
            raise DreamError(f"the input has {L} tokens, more than the model's context of {self.config.context_length}")
        mask, is_causal = None, self.causal
        if attention_mask is not None and attention_mask.dim() == 2:
            if bool((attention_mask == 0).any()):
                if position_ids is None:
                    position_ids = padding_positions(attention_mask)
                mask, is_causal = padding_attention(attention_mask, self.causal), False
        elif attention_mask is not None:
            mask, is_causal = attention_mask.bool(), False
            if self.causal:
                mask = mask & torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device).expand(B, L)
        h = self.model.embed_tokens(input_ids)  # (B, L, E)
        cos, sin = rope_cos_sin(position_ids, self.config.dim_per_head, self.config.rope_theta, h.dtype)
        for i, layer in enumerate(self.model.layers):
            if self.activation_checkpointing and self.training:
                h = checkpoint(layer, h, cos, sin, mask, is_causal, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, is_causal, None if cache is None else cache.layers[i])
        return self._head(h, select)

    def packed_forward(self, canvases: Sequence[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]],
                       select: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for several canvases of different shapes in one forward: `canvases` holds (ids (B, N), prepared
        boolean attention (B, 1, N, N) or None, position ids (B, N) or None) each; the result is the logits of the
        concatenated rows (T, V), T = sum of B * N in order, or only rows `select` (M,) of them. Each canvas's
        logits are those it gets alone (same matmul rows, its own attention call), as long as T >= MIN_MATMUL_ROWS
        alone too."""
        spans, masks, ids, positions, offset = [], [], [], [], 0
        for x, mask, position_ids in canvases:
            check_ids(x, self.config.vocab_size)
            B, N = x.shape
            if N > self.config.context_length:
                raise DreamError(f"the input has {N} tokens, more than the model's context of "
                                 f"{self.config.context_length}")
            spans.append((offset, B, N))
            masks.append(None if mask is None else mask.bool())
            ids.append(x.reshape(-1))
            if position_ids is None:
                position_ids = torch.arange(N, device=x.device).expand(B, N)
            positions.append(position_ids.reshape(-1))
            offset += B * N
        packing = Packing(spans, masks)
        h = self.model.embed_tokens(torch.cat(ids)[None])  # (1, T, E)
        cos, sin = rope_cos_sin(torch.cat(positions)[None], self.config.dim_per_head, self.config.rope_theta, h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin, None, self.causal, packing=packing)
        return self._head(h[0], None if select is None else (select,))

    def _span_forward(self, span_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      position_ids: torch.Tensor | None, select: tuple[torch.Tensor, torch.Tensor] | None,
                      cache: KVCache, start: int) -> torch.Tensor:
        B, S = span_ids.shape
        N = cache.length
        device = span_ids.device
        mask = None
        if attention_mask is not None:
            if attention_mask.dim() == 2:
                attention_mask = padding_attention(attention_mask, False)
            mask = attention_mask[:, :, start:start + S].bool()  # (B, 1, S, N)
        if self.causal:
            rows = torch.arange(start, start + S, device=device)[:, None] >= torch.arange(N, device=device)[None]
            mask = rows[None, None] if mask is None else mask & rows
        if position_ids is None:
            position_ids = torch.arange(start, start + S, device=device).expand(B, S)
        else:
            position_ids = position_ids[:, start:start + S]
        h = self.model.embed_tokens(span_ids)  # (B, S, E)
        cos, sin = rope_cos_sin(position_ids, self.config.dim_per_head, self.config.rope_theta, h.dtype)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, mask, False, cache.layers[i], start)
        return self._head(h, select)

    def _head(self, h: torch.Tensor, select: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        h = self.model.norm(h)
        if select is not None:
            h = h[select]  # (M, E)
            M = h.shape[0]
            if 0 < M < MIN_MATMUL_ROWS:
                return self.lm_head(F.pad(h, (0, 0, 0, MIN_MATMUL_ROWS - M)))[:M]
        return self.lm_head(h)  # (B, L, V) or (M, V)

    def num_parameters(self) -> int:
        """Number of distinct parameters (a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    # ---- checkpoints (see checkpoint.py) -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, causal: bool | None = None) -> "DreamModel":
        """Load a HF-format Dream (or Qwen2) directory, materialising each tensor straight into place."""
        from dreamlm.checkpoint import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device, causal=causal)

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB",
                        tokenizer: "DreamTokenizer | None" = None) -> None:
        """Write config, generation config, (sharded) safetensors and tokenizer files, each atomically."""
        from dreamlm.checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size, tokenizer=tokenizer or self.tokenizer)

    # ---- sampling (see sampling/generate.py) ---------------------------------------------------------------
    def diffusion_generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           **kwargs: Any) -> "torch.Tensor | DreamGenerationOutput":
        """Dream's sampler; arguments and semantics as `dreamlm.sampling.diffusion_generate`."""
        from dreamlm.sampling.generate import diffusion_generate

        return diffusion_generate(self, input_ids, attention_mask, **kwargs)

