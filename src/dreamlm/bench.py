"""Benchmarks run side by side in one process: planning accuracy (diffusion vs AR) and decoding speed.

Each writes a markdown table, JSON and a PNG plot; numbers are whatever this machine measures.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreamlm.errors import DreamError
from dreamlm.solver import Solver, bundled_model_dir
from dreamlm.tasks import get_task, make_examples

PLANNING_TASKS = ["sudoku4", "star-2-5", "star-3-5", "star-5-5", "cd3", "sudoku9", "cd4"]
TEST_SEED = 1  # the held-out split every bench and the demo use (training data uses seed 0)


@dataclass
class Score:
    """Accuracy and cost of one solver on one split."""

    accuracy: float
    forward_passes: float
    ms_per_solution: float
    n: int


def machine() -> str:
    """One line naming the machine and torch."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    return f"{platform.machine()} {device}, torch {torch.__version__}"


def available_tasks(tasks: list[str] | None = None) -> list[str]:
    """Tasks whose bundled diffusion and AR models both exist."""
    names = tasks or PLANNING_TASKS
    return [t for t in names if (bundled_model_dir(f"{t}-diffusion") / "config.json").is_file()
            and (bundled_model_dir(f"{t}-ar") / "config.json").is_file()]


def score(solver: Solver, puzzles: list[str], batch: int = 64, **kwargs: Any) -> Score:
    """Solve puzzles in batches; accuracy by the task's rules, passes and time per solution."""
    valid, passes, seconds = 0, [], 0.0
    for start in range(0, len(puzzles), batch):
        chunk = puzzles[start:start + batch]
        t0 = time.perf_counter()
        solutions = solver.solve(chunk, **kwargs)
        seconds += time.perf_counter() - t0
        valid += sum(s.valid for s in solutions)
        passes += [s.forward_passes for s in solutions]
    return Score(valid / len(puzzles), statistics.mean(passes), 1000 * seconds / len(puzzles), len(puzzles))


def planning(n: int = 200, tasks: list[str] | None = None, out_dir: Path | None = None,
             steps_fractions: tuple[float, ...] = (0.25, 0.5, 1.0)) -> dict[str, Any]:
    """Diffusion vs AR on each task's held-out split (and Countdown's OOD split); diffusion accuracy vs steps."""
    names = available_tasks(tasks)
    if not names:
        raise DreamError("no bundled planning models found (train them with recipes/planning first)")
    results: dict[str, Any] = {}
    for name in names:
        task = get_task(name)
        splits = ["test"] + (["ood"] if task.has_ood else [])
        diffusion = Solver(bundled_model_dir(f"{name}-diffusion"))
        ar = Solver(bundled_model_dir(f"{name}-ar"))
        entry: dict[str, Any] = {}
        for split in splits:
            puzzles = [e["input"] for e in make_examples(name, n, TEST_SEED, split)]
            entry[split] = {"diffusion": vars(score(diffusion, puzzles)), "ar": vars(score(ar, puzzles))}
        puzzles = [e["input"] for e in make_examples(name, n, TEST_SEED, "test")]
        budget = diffusion.seq_len - len(diffusion.prompt_ids(puzzles[0]))
        curve = []
        for frac in steps_fractions:
            steps = max(1, round(budget * frac))
            curve.append({"steps": steps, **vars(score(diffusion, puzzles, steps=steps))})
        entry["steps_curve"] = curve
        results[name] = entry
    report = {"machine": machine(), "command": "dreamlm " + " ".join(sys.argv[1:]), "n": n, "results": results}
    if out_dir is not None:
        write_planning_report(report, out_dir)
    return report


def planning_table(report: dict[str, Any]) -> str:
    """Markdown table of a planning report."""
    lines = ["| task | split | diffusion acc | AR acc | diffusion passes | AR passes | diffusion ms | AR ms |",
             "|---|---|---|---|---|---|---|---|"]
    for name, entry in report["results"].items():
        for split in ("test", "ood"):
            if split not in entry:
                continue
            d, a = entry[split]["diffusion"], entry[split]["ar"]
            lines.append(f"| {name} | {split} | {100 * d['accuracy']:.1f} % | {100 * a['accuracy']:.1f} % | "
                         f"{d['forward_passes']:.1f} | {a['forward_passes']:.1f} | {d['ms_per_solution']:.1f} | "
                         f"{a['ms_per_solution']:.1f} |")
    lines.append("")
    lines.append("| task | diffusion steps | accuracy | ms/solution |")
    lines.append("|---|---|---|---|")
    for name, entry in report["results"].items():
        for point in entry["steps_curve"]:
            lines.append(f"| {name} | {point['steps']} | {100 * point['accuracy']:.1f} % | "
                         f"{point['ms_per_solution']:.1f} |")
    return "\n".join(lines)


def write_planning_report(report: dict[str, Any], out_dir: Path) -> None:
    """planning.md, planning.json and planning.png under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = planning_table(report)
    (out_dir / "planning.md").write_text(f"`{report['command']}` on {report['machine']}, "
                                         f"{report['n']} held-out puzzles per split\n\n{table}\n")
    (out_dir / "planning.json").write_text(json.dumps(report, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    xs = range(len(names))
    d = [100 * report["results"][t]["test"]["diffusion"]["accuracy"] for t in names]
    a = [100 * report["results"][t]["test"]["ar"]["accuracy"] for t in names]
    left.bar([x - 0.2 for x in xs], d, width=0.4, label="diffusion")
    left.bar([x + 0.2 for x in xs], a, width=0.4, label="AR (same size, data, steps)")
    left.set_xticks(list(xs), names)
    left.set_ylabel("held-out accuracy (%)")
    left.set_ylim(0, 105)
    left.legend()
    for t in names:
        curve = report["results"][t]["steps_curve"]
        right.plot([p["steps"] for p in curve], [100 * p["accuracy"] for p in curve], "o-", label=t)
    right.set_xlabel("diffusion sampling steps")
    right.set_ylabel("accuracy (%)")
    right.set_ylim(0, 105)
    right.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "planning.png", dpi=120)
    plt.close(fig)
