"""Rewards: plain Python callables `(completion, example) -> float`, and the built-ins found by exact name.

`completion` is a `Completion` (the answer text in the puzzle's own terms, and the ids the policy wrote); `example`
is the training example (`{"input": ..., "output": ..., ...}`). A reward is checked every time it is called
(`score`): an exception, a non-number or a non-finite value raises `RewardError`, which stops the run (with a
checkpoint saved) rather than training on garbage.

Built-ins: the task validators (`task`: 1 if the rules hold, else 0; `task-partial`: the same with partial credit
where it helps: star graphs get the share of the path's nodes that are right, Sudoku the share of its rows,
columns and boxes that hold every digit once, Countdown 0.1 for well-formed equations), `exact-match` (the answer
equals the example's "output") and `code-tests` (the completion followed by the example's "tests", run in the
sandbox of `dreamlm.sandbox`: a subprocess with a timeout, memory limit, no network and no writes outside its
temporary directory; 1 if it exits cleanly). Model output is parsed or run in the sandbox, never evaluated here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from dreamlm.errors import DreamError


@dataclass(frozen=True)
class Completion:
    """What a policy wrote: the answer text (in the puzzle's terms) and the token ids of its generated slots."""

    text: str
    ids: tuple[int, ...] = ()


Reward = Callable[[Completion, Mapping[str, Any]], float]


class RewardError(DreamError):
    """A reward function failed (raised, returned a non-number or a non-finite value)."""


def score(reward: Reward, completion: Completion, example: Mapping[str, Any], name: str = "") -> float:
    """Call `reward` and check its value: a finite int/float (bools count as 0/1), else RewardError in one line."""
    label = name or getattr(reward, "__name__", type(reward).__name__)
    try:
        value = reward(completion, example)
    except Exception as exc:  # noqa: BLE001 - any failure of user code stops the run with its message
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise RewardError(f"reward {label!r} raised {type(exc).__name__}{': ' + detail if detail else ''} "
                          f"on input {str(example.get('input', ''))[:60]!r}") from None
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)):
        raise RewardError(f"reward {label!r} returned {type(value).__name__} ({str(value)[:40]!r}); a reward must "
                          "return a number")
    value = float(value)
    if not math.isfinite(value):
        raise RewardError(f"reward {label!r} returned {value} on input {str(example.get('input', ''))[:60]!r}; a "
                          "reward must be finite")
    return value


def task_reward(task_name: str, partial: bool = False) -> Reward:
    """1.0 when the task's validator accepts the answer, else 0.0 (with `partial`: the task's partial credit)."""
    from dreamlm.tasks import get_task

    task = get_task(task_name)

    def reward(completion: Completion, example: Mapping[str, Any]) -> float:
        puzzle = example["input"]
        if task.validate(puzzle, completion.text):
            return 1.0
        return partial_credit(task.name, puzzle, completion.text) if partial else 0.0

    reward.__name__ = f"task-partial:{task.name}" if partial else f"task:{task.name}"
    return reward


def partial_credit(task_name: str, puzzle: str, answer: str) -> float:
    """Credit in [0, 1) for an invalid answer: star graphs, the share of the path's nodes right at their place
    (the path is unique); Sudoku, the share of rows, columns and boxes holding every digit once when the givens are
    kept; Countdown, 0.1 for a well-formed list of equations. 0 when the answer cannot be read."""
    if task_name.startswith("star-"):
        from dreamlm.tasks import stargraph

        truth = stargraph.solve(puzzle)
        path = stargraph._parse_path(answer)  # the validator's own reader: one grammar for answers
        if path is None:
            return 0.0
        right = sum(a == b for a, b in zip(path, truth))
        return 0.9 * right / max(len(truth), len(path))
    if task_name.startswith("sudoku"):
        from dreamlm.tasks import sudoku

        try:
            given, got = sudoku.parse(puzzle), sudoku.parse(answer)
        except DreamError:
            return 0.0
        n = len(given)
        if len(got) != n or any(g and g != a for gr, ar in zip(given, got) for g, a in zip(gr, ar)):
            return 0.0
        box = int(math.isqrt(n))
        units = [list(row) for row in got] + [[got[r][c] for r in range(n)] for c in range(n)] + [
            [got[r][c] for r in range(br, br + box) for c in range(bc, bc + box)]
            for br in range(0, n, box) for bc in range(0, n, box)]
        full = set(range(1, n + 1))
        return 0.9 * sum(set(u) == full for u in units) / len(units)
    if task_name.startswith("cd"):
        number = r"[0-9]+"
        step = rf"{number}[-+*/]{number}={number}"
        return 0.1 if re.fullmatch(rf"{step}(,{step})*", answer.strip()) else 0.0
    return 0.0


def exact_match(completion: Completion, example: Mapping[str, Any]) -> float:
    """1.0 when the answer equals the example's "output" (surrounding whitespace ignored), else 0.0."""
    return float(completion.text.strip() == str(example["output"]).strip())


exact_match.__name__ = "exact-match"


def code_tests(timeout: float = 5.0, memory_mb: int = 512) -> Reward:
    """1.0 when the completion followed by the example's "tests" (Python, e.g. asserts) runs cleanly in the
    sandbox (`dreamlm.sandbox.run_python`), else 0.0; the example's optional "prefix" goes before the completion
    (a function's signature and docstring, for body completions)."""
    from dreamlm.sandbox import run_python

    def reward(completion: Completion, example: Mapping[str, Any]) -> float:
        program = f"{example.get('prefix', '')}{completion.text}\n\n{example['tests']}\n"
        return 1.0 if run_python(program, timeout=timeout, memory_mb=memory_mb).ok else 0.0

    reward.__name__ = "code-tests"
    return reward


BUILTIN = ("task", "task-partial", "exact-match", "code-tests")


def builtin_reward(name: str, task_name: str = "") -> Reward:
    """A built-in reward by exact name (see BUILTIN); the task ones need the run's task."""
    if name in ("task", "task-partial"):
        if not task_name:
            raise DreamError(f"reward {name!r} checks answers with a task's rules: set data.task")
        return task_reward(task_name, partial=name == "task-partial")
    if name == "exact-match":
        return exact_match
    if name == "code-tests":
        return code_tests()
    raise DreamError(f"unknown reward {name!r}; built-in rewards: {', '.join(BUILTIN)} (or pass a Python callable "
                     "to dreamlm.rl.train)")
