"""Planning accuracy of every bundled planning model in bf16 against fp32, side by side in one process.

Each model solves the same held-out puzzles of its own task (the split every bench uses, seed 1) with its default
decoding (diffusion: one token per step, most confident first; AR: greedy with a KV cache), once with fp32 weights
and once with bf16 weights; the sampler computes in fp32 either way. Then the Sudoku diffusion model with bench
speed's confidence thresholds, where bf16's rounding of p(x0) near the threshold can change what is committed. Reports accuracy, the puzzles whose validity
changed, and ms per solution. Run on one thread (the machine is shared: OpenMP threads that wait on each other
cost more than they give):

    OMP_NUM_THREADS=1 python benchmarks/precision_planning.py --n 300
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from dreamlm.bench import TEST_SEED, machine
from dreamlm.solver import TASK_FILE, Solver
from dreamlm.tasks import make_examples

OUT = Path(__file__).parent / "results"
FAST_THRESHOLDS = (0.999, 0.99, 0.9)  # bench speed's threshold modes, on the Sudoku diffusion model


def planning_models() -> list[Path]:
    """Every bundled planning model directory (a task file beside the weights)."""
    root = Path(str(resources.files("dreamlm") / "assets"))
    return sorted(p for p in root.iterdir() if (p / TASK_FILE).is_file() and (p / "config.json").is_file())


def compare(path: Path, n: int, options: dict | None = None, label: str = "default") -> dict:
    """One model's accuracy and time in fp32 and bf16 on n held-out puzzles of its task, decoded with `options`
    (the solver's default decoding when None)."""
    task = json.loads((path / TASK_FILE).read_text())["task"]
    puzzles = [e["input"] for e in make_examples(task, n, TEST_SEED, "test")]
    entry: dict = {"model": path.name, "task": task, "n": n, "decoding": label}
    valid = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        solver = Solver(path, dtype=dtype)
        start = time.perf_counter()
        solutions = solver.solve_batches(puzzles, **(options or {}))
        seconds = time.perf_counter() - start
        valid[name] = [s.valid for s in solutions]
        entry[name] = {"accuracy": sum(valid[name]) / n, "ms_per_solution": 1000 * seconds / n}
    entry["changed"] = {"fixed_in_bf16": sum(b and not f for f, b in zip(valid["fp32"], valid["bf16"])),
                        "broken_in_bf16": sum(f and not b for f, b in zip(valid["fp32"], valid["bf16"]))}
    return entry


def table(report: dict) -> str:
    """Markdown table of the report."""
    lines = ["| model | decoding | n | fp32 acc | bf16 acc | bf16 − fp32 | solved only in fp32 / only in bf16 | "
             "fp32 ms | bf16 ms |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in report["rows"]:
        f, b = e["fp32"], e["bf16"]
        lines.append(f"| {e['model']} | {e['decoding']} | {e['n']} | {100 * f['accuracy']:.1f} % | "
                     f"{100 * b['accuracy']:.1f} % | {100 * (b['accuracy'] - f['accuracy']):+.1f} pt | "
                     f"{e['changed']['broken_in_bf16']} / {e['changed']['fixed_in_bf16']} | "
                     f"{f['ms_per_solution']:.1f} | {b['ms_per_solution']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    """Measure every bundled planning model and write precision_planning.{json,md}."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300, help="held-out puzzles per model")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    start = time.perf_counter()
    rows = []
    runs = [(path, None, "default") for path in planning_models()]
    sudoku = [p for p in planning_models() if p.name == "sudoku4-diffusion"]
    runs += [(p, {"threshold": tau, "alg": "maskgit_plus"}, f"threshold {tau} (p(x0))") for p in sudoku
             for tau in FAST_THRESHOLDS]
    for path, options, label in runs:
        rows.append(compare(path, args.n, options, label))
        print(f"{path.name} {label}: fp32 {rows[-1]['fp32']['accuracy']:.3f}, bf16 {rows[-1]['bf16']['accuracy']:.3f}",
              file=sys.stderr, flush=True)
    report = {"machine": machine(), "command": "python benchmarks/precision_planning.py " + " ".join(sys.argv[1:]),
              "n": args.n, "wall_seconds": round(time.perf_counter() - start, 1), "rows": rows}
    write_report(args.out, "precision_planning", report,
                 f"{args.n} held-out puzzles per model, the same puzzles in both precisions", table(report))


def write_report(out: Path, name: str, report: dict, what: str, table_text: str) -> None:
    """NAME.json (the report) and NAME.md (the command, machine, `what` and the table) in `out`; the text printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = f"`{report['command']}` on {report['machine']}, {what}\n\n{table_text}\n"
    (out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
