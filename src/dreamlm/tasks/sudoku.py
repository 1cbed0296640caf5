"""Sudoku 4×4 and 9×9: generator (unique solution, exact blank count), parser, formatter, solver, validator.

Formats (a contract, see planning.md): 9×9 is 81 characters row-major with `0` for a blank; 4×4 is four rows of
four digits joined by newlines (`0042\\n2031\\n4023\\n3214`); answers use the same format as the puzzle.

Internally a grid is a flat list of n*n ints (0 = blank) and candidates are bitmasks (bit d-1 = digit d), which is
what makes the pure-Python solver fast enough to generate thousands of 9×9 puzzles per minute.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from dreamlm.errors import DreamError
from dreamlm.tasks.splits import key_in_split

SIZES = (4, 9)
# Most blanks generate() accepts. 4×4: 4 givens is the proven minimum, so 12. 9×9: 17 givens is the proven minimum
# (64 blanks), but puzzles with few givens are so rare that this generator already needs seconds for 61 blanks
# (20 givens; 60 blanks takes ~0.3 s), so it refuses more rather than search for minutes.
MAX_BLANKS = {4: 12, 9: 61}
# Hill-climbing moves (blank a given, repair uniqueness, re-minimise) per full grid before drawing a new grid.
_PERTURB_STEPS = {4: 20, 9: 150}

Grid = list[list[int]]


@dataclass(frozen=True)
class Puzzle:
    """A generated puzzle: givens (0 = blank) and its unique solution, both as n×n lists of ints."""

    size: int
    givens: Grid
    solution: Grid

    @property
    def input(self) -> str:
        """The puzzle in the spec text format."""
        return format(self.givens)

    @property
    def output(self) -> str:
        """The solution in the spec text format."""
        return format(self.solution)

    @property
    def blanks(self) -> int:
        """Number of blank cells."""
        return sum(v == 0 for row in self.givens for v in row)


@dataclass(frozen=True)
class _Geometry:
    n: int
    row: tuple[int, ...]  # row index of each cell
    col: tuple[int, ...]
    box: tuple[int, ...]


@lru_cache(maxsize=None)
def _geometry(n: int) -> _Geometry:
    b = 2 if n == 4 else 3
    cells = range(n * n)
    return _Geometry(
        n=n,
        row=tuple(c // n for c in cells),
        col=tuple(c % n for c in cells),
        box=tuple((c // n) // b * b + (c % n) // b for c in cells),
    )


def _check_size(size: int) -> int:
    if size not in SIZES:
        raise DreamError(f"sudoku size must be 4 or 9, got {size!r}")
    return size


def _search(flat: list[int], n: int, limit: int, *, ban: tuple[int, int] | None = None,
            rng: random.Random | None = None, keep: list[list[int]] | None = None) -> int:
    """Count completions of `flat` up to `limit` (0 if the givens clash).

    ban=(cell, digit) forbids one digit in one cell (used to ask "is there a solution other than this one?");
    rng randomises the digit order (used to draw random full grids); found solutions are appended to `keep`.
    """
    geo = _geometry(n)
    R, C, B = geo.row, geo.col, geo.box
    rows, cols, boxes = [0] * n, [0] * n, [0] * n
    grid = list(flat)
    for c, v in enumerate(grid):
        if v:
            bit = 1 << (v - 1)
            if (rows[R[c]] | cols[C[c]] | boxes[B[c]]) & bit:
                return 0
            rows[R[c]] |= bit
            cols[C[c]] |= bit
            boxes[B[c]] |= bit
    empties = [c for c, v in enumerate(grid) if v == 0]
    total = len(empties)
    full = (1 << n) - 1
    banned = [0] * (n * n)
    if ban is not None:
        banned[ban[0]] = 1 << (ban[1] - 1)
    count = 0

    def rec(k: int) -> bool:
        """Fill empties[k:]; True once `limit` solutions were found (stop everything)."""
        nonlocal count
        if k == total:
            count += 1
            if keep is not None:
                keep.append(list(grid))
            return count >= limit
        # Most-constrained cell first (a naked single ends the scan early).
        best, best_mask, best_count = k, 0, n + 1
        masks = []
        for i in range(k, total):
            c = empties[i]
            mask = full & ~(rows[R[c]] | cols[C[c]] | boxes[B[c]] | banned[c])
            if not mask:
                return False
            masks.append(mask)
            bits = mask.bit_count()
            if bits < best_count:
                best, best_mask, best_count = i, mask, bits
                if bits == 1:
                    break
        if best_count > 1:
            # No naked single: look for hidden singles (a digit with one place left in a row, column or box).
            # once/twice are bitwise "seen at least once/twice" counters per unit; this prunes far more than it
            # costs on the sparse puzzles that uniqueness checks spend their time on.
            r1, r2, c1, c2, b1, b2 = [0] * n, [0] * n, [0] * n, [0] * n, [0] * n, [0] * n
            for i in range(k, total):
                c, m = empties[i], masks[i - k]
                u = R[c]
                r2[u] |= r1[u] & m
                r1[u] |= m
                u = C[c]
                c2[u] |= c1[u] & m
                c1[u] |= m
                u = B[c]
                b2[u] |= b1[u] & m
                b1[u] |= m
            for u in range(n):
                if (r1[u] | rows[u]) != full or (c1[u] | cols[u]) != full or (b1[u] | boxes[u]) != full:
                    return False  # some digit has no place left in this unit
            for i in range(k, total):
                c, m = empties[i], masks[i - k]
                hidden = m & ((r1[R[c]] & ~r2[R[c]]) | (c1[C[c]] & ~c2[C[c]]) | (b1[B[c]] & ~b2[B[c]]))
                if hidden:
                    if hidden & (hidden - 1):
                        return False  # this cell is the only place for two digits
                    best, best_mask = i, hidden
                    break
        empties[k], empties[best] = empties[best], empties[k]
        c = empties[k]
        r, co, bx = R[c], C[c], B[c]
        choices = [1 << d for d in range(n) if best_mask >> d & 1]
        if rng is not None:
            rng.shuffle(choices)
        for bit in choices:
            rows[r] |= bit
            cols[co] |= bit
            boxes[bx] |= bit
            grid[c] = bit.bit_length()
            if rec(k + 1):
                return True
            rows[r] ^= bit
            cols[co] ^= bit
            boxes[bx] ^= bit
        grid[c] = 0
        empties[k], empties[best] = empties[best], empties[k]
        return False

    rec(0)
    return count


def _flatten(grid: Grid) -> tuple[list[int], int]:
    """Check the shape and values of a list-of-lists grid and flatten it."""
    n = len(grid)
    _check_size(n)
    if any(len(row) != n for row in grid):
        raise DreamError(f"a {n}×{n} sudoku grid needs {n} rows of {n} values")
    flat = [v for row in grid for v in row]
    if any(not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= n for v in flat):
        raise DreamError(f"sudoku values must be integers 0..{n} (0 = blank)")
    return flat, n


def _unflatten(flat: list[int], n: int) -> Grid:
    return [flat[r * n:(r + 1) * n] for r in range(n)]


def count_solutions(grid: Grid, limit: int = 2) -> int:
    """Number of solutions of `grid`, counting stops at `limit` (so 2 means "not unique")."""
    flat, n = _flatten(grid)
    return _search(flat, n, limit)


def solve(grid: Grid) -> Grid | None:
    """One solution of `grid` (the first in search order), or None if it has none; exact backtracking."""
    flat, n = _flatten(grid)
    found: list[list[int]] = []
    _search(flat, n, 1, keep=found)
    return _unflatten(found[0], n) if found else None


def _random_full_grid(rng: random.Random, n: int) -> list[int]:
    found: list[list[int]] = []
    _search([0] * (n * n), n, 1, rng=rng, keep=found)
    return found[0]


def _witness(flat: list[int], n: int, cell: int) -> list[int] | None:
    """A solution with a different digit at `cell` once that given is blanked, or None if blanking keeps uniqueness.

    The current digit is the only completion iff no solution puts another digit there, so one "any solution?"
    search with that digit banned replaces a two-solution count (about half the work).
    """
    digit = flat[cell]
    flat[cell] = 0
    found: list[list[int]] = []
    _search(flat, n, 1, ban=(cell, digit), keep=found)
    flat[cell] = digit
    return found[0] if found else None


def _still_witness(witness: list[int], flat: list[int], cell: int) -> bool:
    """True if `witness` still agrees with every given except `cell` (so `cell` still cannot be blanked)."""
    return all(v == 0 or v == w or i == cell for i, (v, w) in enumerate(zip(flat, witness)))


def _minimise(flat: list[int], n: int, target_givens: int, rng: random.Random,
              witnesses: dict[int, list[int]]) -> None:
    """Blank givens of a unique puzzle in random order while uniqueness holds, stopping at `target_givens`.

    witnesses[cell] is an alternative solution proving `cell` cannot be blanked; while it agrees with every given
    it stays a proof, so the expensive search is skipped (blanking other cells only adds solutions).
    """
    givens = [c for c, v in enumerate(flat) if v]
    rng.shuffle(givens)
    count = len(givens)
    for c in givens:
        if count <= target_givens:
            return
        old = witnesses.get(c)
        if old is not None and _still_witness(old, flat, c):
            continue
        witness = _witness(flat, n, c)
        if witness is None:
            flat[c] = 0
            count -= 1
            witnesses.pop(c, None)
        else:
            witnesses[c] = witness


def _givens(flat: list[int]) -> int:
    return sum(1 for v in flat if v)


def _carve(rng: random.Random, solution: list[int], n: int, target: int) -> list[int] | None:
    """Blank cells of a full grid down to exactly `target` givens with a unique solution, or None if stuck."""
    flat = list(solution)
    witnesses: dict[int, list[int]] = {}
    _minimise(flat, n, target, rng, witnesses)
    # Greedy removal ends in a minimal puzzle that often has more givens than wanted (9×9 top-down minimal puzzles
    # average ~24 givens). Hill-climb over puzzles of the same grid: blank one given (uniqueness breaks), add back
    # givens where another solution disagrees until unique again, minimise, and keep the move unless it got worse.
    for _ in range(_PERTURB_STEPS[n]):
        before = _givens(flat)
        if before <= target:
            break
        saved, saved_witnesses = list(flat), dict(witnesses)
        cell = rng.choice([c for c, v in enumerate(flat) if v])
        flat[cell] = 0
        witnesses.pop(cell, None)
        while True:
            found: list[list[int]] = []
            _search(flat, n, 2, keep=found)
            alt = next((s for s in found if s != solution), None)
            if alt is None:
                break
            diff = [c for c in range(n * n) if alt[c] != solution[c] and c != cell]
            if not diff:
                fix = cell
            else:
                # Prefer the fix that refutes the most witnesses: those givens become candidates for blanking,
                # which is what lets the next minimise go below the previous count.
                refuted = [sum(1 for w in witnesses.values() if w[c] != solution[c]) for c in diff]
                top = max(refuted)
                fix = rng.choice([c for c, r in zip(diff, refuted) if r == top])
            flat[fix] = solution[fix]
        _minimise(flat, n, target, rng, witnesses)
        if _givens(flat) > before:
            flat, witnesses = saved, saved_witnesses
    return flat if _givens(flat) == target else None


def generate(rng: random.Random, size: int, blanks: int, split: str | None = None) -> Puzzle:
    """A puzzle with exactly `blanks` blanks and a unique solution.

    split="train"/"test" keeps only solution grids whose hash belongs to that split (see tasks.splits), so train
    and test never share a solution grid; None means no split restriction.
    """
    n = _check_size(size)
    if not isinstance(blanks, int) or isinstance(blanks, bool) or not 0 <= blanks <= MAX_BLANKS[n]:
        raise DreamError(f"{n}×{n} sudoku generation supports 0..{MAX_BLANKS[n]} blanks, got {blanks!r}")
    target = n * n - blanks
    while True:
        solution = _random_full_grid(rng, n)
        if split is not None and not key_in_split("".join(map(str, solution)), split):
            continue
        flat = _carve(rng, solution, n, target)
        if flat is not None:
            return Puzzle(n, _unflatten(flat, n), _unflatten(solution, n))


def _parse_flat(text: str, size: int | None) -> tuple[list[int], int]:
    """Parse the text format into a flat list without checking for clashes."""
    if not isinstance(text, str):
        raise DreamError(f"a sudoku must be text, got {type(text).__name__}")
    if size is not None:
        _check_size(size)
    body = text.strip()
    if "\n" in body:
        lines = [line.strip() for line in body.split("\n")]
        if len(lines) != 4 or any(len(line) != 4 for line in lines) or size == 9:
            raise DreamError("a sudoku written on several lines must be 4 rows of 4 digits (4×4); "
                             "a 9×9 sudoku is 81 characters on one line")
        chars, n = "".join(lines), 4
    elif len(body) == 81 and size in (None, 9):
        chars, n = body, 9
    elif len(body) == 16 and size in (None, 4):
        chars, n = body, 4
    else:
        want = {None: "81 characters (9×9) or 4 lines of 4 digits (4×4)", 9: "81 characters",
                4: "4 lines of 4 digits (or 16 digits)"}[size]
        raise DreamError(f"a sudoku must be {want}, got {len(body)} characters")
    bad = sorted({ch for ch in chars if ch not in "0123456789"[: n + 1]})
    if bad:
        raise DreamError(f"a {n}×{n} sudoku may only contain digits 0..{n}, found {''.join(bad)!r}")
    return [int(ch) for ch in chars], n


def canonical(text: str, size: int | None = None) -> str:
    """A grid in any accepted layout (a 4×4 as 4 lines or 16 digits, stray spaces, CRLF) written in the spec's
    layout for its size; clashes are not checked. Malformed text → DreamError."""
    return format(_unflatten(*_parse_flat(text, size)))


def _clash(flat: list[int], n: int) -> str | None:
    """Describe the first repeated digit in a row, column or box, or None if there is none."""
    geo = _geometry(n)
    seen: dict[tuple[str, int, int], int] = {}
    for c, v in enumerate(flat):
        if not v:
            continue
        for kind, index in (("row", geo.row[c]), ("column", geo.col[c]), ("box", geo.box[c])):
            if (kind, index, v) in seen:
                return f"digit {v} appears twice in {kind} {index + 1}"
            seen[(kind, index, v)] = c
    return None


def parse(text: str, size: int | None = None) -> Grid:
    """Parse a puzzle in the spec format into an n×n grid (0 = blank); malformed or contradictory → DreamError."""
    flat, n = _parse_flat(text, size)
    clash = _clash(flat, n)
    if clash:
        raise DreamError(f"contradictory sudoku givens: {clash}")
    return _unflatten(flat, n)


def format(grid: Grid) -> str:  # noqa: A001 - the module's public name, mirrors parse()
    """Write a grid in the spec format for its size (9×9: 81 characters; 4×4: 4 lines)."""
    flat, n = _flatten(grid)
    rows = ["".join(map(str, flat[r * n:(r + 1) * n])) for r in range(n)]
    return "".join(rows) if n == 9 else "\n".join(rows)


def is_valid_solution(puzzle_text: str, answer_text: str) -> bool:
    """True if the answer fills the puzzle: every row, column and box a permutation of 1..n, givens kept.

    Raises DreamError for a malformed puzzle (bad data); never raises on a malformed answer (returns False).
    """
    givens = [v for row in parse(puzzle_text) for v in row]
    n = 4 if len(givens) == 16 else 9
    try:
        answer, m = _parse_flat(answer_text, n)
    except (DreamError, TypeError):
        return False
    if m != n or 0 in answer or _clash(answer, n) is not None:
        return False
    # No zeros and no repeats in any unit means each unit is exactly a permutation of 1..n.
    return all(g == 0 or g == a for g, a in zip(givens, answer))
