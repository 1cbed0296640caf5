"""Sampling: Dream's `diffusion_generate` (the one loop, a step machine), infilling and constraints."""

from dreamlm.sampling.generate import (
    Alg,
    CacheMode,
    Constraints,
    DecodeState,
    DreamGenerationOutput,
    SamplerOptions,
    advance,
    diffusion_generate,
    plan,
    sample_tokens,
    shift_logits,
    steps_for_blocks,
)
from dreamlm.sampling.infill import InfillResult, cut_at_eos, infill, json_template, parse_template

__all__ = ["Alg", "CacheMode", "Constraints", "DecodeState", "DreamGenerationOutput", "InfillResult", "SamplerOptions",
           "advance", "cut_at_eos", "diffusion_generate", "infill", "json_template", "parse_template", "plan",
           "sample_tokens", "shift_logits", "steps_for_blocks"]
