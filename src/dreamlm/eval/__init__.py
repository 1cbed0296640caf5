"""Evaluation with lm-evaluation-harness: the `dreamlm` model class (harness.py), Dream's likelihoods
(likelihood.py), the offline task YAMLs and their data (tasks/), and `evaluate`, what `dreamlm eval` runs."""

from dreamlm.eval.suite import TASK_DIR, default_tasks, evaluate, task_names

__all__ = ["TASK_DIR", "default_tasks", "evaluate", "task_names"]
