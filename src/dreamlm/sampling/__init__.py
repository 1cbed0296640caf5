"""Sampling: Dream's `diffusion_generate` (the one loop), infilling and constraints."""

from dreamlm.sampling.generate import (
    Alg,
    Constraints,
    DreamGenerationOutput,
    diffusion_generate,
    sample_tokens,
    shift_logits,
)
from dreamlm.sampling.infill import InfillResult, cut_at_eos, infill, json_template, parse_template

__all__ = ["Alg", "Constraints", "DreamGenerationOutput", "InfillResult", "cut_at_eos", "diffusion_generate",
           "infill", "json_template", "parse_template", "sample_tokens", "shift_logits"]
