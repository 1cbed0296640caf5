"""Group rollouts: G completions per prompt from the policy, with the project's one sampler.

A diffusion policy decodes through `diffusion_generate` (plan -> advance), exactly as `Solver.solve` lays out a
planning canvas (the puzzle as the model reads it, the separator, masks up to seq_len; where the answer's length
follows from the puzzle, EOS and the PAD tail pinned), but sampling at `temperature` so a group's completions
differ. A causal (AR) policy decodes with `ar_generate` at the same temperature. Every canvas is seq_len long, so
the rollouts of a step stack into one batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from dreamlm.rl.rewards import Completion
from dreamlm.sampling import Constraints, diffusion_generate
from dreamlm.sampling.autoregressive import ar_generate
from dreamlm.solver import Solver


@dataclass
class Rollouts:
    """R = P x G finished canvases (row p * G + g is completion g of prompt p)."""

    x: torch.Tensor  # (R, N) prompt + completion
    prompt: torch.Tensor  # (R, N) bool: the prompt's positions
    generated: torch.Tensor  # (R, N) bool: the slots the policy wrote (pinned slots excluded)
    completions: list[Completion]
    group_size: int

    @property
    def tokens(self) -> int:
        """Generated tokens in the batch."""
        return int(self.generated.sum())

    def select(self, rows: torch.Tensor) -> "Rollouts":
        """The rows `rows` (e.g. the groups that carry a learning signal)."""
        keep = rows.tolist()
        return Rollouts(self.x[rows], self.prompt[rows], self.generated[rows],
                        [self.completions[i] for i in keep], self.group_size)

    @staticmethod
    def cat(parts: "Sequence[Rollouts]") -> "Rollouts":
        """The rows of several batches (same group size and canvas length), in order."""
        return Rollouts(torch.cat([p.x for p in parts]), torch.cat([p.prompt for p in parts]),
                        torch.cat([p.generated for p in parts]), [c for p in parts for c in p.completions],
                        parts[0].group_size)


@torch.no_grad()
def rollouts(solver: Solver, examples: Sequence[Mapping[str, Any]], group_size: int, temperature: float,
             alg: str, generator: torch.Generator) -> Rollouts:
    """`group_size` sampled completions of each example's puzzle from the solver's model (its canvas layout)."""
    model = solver.model
    views = [solver._view(e["input"]) for e in examples]  # (model text, answer map back, answer tokens)
    prompts = [solver.prompt_ids(e["input"]) for e in examples]
    N = solver.seq_len
    rows = len(examples) * group_size
    x = torch.zeros(rows, N, dtype=torch.long)
    prompt = torch.zeros(rows, N, dtype=torch.bool)
    generated = torch.zeros(rows, N, dtype=torch.bool)
    groups: dict[tuple[int, int | None], list[int]] = {}
    for i, ids in enumerate(prompts):
        groups.setdefault((len(ids), views[i][2] if solver.kind == "diffusion" else None), []).append(i)
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    for (length, end), members in groups.items():
        batch = torch.tensor([prompts[i] for i in members]).repeat_interleave(group_size, dim=0)
        budget = N - length
        if solver.kind == "ar":
            out, _ = ar_generate(model, batch, budget, temperature=temperature, generator=generator)
            out = out.cpu()
            wrote = torch.zeros(out.shape, dtype=torch.bool)
            for r in range(out.shape[0]):
                tail = out[r, length:].tolist()
                stop = tail.index(eos) + 1 if eos in tail else len(tail)
                wrote[r, length:length + stop] = True
        else:
            pinned: dict[int, int] = {}
            if end is not None and end < budget:  # as Solver.solve: EOS where the answer ends, PAD after it
                pinned = {length + end: eos, **dict.fromkeys(range(length + end + 1, N), pad)}
            slots = end if pinned else budget
            out = diffusion_generate(model, batch, max_new_tokens=budget, steps=slots, alg=alg,
                                     temperature=temperature, threshold=1.0, generator=generator,
                                     constraints=Constraints(pinned=pinned) if pinned else None).cpu()
            wrote = torch.zeros(out.shape, dtype=torch.bool)
            wrote[:, length:] = True
            for pos in pinned:
                wrote[:, pos] = False
        for k, i in enumerate(members):
            for g in range(group_size):
                r, row = i * group_size + g, k * group_size + g
                x[r], prompt[r, :length], generated[r] = out[row], True, wrote[row]
    completions = []
    for r in range(rows):
        i = r // group_size
        length = int(prompt[r].sum())
        text = views[i][1](solver.decode(x[r, length:].tolist()))
        completions.append(Completion(text, tuple(x[r][generated[r]].tolist())))
    return Rollouts(x, prompt, generated, completions, group_size)
