"""RLConfig: every setting of `dreamlm rl`, read like a training config (TOML + `section.key=value` overrides).

It is `TrainConfig` (the same strict reader, the same [model], [data], [optim] and [run] sections) plus:

[rollout]  group_size (completions per prompt, G), prompts (prompts per step, P), temperature (sampling temperature
           of the rollouts), alg (the diffusion sampler's confidence: entropy, maskgit_plus, topk_margin; one slot
           per step, the most confident first, as the planning solvers decode), refill (dynamic sampling, as DAPO:
           while fewer than `prompts` groups of a step carry a signal (rewards not all equal), roll out up to this
           many more rounds of `prompts` fresh puzzles and keep only the informative groups, at most `prompts`;
           0 = off; single process, with train-split puzzles)
[grpo]     estimator ("one_step" d1, "coupled" DiffuCoder, "elbo" sequence-level ESPO-style; "exact" for an AR
           model, chosen automatically for one), inner_steps (optimizer steps per batch of rollouts, μ), clip_eps
           (ε of the clipped ratio), beta (weight of the k3 KL to the frozen initial model; 0 = no reference),
           prompt_mask_p (one_step's prompt masking rate), elbo_pairs (antithetic pairs per ELBO estimate), eps,
           scale_rewards (divide advantages by the group's std), skip_uniform_groups (groups whose rewards are all
           equal carry no advantage: leave them out of the gradient steps), reward (a built-in reward by name:
           task, task-partial, exact-match, code-tests), tasks (extra tasks whose puzzles are mixed into training,
           in turn with data.task, e.g. ["star-8-5"])

Used from the training sections: model.init_from (the planning model to improve: a directory or bundled name
with its dreamlm_task.json), data.task (the puzzles), data.train (optional JSONL puzzles; default: fresh puzzles of
the train split each step), data.valid (optional; default: run.eval_solve puzzles of the test split drawn with
seed 2, so the bench's held-out set, seed 1, stays unseen), optim.lr / min_lr_ratio / warmup_steps / max_steps
(outer steps) / weight_decay / beta1 / beta2 / clip, run.* (out_dir, seed, log_every, eval_every, eval_solve,
save_every, keep_checkpoints, device, precision, progress, stop_at, export_dtype). [objective] and [adapter] do
not apply to RL and are refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamlm.errors import DreamError
from dreamlm.rl.estimators import Estimator, EstimatorSettings
from dreamlm.training.config import MAX_COUNT, OptimSection, RunSection, TrainConfig


@dataclass
class RolloutSection:
    group_size: int = 8
    prompts: int = 8
    temperature: float = 1.0
    alg: str = "entropy"
    refill: int = 0


@dataclass
class GRPOSection:
    estimator: str = "coupled"
    inner_steps: int = 2
    clip_eps: float = 0.2
    beta: float = 0.02
    prompt_mask_p: float = 0.15
    elbo_pairs: int = 2
    eps: float = 1e-3
    scale_rewards: bool = True
    skip_uniform_groups: bool = True
    reward: str = "task-partial"
    tasks: list[str] = field(default_factory=list)


@dataclass
class RLConfig(TrainConfig):
    """All settings of one RL run (RL's defaults for the optimizer and the run: a small learning rate, no warm-up or
    weight decay, frequent logs)."""

    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-5, weight_decay=0.0, warmup_steps=0,
                                                                     max_steps=100))
    run: RunSection = field(default_factory=lambda: RunSection(out_dir="runs/rl", log_every=1, eval_every=20,
                                                               save_every=20, eval_solve=100))
    rollout: RolloutSection = field(default_factory=RolloutSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RLConfig":
        """Strict, as TrainConfig; [objective] and [adapter] are refused (they do not apply to RL)."""
        for section in ("objective", "adapter"):
            if section in data:
                raise DreamError(f"rl recipe: [{section}] does not apply to RL runs; remove it")
        try:
            return super().from_dict(data)
        except DreamError as exc:
            raise DreamError(str(exc).replace("train config", "rl recipe", 1)) from None

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] | None = None) -> "RLConfig":
        """Read a TOML recipe and apply `section.key=value` overrides."""
        try:
            return super().load(path, overrides)  # type: ignore[return-value]
        except DreamError as exc:
            raise DreamError(str(exc).replace("train config", "rl recipe", 1)) from None

    @property
    def estimator_settings(self) -> EstimatorSettings:
        """The estimators' knobs from [grpo]."""
        return EstimatorSettings(self.grpo.prompt_mask_p, self.grpo.elbo_pairs, self.grpo.eps)

    def validate(self) -> None:
        """Check ranges and choices, with messages that name the key."""
        r, g, o = self.rollout, self.grpo, self.optim
        checks = [
            (bool(self.model.init_from), "model.init_from must name the planning model to improve"),
            (bool(self.data.task), "data.task must name the task whose puzzles the run trains on"),
            (1 <= r.group_size <= 1024 and 1 <= r.prompts <= MAX_COUNT,
             "rollout.group_size must be in 1..1024 and rollout.prompts >= 1"),
            (r.group_size >= 2, "rollout.group_size must be >= 2 (advantages compare a group's completions)"),
            (r.temperature > 0, "rollout.temperature must be > 0 (a group of greedy completions is one completion)"),
            (0 <= r.refill <= 64, "rollout.refill must be in 0..64 (extra rounds of rollouts a step)"),
            (r.alg in ("entropy", "maskgit_plus", "topk_margin"),
             "rollout.alg must be entropy, maskgit_plus or topk_margin"),
            (1 <= g.inner_steps <= 64, "grpo.inner_steps must be in 1..64"),
            (0 < g.clip_eps < 1, "grpo.clip_eps must be in (0, 1)"),
            (g.beta >= 0, "grpo.beta must be >= 0"),
            (o.lr > 0 and 0 <= o.min_lr_ratio <= 1, "optim.lr must be > 0 and optim.min_lr_ratio in [0, 1]"),
            (1 <= o.max_steps <= MAX_COUNT, f"optim.max_steps must be in 1..{MAX_COUNT}"),
            (o.warmup_steps >= 0 and o.clip >= 0 and o.weight_decay >= 0,
             "optim.warmup_steps, clip and weight_decay must be >= 0"),
            (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1 and beta2 must be in [0, 1)"),
            (self.run.log_every >= 1 and self.run.eval_every >= 1 and self.run.save_every >= 1,
             "run.log_every, eval_every and save_every must be >= 1"),
            (self.run.keep_checkpoints >= 1 and self.run.stop_at >= 0 and self.run.seed >= 0
             and self.run.eval_solve >= 0,
             "run.keep_checkpoints must be >= 1, run.stop_at, seed and eval_solve >= 0"),
            (self.run.precision in ("auto", "fp32", "bf16"), "run.precision must be auto, fp32 or bf16"),
            (self.run.device in ("auto", "cpu", "cuda") or self.run.device.startswith("cuda:"),
             "run.device must be auto, cpu or cuda[:N]"),
            (self.run.export_dtype in ("bfloat16", "float32", "float16"), "run.export_dtype must be a float dtype"),
        ]
        for ok, message in checks:
            if not ok:
                raise DreamError(f"rl recipe: {message}")
        Estimator.parse(g.estimator)
        try:
            self.estimator_settings
        except DreamError as exc:
            raise DreamError(f"rl recipe: grpo.{exc}") from None
        from dreamlm.rl.rewards import BUILTIN
        from dreamlm.tasks import get_task

        if g.reward not in BUILTIN:
            raise DreamError(f"rl recipe: unknown grpo.reward {g.reward!r}; built-in rewards: {', '.join(BUILTIN)}")
        for name in [self.data.task, *g.tasks]:
            get_task(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for the run directory's record), without the sections RL does not use."""
        data = dataclasses.asdict(self)
        data.pop("objective")
        data.pop("adapter")
        return data
