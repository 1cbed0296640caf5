"""Planning tasks (Sudoku, Countdown, star graph): generators, validators and a registry by exact name.

Every task turns a `random.Random` and a split into an example `{"input": ..., "output": ...}` in the text formats
of planning.md, validates answers by checking the rules (never by comparing with one stored answer), checks
puzzles for malformation (DreamError) and names the characters its texts use, for a character tokenizer.

Splits: "train" and "test" are disjoint by construction (a stable hash of each puzzle's canonical key assigns it to
one of them, ~10 % test; see tasks.splits); "ood" exists only for Countdown (held-out target values, see
tasks.countdown). `write_dataset` seeds its generator from (task name, split, seed), so the same arguments always
write the same file.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dreamlm.errors import DreamError
from dreamlm.tasks import countdown, stargraph, sudoku
from dreamlm.tasks.splits import SPLITS, check_split, key_in_split

__all__ = [
    "SPLITS", "TASKS", "Task", "countdown_task", "get_task", "make_examples", "register", "star_task",
    "sudoku_task", "task_names", "write_dataset",
]

Example = dict[str, str]
View = Callable[[str], tuple[str, Callable[[str], str], Callable[[str], str]]]


def _same(text: str) -> str:
    return text

# Default difficulty: blanks drawn uniformly from these ranges (inclusive).
SUDOKU_BLANKS = {4: (6, 10), 9: (40, 60)}
SUDOKU_ALPHABET = {4: "01234\n", 9: "0123456789"}
COUNTDOWN_ALPHABET = "0123456789+-*/=,"
STAR_ALPHABET = "0123456789,|/="


@dataclass(frozen=True)
class Task:
    """A planning task: example generator, answer validator, input checker and character alphabet."""

    name: str
    alphabet: str  # every character that can appear in an input or output
    has_ood: bool
    make: Callable[[random.Random, str], tuple[str, str]] = field(repr=False)
    check: Callable[[str], object] = field(repr=False)
    is_valid: Callable[[str, str], bool] = field(repr=False)
    # Optional views by name: puzzle → (the puzzle as such a model reads it, answer in the puzzle's terms → answer
    # in the view's, answer in the view's terms → answer in the puzzle's). "" is the default view.
    views: dict[str, View] = field(default_factory=dict, repr=False)
    # Optional: (the puzzle as a view reads it, the view's name) → any answer of the layout every answer to it has
    # in that view (so its length in tokens), or None where answers differ in length.
    answer_layout: Callable[[str, str], str | None] = field(default=lambda text, view: None, repr=False)

    def generate(self, rng: random.Random, split: str = "train") -> Example:
        """One example {"input", "output"} drawn from `split` ("train", "test" or, where supported, "ood")."""
        check_split(split, has_ood=self.has_ood, task=self.name)
        text_in, text_out = self.make(rng, split)
        return {"input": text_in, "output": text_out}

    def check_input(self, input: str) -> None:  # noqa: A002 - mirrors the JSONL field name
        """Raise DreamError if `input` is not a well-formed puzzle of this task."""
        self.check(input)

    def check_view(self, view: str) -> None:
        """Raise DreamError unless `view` is "" (the default) or one of this task's named views."""
        if view and view not in self.views:
            known = ", ".join(repr(v) for v in self.views if v) or "none"
            raise DreamError(f"task {self.name} has no view {view!r} (its views: {known})")

    def _view(self, input: str, view: str) -> tuple[str, Callable[[str], str], Callable[[str], str]]:  # noqa: A002
        self.check_view(view)
        if view not in self.views:
            return input, _same, _same
        return self.views[view](input)

    def model_view(self, input: str, view: str = "") -> tuple[str, Callable[[str], str]]:  # noqa: A002
        """The puzzle as a model of this task reads it, and the map of such a model's answer back to `input`'s terms
        (identity for most tasks; star graphs rename their nodes to the training names' width, and their "edges"
        view writes each edge as one token)."""
        text, _, back = self._view(input, view)
        return text, back

    def training_pair(self, input: str, output: str, view: str = "") -> tuple[str, str]:  # noqa: A002
        """An example {input, output} as a model with this view is trained on it."""
        text, forward, _ = self._view(input, view)
        return text, forward(output)

    def validate(self, input: str, answer: str) -> bool:  # noqa: A002
        """True if `answer` solves `input`; DreamError for a malformed puzzle, False for any malformed answer."""
        self.check(input)
        return self.is_valid(input, answer)


def sudoku_task(size: int, min_blanks: int | None = None, max_blanks: int | None = None) -> Task:
    """Sudoku of size 4 or 9 with blanks drawn uniformly from [min_blanks, max_blanks] (defaults 6–10 / 40–60)."""
    if size not in sudoku.SIZES:
        raise DreamError(f"sudoku size must be 4 or 9, got {size!r}")
    default_lo, default_hi = SUDOKU_BLANKS[size]
    lo = default_lo if min_blanks is None else min_blanks
    hi = default_hi if max_blanks is None else max_blanks
    if not 0 <= lo <= hi <= sudoku.MAX_BLANKS[size]:
        raise DreamError(f"{size}×{size} sudoku blanks must satisfy 0 <= min <= max <= {sudoku.MAX_BLANKS[size]}, "
                         f"got {lo}..{hi}")
    name = f"sudoku{size}" if (lo, hi) == (default_lo, default_hi) else f"sudoku{size}-{lo}-{hi}"

    def make(rng: random.Random, split: str) -> tuple[str, str]:
        puzzle = sudoku.generate(rng, size, rng.randint(lo, hi), split=split)
        return puzzle.input, puzzle.output

    return Task(name, SUDOKU_ALPHABET[size], False, make, lambda text: sudoku.parse(text, size),
                sudoku.is_valid_solution, {"": _sudoku_layout(size)},
                answer_layout=lambda text, view: text)  # the grid read in the spec's layout: the answer's


def _sudoku_layout(size: int) -> View:
    """The default sudoku view: a puzzle written in another accepted layout (a 4×4 as 16 digits on one line, rows
    with stray spaces or CRLF endings) is read in the spec's layout, as the models were trained; the answer is
    written back in the puzzle's own (16 digits on one line for such a 4×4)."""
    def canonical(text: str) -> str:
        try:
            return sudoku.canonical(text, size)
        except DreamError:
            return text  # not a grid of this size: left for the validator to reject

    def view(text: str) -> tuple[str, Callable[[str], str], Callable[[str], str]]:
        flat = size == 4 and "\n" not in text.strip()
        return canonical(text), canonical, (lambda answer: answer.replace("\n", "")) if flat else _same

    return view


def countdown_task(k: int) -> Task:
    """Countdown with k input numbers (CDk); has an "ood" split of held-out targets."""
    if not isinstance(k, int) or isinstance(k, bool) or not countdown.MIN_K <= k <= countdown.MAX_K:
        raise DreamError(f"countdown needs {countdown.MIN_K}..{countdown.MAX_K} numbers, got {k!r}")

    def make(rng: random.Random, split: str) -> tuple[str, str]:
        puzzle = countdown.generate(rng, k, split)
        return puzzle.input, puzzle.output

    def check(text: str) -> None:
        numbers, _ = countdown.parse_input(text)
        if len(numbers) != k:
            raise DreamError(f"a cd{k} puzzle has {k} numbers and a target, got {len(numbers)} numbers")

    def fixed(text: str) -> tuple[str, Callable[[str], str], Callable[[str], str]]:
        return (countdown.fixed_view(text, k), lambda answer: countdown.to_fixed(answer, k),
                countdown.from_fixed)

    def refs(text: str) -> tuple[str, Callable[[str], str], Callable[[str], str]]:
        return (countdown.fixed_view(text, k), lambda answer: countdown.to_refs(answer, k),
                countdown.from_refs)

    def layout(text: str, view: str) -> str | None:  # in the fixed-width views every equation is as long
        number = "0" * countdown.view_width(k)
        return ",".join([f"{number}+{number}={number}"] * (k - 1)) if view in ("fixed", "refs") else None

    return Task(f"cd{k}", COUNTDOWN_ALPHABET, True, make, check, countdown.is_valid_solution,
                {"fixed": fixed, "refs": refs}, answer_layout=layout)


def _star_key(puzzle: stargraph.Puzzle) -> str:
    # The graph and query without edge order or orientation: shuffles of one puzzle share a split.
    edges = sorted(tuple(sorted(edge)) for edge in puzzle.edges)
    return f"{edges}/{puzzle.centre},{puzzle.goal}"


def star_task(degree: int, length: int) -> Task:
    """Star graph G(degree, length), named "star-{degree}-{length}"; length counts the path's nodes incl. centre."""
    stargraph.generate(random.Random(0), degree, length)  # validates the knobs now rather than at first use

    def make(rng: random.Random, split: str) -> tuple[str, str]:
        while True:
            puzzle = stargraph.generate(rng, degree, length)
            if key_in_split(_star_key(puzzle), split):
                return puzzle.input, puzzle.output

    return Task(f"star-{degree}-{length}", STAR_ALPHABET, False, make, stargraph.parse_input,
                stargraph.is_valid_solution,
                {"": _renaming(stargraph.relabel), "edges": _renaming(stargraph.edge_view)})


def _renaming(rename: Callable[[str], tuple[str, dict[int, int]]]) -> View:
    """A star-graph view from a renaming (puzzle → (view text, view name → puzzle name)): answer paths are mapped
    into the view's names and back."""
    def view(text: str) -> tuple[str, Callable[[str], str], Callable[[str], str]]:
        renamed, back = rename(text)
        forward = {v: k for k, v in back.items()}
        return (renamed, lambda answer: stargraph.unlabel(answer, forward),
                lambda answer: stargraph.unlabel(answer, back))

    return view


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        sudoku_task(4), sudoku_task(9),
        countdown_task(3), countdown_task(4), countdown_task(5),
        star_task(2, 5), star_task(3, 5), star_task(5, 5),
    )
}


_MADE: dict[str, Task] = {}


def task_names() -> list[str]:
    """Names of the registered tasks."""
    return list(TASKS)


def register(task: Task) -> Task:
    """Add a task (e.g. `star_task(7, 4)`) to the registry; re-registering the same name replaces it."""
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task with exactly this name, else DreamError listing the known names."""
    task = TASKS.get(name) or _MADE.get(name)
    star = re.fullmatch(r"star-([1-9][0-9]?)-([1-9][0-9]?)", name) if isinstance(name, str) else None
    if task is None and star is not None and int(star[2]) >= 2:
        # any G(d, l) by name, e.g. "star-7-4": made once and kept aside (the registry lists only the defaults)
        task = _MADE.setdefault(name, star_task(int(star[1]), int(star[2])))
    if task is None:
        raise DreamError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} "
                         f"(and any star-D-L, e.g. star-7-4)")
    return task


CHUNK = 1000  # examples per independently seeded chunk when generating with workers


def make_examples(task_name: str, n: int, seed: int, split: str = "train",
                  workers: int | None = None, progress: Callable[[int], None] | None = None) -> list[Example]:
    """n examples of a task's split, deterministic in (task_name, split, seed).

    `workers=None` draws one stream. With `workers=k` (any k >= 1) the examples come in chunks of CHUNK, each from a
    stream seeded by its index, generated by k processes: a different set from the single stream, but the same for
    every k (9×9 Sudoku makes ~20 unique-solution puzzles a second per core). `progress(k)` is called as examples
    are made (k at a time).
    """
    task = get_task(task_name)
    check_split(split, has_ood=task.has_ood, task=task.name)
    if not isinstance(n, int) or n < 0:
        raise DreamError(f"number of examples must be a non-negative integer, got {n!r}")
    # A str seed is hashed with sha512 by random.Random (stable across runs); naming the split in it also gives
    # train, test and ood different streams for the same seed.
    stream = f"dreamlm-tasks/{task.name}/{split}/{seed}"
    if workers is None:
        rng = random.Random(stream)
        examples = []
        for _ in range(n):
            examples.append(task.generate(rng, split))
            if progress is not None:
                progress(1)
        return examples
    if not isinstance(workers, int) or workers < 1:
        raise DreamError(f"workers must be an integer >= 1, got {workers!r}")
    jobs = [(task.name, split, f"{stream}/chunk{i}", min(CHUNK, n - start))
            for i, start in enumerate(range(0, n, CHUNK))]
    chunks = []
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            chunks.append(_chunk(job))
            if progress is not None:
                progress(len(chunks[-1]))
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for chunk in pool.imap(_chunk, jobs):  # in order: the same file for any worker count
                chunks.append(chunk)
                if progress is not None:
                    progress(len(chunk))
    return [example for chunk in chunks for example in chunk]


def _chunk(job: tuple[str, str, str, int]) -> list[Example]:
    name, split, stream, count = job
    task, rng = get_task(name), random.Random(stream)
    return [task.generate(rng, split) for _ in range(count)]


def write_dataset(task_name: str, n: int, seed: int, split: str, path: str | Path,
                  workers: int | None = None, progress: Callable[[int], None] | None = None) -> Path:
    """Write n examples as JSONL lines {"input": ..., "output": ...}; same arguments → byte-identical file."""
    examples = make_examples(task_name, n, seed, split, workers, progress)
    from dreamlm.checkpoint import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(example) + "\n" for example in examples)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline="\n"))
    return path
