"""The one generation loop as a step machine: Dream's `diffusion_generate`, step for step as the published sampler.

Vocabulary: `x` the canvas (B, N) of ids where `mask_token_id` marks slots still to fill; `logits` (B, N, V) already
shifted so that position j is scored by the model's output at j - 1.

`plan()` checks a request and builds its `DecodeState` (canvas, schedule position, block, cache, generator,
options). Each step, `advance()` runs ONE model forward for every state that has no cache (left-padded to a common
canvas, with per-row attention and positions) and hands each state the logits of its own masked slots;
`DecodeState.step` commits tokens from them. A state reads only its own rows and draws only from its own generator,
so a request gives the same tokens alone or in any batch, and states may join or leave between steps.
`diffusion_generate` is plan -> advance until done, with a single state; every consumer (CLI, benches, infilling,
solvers, the server) goes through it or through `advance`.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dreamlm.errors import DreamError
from dreamlm.model import MIN_MATMUL_ROWS, KVCache, padding_attention, padding_positions
from dreamlm.sampling.options import Alg, CacheMode, SamplerOptions

if TYPE_CHECKING:
    from dreamlm.model import DreamModel

__all__ = ["Alg", "CacheMode", "Constraints", "DecodeState", "DreamGenerationOutput", "SamplerOptions", "advance",
           "compiled", "diffusion_generate", "plan", "sample_tokens", "sampler_logits", "shift_logits"]

TokensHook = Callable[[int | None, torch.Tensor, torch.Tensor | None], torch.Tensor]
LogitsHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
DEFAULT_NEW_TOKENS = 20  # HF's default max_length, counted past the prompt as Dream does
COMPILE_BUCKET = 64  # compiled forwards run on canvases rounded up to a multiple of this (and batches to a power of 2)
COMPILE_GRAPHS = 64  # distinct compiled shapes allowed per model before an error (never a silent eager fallback)
NO_LENGTH_STATES = ("this model has no <|expand|>/<|delete|> tokens (it was trained without DreamOn's length "
                    "states), so it cannot choose a length; give each span's length (<|mask:N|>) or use a model "
                    "trained with objective.length_rate")


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
    slots: torch.Tensor | None = None  # (B, N) the positions the sampler filled (they move when the length changes)
    pad_mask: torch.Tensor | None = None  # (B, N) 0 on left padding (rows of a canvas that changed length), or None


def shift_logits(logits: torch.Tensor) -> torch.Tensor:
    """Re-align AR-convention logits: aligned[:, 0] = logits[:, 0], aligned[:, j] = logits[:, j - 1]."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def sampler_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits as the sampler computes with them: bf16/fp16 upcast to float32 (float32 and float64 unchanged)."""
    # a bf16 model's logits carry 8 significant bits; softmax, entropy, margins, Gumbel draws and the top-p
    # cumulative sum need fp32 so that Dream's semantics (ties, thresholds, the nucleus edge) hold in either precision
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


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


def threshold_scale(alg: Alg, confidence: torch.Tensor) -> torch.Tensor:
    """A confidence on the (0, 1] scale `threshold` is compared with: exp(-entropy) for entropy, else as is."""
    return confidence.exp() if alg is Alg.ENTROPY else confidence


def _check_ids(name: str, ids: "list[int] | torch.Tensor", vocab: int) -> None:
    values = ids.flatten().tolist() if isinstance(ids, torch.Tensor) else list(ids)
    bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < vocab]
    if bad:
        raise DreamError(f"{name} holds {bad[0]!r}, which is not a token id of this model (0..{vocab - 1})")


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DreamError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _canvas_length(prompt_len: int, max_new_tokens: int | None, max_length: int | None, context: int) -> int:
    if max_new_tokens is not None:
        return prompt_len + _positive_int("max_new_tokens", max_new_tokens)
    if max_length is not None:
        return _positive_int("max_length", max_length)
    return min(prompt_len + DEFAULT_NEW_TOKENS, context)


def _generator(device: torch.device, generator: torch.Generator | None, seed: int | None) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise DreamError("give seed or generator, not both (seed makes a fresh generator)")
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise DreamError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        return torch.Generator(device=device).manual_seed(seed)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise DreamError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        gen_device = torch.device(generator.device)
        if gen_device.type != device.type or (gen_device.index or 0) != (device.index or 0):
            raise DreamError(f"the generator is on {gen_device} but the model on {device}; "
                             f"make it with torch.Generator(device='{device}')")
    return generator


def plan(model: "DreamModel", input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
         max_new_tokens: int | None = None, max_length: int | None = None,
         options: SamplerOptions | None = None, num_return_sequences: int = 1,
         constraints: Constraints | None = None, generator: torch.Generator | None = None, seed: int | None = None,
         tokens_hook: TokensHook | None = None, logits_hook: LogitsHook | None = None,
         output_history: bool = False) -> "DecodeState":
    """Check one request and build its decoding state: prompt + masks on a canvas (Dream's padding rules)."""
    options = options or SamplerOptions()
    config = model.config
    mask_id, vocab = config.mask_token_id, config.vocab_size
    if mask_id is None:
        raise DreamError("the model config has no mask_token_id; it is not a diffusion checkpoint (convert it first)")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise DreamError("input_ids must be a (batch, length) tensor of token ids (torch.long)")
    B, prompt_len = input_ids.shape
    if B == 0 or prompt_len == 0:
        raise DreamError("the prompt is empty; give at least one token")
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        _check_ids("input_ids", input_ids, vocab)
    _positive_int("num_return_sequences", num_return_sequences)
    for name, hook in (("generation_tokens_hook_func", tokens_hook), ("generation_logits_hook_func", logits_hook)):
        if hook is not None and not callable(hook):
            raise DreamError(f"{name} must be a function, got {type(hook).__name__}")
    if logits_hook is not None and options.cache is not CacheMode.NONE:
        raise DreamError("a logits hook needs the full canvas's logits; use cache='none'")
    if options.stop_at_eos and config.eos_token_id is None:
        raise DreamError("stop_at_eos needs an eos_token_id in the model config")
    context = config.context_length
    N = _canvas_length(prompt_len, max_new_tokens, max_length, context)
    # a prompt that fills the canvas is fine when it holds masks itself (infilling): there is work to do
    if prompt_len > N or (prompt_len == N and not bool((input_ids == mask_id).any())):
        raise DreamError(f"the prompt has {prompt_len} tokens, which leaves no room in a canvas of {N}; "
                         "raise max_new_tokens or max_length")
    if N > context:
        raise DreamError(f"prompt ({prompt_len} tokens) + output needs {N} tokens, more than the model's "
                         f"context of {context}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            shape = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
            raise DreamError(f"attention_mask has shape {shape}, input_ids {list(input_ids.shape)}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise DreamError("attention_mask must hold only 0 (padding) and 1 (token)")
    if options.length_limit is not None:
        if not config.length_states:
            raise DreamError(NO_LENGTH_STATES)
        if not N <= options.length_limit <= context:
            raise DreamError(f"length_limit ({options.length_limit}) must lie between the canvas's {N} tokens and "
                             f"the model's context of {context}")
        if constraints is not None and constraints.pinned:
            raise DreamError("pinned positions cannot be combined with length_limit: the canvas changes length, "
                             "so positions move")
    device = model.device
    generator = _generator(device, generator, seed)
    input_ids = input_ids.to(device).repeat_interleave(num_return_sequences, dim=0)
    x = F.pad(input_ids, (0, N - prompt_len), value=mask_id)
    pad_mask = None
    if attention_mask is not None and bool((attention_mask == 0).any()):
        pad_mask = F.pad(attention_mask.to(device).long().repeat_interleave(num_return_sequences, dim=0),
                         (0, N - prompt_len), value=1)
    banned = None
    if constraints is not None:
        for pos, token in constraints.pinned.items():
            if not isinstance(pos, int) or isinstance(pos, bool) or not 0 <= pos < N:
                raise DreamError(f"pinned position {pos!r} is outside the canvas of {N} tokens")
            _check_ids(f"pinned position {pos}", [token], vocab)
            if token == mask_id:
                raise DreamError(f"pinned position {pos} holds the mask id; pin real tokens only")
            if bool((x[:, pos] != mask_id).any()):
                raise DreamError(f"pinned position {pos} is a prompt token, not a masked slot; pin only positions "
                                 "the sampler fills")
            x[:, pos] = token
        if constraints.banned_token_ids:
            _check_ids("banned_token_ids", constraints.banned_token_ids, vocab)
            if len(set(constraints.banned_token_ids) | {mask_id}) >= vocab:
                raise DreamError("banned_token_ids leaves no token the sampler may write (every id but the mask "
                                 "is banned)")
            banned = torch.tensor(sorted(set(constraints.banned_token_ids)), device=device)
    if config.length_states and options.length_limit is not None and banned is not None:
        # a canvas that may change length needs the two states (front ends ban them as non-text by default)
        banned = banned[~torch.isin(banned, torch.tensor([config.expand_token_id, config.delete_token_id],
                                                         device=device))]
    if config.length_states and options.length_limit is None:
        # a fixed canvas: the length states are not text (DreamOn also bans expand at a fixed length)
        extra = torch.tensor([config.expand_token_id, config.delete_token_id], device=device)
        banned = extra if banned is None else torch.unique(torch.cat([banned, extra]))
    first_real = pad_mask.argmax(dim=1) if pad_mask is not None else torch.zeros(x.shape[0], dtype=torch.long,
                                                                                     device=device)
    if bool((x.gather(1, first_real[:, None]) == mask_id).any()):
        raise DreamError("the first token of a sequence must not be a mask (it can never be predicted); "
                         "start the prompt with a real token such as BOS")
    pinned = sorted(constraints.pinned) if constraints is not None else []
    return DecodeState(model, x, pad_mask, options, generator, banned, tokens_hook, logits_hook, output_history,
                       pinned)


def _blocks(region: int, N: int, options: SamplerOptions) -> tuple[list[tuple[int, int]], int]:
    """(lo, hi) ranges of the canvas decoded one after the other, and the steps each gets."""
    if options.block_length is None:
        return [(region, N)], options.steps
    blocks = [(lo, min(lo + options.block_length, N)) for lo in range(region, N, options.block_length)]
    blocks = blocks or [(region, N)]
    if options.steps % len(blocks):
        raise DreamError(f"steps ({options.steps}) must be a multiple of the number of blocks ({len(blocks)}); "
                         "change steps or block_length")
    return blocks, options.steps // len(blocks)


def steps_for_blocks(steps: int, region: int, block_length: int | None) -> int:
    """`steps` rounded up to a multiple of the number of blocks a region of `region` tokens splits into (what
    block decoding needs); unchanged without blocks. For callers that default steps to the number of slots."""
    if block_length is None:
        return steps
    blocks = max(-(-region // block_length), 1)
    return -(-steps // blocks) * blocks


class DecodeState:
    """One request's decoding state: canvas, schedule position, block, cache, generator, options and hooks.

    Each step: `prepare()` names the masked slots the step scores (None once done), the caller computes their
    logits (`advance` does, batched with other states), and `step(logits)` commits tokens. Built by `plan()`.
    """

    def __init__(self, model: "DreamModel", x: torch.Tensor, pad_mask: torch.Tensor | None, options: SamplerOptions,
                 generator: torch.Generator | None, banned: torch.Tensor | None, tokens_hook: TokensHook | None,
                 logits_hook: LogitsHook | None, output_history: bool, pinned: Sequence[int] = ()) -> None:
        config = model.config
        self.options = options
        self.mask_id, self.eos_id = config.mask_token_id, config.eos_token_id
        self.expand_id, self.delete_id = config.expand_token_id, config.delete_token_id
        self.causal = model.causal
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        self.pad_id = pad if pad is not None else 0
        self.generator, self.banned = generator, banned
        self.tokens_hook, self.logits_hook = tokens_hook, logits_hook
        self.pad_mask = pad_mask  # (B, N) 0/1 when the prompt is left-padded, else None
        self.attention = self.position_ids = None
        if pad_mask is not None:
            self.position_ids = padding_positions(pad_mask)
            self.attention = padding_attention(pad_mask, model.causal)
        self.x = x
        if tokens_hook is not None:
            self.x = self._checked_canvas(tokens_hook(None, x, None))
        self.slots = self.x == self.mask_id  # the canvas positions this request fills
        self.answer = self.slots.clone()  # where the text may end: the slots and the pinned positions
        self.answer[:, list(pinned)] = True
        masked_cols = self.slots.any(dim=0).nonzero()
        region = int(masked_cols[0]) if len(masked_cols) else x.shape[1]
        self.blocks, self.steps_per_block = _blocks(region, x.shape[1], options)
        ts = torch.linspace(1, options.eps, self.steps_per_block + 1, device=x.device)
        self.ts = ts
        self.ratios = (1 - ts[1:] / ts[:-1]).cpu().numpy()  # float32, exactly Dream's 1 - s/t per step
        self.kv = KVCache(len(model.model.layers)) if options.cache is not CacheMode.NONE else None
        self.history: list[torch.Tensor] | None = [] if output_history else None
        self.block = self.i = self.step_index = self.passes = 0
        self.done = False
        self._mask_index: torch.Tensor | None = None
        self._targets: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def wants_full_logits(self) -> bool:
        """True when a hook needs the whole shifted (B, N, V) logits, not only the masked slots' rows."""
        return self.kv is None and (self.tokens_hook is not None or self.logits_hook is not None)

    @property
    def needs_forward(self) -> bool:
        """True when the prepared step has slots to score or a hook that reads logits (Dream always forwards)."""
        return self._targets is not None and (len(self._targets[0]) > 0 or self.wants_full_logits)

    def prepare(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, cols) of the masked slots this step scores, in row-major order; None once the state is done.

        Vanilla decoding scores every mask on the canvas for exactly `steps` steps, as Dream. With any fast option
        only the active block's masks count, and a block with none left ends (the next one starts at once).
        """
        while not self.done:
            mask_index = self.x == self.mask_id
            if not self.options.vanilla:
                lo, hi = self.blocks[self.block]
                mask_index[:, :lo] = False
                mask_index[:, hi:] = False
            rows, cols = mask_index.nonzero(as_tuple=True)
            if not len(rows) and self.options.length_limit is not None:
                self.done = True  # DreamOn: a canvas with no mask left is finished
                break
            if len(rows) or self.options.vanilla:
                self._mask_index, self._targets = mask_index, (rows, cols)
                return self._targets
            self._next_block()
        self._targets = None
        return None

    def cached_logits(self, model: "DreamModel") -> torch.Tensor:
        """The masked slots' logits (M, V) from this state's own forward with its key/value cache: a full pass at a
        block's first step (and every `refresh_every`), else only the block (and, for "prefix", what follows)."""
        rows, cols = self._targets
        refresh_every = self.options.refresh_every
        if self.i == 0 or (refresh_every is not None and self.i % refresh_every == 0):
            return model(self.x, self.attention, self.position_ids, select=(rows, (cols - 1).clamp(min=0)),
                         cache=self.kv)
        lo, hi = self.blocks[self.block]
        start = lo - 1  # the output at lo - 1 scores the block's first slot
        stop = self.x.shape[1] if self.options.cache is CacheMode.PREFIX else hi
        return model(self.x[:, start:stop], self.attention, self.position_ids, select=(rows, cols - 1 - start),
                     cache=self.kv, start=start)

    def step(self, logits: torch.Tensor | None) -> None:
        """Commit this step's tokens. `logits`: the masked slots' rows (M, V) in `prepare()`'s order, or the whole
        shifted (B, N, V) when `wants_full_logits`, or None when there was nothing to score."""
        rows, cols = self._targets
        full = None
        if logits is not None:
            logits = sampler_logits(logits)  # the one place model logits enter the sampler
        if self.wants_full_logits:
            full = logits
            if self.logits_hook is not None:
                full = self.logits_hook(self.step_index, self.x, full)
                if not isinstance(full, torch.Tensor) or full.shape != logits.shape:
                    raise DreamError("generation_logits_hook_func must return the logits it was given, "
                                     f"a tensor of shape {list(logits.shape)}")
            logits = full[rows, cols]
        if logits is not None and len(rows):
            if self.banned is not None:
                logits = logits.index_fill(-1, self.banned, float("-inf"))
            self._commit(rows, cols, logits)
        if self.options.length_limit is not None:
            self._apply_length_states()
        if self.tokens_hook is not None:
            self.x = self._checked_canvas(self.tokens_hook(self.step_index, self.x, full))
        if self.history is not None:
            self.history.append(self.x.clone())
        self.step_index += 1
        self.i += 1
        if self.options.stop_at_eos and self._finish_at_eos():
            self.done = True
        elif self.i == self.steps_per_block:
            self._next_block()

    def row_ids(self) -> list[list[int]]:
        """Each row's ids without the left padding (rows of a canvas that changed length differ in length)."""
        if self.pad_mask is None:
            return self.x.tolist()
        return [row[keep].tolist() for row, keep in zip(self.x, self.pad_mask.bool())]

    def output(self, return_dict: bool) -> "torch.Tensor | DreamGenerationOutput":
        """The canvas (B, N), or a DreamGenerationOutput with history and forward passes."""
        if return_dict:
            return DreamGenerationOutput(sequences=self.x, history=self.history, forward_passes=self.passes,
                                         slots=self.slots, pad_mask=self.pad_mask)
        return self.x

    # ---- internals --------------------------------------------------------------------------------------------
    def _next_block(self) -> None:
        self.block += 1
        self.i = 0
        self.done = self.block == len(self.blocks)

    def _checked_canvas(self, x: object) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.shape != self.x.shape or x.dtype != torch.long:
            raise DreamError("generation_tokens_hook_func must return the canvas, a torch.long tensor of shape "
                             f"{list(self.x.shape)}; got {type(x).__name__ if not isinstance(x, torch.Tensor) else list(x.shape)}")
        return x

    def _commit_auto(self, rows: torch.Tensor, cols: torch.Tensor, logits: torch.Tensor) -> None:
        """A step of a canvas that may change length: the most confident ceil(masks / steps left) slots per row
        (all on the last step); a row with no room to grow (or on the last step) may not write `<|expand|>`."""
        o = self.options
        B = self.x.shape[0]
        counts = torch.bincount(rows, minlength=B).tolist()
        left = self.steps_per_block - self.i
        last = left == 1
        ks = [c if last else min(c, -(-c // left)) for c in counts]
        lengths = self.pad_mask.sum(dim=1).tolist() if self.pad_mask is not None else [self.x.shape[1]] * B
        full = [last or n + k > o.length_limit for n, k in zip(lengths, ks)]
        if any(full):
            no_room = torch.tensor(full, device=rows.device)[rows]
            logits = logits.clone()
            logits[no_room, self.expand_id] = float("-inf")
        confidence, x0 = sample_tokens(logits, o.temperature, o.top_p, o.top_k, o.alg, self.generator)
        if max(ks) > 0:
            _commit_top(self.x, self._mask_index, rows, cols, confidence, x0, ks, o.alg_temp, self.generator,
                        self.mask_id, None)

    def _apply_length_states(self) -> None:
        """DreamOn's transitions between steps: in each gap (a run of slots) a committed `<|delete|>` is removed
        together with the masks after it in that gap, and a committed `<|expand|>` becomes two masks. Rows that end
        up with different lengths are left-padded (pad_mask), as a batch of prompts is."""
        if not bool(((self.x == self.expand_id) | (self.x == self.delete_id)).any()):
            return
        keep = self.pad_mask.bool() if self.pad_mask is not None else torch.ones_like(self.x, dtype=torch.bool)
        rows, slot_rows = [], []
        for ids, slots in zip(self.x.tolist(), (self.slots & keep).tolist()):
            out, out_slots, deleting = [], [], False
            for token, slot in zip(ids, slots):
                if not slot:
                    deleting = False
                    out.append(token)
                    out_slots.append(False)
                elif token == self.delete_id or (deleting and token == self.mask_id):
                    deleting = True
                elif token == self.expand_id:
                    out += [self.mask_id, self.mask_id]
                    out_slots += [True, True]
                else:
                    out.append(token)
                    out_slots.append(True)
            rows.append(out)
            slot_rows.append(out_slots)
        if self.pad_mask is not None:  # drop the old left padding (pads are never slots)
            for r, (ids, k) in enumerate(zip(self.x.tolist(), keep.tolist())):
                first = k.index(True)
                rows[r], slot_rows[r] = rows[r][first:], slot_rows[r][first:]
        N = max(len(r) for r in rows)
        device = self.x.device
        self.x = torch.tensor([[self.pad_id] * (N - len(r)) + r for r in rows], dtype=torch.long, device=device)
        self.slots = torch.tensor([[False] * (N - len(r)) + r for r in slot_rows], dtype=torch.bool, device=device)
        self.answer = self.slots.clone()
        if all(len(r) == N for r in rows):
            self.pad_mask = self.attention = self.position_ids = None
        else:
            self.pad_mask = torch.tensor([[0] * (N - len(r)) + [1] * len(r) for r in rows], dtype=torch.long,
                                         device=device)
            self.position_ids = padding_positions(self.pad_mask)
            self.attention = padding_attention(self.pad_mask, self.causal)

    def _commit(self, rows: torch.Tensor, cols: torch.Tensor, logits: torch.Tensor) -> None:
        o = self.options
        if o.length_limit is not None:
            self._commit_auto(rows, cols, logits)
            return
        last = self.i == self.steps_per_block - 1
        if o.alg is Alg.ORIGIN:
            # Dream's ancestral step: each slot independently with probability 1 - s/t (1 on the last step)
            t, s = self.ts[self.i], self.ts[self.i + 1]
            p_transfer = 1 - s / t if not last else 1
            x0 = torch.full((len(rows),), self.mask_id, dtype=torch.long, device=self.x.device)
            transfer = torch.rand(x0.shape, device=self.x.device, generator=self.generator) < p_transfer
            if bool(transfer.any()):
                _, x0[transfer] = sample_tokens(logits[transfer], o.temperature, o.top_p, o.top_k, o.alg,
                                                self.generator)
            self.x[rows, cols] = x0
            return
        confidence, x0 = sample_tokens(logits, o.temperature, o.top_p, o.top_k, o.alg, self.generator)
        B = self.x.shape[0]
        counts = torch.bincount(rows, minlength=B).tolist()
        # k = floor(masked * (1 - s/t)) in float32 as Dream computes it, but per row: a row with more masks than
        # the batch mean still finishes on the last step (Dream uses the mean and would leave masks)
        ratio = self.ratios[self.i]
        ks = counts if last else [int(np.float32(c) * ratio) for c in counts]
        above = None
        if o.threshold is not None:
            above = threshold_scale(o.alg, confidence) >= o.threshold
            above_counts = torch.bincount(rows[above], minlength=B).tolist()
            ks = [max(k, a, 1 if c else 0) for k, a, c in zip(ks, above_counts, counts)]
        if max(ks) > 0:
            _commit_top(self.x, self._mask_index, rows, cols, confidence, x0, ks, o.alg_temp, self.generator,
                        self.mask_id, above)

    def _finish_at_eos(self) -> bool:
        """When every row has an EOS in its answer (slots or pinned positions) with no mask before it: EOS into
        every slot after it (pinned tokens stay)."""
        eos_slots = (self.x == self.eos_id) & self.answer
        if not bool(eos_slots.any(dim=1).all()):
            return False
        columns = torch.arange(self.x.shape[1], device=self.x.device)
        first = eos_slots.int().argmax(dim=1, keepdim=True)  # (B, 1)
        if bool(((self.x == self.mask_id) & self.slots & (columns < first)).any()):
            return False
        self.x[self.slots & (columns > first)] = self.eos_id
        return True


def _commit_top(x: torch.Tensor, mask_index: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                confidence: torch.Tensor, x0: torch.Tensor, ks: list[int], alg_temp: float | None,
                generator: torch.Generator | None, mask_id: int, forced: torch.Tensor | None) -> None:
    """Write x0 into ks[r] masked slots of each row r: the most confident (top-k), or drawn from
    softmax(confidence / alg_temp) without replacement; `forced` slots (above a threshold) always among them.
    Committed tokens are never overwritten."""
    B, kmax = x.shape[0], max(ks)
    full_confidence = torch.full(x.shape, -torch.inf, dtype=confidence.dtype, device=x.device)
    full_confidence[rows, cols] = confidence
    proposal = torch.full_like(x, mask_id)
    proposal[rows, cols] = x0
    uniform = min(ks) == kmax
    if alg_temp:
        weights = F.softmax(full_confidence / alg_temp, dim=-1)
        if uniform and forced is None and int((weights > 0).sum(dim=-1).min()) >= kmax:
            chosen = torch.multinomial(weights, kmax, generator=generator)  # Dream's draw
        else:
            _commit_drawn(x, proposal, weights, rows, cols, ks, forced, generator)
            return
    else:
        chosen = torch.topk(full_confidence, kmax).indices  # (B, kmax); ties resolve as torch.topk does
    r = torch.arange(B, device=x.device)[:, None].expand_as(chosen)
    write = mask_index[r, chosen]
    if not uniform:
        write &= torch.arange(kmax, device=x.device)[None] < torch.tensor(ks, device=x.device)[:, None]
    x[r, chosen] = torch.where(write, proposal[r, chosen], x[r, chosen])


def _commit_drawn(x: torch.Tensor, proposal: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor,
                  cols: torch.Tensor, ks: list[int], forced: torch.Tensor | None,
                  generator: torch.Generator | None) -> None:
    """Row by row: the forced slots, then the rest drawn from `weights` without replacement; slots whose weight
    underflowed to 0 are taken in confidence order after the drawable ones run out."""
    for r, k in enumerate(ks):
        if k == 0:
            continue
        picked = cols[(rows == r) & forced] if forced is not None else cols[:0]
        w = weights[r].clone()
        w[picked] = 0
        need = k - len(picked)
        drawable = int((w > 0).sum())
        if need > 0 and drawable:
            picked = torch.cat([picked, torch.multinomial(w, min(need, drawable), generator=generator)])
        if len(picked) < k:  # only zero-weight slots remain: most confident first, as top-k would
            rest = cols[rows == r]
            rest = rest[~torch.isin(rest, picked)]
            picked = torch.cat([picked, rest[: k - len(picked)]])
        x[r, picked] = proposal[r, picked]


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


def _dynamo_limits() -> "object":
    """Within compiled calls: a generous recompile limit that fails loudly instead of falling back to eager."""
    import torch._dynamo.config as dynamo_config

    wanted = {"recompile_limit": COMPILE_GRAPHS, "cache_size_limit": COMPILE_GRAPHS,
              "fail_on_recompile_limit_hit": True}
    present = {k: v for k, v in wanted.items() if hasattr(dynamo_config, k)}
    return dynamo_config.patch(**present) if present else nullcontext()


def bucket_shape(rows: int, length: int, context: int) -> tuple[int, int]:
    """The (batch, canvas) a compiled forward runs at: batch rounded up to a power of two, canvas to a multiple of
    COMPILE_BUCKET (never past the context), so a few graphs serve every request."""
    padded = -(-length // COMPILE_BUCKET) * COMPILE_BUCKET
    return 1 << (rows - 1).bit_length(), max(length, min(padded, context))


def _shared_forward(model: "DreamModel", states: Sequence[DecodeState],
                    compile: "bool | str | Callable") -> list[torch.Tensor]:  # noqa: A002
    """One forward for all the states; returns each state's masked-slot logits (M, V), or its shifted (B, N, V)
    when a hook wants them. Eager: the canvases are packed (`DreamModel.packed_forward`: shared matmuls, each
    canvas its own attention), so a state gets the same logits whatever shares the forward. Compiled: canvases
    left-padded into one static bucket shape (see `_bucket_forward`)."""
    if compile:
        return _bucket_forward(model, states, compile)
    canvases = [(s.x, s.attention, s.position_ids) for s in states]
    total = sum(s.x.numel() for s in states)
    if total < MIN_MATMUL_ROWS:  # a spare canvas so that tiny canvases get the same matmul bits alone or batched
        canvases.append((torch.zeros((1, MIN_MATMUL_ROWS - total), dtype=torch.long, device=states[0].x.device),
                         None, None))
    picks, offset = [], 0
    for s in states:
        B, N = s.x.shape
        if s.wants_full_logits:
            picks.append(torch.arange(offset, offset + B * N, device=s.x.device))
        else:
            rows, cols = s._targets
            picks.append(offset + rows * N + (cols - 1).clamp(min=0))
        offset += B * N
    out = model.packed_forward(canvases, select=torch.cat(picks))
    results = []
    for s, own in zip(states, out.split([len(p) for p in picks])):
        results.append(shift_logits(own.view(*s.x.shape, -1)) if s.wants_full_logits else own)
    return results


def _bucket_forward(model: "DreamModel", states: Sequence[DecodeState],
                    compile: "bool | str | Callable") -> list[torch.Tensor]:  # noqa: A002
    """The compiled forward: every canvas left-padded to one bucketed (rows, length) shape (pads attend to nothing
    real), rows stacked, one static graph per bucket; returns as `_shared_forward`."""
    rows = [s.x.shape[0] for s in states]
    lengths = [s.x.shape[1] for s in states]
    R, N = bucket_shape(sum(rows), max(lengths), model.config.context_length)
    R = max(R, -(-MIN_MATMUL_ROWS // N))
    device = states[0].x.device
    x = torch.zeros((R, N), dtype=torch.long, device=device)
    keep = torch.ones((R, N), dtype=torch.long, device=device)  # spare rows: a sequence of token 0
    top = 0
    for s, b, n in zip(states, rows, lengths):
        x[top:top + b, N - n:] = s.x
        keep[top:top + b, :N - n] = 0
        if s.pad_mask is not None:
            keep[top:top + b, N - n:] = s.pad_mask
        top += b
    attention, positions = padding_attention(keep, model.causal), padding_positions(keep)
    with _dynamo_limits():
        try:
            out = compiled(model, compile)(x, attention, positions)
        except torch._dynamo.exc.FailOnRecompileLimitHit as exc:
            raise DreamError(f"compile: more than {COMPILE_GRAPHS} distinct shapes for this model; "
                             "run without compile") from exc
    results, top = [], 0
    for s, b, n in zip(states, rows, lengths):
        own = shift_logits(out[top:top + b, N - n:])
        results.append(own if s.wants_full_logits else own[s._targets])
        top += b
    return results


def advance(model: "DreamModel", states: Sequence[DecodeState],
            compile: "bool | str | Callable" = False,  # noqa: A002
            on_error: Callable[[DecodeState, Exception], None] | None = None) -> None:
    """One step of every unfinished state: those without a cache share one model forward, whatever their canvas
    lengths (the ones with a cache run their own, since their spans differ); each then commits from its own masked
    slots' logits. A compiled forward groups the canvases by length (its shapes are static).

    With `on_error`, a state whose own work fails (its step, its cached forward) is reported there and the others
    go on (a server keeps serving the rest of the batch); the shared forward failing still raises."""

    def guarded(state: DecodeState, work: Callable[[], None]) -> None:
        if on_error is None:
            work()
            return
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - handed to the caller, who owns the state
            on_error(state, exc)

    def cached_step(state: DecodeState) -> None:
        logits = state.cached_logits(model)
        state.passes += 1
        state.step(logits)

    def shared_step(state: DecodeState, logits: torch.Tensor) -> None:
        state.passes += 1
        state.step(logits)

    shared = []
    for state in states:
        if state.prepare() is None:
            continue
        if state.kv is not None:
            guarded(state, lambda s=state: cached_step(s))
        elif state.needs_forward:
            shared.append(state)
        else:
            guarded(state, lambda s=state: s.step(None))  # nothing masked, no hook: Dream's step changes nothing
    # packing gives every canvas its own attention, so lengths mix freely; a compiled forward pads into a bucket, and
    # a left-padded row's logits can differ in the last bits from the row alone (flipping near-ties), so it keeps
    # one forward per canvas shape
    groups: dict[object, list[DecodeState]] = {}
    for state in shared:
        groups.setdefault((state.x.shape[1], state.pad_mask is not None) if compile else None, []).append(state)
    for group in groups.values():
        for state, logits in zip(group, _shared_forward(model, group, compile)):
            guarded(state, lambda s=state, lg=logits: shared_step(s, lg))


def check_compile(compile: "bool | str | Callable", options: SamplerOptions) -> None:  # noqa: A002
    """Refuse compile settings that cannot work, before any work is done."""
    if compile is False or compile is None:
        return
    if not (compile is True or isinstance(compile, str) or callable(compile)):
        raise DreamError(f"compile must be True, a torch.compile backend name or a backend callable, got {compile!r}")
    if options.cache is not CacheMode.NONE:
        raise DreamError("compile runs static full-canvas forwards; use it with cache='none' "
                         "(block_length, threshold and stop_at_eos are fine)")


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
    length_limit: int | None = None,
) -> "torch.Tensor | DreamGenerationOutput":
    """Dream's masked-diffusion sampler (spec §2); returns ids (B, N) or a DreamGenerationOutput.

    Beyond Dream: `generator` or `seed` make the random draws reproducible (default: torch's global RNG, as Dream);
    `constraints` pins canvas positions and bans ids. Fast options (all off = Dream; see `SamplerOptions`):
    `block_length`, `cache` ("prefix"/"dual") with `refresh_every`, `threshold`, `stop_at_eos`. `compile=True` (or
    a torch.compile backend name/callable) runs every forward through `torch.compile(model, dynamic=False)` on the
    full canvas, batch and canvas rounded up to buckets (masked padding) so a few graphs serve every request; it
    combines with block_length, threshold and stop_at_eos but not with cache (cached spans change shape).
    `length_limit` lets a model with DreamOn's `<|expand|>`/`<|delete|>` tokens grow and shrink the canvas (see
    `SamplerOptions`); rows that end shorter than others come back left-padded with the pad id.
    """
    options = SamplerOptions(steps, eps, temperature, top_p, top_k, alg, alg_temp, block_length, cache,
                             refresh_every, threshold, stop_at_eos, length_limit)
    check_compile(compile, options)
    state = plan(model, input_ids, attention_mask, max_new_tokens, max_length, options, num_return_sequences,
                 constraints, generator, seed, generation_tokens_hook_func, generation_logits_hook_func,
                 output_history=return_dict_in_generate and output_history)
    while not state.done:
        advance(model, [state], compile)
    return state.output(return_dict_in_generate)
