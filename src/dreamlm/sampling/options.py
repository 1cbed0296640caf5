"""Sampler options: one typed, validated object for everything a decoding request can set.

`diffusion_generate` keeps Dream's argument names and builds a `SamplerOptions` from them; the step machine and the
server take the object itself. Every option is either honoured or refused here with a one-line error: none is
dropped silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from dreamlm.errors import DreamError


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


class CacheMode(str, Enum):
    """Key/value reuse inside a block (Fast-dLLM): none, the finished prefix, or prefix and suffix ("dual")."""

    NONE = "none"
    PREFIX = "prefix"
    DUAL = "dual"


MIN_TEMPERATURE = 1e-6  # below this (but above 0) logits / temperature can overflow to inf and sampling fails


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplerOptions:
    """Dream's sampler settings plus the fast options of the one loop; all fast options off is Dream's sampler.

    Fast options: `block_length` decodes the generated region in blocks, left to right, `steps` split evenly
    (steps must be a multiple of the number of blocks); `cache` ("prefix"/"dual") reuses keys/values from each
    block's first step and, with `refresh_every=k`, every k-th step; `threshold` also commits, at every step, each
    slot of the active block whose confidence reaches it, and at least one slot a step: the schedule's count stays
    the minimum, so `steps` (per block) is still the most passes a block can take and the block ends as soon as it
    has no mask. Confidence on a (0, 1] scale for every alg: p(x0) (`maskgit_plus`), p(1st) - p(2nd)
    (`topk_margin`), exp(-entropy) (`entropy`, the geometric-mean probability). `stop_at_eos` ends once every row's
    text up to its first EOS is complete, then writes EOS into every slot after it.

    `length_limit` (DreamOn, for models with `<|expand|>`/`<|delete|>`): the canvas may change length between
    steps, up to this many tokens: a slot that becomes `<|expand|>` turns into two masks, one that becomes
    `<|delete|>` is removed with the masks after it in the same gap. Each step commits the most confident
    ceil(masks / steps left) slots of a row (one a step when `steps` is large, DreamOn's setting) and decoding ends
    when no mask is left or after `steps` steps (the last step commits every mask, expansion banned).
    """

    steps: int = 512
    eps: float = 1e-3
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    alg: Alg = Alg.ORIGIN
    alg_temp: float | None = None
    block_length: int | None = None
    cache: CacheMode = CacheMode.NONE
    refresh_every: int | None = None
    threshold: float | None = None
    stop_at_eos: bool = False
    length_limit: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "alg", Alg.parse(self.alg))
        try:
            object.__setattr__(self, "cache", CacheMode(self.cache))
        except ValueError:
            raise DreamError(f"unknown cache {self.cache!r}; choose none, prefix or dual") from None
        if not _integer(self.steps) or self.steps < 1:
            raise DreamError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not (_number(self.eps) and 0 < self.eps < 1):
            raise DreamError(f"eps must be in (0, 1), got {self.eps!r}")
        if not (_number(self.temperature) and (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE)):
            raise DreamError(f"temperature must be 0 (argmax) or a finite number >= {MIN_TEMPERATURE} (smaller ones "
                             f"overflow the scaled logits), got {self.temperature!r}")
        if self.top_p is not None and not (_number(self.top_p) and 0 < self.top_p <= 1):
            raise DreamError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and not (_integer(self.top_k) and self.top_k >= 1):
            raise DreamError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.alg_temp is not None and not (_number(self.alg_temp)
                                              and (self.alg_temp == 0 or self.alg_temp >= MIN_TEMPERATURE)):
            raise DreamError(f"alg_temp must be 0 or a finite number >= {MIN_TEMPERATURE} (smaller ones overflow the "
                             f"scaled confidence), got {self.alg_temp!r}")
        if self.block_length is not None and not (_integer(self.block_length) and self.block_length >= 1):
            raise DreamError(f"block_length must be an integer >= 1, got {self.block_length!r}")
        if self.threshold is not None and not (_number(self.threshold) and 0 < self.threshold <= 1):
            raise DreamError(f"threshold must be in (0, 1], got {self.threshold!r}")
        if self.refresh_every is not None and not (_integer(self.refresh_every) and self.refresh_every >= 1):
            raise DreamError(f"refresh_every must be an integer >= 1, got {self.refresh_every!r}")
        if not isinstance(self.stop_at_eos, bool):
            raise DreamError(f"stop_at_eos must be True or False, got {self.stop_at_eos!r}")
        if self.refresh_every is not None and self.cache is CacheMode.NONE:
            raise DreamError("refresh_every refreshes a key/value cache; it needs cache='prefix' or 'dual'")
        if self.length_limit is not None:
            if not (_integer(self.length_limit) and self.length_limit >= 1):
                raise DreamError(f"length_limit must be an integer >= 1, got {self.length_limit!r}")
            if not self.vanilla:
                raise DreamError("a canvas that changes length (length_limit, DreamOn's expand/delete states) runs "
                                 "without block_length, cache, threshold and stop_at_eos: cached keys/values and "
                                 "block bounds would point at moved tokens")
            if self.alg is Alg.ORIGIN:
                raise DreamError("length_limit (automatic length) commits the most confident slots each step, as "
                                 "DreamOn does; use alg entropy, maskgit_plus or topk_margin, not origin")
        if self.threshold is not None and self.alg is Alg.ORIGIN:
            raise DreamError("threshold commits slots by confidence, which alg='origin' does not have; "
                             "use maskgit_plus, topk_margin or entropy")

    @property
    def vanilla(self) -> bool:
        """True when nothing departs from Dream's loop."""
        return (self.block_length is None and self.cache is CacheMode.NONE and self.threshold is None
                and not self.stop_at_eos)
