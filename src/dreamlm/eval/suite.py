"""`evaluate`: lm-eval's `simple_evaluate` over the `dreamlm` model class and the shipped offline tasks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dreamlm.errors import DreamError
from dreamlm.hub import require_model_dir

TASK_DIR = Path(__file__).parent / "tasks"
PLANNING_TASKS = {"sudoku4": ["dreamlm_sudoku4", "dreamlm_sudoku4_mc"], "star-2-5": ["dreamlm_star_2_5"],
                  "star-3-5": ["dreamlm_star_3_5"], "star-5-5": ["dreamlm_star_5_5"],
                  "star-10-5": ["dreamlm_star_10_5"]}
TEXT_TASKS = ["dreamlm_code_infill", "dreamlm_sudoku4_mc"]


def task_names() -> list[str]:
    """The shipped offline tasks."""
    return sorted(p.stem for p in TASK_DIR.glob("dreamlm_*.yaml"))


def default_tasks(model_dir: str | Path) -> list[str]:
    """A planning model's own tasks (generation; the likelihood task too unless the model is causal, an AR
    baseline), else the text tasks."""
    meta_file = Path(model_dir) / "dreamlm_task.json"
    if not meta_file.is_file():
        return list(TEXT_TASKS)
    meta = json.loads(meta_file.read_text())
    tasks = PLANNING_TASKS.get(meta.get("task"), [])
    causal = bool(json.loads((Path(model_dir) / "config.json").read_text()).get("causal", False))
    return [t for t in tasks if not (causal and t.endswith("_mc"))]


def evaluate(model_dir: str | Path, tasks: list[str] | None = None, limit: int | None = None,
             apply_chat_template: bool = False, log_samples: bool = False, **model_args: Any) -> dict[str, Any]:
    """lm-eval results for one model directory on shipped tasks (default: `default_tasks`), fully offline."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = require_model_dir(model_dir)
    tasks = list(tasks or default_tasks(model_dir))
    unknown = [t for t in tasks if t not in task_names()]
    if unknown:
        raise DreamError(f"unknown task {unknown[0]!r}; shipped tasks: {', '.join(task_names())}")
    if limit is not None and limit < 1:
        raise DreamError(f"limit must be >= 1, got {limit}")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dreamlm.eval.harness import DreamLM

    lm = DreamLM(pretrained=str(model_dir), **model_args)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(TASK_DIR)),
                                   limit=limit, apply_chat_template=apply_chat_template, log_samples=log_samples,
                                   random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
                                   bootstrap_iters=0)
