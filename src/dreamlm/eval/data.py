"""Writes the offline evaluation sets shipped in `dreamlm/eval/tasks/data/` (run `python -m dreamlm.eval.data`).

Every set is deterministic: planning puzzles come from the task generators' held-out "test" split (seed 0);
the multiple-choice set pairs each held-out 4x4 Sudoku with its solution and three corrupted grids; the code-infill
set takes lines of a few Python standard-library modules that are held out of `stdlib:train` (the bundled
stdlib-code model never saw them; the planning models saw no code at all) with three lines before and two after as
context.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from dreamlm.errors import DreamError
from dreamlm.tasks import get_task, make_examples
from dreamlm.tokenizer import DreamTokenizer

DATA_DIR = Path(__file__).parent / "tasks" / "data"
PLANNING_SETS = {"sudoku4": 100, "star-2-5": 100, "star-3-5": 100, "star-5-5": 100, "star-10-5": 50}
MC_PUZZLES = 100
INFILL_MODULES = ("sched.py", "secrets.py", "traceback.py", "copyreg.py", "email/contentmanager.py")  # held out
INFILL_LINES = 60


def planning_set(task: str, n: int) -> list[dict]:
    """n held-out puzzles of a planning task: {"input", "output"} (the output is one valid answer)."""
    return make_examples(task, n, seed=0, split="test")


def corrupt(grid: str, rng: random.Random) -> str:
    """A 4x4 grid with two cells of different digits swapped inside one row (so it breaks a column rule)."""
    rows = grid.split("\n")
    r = rng.randrange(4)
    i, j = rng.sample(range(4), 2)
    row = list(rows[r])
    row[i], row[j] = row[j], row[i]
    rows[r] = "".join(row)
    return "\n".join(rows)


def sudoku_mc_set(n: int) -> list[dict]:
    """Held-out 4x4 Sudoku with four candidate grids: the solution and three distinct invalid corruptions."""
    task, rng, out = get_task("sudoku4"), random.Random(0), []
    for ex in planning_set("sudoku4", n):
        wrong: list[str] = []
        while len(wrong) < 3:
            cand = corrupt(ex["output"], rng)
            if cand not in wrong and not task.validate(ex["input"], cand):
                wrong.append(cand)
        choices = wrong + [ex["output"]]
        rng.shuffle(choices)
        out.append({"input": ex["input"], "choices": choices, "label": choices.index(ex["output"])})
    return out


def code_infill_set(n: int, tokenizer: DreamTokenizer) -> list[dict]:
    """Standard-library lines to fill between their neighbours; `tokens` is the line's length under `tokenizer`
    (the bundled default model's), the span length the template asks for."""
    from dreamlm.training.data import stdlib_root, stdlib_split

    root = stdlib_root()
    held_out = {str(p.relative_to(root)) for p in stdlib_split()[1]}
    candidates = []
    for name in INFILL_MODULES:
        if name not in held_out:
            raise DreamError(f"{name} is not held out of stdlib:train on this Python; pick held-out modules")
        lines = (root / name).read_text(encoding="utf-8").split("\n")
        for i in range(3, len(lines) - 2):
            line = lines[i].strip()
            if 12 <= len(line) <= 60 and not line.startswith(("#", '"', "'")) and line.isascii():
                candidates.append((name, i, lines))
    rng = random.Random(0)
    picked = sorted(rng.sample(candidates, n), key=lambda c: (c[0], c[1]))
    return [{"module": name, "lineno": i + 1, "prefix": "\n".join(lines[i - 3:i]) + "\n", "line": lines[i],
             "suffix": "\n" + "\n".join(lines[i + 1:i + 3]), "tokens": len(tokenizer.encode(lines[i]))}
            for name, i, lines in picked]


def write_all(data_dir: Path = DATA_DIR) -> list[Path]:
    """Write every set as JSON Lines; returns the files."""
    from dreamlm.cli import default_model_dir

    data_dir.mkdir(parents=True, exist_ok=True)
    sets = {f"{task}.jsonl": planning_set(task, n) for task, n in PLANNING_SETS.items()}
    sets["sudoku4_mc.jsonl"] = sudoku_mc_set(MC_PUZZLES)
    sets["code_infill.jsonl"] = code_infill_set(INFILL_LINES, DreamTokenizer.from_pretrained(default_model_dir()))
    written = []
    for name, rows in sets.items():
        path = data_dir / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_all():
        print(path, path.stat().st_size)
