"""Puzzle solving with trained planning models: a diffusion solver and its AR baseline behind one interface.

A planning model directory is a normal Dream-format checkpoint plus `dreamlm_task.json`:
`{"task": "sudoku4", "seq_len": 48, "separator": "<|sep|>", "command": "<how it was trained>"}`. The canvas is the
puzzle, the separator, then masks up to `seq_len` — exactly the training layout — and the answer is read up to EOS.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch

from dreamlm.errors import DreamError
from dreamlm.files import read_text
from dreamlm.model import DreamModel
from dreamlm.sampling import Constraints, cut_at_eos, diffusion_generate, steps_for_blocks
from dreamlm.sampling.autoregressive import ar_generate
from dreamlm.tasks import get_task, stargraph

TASK_FILE = "dreamlm_task.json"


@dataclass
class Solution:
    """One puzzle's answer, whether it obeys the rules, and what it cost."""

    input: str
    output: str
    valid: bool
    forward_passes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def bundled_model_dir(name: str) -> Path:
    """A planning model shipped inside the package (e.g. 'sudoku4-diffusion')."""
    return Path(str(resources.files("dreamlm") / "assets" / name))


def star_shapes(meta: dict) -> list[tuple[int, int]]:
    """The star-graph shapes (d, l) a planning model was trained on: its task file's "star_shapes" (recorded from
    the training data), else the shape in its task name ("star-5-5" → [(5, 5)]); [] for other tasks."""
    if meta.get("star_shapes"):
        return [(int(d), int(l)) for d, l in meta["star_shapes"]]
    star = re.fullmatch(r"star-(\d+)-(\d+)", str(meta.get("task", "")))
    return [(int(star[1]), int(star[2]))] if star else []


def read_shape(shapes: list[tuple[int, int]], degree: int, length: int) -> tuple[int, int] | None:
    """The shape (D, L) at which a model trained on `shapes` reads a G(degree, length): of the shapes with
    D >= degree and L >= length, the smallest degree, then the shortest arms; None when no shape covers it. The
    solver stretches the arms to L and, when D > degree, adds decoy arms up to D (`stargraph.stretch`)."""
    fits = sorted((d, l) for d, l in shapes if d >= degree and l >= length)
    return fits[0] if fits else None


def bundled_solver_dir(task: str, kind: str = "diffusion") -> Path:
    """The bundled `kind` ("diffusion" or "ar") model for a task. A star graph G(d, l) without a model of its own
    goes to a bundled star model trained on some G(D, L) with D >= d and L >= l (the smallest such D, then L, then
    the model whose largest training shape is smallest, then the name): the solver stretches shorter arms to L
    (`stargraph.stretch`, which keeps the graph a star of that shape) and, when D > d, adds decoy arms of fresh
    nodes up to D. DreamError when none fits."""
    path = bundled_model_dir(f"{task}-{kind}")
    if (path / "config.json").is_file():
        return path
    star = re.fullmatch(r"star-(\d+)-(\d+)", task)
    if star:
        degree, length = int(star[1]), int(star[2])
        fits = []
        for candidate in bundled_model_dir("x").parent.glob(f"star-*-{kind}"):
            if not (candidate / "config.json").is_file():
                continue
            meta_file = candidate / TASK_FILE
            meta = read_task_file(meta_file, solving=False) if meta_file.is_file() else \
                {"task": candidate.name.removesuffix(f"-{kind}")}
            trained = star_shapes(meta)
            shapes = [s for s in trained if s[0] >= degree and s[1] >= length]
            if shapes:  # ties go to the model of the fewest arms (the specialist)
                fits.append((min(shapes), max(trained), candidate.name))
        if fits:
            return bundled_model_dir(min(fits)[-1])
    raise DreamError(f"no bundled model for {task} yet; train one (recipes/planning) and pass --model")


def read_task_file(file: Path, solving: bool = True) -> dict[str, Any]:
    """A planning model's task file (dreamlm_task.json), checked: an object naming its task (and, to solve with
    it, its seq_len)."""
    try:
        meta = json.loads(read_text(file, "task file"))
    except json.JSONDecodeError as exc:
        raise DreamError(f"{file} is not valid JSON: {exc}") from None
    seq_len = meta.get("seq_len", 2 if not solving else None) if isinstance(meta, dict) else None
    if not (isinstance(meta, dict) and isinstance(meta.get("task"), str) and isinstance(seq_len, int)
            and not isinstance(seq_len, bool) and seq_len >= 2
            and isinstance(meta.get("separator", ""), str) and isinstance(meta.get("view", ""), str)):
        raise DreamError(f"{file} must be an object with a \"task\" name, an integer \"seq_len\" >= 2 and "
                         "optional \"separator\" and \"view\" strings")
    return meta


def write_task_file(path: str | Path, task: str, seq_len: int, separator: str, command: str, view: str = "",
                    shapes: list[tuple[int, int]] | None = None) -> None:
    """Record which task a model solves, how it reads puzzles (`view`, see Task.model_view), how it was trained
    and, for star graphs, the shapes (d, l) of its training graphs."""
    meta: dict[str, Any] = {"task": task, "seq_len": seq_len, "separator": separator, "command": command}
    if view:
        meta["view"] = view
    if shapes:
        meta["star_shapes"] = [list(s) for s in sorted(shapes)]
    (Path(path) / TASK_FILE).write_text(json.dumps(meta, indent=2) + "\n")


class Solver:
    """Loads a planning model and solves puzzles with it (diffusion or, for causal models, AR decoding)."""

    def __init__(self, model_dir: str | Path, device: str | None = None,
                 dtype: torch.dtype | str = torch.float32) -> None:
        model_dir = Path(model_dir)
        meta_file = model_dir / TASK_FILE
        if not meta_file.is_file():
            raise DreamError(f"{model_dir} is not a planning model (no {TASK_FILE})")
        meta = read_task_file(meta_file)
        model = DreamModel.from_pretrained(model_dir, dtype=dtype, device=device)
        if model.tokenizer is None:
            raise DreamError(f"{model_dir} has no tokenizer")
        self._setup(model, meta, str(model_dir))

    @classmethod
    def from_model(cls, model: DreamModel, task: str, seq_len: int, separator: str = "", view: str = "") -> "Solver":
        """A solver over a model in memory (with its tokenizer), e.g. to measure accuracy during training."""
        solver = cls.__new__(cls)
        solver._setup(model, {"task": task, "seq_len": seq_len, "separator": separator, "view": view}, "the model")
        return solver

    def _setup(self, model: DreamModel, meta: dict, where: str) -> None:
        self.meta, self.model = meta, model
        self.task = get_task(meta["task"])
        self.tok = model.tokenizer
        self.seq_len = int(meta["seq_len"])
        self.separator = meta.get("separator", "")
        self.view = str(meta.get("view", ""))
        self.star_shapes = star_shapes(meta)
        try:
            self.task.check_view(self.view)
        except DreamError as err:
            raise DreamError(f"{where}: {err}") from None

    @property
    def view_note(self) -> str:
        """A title suffix for live views of a model that reads puzzles in a view of their own ("" otherwise)."""
        return f" · {self.view} view: names as the model reads them" if self.view else ""

    @property
    def kind(self) -> str:
        """'ar' for a causal model, else 'diffusion'."""
        return "ar" if self.model.causal else "diffusion"

    def prompt_ids(self, puzzle: str) -> list[int]:
        """Token ids of the puzzle (as the model reads it, see Task.model_view) and separator: the canvas's fixed
        part."""
        return self._encode(self._view(puzzle)[0])

    def _view(self, puzzle: str) -> tuple[str, Callable[[str], str], int | None]:
        """Check the puzzle as given (DreamError if malformed), then give it as the model reads it, the map of an
        answer back, and how many tokens the answer takes when the puzzle fixes that (else None). A star graph with
        shorter arms than the model reads is first stretched to them, and one with fewer arms than the training shape
        it is read at gets decoy arms (`stargraph.stretch`); once every arm has one length, the path's length is known
        whichever arm the goal is on. Other tasks say when their answers have one layout (`Task.answer_layout`:
        a sudoku grid, Countdown in a fixed-width view)."""
        self.task.check_input(puzzle)
        unknown = set(puzzle) - set(self.task.alphabet) - set(" \t\r")  # the task's parser judges spacing
        if unknown:
            raise DreamError(f"the puzzle has characters this task never uses: {''.join(sorted(unknown))!r}")
        shape = self.read_shape(puzzle)
        if shape is None:
            text, back = self.task.model_view(puzzle, self.view)
            layout = self.task.answer_layout(text, self.view)
            return text, back, None if layout is None else len(self.tok.encode(layout))
        stretched, splice = stargraph.stretch(puzzle, shape[1], shape[0])
        text, back = self.task.model_view(stretched, self.view)
        answer_tokens = None
        if splice is not None:  # every arm has shape[1] nodes: so has the path (`a,b,...` in the view's names)
            goal = text.rstrip().removesuffix("=").rsplit(",", 1)[1]
            answer_tokens = len(self.tok.encode(",".join([goal] * shape[1])))
        return text, lambda answer: stargraph.unstretch(back(answer), splice), answer_tokens

    def read_shape(self, puzzle: str) -> tuple[int, int] | None:
        """For a star-graph model: the shape (degree, arm length) it reads this puzzle at (`read_shape` of its
        training shapes; more arms or longer ones than the puzzle's when the solver stretches it). None for other
        models, or when no training shape covers the puzzle (it is then read as given)."""
        if not self.star_shapes:
            return None
        edges, centre, _ = stargraph.parse_input(puzzle)
        return read_shape(self.star_shapes, *stargraph.shape(edges, centre))

    def reading_note(self, puzzle: str) -> str:
        """How a star-graph model reads a puzzle of another shape, for messages: " (arms stretched to 11 nodes, 1
        decoy arm added)"; "" when it reads the puzzle as given."""
        shape = self.read_shape(puzzle)
        if shape is None:
            return ""
        edges, centre, _ = stargraph.parse_input(puzzle)
        (degree, length), (to_degree, to_length) = stargraph.shape(edges, centre), shape
        parts = [f"arms stretched to {to_length} nodes"] if to_length != length else []
        if to_degree > degree:
            extra = to_degree - degree
            parts.append(f"{extra} decoy arm{'s' if extra > 1 else ''} added")
        return f" ({', '.join(parts)})" if parts else ""

    def answer_tokens(self, puzzle: str) -> int | None:
        """For a star-graph model: how many tokens the answer path takes as the model writes it, so that a
        diffusion solver can pin EOS right after it; None when the puzzle does not fix it, and for other models."""
        return self._view(puzzle)[2]

    def _encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text + self.separator)
        if len(ids) >= self.seq_len:
            raise DreamError(f"the puzzle needs {len(ids)} tokens; this model's canvas holds {self.seq_len}")
        return ids

    def solve(self, puzzles: list[str], steps: int | None = None, alg: str = "entropy",
              hook: Callable | None = None, watch: Callable[[int, torch.Tensor], None] | None = None,
              **fast: Any) -> list[Solution]:
        """Solve puzzles (grouped by prompt length so every canvas has the training layout).

        Diffusion decoding: by default one token per step, the most confident by `alg` first (easy-first, as the
        published small planning MDMs decode; `threshold=1.0` of the fast options). Dream's schedule commits two
        tokens at its last step, so the two hardest slots would be decided together, each blind to the other. `steps=N`
        decodes with Dream's schedule over N steps instead (the speed/quality knob); `fast` options pass through.
        Where the answer's length follows from the puzzle (a star graph's path once its arms are even, a sudoku
        grid, Countdown equations in a fixed-width view), the diffusion solver pins EOS (and the PAD tail) where the
        answer ends, as the model saw them in training: it finds the answer, not where to stop (an AR model stops
        by itself).
        """
        if steps is None and not fast:
            fast = {"threshold": 1.0}
        if watch is not None:  # `watch(n, canvas)` after each step (0: the canvas before the first), either kind
            inner = hook

            def hook(step: int | None, x: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
                if inner is not None:
                    x = inner(step, x, logits)
                watch(0 if step is None else step + 1, x)
                return x
        views = [self._view(p) for p in puzzles]
        prompts = [self._encode(text) for text, _, _ in views]
        groups: dict[tuple[int, int | None], list[int]] = {}
        for i, ids in enumerate(prompts):
            groups.setdefault((len(ids), views[i][2] if self.kind == "diffusion" else None), []).append(i)
        results: list[Solution | None] = [None] * len(puzzles)
        for (length, end), members in groups.items():
            batch = torch.tensor([prompts[i] for i in members])
            budget = self.seq_len - length
            start = time.perf_counter()
            if self.kind == "ar":
                out, passes = ar_generate(self.model, batch, budget, on_token=watch)
            else:
                constraints = None
                if end is not None and end < budget:
                    tail = range(length + end + 1, self.seq_len)
                    constraints = Constraints(pinned={length + end: self.model.config.eos_token_id,
                                                      **dict.fromkeys(tail, self.model.config.pad_token_id)})
                slots = end if constraints is not None else budget
                steps_here = steps or steps_for_blocks(slots, budget, fast.get("block_length"))
                res = diffusion_generate(self.model, batch, max_new_tokens=budget, steps=steps_here, alg=alg,
                                         temperature=0.0, return_dict_in_generate=True,
                                         generation_tokens_hook_func=hook, constraints=constraints, **fast)
                out, passes = res.sequences, res.forward_passes
            seconds = (time.perf_counter() - start) / len(members)
            for row, i in enumerate(members):
                answer = views[i][1](self.decode(out[row].tolist()[length:]))
                results[i] = Solution(puzzles[i], answer, self.task.validate(puzzles[i], answer), passes, seconds)
        return [r for r in results if r is not None]

    def solve_batches(self, puzzles: list[str], batch: int = 64, **kwargs: Any) -> list[Solution]:
        """`solve` over consecutive batches of `batch` puzzles (memory stays bounded for long files); answers in
        order."""
        return [solution for start in range(0, len(puzzles), batch)
                for solution in self.solve(puzzles[start:start + batch], **kwargs)]

    def budget(self, puzzle: str) -> int:
        """Canvas slots the model fills for this puzzle: those after the prompt, or for a star-graph diffusion
        model the answer path's (the rest is pinned, see `solve`)."""
        text, _, end = self._view(puzzle)
        free = self.seq_len - len(self._encode(text))
        return end if self.kind == "diffusion" and end is not None and end < free else free

    def decode(self, ids: list[int]) -> str:
        """Answer text: up to the first EOS, specials dropped."""
        return self.tok.decode(cut_at_eos(ids, self.model.config.eos_token_id), skip_special_tokens=True)


def resolve_task(kind: str, puzzle: str) -> str:
    """A registry task name from a family name and a puzzle: sudoku → sudoku4/9 by size, countdown → cdN by the
    count of numbers, path → star-D-L from the graph's shape; an exact task name passes through."""
    from dreamlm.tasks import TASKS

    if kind in TASKS:
        return kind
    text = puzzle.strip()
    if kind == "sudoku":
        digits = sum(ch.isdigit() for ch in text)
        if digits not in (16, 81):
            raise DreamError(f"a sudoku has 16 digits (4x4) or 81 (9x9), 0 for a blank; this one has {digits}")
        return "sudoku9" if digits == 81 else "sudoku4"
    if kind == "countdown":
        parts = text.split(",")
        return f"cd{max(len(parts) - 1, 1)}"
    if kind == "path":
        edges, centre, _ = stargraph.parse_input(text)
        return "star-{}-{}".format(*stargraph.shape(edges, centre))
    raise DreamError(f"unknown task {kind!r}; use sudoku, countdown, path or one of {', '.join(TASKS)}")


def task_family(task: str) -> str:
    """What a model can be asked: any star graph for a star model (stretched, decoys), else its own task."""
    return "star" if task.startswith("star-") else task


def invalid_hint(task: str, puzzle: str) -> str:
    """Why an answer may be invalid beyond the model's mistake: a sudoku without any solution says so."""
    if task.startswith("sudoku"):
        from dreamlm.tasks import sudoku

        try:
            if sudoku.count_solutions(sudoku.parse(puzzle), limit=1) == 0:
                return " (this puzzle has no solution)"
        except DreamError:
            return ""
    return ""


def normalise_puzzle(text: str) -> str:
    """Accept a literal backslash-n typed on a command line as a newline."""
    return text.strip().replace("\\n", "\n")
