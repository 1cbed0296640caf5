"""The GRPO loop: rollouts -> rewards -> group advantages -> several clipped policy-gradient steps with a KL to the
frozen initial model; checkpoints, exact resume and curves as in training.

Exact resume: every random draw of a step (its puzzles, its rollouts, each inner step's masks) comes from a
generator seeded by (run.seed, step, rank, ...), so a resumed run repeats an uninterrupted one's draws; model,
optimizer, step and history are checkpointed with the training checkpoints' atomic writes (`training.state`).
Distributed (torchrun): each rank rolls out its own prompts (a group never spans ranks, so advantages need no
communication), the model is wrapped as in training (`training.parallel`), the loss is divided by the global
sequence count; uniform groups are kept then, so every rank runs the same forwards.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from dreamlm.errors import DreamError
from dreamlm.files import output_dir, read_puzzle_records
from dreamlm.hub import resolve
from dreamlm.model import DreamModel
from dreamlm.precision import training_precision
from dreamlm.rl.config import RLConfig
from dreamlm.rl.estimators import Estimator, draw, loglik
from dreamlm.rl.grpo import group_advantages, grpo_loss, informative
from dreamlm.rl.rewards import Reward, RewardError, builtin_reward, score
from dreamlm.rl.rollouts import Rollouts, rollouts
from dreamlm.solver import TASK_FILE, Solver, read_task_file, star_shapes
from dreamlm.tasks import get_task, make_examples
from dreamlm.training.data import resolve_files
from dreamlm.training.parallel import (all_reduce_sum, barrier, full_state, init_world, load_full_state, shard_model,
                                       shutdown)
from dreamlm.training.state import LATEST, checkpoint_root, load_training_checkpoint, save_training_checkpoint
from dreamlm.training.trainer import log_metrics, lr_at, open_run

VALID_SEED = 2  # validation puzzles: the test split drawn with seed 2 (the benches use seed 1, training data 0)


def _seed(*parts: int) -> int:
    """One 63-bit seed from several integers (stable across runs and machines)."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part) + 1) % (2**63 - 1)
    return value


class GRPOTrainer:
    """Holds the pieces of an RL run; `fit()` runs it."""

    def __init__(self, cfg: RLConfig, reward: Reward | None = None, reward_name: str = "") -> None:
        self.cfg = cfg
        self.out = output_dir(Path(cfg.run.out_dir))
        self.source = resolve(cfg.model.init_from)
        if not (self.source / TASK_FILE).is_file():
            raise DreamError(f"model.init_from {cfg.model.init_from!r} is not a planning model (no {TASK_FILE}); "
                             "dreamlm rl improves planning models")
        self.meta = read_task_file(self.source / TASK_FILE)
        self.world = init_world(cfg.run.device)
        self.reward = reward if reward is not None else builtin_reward(cfg.grpo.reward, cfg.data.task)
        self.reward_name = reward_name or (cfg.grpo.reward if reward is None else
                                           getattr(reward, "__name__", type(reward).__name__))
        model = DreamModel.from_pretrained(self.source, dtype=torch.float32, device=self.world.device)
        if model.tokenizer is None:
            raise DreamError(f"{self.source} has no tokenizer")
        self.tokenizer = model.tokenizer
        self.model_config = model.config
        self.estimator = Estimator.parse(cfg.grpo.estimator)
        if model.causal:
            self.estimator = Estimator.EXACT  # an AR policy has exact log-probabilities: plain GRPO
        elif self.estimator is Estimator.EXACT:
            raise DreamError("grpo.estimator 'exact' is for causal (AR) models; a diffusion model uses one_step, "
                             "coupled or elbo")
        self.precision = training_precision(cfg.run.precision, self.world.device)
        if self.world.main:
            print(self.precision.describe(), file=sys.stderr)
        self.autocast = self.precision.autocast(self.world.device)
        model.train()
        self.model = shard_model(model, self.world, False)
        self.ref = None
        if cfg.grpo.beta > 0:  # the frozen reference: the starting model, reloaded (never trained)
            ref = DreamModel.from_pretrained(self.source, dtype=torch.float32, device=self.world.device).eval()
            ref.requires_grad_(False)
            self.ref = shard_model(ref, self.world, False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=(o.beta1, o.beta2), fused=self.world.device.type == "cuda")
        # the sampler runs whole-model forwards (packed canvases), which sharded weights cannot serve: under
        # torchrun each rank rolls out with an unsharded copy, refreshed from the policy before every step
        self.rollout_model = self.model
        if self.world.distributed:
            self.rollout_model = DreamModel.from_pretrained(self.source, dtype=torch.float32,
                                                            device=self.world.device).eval()
            self.rollout_model.requires_grad_(False)
        self.rollout_model.tokenizer = self.tokenizer
        self.solver = Solver.from_model(self.rollout_model, cfg.data.task, int(self.meta["seq_len"]),
                                        self.meta.get("separator", ""), str(self.meta.get("view", "")))
        self.solver.star_shapes = star_shapes(self.meta)  # read puzzles at the shapes the model was trained on
        if cfg.rollout.refill and (cfg.data.train or self.world.distributed):
            raise DreamError("rollout.refill draws fresh train-split puzzles in one process: it does not work with "
                             "data.train files or under torchrun")
        self.train_examples = self._read(cfg.data.train) if cfg.data.train else None
        self.valid_examples = (self._read(cfg.data.valid) if cfg.data.valid
                               else make_examples(cfg.data.task, cfg.run.eval_solve, VALID_SEED, "test"))
        self.valid_examples = self.valid_examples[:cfg.run.eval_solve]
        self.step = 0
        self.history: list[dict[str, Any]] = []

    @staticmethod
    def _read(files: list[str]) -> list[dict[str, Any]]:
        examples = [record for path in resolve_files(files) for record in read_puzzle_records(path, "data file")]
        if not examples:
            raise DreamError(f"no examples in {', '.join(files)}")
        return examples

    # ---- one step ------------------------------------------------------------------------------------------
    def examples(self, step: int, refill: int = 0) -> list[Mapping[str, Any]]:
        """This rank's prompts of a step: fresh train-split puzzles (data.task and grpo.tasks in turn) or the
        data.train files' examples in order, the same for a given (seed, step) on every run; `refill` > 0: the
        fresh puzzles of that extra round (rollout.refill)."""
        cfg = self.cfg
        P, W = cfg.rollout.prompts, self.world.size
        if self.train_examples is not None:
            n = len(self.train_examples)
            chosen = [self.train_examples[(step * P * W + i) % n] for i in range(P * W)]
        else:
            names = [cfg.data.task, *cfg.grpo.tasks]
            rng = random.Random(f"dreamlm-rl/{cfg.run.seed}/{step}" + (f"/refill{refill}" if refill else ""))
            chosen = [get_task(names[i % len(names)]).generate(rng, "train") for i in range(P * W)]
        return chosen[self.world.rank::W]

    def train_step(self) -> dict[str, Any]:
        """Rollouts, rewards, advantages, then grpo.inner_steps optimizer steps; returns the step's metrics."""
        cfg, g = self.cfg, self.cfg.grpo
        start = time.perf_counter()
        examples = self.examples(self.step)
        G = cfg.rollout.group_size
        device = self.world.device
        generator = torch.Generator(device=device).manual_seed(_seed(cfg.run.seed, self.step, self.world.rank))
        self._sync_rollout_model()
        self.model.eval()
        batch, rewards = self._rollouts(examples, generator)
        # what the step logs describes its own prompts (the policy as it is), not the groups a refill kept
        own = [float(rewards.sum()), float((rewards >= 1).sum()), float(len(rewards)),
               float(informative(rewards.view(-1, G)).sum()) * G]
        refills, tokens = 0, batch.tokens
        if cfg.rollout.refill:
            batch, rewards, refills, tokens = self._refill(batch, rewards, generator)
        groups = rewards.view(-1, G)
        advantages = group_advantages(groups, g.scale_rewards).flatten()
        skip = g.skip_uniform_groups and not self.world.distributed
        rows = (informative(groups).repeat_interleave(G).nonzero(as_tuple=True)[0] if skip
                else torch.arange(len(rewards)))
        (kept,) = all_reduce_sum([float(len(rows))], self.world)
        stats = {"kl": 0.0, "clipped": 0.0, "loss": 0.0}
        if kept > 0:
            stats = self._update(batch.select(rows), advantages[rows], kept)
        self.step += 1
        seconds = time.perf_counter() - start
        total, solved, count, informative_n, tokens = all_reduce_sum([*own, float(tokens)], self.world)
        record = {"step": self.step, "reward": total / count, "rollout_acc": solved / count,
                  "informative": informative_n / count, "lr": lr_at(self.step - 1, cfg), **stats,
                  "tokens": int(tokens), "tok_per_s": tokens / max(seconds, 1e-9), "seconds": seconds}
        if cfg.rollout.refill:
            record.update(refills=refills, kept_groups=int(kept) // G)
        return record

    def _rollouts(self, examples: list[Mapping[str, Any]], generator: torch.Generator):
        """G completions of each example and their rewards."""
        cfg = self.cfg
        with self.autocast:
            batch = rollouts(self.solver, examples, cfg.rollout.group_size, cfg.rollout.temperature,
                             cfg.rollout.alg, generator)
        rewards = torch.tensor([score(self.reward, c, examples[r // cfg.rollout.group_size], self.reward_name)
                                for r, c in enumerate(batch.completions)])
        return batch, rewards

    def _refill(self, batch, rewards: torch.Tensor, generator: torch.Generator):
        """Dynamic sampling: keep the informative groups (rewards not all equal) of the step's rollouts and of up to
        rollout.refill extra rounds of fresh puzzles, until `prompts` groups are kept. Returns the kept batch (the
        first round's as it was if no group anywhere carried a signal), its rewards, the extra rounds drawn and the
        tokens generated in all."""
        P, G = self.cfg.rollout.prompts, self.cfg.rollout.group_size
        kept_batches, kept_rewards, tokens, rounds = [], [], batch.tokens, 0
        current, current_rewards = batch, rewards
        while True:
            for i in informative(current_rewards.view(-1, G)).nonzero(as_tuple=True)[0].tolist():
                if len(kept_batches) == P:
                    break
                rows = torch.arange(i * G, (i + 1) * G)
                kept_batches.append(current.select(rows))
                kept_rewards.append(current_rewards[rows])
            if len(kept_batches) >= P or rounds >= self.cfg.rollout.refill:
                break
            rounds += 1
            current, current_rewards = self._rollouts(self.examples(self.step, rounds), generator)
            tokens += current.tokens
        if not kept_batches:
            return batch, rewards, rounds, tokens
        return Rollouts.cat(kept_batches), torch.cat(kept_rewards), rounds, tokens

    def _sync_rollout_model(self) -> None:
        """Under torchrun: copy the (sharded) policy's full weights into every rank's rollout model."""
        if self.rollout_model is not self.model:
            state, _ = full_state(self.model, None, self.world, everywhere=True)
            self.rollout_model.load_state_dict({k: v.to(self.world.device) for k, v in state.items()})

    def _update(self, batch, advantages: torch.Tensor, kept: float) -> dict[str, float]:
        cfg, g = self.cfg, self.cfg.grpo
        device = self.world.device
        x, generated = batch.x.to(device), batch.generated.to(device)
        draws = []
        for k in range(g.inner_steps):
            gen = torch.Generator().manual_seed(_seed(cfg.run.seed, self.step, self.world.rank, k + 1))
            draws.append(draw(self.estimator, batch.generated, batch.prompt, cfg.estimator_settings, gen))
        # the rollout policy's and the reference's estimates on every inner step's masks, before any update
        with torch.no_grad(), self.autocast:
            old = [loglik(self.model, x, generated, d, self.estimator).values for d in draws]
            ref = [loglik(self.ref, x, generated, d, self.estimator).values for d in draws] \
                if self.ref is not None else [None] * len(draws)
        self.model.train()
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        kl = clipped = loss = 0.0
        for k, noise in enumerate(draws):
            with self.autocast:
                new = loglik(self.model, x, generated, noise, self.estimator)
                parts = grpo_loss(new.values, old[k], ref[k], new.mask, advantages, g.clip_eps, g.beta,
                                  kept / self.world.size)
            parts.loss.backward()
            if cfg.optim.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if k == 0:
                kl = parts.kl_sum
            clipped += parts.clipped_sum / g.inner_steps
            loss += float(parts.loss.detach()) / g.inner_steps
        kl, clipped, loss = all_reduce_sum([kl, clipped, loss], self.world)
        return {"kl": kl / kept, "clipped": clipped / kept, "loss": loss}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Share of the validation puzzles the model solves greedily (as `dreamlm solve`), or None."""
        if not self.valid_examples:
            return None
        self._sync_rollout_model()  # (every rank: a collective) then rank 0 solves with the whole model
        if not self.world.main:
            return None
        self.rollout_model.eval()
        with self.autocast:
            solutions = self.solver.solve_batches([e["input"] for e in self.valid_examples])
        self.model.train()
        return sum(s.valid for s in solutions) / len(solutions)

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint model, optimizer, step, RNG and history (atomic, rank 0 writes)."""
        model_state, optim_state = full_state(self.model, self.optimizer, self.world)
        if self.world.main:
            state = {"step": self.step, "optimizer": optim_state, "torch_rng": torch.get_rng_state(),
                     "history": json.dumps(self.history), "precision": self.precision.name}
            save_training_checkpoint(self.out, self.step, model_state, state,
                                     {"config": self.cfg.to_dict(), "step": self.step, "kind": "rl"},
                                     self.cfg.run.keep_checkpoints)
        barrier(self.world)

    def resume(self) -> bool:
        """Load the latest checkpoint of out_dir; False if there is none."""
        loaded = load_training_checkpoint(self.out)
        if loaded is None:
            return False
        model_state, state = loaded
        try:
            load_full_state(self.model, self.optimizer, model_state, state["optimizer"], self.world)
        except (RuntimeError, KeyError, ValueError):
            raise DreamError(f"the checkpoint in {self.out} does not fit model.init_from's model; resume with the "
                             "run's own recipe or choose a new out_dir") from None
        self.step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        self.history = json.loads(state["history"])
        if state.get("precision", self.precision.name) != self.precision.name and self.world.main:
            print(f"note: this run was trained in {state['precision']} and resumes in {self.precision.name}; "
                  "the continuation is not bit-exact with an uninterrupted run", file=sys.stderr)
        return True

    def export(self) -> Path:
        """The final policy as a planning model directory (weights, tokenizer, dreamlm_task.json naming its base)."""
        model_state, _ = full_state(self.model, None, self.world)
        path = self.out / "final"
        if self.world.main:
            dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
                self.cfg.run.export_dtype]
            with torch.device("meta"):
                plain = DreamModel(self.model_config)
            plain.load_state_dict(model_state, assign=True)
            plain.to(dtype).save_pretrained(path, tokenizer=self.tokenizer)
            meta = {**self.meta, "command": "dreamlm " + " ".join(sys.argv[1:]) if sys.argv else "",
                    "rl_base": self.source.name, "rl_estimator": self.estimator.value}
            (path / TASK_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        barrier(self.world)
        return path

    # ---- the run -------------------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        log_metrics(self, record)

    def _say(self, text: str) -> None:
        if self.cfg.run.progress and self.world.main:
            print(text, file=sys.stderr, flush=True)

    def _evaluate_and_log(self) -> None:
        acc = self.evaluate()
        if acc is not None:
            self._log({"step": self.step, "val_acc": acc})
            self._say(f"step {self.step}: val_acc {acc:.3f} ({len(self.valid_examples)} held-out puzzles)")
        barrier(self.world)

    def fit(self, resume: bool = False) -> Path | None:
        """Run to optim.max_steps (or run.stop_at), logging, evaluating and checkpointing; export at the end."""
        cfg = self.cfg
        last = open_run(self, resume, "rl_config.json")
        if self.step == 0:
            self._evaluate_and_log()  # the starting point of the curve
        try:
            while self.step < last:
                metrics = self.train_step()
                if self.step % cfg.run.log_every == 0 or self.step == last:
                    self._log(metrics)
                    self._say(f"step {self.step}/{cfg.optim.max_steps} · reward {metrics['reward']:.3f} · rollout "
                              f"acc {metrics['rollout_acc']:.3f} · kl {metrics['kl']:.4f} · clipped "
                              f"{metrics['clipped']:.3f} · {metrics['tok_per_s']:.0f} tok/s · "
                              f"{metrics['seconds']:.1f} s")
                if self.step % cfg.run.eval_every == 0 or self.step == cfg.optim.max_steps:
                    self._evaluate_and_log()
                if self.step % cfg.run.save_every == 0 or self.step == last:
                    self.save()
        except RewardError as exc:
            self.save()  # the model is as it was before this step's update: a resume redoes the step
            shutdown(self.world)
            raise RewardError(f"{exc}; stopped at step {self.step}, checkpoint saved in "
                              f"{checkpoint_root(self.out)} (fix the reward, then resume)") from None
        if self.step < cfg.optim.max_steps:
            shutdown(self.world)
            return None
        path = self.export()
        if self.world.main:
            plot_rl(self.history, self.out / "rl.png")
        shutdown(self.world)
        return path


def plot_rl(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Reward, validation accuracy and KL against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(axes, ("reward", "val_acc", "kl"), ("mean reward", "validation accuracy", "KL (k3)")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), "o-" if key == "val_acc" else "-")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(cfg: RLConfig, resume: bool = False, reward: Reward | None = None) -> Path | None:
    """Run GRPO; returns the exported model directory (None when stopped early by run.stop_at). `reward` replaces
    grpo.reward with any callable (completion, example) -> float."""
    root = checkpoint_root(cfg.run.out_dir)
    if resume and not (root / LATEST).is_file():
        raise DreamError(f"--resume: {cfg.run.out_dir} holds no checkpoint to continue; drop --resume to start a "
                         "new run")
    if not resume and root.exists():
        raise DreamError(f"{cfg.run.out_dir} already holds a run; pass --resume to continue it or choose another "
                         "out_dir")
    return GRPOTrainer(cfg, reward).fit(resume=resume)
