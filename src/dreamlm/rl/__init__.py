"""Reinforcement learning with verifiable rewards for planning models: GRPO over the project's sampler.

    from dreamlm.rl import RLConfig, train
    cfg = RLConfig.load("recipes/rl/star-10-5-diffusion.toml")
    train(cfg, reward=lambda completion, example: float(completion.text == example["output"]))

Pieces: `rollouts` (group sampling with `diffusion_generate` / `ar_generate`), `estimators` (one_step, coupled,
elbo, exact), `grpo` (advantages, k3 KL, clipped loss), `rewards` (callables and built-ins), `loop` (the run).
"""

from dreamlm.rl.config import RLConfig
from dreamlm.rl.estimators import Draw, Estimator, EstimatorSettings, LogLik, draw, loglik
from dreamlm.rl.grpo import group_advantages, grpo_loss, k3_kl
from dreamlm.rl.loop import GRPOTrainer, train
from dreamlm.rl.rewards import (BUILTIN, Completion, Reward, RewardError, builtin_reward, code_tests, exact_match,
                                partial_credit, score, task_reward)
from dreamlm.rl.rollouts import Rollouts, rollouts

__all__ = ["BUILTIN", "Completion", "Draw", "Estimator", "EstimatorSettings", "GRPOTrainer", "LogLik", "RLConfig",
           "Reward", "RewardError", "Rollouts", "builtin_reward", "code_tests", "draw", "exact_match",
           "group_advantages", "grpo_loss", "k3_kl", "loglik", "partial_credit", "rollouts", "score",
           "task_reward", "train"]
