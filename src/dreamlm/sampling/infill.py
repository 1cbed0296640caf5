"""Infilling and format templates: mask spans anywhere in a fixed canvas; the rest is context, never touched.

Template syntax: `<|mask|>` is one token to fill, `<|mask:N|>` is N tokens to fill. Everything else is tokenized as
written (special tokens such as `<|im_start|>` included) and stays byte-identical in the result.

Automatic length (DreamOn; models trained with the `<|expand|>`/`<|delete|>` states): `<|mask:auto|>` is a span
whose length the model chooses, starting from AUTO_START masks; `<|mask:auto:N|>` starts from N. `infill(...,
length="auto")` reads every span so (`<|mask|>` from AUTO_START masks, `<|mask:N|>` from N). Each span may then
grow to `max_span` tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from dreamlm.errors import DreamError
from dreamlm.sampling.generate import NO_LENGTH_STATES, Constraints, diffusion_generate

if TYPE_CHECKING:
    from dreamlm.model import DreamModel
    from dreamlm.tokenizer import DreamTokenizer

MASK_SPAN = re.compile(r"<\|mask(?::(auto)(?::(\d+))?|:(\d+))?\|>")
MAX_SPAN = 4096
AUTO_START = 4  # masks an automatic-length span starts from (DreamOn's default initial length)
AUTO_MAX_SPAN = 64  # tokens an automatic-length span may grow to (DreamOn's max_gen_len)


@dataclass
class Template:
    """A tokenized template: canvas ids with mask slots, and the (start, end) of each span."""

    ids: list[int]
    spans: list[tuple[int, int]]
    auto: bool = False  # the spans' lengths are starting points the model may change


@dataclass
class InfillResult:
    """The filled canvas, its text, and the text generated for each span."""

    ids: list[int]
    text: str
    fills: list[str]
    spans: list[tuple[int, int]]


def parse_template(tokenizer: "DreamTokenizer", template: str, mask_token_id: int,
                   bos_token_id: int | None = None, auto: bool = False) -> Template:
    """Tokenize a template, expanding `<|mask:N|>` into N mask slots; prepend BOS if it starts with a mask.
    `<|mask:auto|>` spans (or every span, with `auto`) make an automatic-length template."""
    unknown = [m for m in tokenizer.unknown_specials(template) if not MASK_SPAN.fullmatch(m)]
    if unknown:
        raise DreamError(f"unknown special token {unknown[0]} in the template (mask spans are <|mask|>, <|mask:N|>, "
                         "<|mask:auto|> or <|mask:auto:N|>)")
    matches = list(MASK_SPAN.finditer(template))
    marked = [m.group(1) is not None for m in matches]
    if any(marked) and not all(marked) and not auto:
        raise DreamError("the template mixes <|mask:auto|> spans with fixed ones; a canvas either keeps its length "
                         "or lets the model change every span (write every span as <|mask:auto|> or <|mask:auto:N|>)")
    auto = auto or any(marked)
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for match in matches:
        if match.start() > pos:
            ids.extend(tokenizer.encode(template[pos:match.start()]))
        given = match.group(2) or match.group(3)
        n = int(given) if given is not None else (AUTO_START if auto else 1)
        if not 1 <= n <= MAX_SPAN:
            raise DreamError(f"{match.group(0)}: a span needs 1..{MAX_SPAN} tokens")
        spans.append((len(ids), len(ids) + n))
        ids.extend([mask_token_id] * n)
        pos = match.end()
    if pos < len(template):
        ids.extend(tokenizer.encode(template[pos:]))
    if not spans:
        raise DreamError("the template has no mask span; mark what to fill with <|mask|> or <|mask:N|>")
    if ids[0] == mask_token_id:
        if bos_token_id is None:
            raise DreamError("the template starts with a mask, which can never be predicted, and this model has "
                             "no BOS token to put before it; start the template with some text")
        ids.insert(0, bos_token_id)
        spans = [(a + 1, b + 1) for a, b in spans]
    return Template(ids, spans, auto)


def json_template(fields: dict[str, int | str]) -> str:
    """A JSON-object template: each value is a masked span (an int is its token count) or fixed text."""
    if not isinstance(fields, dict):
        raise DreamError(f"json_template takes a dict of field name -> token count or text, got "
                         f"{type(fields).__name__}")
    parts = []
    for key, value in fields.items():
        if not isinstance(key, str):
            raise DreamError(f"json_template: field names must be strings, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise DreamError(f"json_template: {key!r} must be a token count (int) or fixed text (str), got {value!r}")
        if isinstance(value, int) and not 1 <= value <= MAX_SPAN:
            raise DreamError(f"json_template: {key!r} needs 1..{MAX_SPAN} tokens, got {value}")
        slot = f"<|mask:{value}|>" if isinstance(value, int) else json.dumps(value)
        parts.append(f"{json.dumps(key)}: {slot}")
    return "{" + ", ".join(parts) + "}"


def unwritable_ids(model: "DreamModel", tokenizer: "DreamTokenizer") -> list[int]:
    """Ids a text front end never lets the sampler write: the mask itself, and ids past the tokenizer's range
    (Dream's head is wider than its tokenizer; those ids mean nothing)."""
    config = model.config
    states = [config.expand_token_id, config.delete_token_id] if config.length_states else []
    return list(range(tokenizer.vocab_size, config.vocab_size)) + [config.mask_token_id] + states


def apply_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """text before the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def cut_at_eos(ids: list[int], eos_token_id: int | None, start: int = 0) -> list[int]:
    """ids up to (not including) the first EOS at or after `start`."""
    if eos_token_id is None:
        return list(ids)
    for i in range(start, len(ids)):
        if ids[i] == eos_token_id:
            return list(ids[:i])
    return list(ids)


def final_spans(slots: list[bool], template_spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, end) of each span in a canvas whose spans changed length. `slots` marks the positions the sampler
    filled; the fixed text between spans is unchanged, so walking it in order finds every span again (one emptied
    by `<|delete|>` comes back as (p, p) where it stood)."""
    spans, p, previous_end = [], 0, 0
    for a, b in template_spans:
        p += a - previous_end  # the fixed tokens before this span (never slots)
        start = p
        while p < len(slots) and slots[p]:
            p += 1
        spans.append((start, p))
        previous_end = b
    return spans


def infill(model: "DreamModel", tokenizer: "DreamTokenizer", template: str, steps: int | None = None,
           banned_token_ids: list[int] | None = None, length: str | None = None, max_span: int = AUTO_MAX_SPAN,
           **kwargs: Any) -> InfillResult:
    """Fill the template's mask spans with `diffusion_generate`; text outside the spans is kept exactly.

    `steps` defaults to the number of masked tokens; other keyword arguments go to `diffusion_generate`.
    `length="auto"` (or `<|mask:auto|>` spans) lets a model trained with DreamOn's length states choose each span's
    length, up to `max_span` tokens: `steps` is then the most steps (default 2 * max_span per span), one slot is
    committed a step as DreamOn does, and alg defaults to "entropy".
    """
    if not isinstance(template, str):
        raise DreamError(f"the template must be a string with <|mask|> spans, got {type(template).__name__}")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise DreamError(f"steps must be an integer >= 1 (or None: one per masked token), got {steps!r}")
    if length not in (None, "auto"):
        raise DreamError(f"length must be None (the spans' own lengths) or \"auto\", got {length!r}")
    if not isinstance(max_span, int) or isinstance(max_span, bool) or not 1 <= max_span <= MAX_SPAN:
        raise DreamError(f"max_span must be an integer in 1..{MAX_SPAN}, got {max_span!r}")
    mask_id = model.config.mask_token_id
    if mask_id is None:
        raise DreamError("the model config has no mask_token_id; it cannot infill")
    bos = model.config.bos_token_id if model.config.bos_token_id is not None else tokenizer.bos_token_id
    tpl = parse_template(tokenizer, template, mask_id, bos, auto=length == "auto")
    n_masked = sum(b - a for a, b in tpl.spans)
    canvas = torch.tensor([tpl.ids], dtype=torch.long)
    constraints = Constraints(banned_token_ids=list(banned_token_ids or []))
    if tpl.auto:
        if not model.config.length_states:
            raise DreamError(NO_LENGTH_STATES)
        if max(b - a for a, b in tpl.spans) > max_span:
            raise DreamError(f"a span starts with more masks than max_span ({max_span}) allows; raise max_span")
        fixed = len(tpl.ids) - n_masked
        kwargs["length_limit"] = min(fixed + max_span * len(tpl.spans), model.config.context_length)
        kwargs.setdefault("alg", "entropy")
        steps = steps or 2 * max_span * len(tpl.spans)
    out = diffusion_generate(model, canvas, max_length=len(tpl.ids), steps=steps or n_masked,
                             constraints=constraints, return_dict_in_generate=True, **kwargs)
    ids, spans = out.sequences[0].tolist(), tpl.spans
    if tpl.auto:
        keep = out.pad_mask[0].bool().tolist() if out.pad_mask is not None else [True] * len(ids)
        ids = [t for t, k in zip(ids, keep) if k]
        slots = [s for s, k in zip(out.slots[0].tolist(), keep) if k]
        spans = final_spans(slots, tpl.spans)
    fills = [tokenizer.decode(ids[a:b]) for a, b in spans]
    start = 1 if MASK_SPAN.match(template) else 0  # parse_template put BOS before a leading mask: not the user's text
    return InfillResult(ids=ids, text=tokenizer.decode(ids[start:]), fills=fills, spans=spans)
