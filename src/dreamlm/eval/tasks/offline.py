"""Loaders and scorers the task YAMLs name with `!function offline.<name>`: data from the JSON Lines files shipped
beside them (no network, no hub datasets), answers judged by the rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"


def load(file: str, task: str | None = None, **metadata: Any) -> Any:
    """A DatasetDict with one "test" split read from data/<file>; `task` (a planning task name) is added to every
    row for the scorer."""
    import datasets

    rows = [json.loads(line) for line in (DATA_DIR / file).read_text().splitlines() if line.strip()]
    if task is not None:
        rows = [{**row, "task": task} for row in rows]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def score_planning(doc: dict, results: list[str]) -> dict[str, float]:
    """valid: 1.0 when the answer obeys the puzzle's rules (the task's validator, not one stored answer)."""
    from dreamlm.tasks import get_task

    return {"valid": float(get_task(doc["task"]).validate(doc["input"], results[0].strip()))}


def score_infill(doc: dict, results: list[str]) -> dict[str, float]:
    """exact_match: the filled line equals the held-out line (surrounding whitespace ignored)."""
    return {"exact_match": float(results[0].strip() == doc["line"].strip())}
