"""The one generation loop: Dream's `diffusion_generate`, step for step as the published sampler.

Vocabulary: `x` the canvas (B, N) of ids where `mask_token_id` marks slots still to fill; `logits` (B, N, V) already
shifted so that position j is scored by the model's output at j - 1. Each step runs one forward pass over the whole
canvas and commits some masked slots; every consumer (CLI, benches, infilling) calls this function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from dreamlm.errors import DreamError
from dreamlm.model import KVCache, padding_attention, padding_positions

if TYPE_CHECKING:
    from dreamlm.model import DreamModel

TokensHook = Callable[[int | None, torch.Tensor, torch.Tensor | None], torch.Tensor]
LogitsHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
DEFAULT_NEW_TOKENS = 20  # HF's default max_length, counted past the prompt as Dream does


class Alg(str, Enum):
    """How a step chooses which masked slots to commit."""

    ORIGIN = "origin"  # each slot independently with probability 1 - s/t (ancestral, random order)
    MASKGIT_PLUS = "maskgit_plus"  # top-k by p(x0)
    TOPK_MARGIN = "topk_margin"  # top-k by p(1st) - p(2nd)
    ENTROPY = "entropy"  # top-k by negative entropy

    @classmethod
    def parse(cls, alg: "str | Alg") -> "Alg":
        """An Alg from its name, with a clear error for unknown names."""
        try:
            return cls(alg)
        except ValueError:
            raise DreamError(f"unknown alg {alg!r}; choose one of {', '.join(a.value for a in cls)}") from None


@dataclass
class Constraints:
    """Control beyond Dream's API: canvas positions pinned to ids, and ids the sampler may never write."""

    pinned: dict[int, int] = field(default_factory=dict)
    banned_token_ids: list[int] = field(default_factory=list)


@dataclass
class DreamGenerationOutput:
    """`sequences` (B, N) and, with `output_history`, the canvas after every step."""

    sequences: torch.Tensor
    history: list[torch.Tensor] | None = None
    forward_passes: int = 0


def shift_logits(logits: torch.Tensor) -> torch.Tensor:
    """Re-align AR-convention logits: aligned[:, 0] = logits[:, 0], aligned[:, j] = logits[:, j - 1]."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def top_p_logits(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of top tokens whose probability reaches top_p (the first always kept)."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()  # shift right: the token that crosses top_p stays
    remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_idx, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def top_k_logits(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep tokens whose logit is at least the k-th largest."""
    top_k = min(top_k, logits.size(-1))
    kth = torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def sample_tokens(logits: torch.Tensor, temperature: float = 0.0, top_p: float | None = None,
                  top_k: int | None = None, alg: Alg = Alg.MASKGIT_PLUS,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose x0 for each row of logits (M, V) and return (confidence (M,), x0 (M,)) for the alg."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        # the same draw as torch.distributions.Categorical(probs).sample(): normalise, one multinomial per row
        x0 = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, replacement=True, generator=generator)
        confidence = torch.gather(probs, -1, x0).squeeze(-1)
        x0 = x0.squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if alg is Alg.TOPK_MARGIN:
        top2 = probs.topk(2, dim=-1).values
        confidence = top2[:, 0] - top2[:, 1]
    elif alg is Alg.ENTROPY:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


@dataclass
class GenerationPlan:
    """Checked settings and the prepared canvas, attention and positions for one call."""

    x: torch.Tensor
    attention: torch.Tensor | None
    position_ids: torch.Tensor | None
    alg: Alg
    mask_token_id: int


def _check_settings(steps: int, eps: float, temperature: float, top_p: float | None, top_k: int | None,
                    alg_temp: float | None, num_return_sequences: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise DreamError(f"steps must be an integer >= 1, got {steps!r}")
    if not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise DreamError(f"eps must be in (0, 1), got {eps!r}")
    if not (isinstance(temperature, (int, float)) and temperature >= 0 and math.isfinite(temperature)):
        raise DreamError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise DreamError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1):
        raise DreamError(f"top_k must be an integer >= 1, got {top_k!r}")
    if alg_temp is not None and not (isinstance(alg_temp, (int, float)) and alg_temp >= 0 and math.isfinite(alg_temp)):
        raise DreamError(f"alg_temp must be a finite number >= 0, got {alg_temp!r}")
    if not (isinstance(num_return_sequences, int) and num_return_sequences >= 1):
        raise DreamError(f"num_return_sequences must be an integer >= 1, got {num_return_sequences!r}")


def plan_generation(model: "DreamModel", input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    max_new_tokens: int | None, max_length: int | None, alg: "str | Alg",
                    num_return_sequences: int, constraints: Constraints | None) -> GenerationPlan:
    """Validate the prompt and lengths, then build the canvas: prompt + masks (Dream's padding rules)."""
    alg = Alg.parse(alg)
    mask_id = model.config.mask_token_id
    if mask_id is None:
        raise DreamError("the model config has no mask_token_id; it is not a diffusion checkpoint (convert it first)")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise DreamError("input_ids must be a (batch, length) tensor of token ids (torch.long)")
    B, prompt_len = input_ids.shape
    if B == 0 or prompt_len == 0:
        raise DreamError("the prompt is empty; give at least one token")
    context = model.config.context_length
    if max_new_tokens is not None:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise DreamError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        N = prompt_len + max_new_tokens
    elif max_length is not None:
        if not isinstance(max_length, int) or max_length < 1:
            raise DreamError(f"max_length must be an integer >= 1, got {max_length!r}")
        N = max_length
    else:
        N = min(prompt_len + DEFAULT_NEW_TOKENS, context)
    # a prompt that fills the canvas is fine when it holds masks itself (infilling): there is work to do
    if prompt_len > N or (prompt_len == N and not bool((input_ids == mask_id).any())):
        raise DreamError(f"the prompt has {prompt_len} tokens, which leaves no room in a canvas of {N}; "
                         "raise max_new_tokens or max_length")
    if N > context:
        raise DreamError(f"prompt ({prompt_len} tokens) + output needs {N} tokens, more than the model's "
                         f"context of {context}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise DreamError(f"attention_mask has shape {list(attention_mask.shape)}, input_ids {list(input_ids.shape)}")
    device = model.device
    input_ids = input_ids.to(device).repeat_interleave(num_return_sequences, dim=0)
    x = F.pad(input_ids, (0, N - prompt_len), value=mask_id)
    attention = position_ids = None
    if attention_mask is not None:
        attention_mask = attention_mask.to(device).repeat_interleave(num_return_sequences, dim=0)
    if attention_mask is not None and bool((attention_mask == 0).any()):
        full = F.pad(attention_mask, (0, N - prompt_len), value=1)
        position_ids = padding_positions(full)
        attention = padding_attention(full, model.causal)
        first_real = full.long().argmax(dim=1)
    else:
        first_real = torch.zeros(x.shape[0], dtype=torch.long, device=device)
    if constraints is not None:
        for pos, token in constraints.pinned.items():
            if not 0 <= pos < N:
                raise DreamError(f"pinned position {pos} is outside the canvas of {N} tokens")
            x[:, pos] = token
    if bool((x.gather(1, first_real[:, None]) == mask_id).any()):
        raise DreamError("the first token of a sequence must not be a mask (it can never be predicted); "
                         "start the prompt with a real token such as BOS")
    return GenerationPlan(x, attention, position_ids, alg, mask_id)


class CacheMode(str, Enum):
    """Key/value reuse inside a block (Fast-dLLM): none, the finished prefix, or prefix and suffix ("dual")."""

    NONE = "none"
    PREFIX = "prefix"
    DUAL = "dual"


@dataclass
class FastOptions:
    """Speed options of the one loop; all off reproduces Dream's sampler exactly."""

    block_length: int | None = None  # semi-autoregressive blocks over the generated region
    cache: CacheMode = CacheMode.NONE  # reuse keys/values computed at the block's first step
    refresh_every: int | None = None  # also refresh the cache every k steps inside a block
    threshold: float | None = None  # commit every masked slot with p(x0) >= threshold (at least one per step)
    stop_at_eos: bool = False  # stop once each row's text up to its first EOS is complete

    def __post_init__(self) -> None:
        try:
            self.cache = CacheMode(self.cache)
        except ValueError:
            raise DreamError(f"unknown cache {self.cache!r}; choose none, prefix or dual") from None
        if self.block_length is not None and (not isinstance(self.block_length, int) or self.block_length < 1):
            raise DreamError(f"block_length must be an integer >= 1, got {self.block_length!r}")
        if self.threshold is not None and not (isinstance(self.threshold, (int, float)) and 0 < self.threshold <= 1):
            raise DreamError(f"threshold must be in (0, 1], got {self.threshold!r}")
        if self.refresh_every is not None and (not isinstance(self.refresh_every, int) or self.refresh_every < 1):
            raise DreamError(f"refresh_every must be an integer >= 1, got {self.refresh_every!r}")

    @property
    def vanilla(self) -> bool:
        """True when nothing departs from Dream's loop."""
        return (self.block_length is None and self.cache is CacheMode.NONE and self.threshold is None
                and not self.stop_at_eos)


def compiled(model: "DreamModel", backend: "bool | str | Callable" = True) -> Callable:
    """`torch.compile(model, dynamic=False)` (inductor for True, else the given backend), made once per model and
    backend and kept while the model lives."""
    key = "inductor" if backend is True else backend
    if not (isinstance(key, str) or callable(key)):
        raise DreamError(f"compile must be True, a torch.compile backend name or a backend callable, got {key!r}")
    per_model = model.__dict__.get("_compiled_forwards")
    if per_model is None:  # a plain attribute: the compiled wrapper must not register as a submodule
        per_model = {}
        object.__setattr__(model, "_compiled_forwards", per_model)
    if key not in per_model:
        per_model[key] = torch.compile(model, dynamic=False, backend=key)
    return per_model[key]


def _blocks(x: torch.Tensor, mask_id: int, fast: FastOptions, steps: int) -> tuple[list[tuple[int, int]], int]:
    """(lo, hi) ranges of the canvas decoded one after the other, and the steps each gets."""
    N = x.shape[1]
    masked_cols = (x == mask_id).any(dim=0).nonzero()
    region = int(masked_cols[0]) if len(masked_cols) else N
    if fast.block_length is None:
        return [(region, N)], steps
    blocks = [(lo, min(lo + fast.block_length, N)) for lo in range(region, N, fast.block_length)] or [(region, N)]
    if fast.threshold is None and steps % len(blocks):
        raise DreamError(f"steps ({steps}) must be a multiple of the number of blocks ({len(blocks)}); "
                         "change steps or block_length")
    return blocks, steps // len(blocks) if fast.threshold is None else fast.block_length


def _finished(x: torch.Tensor, mask_id: int, eos_id: int, region: int) -> bool:
    """True when every row has an EOS in the generated region with no mask before it."""
    gen = x[:, region:]
    is_eos = gen == eos_id
    if not bool(is_eos.any(dim=1).all()):
        return False
    first = is_eos.int().argmax(dim=1)  # (B,)
    before = torch.arange(gen.shape[1], device=x.device)[None] < first[:, None]
    return not bool(((gen == mask_id) & before).any())


@torch.no_grad()
def diffusion_generate(
    model: "DreamModel",
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    steps: int = 512,
    eps: float = 1e-3,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    alg: "str | Alg" = "origin",
    alg_temp: float | None = None,
    output_history: bool = False,
    return_dict_in_generate: bool = False,
    num_return_sequences: int = 1,
    generation_tokens_hook_func: TokensHook | None = None,
    generation_logits_hook_func: LogitsHook | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    constraints: Constraints | None = None,
    block_length: int | None = None,
    cache: "str | CacheMode" = "none",
    refresh_every: int | None = None,
    threshold: float | None = None,
    stop_at_eos: bool = False,
    compile: "bool | str | Callable" = False,  # noqa: A002 - the natural name; shadows the builtin only here
) -> "torch.Tensor | DreamGenerationOutput":
    """Dream's masked-diffusion sampler (spec §2); returns ids (B, N) or a DreamGenerationOutput.

    Beyond Dream: `generator`/`seed` make the random draws reproducible (default: torch's global RNG, as Dream);
    `constraints` pins canvas positions and bans ids. Speed options (all off = Dream): `block_length` decodes the
    generated region in blocks (steps split evenly); `cache` ("prefix"/"dual") reuses keys/values from each block's
    first step (and every `refresh_every` steps); `threshold` commits every slot of the block with p(x0) >= it, at
    least one per step (steps then only bound each block); `stop_at_eos` ends once each row's text up to its first
    EOS is complete and fills the rest with EOS (the text cut at the first EOS is unchanged). `compile=True` (or a
    torch.compile backend name/callable) runs every forward through `torch.compile(model, dynamic=False)` on the
    full canvas: shapes are static, so it compiles once per (batch, canvas length) and is reused across calls; it
    combines with block_length, threshold and stop_at_eos but not with cache (cached spans change shape).
    """
    _check_settings(steps, eps, temperature, top_p, top_k, alg_temp, num_return_sequences)
    fast = FastOptions(block_length, cache, refresh_every, threshold, stop_at_eos)
    if fast.cache is not CacheMode.NONE and generation_logits_hook_func is not None:
        raise DreamError("a logits hook needs the full canvas's logits; use cache='none'")
    plan = plan_generation(model, input_ids, attention_mask, max_new_tokens, max_length, alg, num_return_sequences,
                           constraints)
    x, alg, mask_id = plan.x, plan.alg, plan.mask_token_id
    forward, position_ids = model, plan.position_ids
    if compile:
        if fast.cache is not CacheMode.NONE:
            raise DreamError("compile runs static full-canvas forwards; use it with cache='none' "
                             "(block_length, threshold and stop_at_eos are fine)")
        forward = compiled(model, compile)
        if position_ids is None:  # explicit positions: the forward then has no data-dependent branch
            position_ids = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    eos_id = model.config.eos_token_id
    if fast.stop_at_eos and eos_id is None:
        raise DreamError("stop_at_eos needs an eos_token_id in the model config")
    if seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(seed)
    banned = None
    if constraints is not None and constraints.banned_token_ids:
        banned = torch.tensor(sorted(set(constraints.banned_token_ids)), device=x.device)
    histories: list[torch.Tensor] | None = [] if (return_dict_in_generate and output_history) else None
    if generation_tokens_hook_func is not None:
        x = generation_tokens_hook_func(None, x, None)
    blocks, steps_per_block = _blocks(x, mask_id, fast, steps)
    region = blocks[0][0]
    kv = KVCache(len(model.model.layers)) if fast.cache is not CacheMode.NONE else None
    rows = torch.arange(x.shape[0], device=x.device)
    columns = torch.arange(x.shape[1], device=x.device)
    step = passes = 0
    done = False
    for lo, hi in blocks:
        in_block = (columns >= lo) & (columns < hi)
        timesteps = torch.linspace(1, eps, steps_per_block + 1, device=x.device)
        for i in range(steps_per_block):
            mask_index = x == mask_id  # (B, N)
            if not fast.vanilla:
                mask_index &= in_block
                if not bool(mask_index.any()):
                    break  # this block is complete (Dream's own loop would spend its steps regardless)
            b, j = mask_index.nonzero(as_tuple=True)
            refresh = kv is None or i == 0 or (fast.refresh_every is not None and i % fast.refresh_every == 0)
            logits = None
            if refresh:
                raw = forward(x, plan.attention, position_ids, cache=kv)  # (B, N, V), unshifted
                if generation_logits_hook_func is not None or (generation_tokens_hook_func is not None and kv is None):
                    logits = shift_logits(raw)
                    if generation_logits_hook_func is not None:
                        logits = generation_logits_hook_func(step, x, logits)
                    mask_logits = logits[mask_index]  # (M, V)
                else:
                    # no hook needs the whole shifted tensor: read the masked rows straight from raw (no copy)
                    mask_logits = raw[b, (j - 1).clamp(min=0)]
            else:
                # recompute only from the position before the block (its output scores the block's first slot)
                start = lo - 1
                stop = x.shape[1] if fast.cache is CacheMode.PREFIX else hi
                mask_logits = model(x[:, start:stop], plan.attention, plan.position_ids, select=(b, j - 1 - start),
                                    cache=kv, start=start)
            passes += 1
            if banned is not None:
                mask_logits = mask_logits.index_fill(-1, banned, float("-inf"))
            if fast.threshold is not None:
                _commit_above_threshold(x, mask_index, mask_logits, fast.threshold, temperature, top_p, top_k,
                                        generator)
            else:
                _commit_scheduled(x, mask_id, mask_index, mask_logits, timesteps[i], timesteps[i + 1],
                                  i == steps_per_block - 1,
                                  alg, temperature, top_p, top_k, alg_temp, generator, rows)
            if generation_tokens_hook_func is not None:
                x = generation_tokens_hook_func(step, x, logits)
            if histories is not None:
                histories.append(x.clone())
            step += 1
            if fast.stop_at_eos and _finished(x, mask_id, eos_id, region):
                x[:, region:] = torch.where(x[:, region:] == mask_id, eos_id, x[:, region:])
                done = True
                break
        if done:
            break
    if return_dict_in_generate:
        return DreamGenerationOutput(sequences=x, history=histories, forward_passes=passes)
    return x


def _commit_scheduled(x: torch.Tensor, mask_id: int, mask_index: torch.Tensor, mask_logits: torch.Tensor,
                      t: torch.Tensor,
                      s: torch.Tensor, last: bool, alg: Alg, temperature: float, top_p: float | None,
                      top_k: int | None, alg_temp: float | None, generator: torch.Generator | None,
                      rows: torch.Tensor) -> None:
    """Dream's step: commit slots by the schedule 1 - s/t (origin: each slot at random; others: top-k)."""
    if mask_logits.shape[0] == 0:
        return  # nothing masked: Dream's step draws nothing and changes nothing
    if alg is Alg.ORIGIN:
        p_transfer = 1 - s / t if not last else 1
        x0 = torch.full((mask_logits.shape[0],), mask_id, dtype=torch.long, device=x.device)
        transfer = torch.rand(x0.shape, device=x.device, generator=generator) < p_transfer
        if bool(transfer.any()):
            _, x0[transfer] = sample_tokens(mask_logits[transfer], temperature, top_p, top_k, alg, generator)
        x[mask_index] = x0
        return
    confidence, x0 = sample_tokens(mask_logits, temperature, top_p, top_k, alg, generator)
    mean_masked = mask_index.sum() / mask_index.shape[0]
    k = int(mean_masked * (1 - s / t)) if not last else int(mean_masked)
    if k > 0:
        full_confidence = torch.full(x.shape, -torch.inf, dtype=mask_logits.dtype, device=x.device)
        full_confidence[mask_index] = confidence
        if not alg_temp:
            chosen = torch.topk(full_confidence, k).indices  # (B, k); ties resolve as torch.topk does
        else:
            chosen = torch.multinomial(F.softmax(full_confidence / alg_temp, dim=-1), k, generator=generator)
        proposal = torch.full_like(x, mask_id)
        proposal[mask_index] = x0
        r = rows[:, None].expand_as(chosen)
        # a row with fewer masks than k (uneven batches) keeps its committed tokens
        x[r, chosen] = torch.where(mask_index[r, chosen], proposal[r, chosen], x[r, chosen])


def _commit_above_threshold(x: torch.Tensor, mask_index: torch.Tensor, mask_logits: torch.Tensor, threshold: float,
                            temperature: float, top_p: float | None, top_k: int | None,
                            generator: torch.Generator | None) -> None:
    """Parallel decoding: commit every slot whose p(x0) >= threshold, and each row's most confident slot."""
    confidence, x0 = sample_tokens(mask_logits, temperature, top_p, top_k, Alg.MASKGIT_PLUS, generator)
    full = torch.full(x.shape, -1.0, dtype=torch.float32, device=x.device)
    full[mask_index] = confidence.float()
    proposal = torch.zeros_like(x)
    proposal[mask_index] = x0
    commit = full >= threshold
    best = full.argmax(dim=1)
    has_mask = mask_index.any(dim=1)
    commit[torch.arange(x.shape[0], device=x.device)[has_mask], best[has_mask]] = True
    commit &= mask_index
    x[commit] = proposal[commit]
