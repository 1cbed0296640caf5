"""Live terminal view of a canvas denoising: masks (░) turn into tokens, in whatever order the sampler picks."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

if TYPE_CHECKING:
    from dreamlm.tokenizer import DreamTokenizer

MASK_GLYPH = "░"


# special tokens drawn as glyphs in live views (the raw strings are noise there; the text output keeps none of them)
SPECIAL_GLYPHS = {"<|sep|>": " │ ", "<|pad|>": "·", "<|endoftext|>": "⏹", "<|expand|>": "⇹", "<|delete|>": "⌫"}


def readable(text: str) -> str:
    """Text for a live view: the planning models' special tokens as glyphs."""
    for special, glyph in SPECIAL_GLYPHS.items():
        text = text.replace(special, glyph)
    return text


def newly_filled(before: list[int], row: list[int], mask_id: int) -> list[int]:
    """Positions of `row` that hold a token where `before` had a mask. A canvas that changed length (DreamOn's
    expand/delete) is compared from its nearer end, as the text around an infill span does not move."""
    out = []
    for i, t in enumerate(row):
        j = i if len(before) == len(row) or i < len(row) // 2 else len(before) - (len(row) - i)
        if t != mask_id and 0 <= j < len(before) and before[j] == mask_id:
            out.append(i)
    return out


class CanvasView:
    """A tokens hook for `diffusion_generate` that redraws row 0 of the canvas after every step.

    The canvas may change length between steps (DreamOn's expand/delete states): the footer then shows the length,
    and new tokens are found by `newly_filled`."""

    def __init__(self, tokenizer: "DreamTokenizer", mask_token_id: int, start: int, steps: int | None,
                 console: Console | None = None, delay: float = 0.0, title: str = "dreamlm") -> None:
        self.tokenizer, self.mask_token_id, self.start, self.steps = tokenizer, mask_token_id, start, steps
        self.console = console or Console()
        self.delay, self.title = delay, title
        self.previous: list[int] | None = None
        self.first_length: int | None = None
        self.live: Live | None = None

    def render(self, ids: list[int], step: int | None) -> Panel:
        """One frame: context dim, new tokens highlighted, masks as glyphs."""
        text = Text()
        fresh_positions = set(newly_filled(self.previous, ids, self.mask_token_id)) if self.previous else set()
        text.append(readable(self.tokenizer.decode(ids[: self.start])), style="dim")
        for pos in range(self.start, len(ids)):
            token = ids[pos]
            if token == self.mask_token_id:
                text.append(MASK_GLYPH, style="grey50")
                continue
            fresh = pos in fresh_positions
            piece = self.tokenizer.decode([token])
            shown = readable(piece)
            text.append(shown, style="bold green" if fresh else "dim" if shown != piece else "")
        masks = sum(1 for t in ids[self.start:] if t == self.mask_token_id)
        if self.first_length is None:
            self.first_length = len(ids)
        label = "start" if step is None else f"step {step + 1}" + (f"/{self.steps}" if self.steps else "")
        resized = f" · canvas {self.first_length} → {len(ids)} tokens" if len(ids) != self.first_length else ""
        footer = Text(f"{label} · {masks} masks left{resized}", style="cyan")
        return Panel(Group(text, footer), title=self.title, border_style="blue")

    def __call__(self, step: int | None, x: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        ids = x[0].tolist()
        frame = self.render(ids, step)
        if self.live is None:
            self.live = Live(frame, console=self.console, refresh_per_second=30, transient=False)
            self.live.start()
        else:
            self.live.update(frame, refresh=True)
        self.previous = ids
        if self.delay:
            time.sleep(self.delay)
        return x

    def close(self) -> None:
        """Stop the live display (the last frame stays on screen)."""
        if self.live is not None:
            self.live.stop()
            self.live = None
            if not self.console.is_terminal:  # rich leaves the last frame unterminated when piped
                self.console.line()
