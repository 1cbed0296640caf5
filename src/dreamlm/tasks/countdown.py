"""Countdown CDn: combine k numbers with + - * / into a target, one equation per step.

Formats (a contract, see planning.md): input `n1,n2,...,nk,target` (`86,28,13,31,96`); output comma-joined
equations `a op b=c` (`86+28=114,31-13=18,114-18=96`). Each equation consumes two available numbers and adds its
result, so a solution has exactly k-1 equations and the last result is the target.

Conventions decided here:
- Subtraction is written larger-first (a >= b) and division only when exact (b != 0, a == b*c), so every
  intermediate result is a non-negative integer.
- Zero results: the generator never produces one (x-x=0 only serves to discard numbers, a degenerate trick), but
  the validator accepts them (e.g. `5-5=0`, `0/7=0`), since such an answer is still a correct use of every number.
- Splits: targets with `target % 10 == 7` (17, 27, ..., 97: 9 of the 91 targets 10..100, ~10 %) are held out as
  the out-of-distribution split "ood"; "train" and "test" never use them. train and test are disjoint by puzzle:
  the hash of the canonical key (sorted numbers, target) decides which split a puzzle belongs to (tasks.splits).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from dreamlm.errors import DreamError
from dreamlm.tasks.splits import check_split, key_in_split

NUMBER_RANGE = (1, 99)  # inputs drawn (and accepted) in this range
TARGET_RANGE = (10, 100)  # targets the generator draws
PARSE_TARGET_RANGE = (1, 1000)  # targets parse_input accepts (wider, for external sets)
MIN_K, MAX_K = 2, 6  # the DFS is exponential in k; 6 numbers already takes seconds on unsolvable draws
OOD_TARGETS = tuple(t for t in range(TARGET_RANGE[0], TARGET_RANGE[1] + 1) if t % 10 == 7)
IN_DISTRIBUTION_TARGETS = tuple(t for t in range(TARGET_RANGE[0], TARGET_RANGE[1] + 1) if t % 10 != 7)
OPS = ("+", "-", "*", "/")  # also the DFS order, which decides the "first solution found"

_INT = r"(0|[1-9][0-9]*)"
_EQUATION = re.compile(rf"{_INT}([-+*/]){_INT}={_INT}")
_INPUT = re.compile(rf"{_INT}(,{_INT})*")
# Longest number accepted in an answer: bigger than any reachable value (99**6 has 12 digits), and keeps int() cheap.
_MAX_DIGITS = 15


class Step(NamedTuple):
    """One equation `a op b=result`."""

    a: int
    op: str
    b: int
    result: int

    def __str__(self) -> str:
        return f"{self.a}{self.op}{self.b}={self.result}"


@dataclass(frozen=True)
class Puzzle:
    """A generated puzzle: the numbers, the target and the first solution the DFS found."""

    numbers: tuple[int, ...]
    target: int
    steps: tuple[Step, ...]

    @property
    def input(self) -> str:
        """The puzzle in the spec text format."""
        return format_input(self.numbers, self.target)

    @property
    def output(self) -> str:
        """The solution in the spec text format."""
        return format_steps(self.steps)


def format_input(numbers: list[int] | tuple[int, ...], target: int) -> str:
    """`n1,...,nk,target`."""
    return ",".join(str(x) for x in (*numbers, target))


def format_steps(steps: list[Step] | tuple[Step, ...]) -> str:
    """Comma-joined equations."""
    return ",".join(str(step) for step in steps)


def _moves(a: int, b: int) -> list[Step]:
    """The equations combining a and b, in DFS order; no zero results, larger-first -, exact / only."""
    hi, lo = max(a, b), min(a, b)
    moves = [Step(a, "+", b, a + b)]
    if hi != lo:
        moves.append(Step(hi, "-", lo, hi - lo))
    moves.append(Step(a, "*", b, a * b))
    if lo and hi % lo == 0:
        moves.append(Step(hi, "/", lo, hi // lo))
    return moves


def solve(numbers: list[int] | tuple[int, ...], target: int) -> list[Step] | None:
    """The first solution of a depth-first search over pairs (i < j, ops + - * /), or None if unsolvable.

    The result of each step is appended after the remaining numbers, so the order (and hence the solution) is
    deterministic; failed multisets are memoised, which prunes without changing which solution comes first.
    """
    failed: set[tuple[int, ...]] = set()
    path: list[Step] = []

    def dfs(nums: list[int]) -> bool:
        if len(nums) == 1:
            return nums[0] == target
        key = tuple(sorted(nums))
        if key in failed:
            return False
        for i in range(len(nums)):
            for j in range(i + 1, len(nums)):
                rest = nums[:i] + nums[i + 1:j] + nums[j + 1:]
                for step in _moves(nums[i], nums[j]):
                    path.append(step)
                    if dfs(rest + [step.result]):
                        return True
                    path.pop()
        failed.add(key)
        return False

    return list(path) if dfs(list(numbers)) else None


def targets_for(split: str) -> tuple[int, ...]:
    """The target values the generator draws for a split."""
    check_split(split, has_ood=True, task="countdown")
    return OOD_TARGETS if split == "ood" else IN_DISTRIBUTION_TARGETS


def generate(rng: random.Random, k: int, split: str = "train") -> Puzzle:
    """A solvable CDk puzzle: numbers from 1..99, target from the split's targets, first DFS solution."""
    if not isinstance(k, int) or isinstance(k, bool) or not MIN_K <= k <= MAX_K:
        raise DreamError(f"countdown needs {MIN_K}..{MAX_K} numbers, got {k!r}")
    targets = targets_for(split)
    while True:
        target = rng.choice(targets)
        numbers = [rng.randint(*NUMBER_RANGE) for _ in range(k)]
        # Checked before the (costly) search: which of train/test a puzzle belongs to depends only on its key.
        if not key_in_split(f"{sorted(numbers)}:{target}", split):
            continue
        steps = solve(numbers, target)
        if steps is not None:
            return Puzzle(tuple(numbers), target, tuple(steps))


def parse_input(text: str) -> tuple[list[int], int]:
    """Parse `n1,...,nk,target` into (numbers, target); malformed or out of range → DreamError."""
    if not isinstance(text, str):
        raise DreamError(f"a countdown puzzle must be text, got {type(text).__name__}")
    body = text.strip()
    if not _INPUT.fullmatch(body):
        raise DreamError(f"a countdown puzzle must be comma-separated non-negative integers "
                         f"'n1,...,nk,target', got {body[:40]!r}")
    values = [int(part) for part in body.split(",")]
    numbers, target = values[:-1], values[-1]
    if len(numbers) < 2:
        raise DreamError(f"a countdown puzzle needs at least 2 numbers and a target, got {len(values)} values")
    lo, hi = NUMBER_RANGE
    bad = [x for x in numbers if not lo <= x <= hi]
    if bad:
        raise DreamError(f"countdown numbers must be in {lo}..{hi}, got {bad[0]}")
    lo, hi = PARSE_TARGET_RANGE
    if not lo <= target <= hi:
        raise DreamError(f"a countdown target must be in {lo}..{hi}, got {target}")
    return numbers, target


def view_width(k: int) -> int:
    """Digits per number in the "fixed" view of CDk: enough for any intermediate result of k numbers from
    NUMBER_RANGE (at most 99**(k-1) before the last equation) and for any target parse_input accepts."""
    return max(len(str(NUMBER_RANGE[1] ** (k - 1))), len(str(PARSE_TARGET_RANGE[1])))


def _pad_numbers(text: str, width: int) -> str:
    """Every number in `text` written with leading zeros to `width` digits (DreamError if one is longer)."""
    def pad(match: re.Match[str]) -> str:
        digits = match.group().lstrip("0") or "0"
        if len(digits) > width:
            raise DreamError(f"{digits[:20]} does not fit the {width}-digit fixed view")
        return digits.rjust(width, "0")

    return re.sub(r"[0-9]+", pad, text)


def fixed_view(text: str, k: int) -> str:
    """The "fixed" view of a CDk puzzle: every number zero-padded to `view_width(k)` digits, so each equation of
    an answer sits at the same characters whatever its values (`86,28,13,96` → `0086,0028,0013,0096`). A masked
    diffusion model then knows where every digit of every equation goes before it knows the digits, and the digits
    of a, b and a op b line up column by column."""
    numbers, target = parse_input(text)
    return _pad_numbers(format_input(numbers, target), view_width(k))


def to_fixed(answer: str, k: int) -> str:
    """An answer written in the fixed view of CDk (for training pairs)."""
    return _pad_numbers(answer.strip(), view_width(k))


def from_fixed(answer: str) -> str:
    """A fixed-view answer written plainly: leading zeros dropped from every number (`0086+0028=0114` →
    `86+28=114`); anything else is kept, so a malformed answer stays malformed for the validator."""
    return re.sub(r"[0-9]+", lambda m: m.group().lstrip("0") or "0", answer)


REF_LETTERS = "abcde"  # "refs" view: the result of equation 1, 2, ... where a later equation uses it


def to_refs(answer: str, k: int) -> str:
    """An answer in the "refs" view of CDk (for training pairs): the fixed view, except that an operand which is the
    result of an earlier equation is written as that equation's letter (`a` for the first, `b` for the second, ...)
    repeated to the view's width: `0086+0028=0114,aaaa-0018=0096`. Where a value is both an unused input number and
    an unused result, the result is taken. A malformed answer is written in the plain fixed view."""
    steps = [_parse_step(part) for part in answer.strip().split(",")]
    if any(step is None for step in steps) or len(steps) > len(REF_LETTERS) + 1:
        return to_fixed(answer, k)
    width, unused, parts = view_width(k), [], []  # unused: (value, equation index) of results not used yet
    for index, step in enumerate(steps):
        operands = []
        for value in (step.a, step.b):
            ref = next((i for v, i in reversed(unused) if v == value), None)
            if ref is None:
                operands.append(str(value).rjust(width, "0"))
            else:
                unused.remove((value, ref))
                operands.append(REF_LETTERS[ref] * width)
        unused.append((step.result, index))
        parts.append(f"{operands[0]}{step.op}{operands[1]}={str(step.result).rjust(width, '0')}")
    return _pad_numbers(",".join(parts), width)


def from_refs(answer: str) -> str:
    """A refs-view answer written plainly: each letter run is replaced by the result the answer itself gives for
    that equation, then leading zeros are dropped. A letter for an equation that is not earlier in the answer, or a
    run of mixed letters, is left as written, so the validator rejects it."""
    parts = answer.strip().split(",")
    results: list[str] = []
    for index, part in enumerate(parts):
        def resolve(match: re.Match[str]) -> str:
            run = match.group()
            ref = REF_LETTERS.find(run[0])
            return results[ref] if len(set(run)) == 1 and 0 <= ref < index else run
        parts[index] = re.sub(rf"[{REF_LETTERS}]+", resolve, part)
        results.append(parts[index].rsplit("=", 1)[-1])
    return from_fixed(",".join(parts))


def _parse_step(text: str) -> Step | None:
    match = _EQUATION.fullmatch(text)
    if match is None or max(len(g) for g in match.group(1, 3, 4)) > _MAX_DIGITS:
        return None
    return Step(int(match.group(1)), match.group(2), int(match.group(3)), int(match.group(4)))


def _step_is_right(step: Step) -> bool:
    """Arithmetic check with the format's rules: larger-first subtraction, exact division."""
    a, op, b, c = step
    if op == "+":
        return a + b == c
    if op == "-":
        return a >= b and a - b == c
    if op == "*":
        return a * b == c
    return b != 0 and a == b * c  # "/": exact, so the quotient is c with no remainder


def is_valid_solution(input_text: str, answer_text: str) -> bool:
    """True if the answer reaches the target using every number and intermediate result exactly once.

    Raises DreamError for a malformed puzzle (bad data); never raises on a malformed answer (returns False).
    """
    numbers, target = parse_input(input_text)
    if not isinstance(answer_text, str):
        return False
    parts = answer_text.strip().split(",")
    if len(parts) != len(numbers) - 1:
        return False
    available = Counter(numbers)
    result = None
    for part in parts:
        step = _parse_step(part)
        if step is None or not _step_is_right(step):
            return False
        # Multiset accounting: the two operands must be available (twice if equal), the result becomes available.
        available[step.a] -= 1
        available[step.b] -= 1
        if available[step.a] < 0 or available[step.b] < 0:
            return False
        available[step.result] += 1
        result = step.result
    return result == target
