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
from typing import Any, Callable

import torch

from dreamlm.errors import DreamError
from dreamlm.solver import Solver, bundled_model_dir, bundled_solver_dir
from dreamlm.tasks import get_task, make_examples

PLANNING_TASKS = ["sudoku4", "star-2-5", "star-3-5", "star-5-5", "star-10-5", "cd3", "sudoku9", "cd4"]
TEST_SEED = 1  # the held-out split every bench and the demo use (training data uses seed 0)


@dataclass
class Score:
    """Accuracy and cost of one solver on one split."""

    accuracy: float
    forward_passes: float
    ms_per_solution: float
    n: int


def cpu_name() -> str:
    """The CPU's model name as the kernel reports it ("CPU" when it does not)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def machine() -> str:
    """One line naming the machine, its native bf16 (what `--dtype auto` goes by) and torch."""
    from dreamlm.precision import cpu_bf16_features

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        features = cpu_bf16_features()
        bf16 = ", ".join(features) + ("" if "amx_bf16" in features else ", no AMX") if features else "none"
        threads = torch.get_num_threads()
        device = f"{cpu_name()} ({threads} thread{'s' if threads != 1 else ''}; native bf16: {bf16})"
    return f"{platform.machine()} {device}, torch {torch.__version__}"


def available_tasks(tasks: list[str] | None = None) -> list[str]:
    """Tasks whose bundled diffusion and AR models both exist."""
    names = tasks or PLANNING_TASKS
    return [t for t in names if (bundled_model_dir(f"{t}-diffusion") / "config.json").is_file()
            and (bundled_model_dir(f"{t}-ar") / "config.json").is_file()]


def require_pair(task: str) -> None:
    """DreamError unless the task's bundled diffusion and AR models both exist."""
    if not available_tasks([task]):
        raise DreamError(f"no bundled {task} models (diffusion and AR) to benchmark")


def score(solver: Solver, puzzles: list[str], batch: int = 64, **kwargs: Any) -> Score:
    """Solve puzzles in batches; accuracy by the task's rules, passes and time per solution."""
    t0 = time.perf_counter()
    solutions = solver.solve_batches(puzzles, batch, **kwargs)
    seconds = time.perf_counter() - t0
    return Score(sum(s.valid for s in solutions) / len(puzzles), statistics.mean(s.forward_passes for s in solutions),
                 1000 * seconds / len(puzzles), len(puzzles))


# Star graphs G(d, l) the grid reports: every d and l in 2..5, longer arms up to the bundled G(5, 5) model's
# largest training shapes (G(2, 11), G(3, 7), G(4, 6)), bare paths (read with a decoy arm), and more arms (shapes
# no bundled pair covers are left out).
STAR_GRID = tuple((d, l) for d in range(2, 6) for l in range(2, 6)) + ((2, 8), (2, 11), (3, 7), (4, 6)) + \
    ((1, 5), (1, 8)) + ((6, 5), (7, 3), (8, 5), (10, 5))


def _nothing(n: int = 1, label: str | None = None) -> None:
    """The default progress callback."""


def star_grid(n: int, shapes: tuple[tuple[int, int], ...] = STAR_GRID,
              advance: Callable[..., None] = _nothing, dtype: torch.dtype = torch.float32,
              rl: dict[str, Path] | None = None) -> dict[str, Any]:
    """Diffusion vs AR on held-out star graphs of each shape G(d, l), each solved by the bundled pair that
    `dreamlm solve path` picks for it (its own, or one of more arms or longer arms, see `bundled_solver_dir`);
    shapes no bundled pair covers are left out. `rl` (bundled model name -> RL-trained model, see `rl_models`):
    where the picked model has an RL-trained version, it is scored on the same puzzles too ("diffusion_rl",
    "ar_rl")."""
    grid: dict[str, Any] = {}
    solvers: dict[Path, Solver] = {}
    for degree, length in shapes:
        name = f"star-{degree}-{length}"
        try:
            paths = {kind: bundled_solver_dir(name, kind) for kind in ("diffusion", "ar")}
        except DreamError:
            continue
        puzzles = [e["input"] for e in make_examples(name, n, TEST_SEED, "test")]
        entry: dict[str, Any] = {"models": {kind: path.name for kind, path in paths.items()}}
        for kind, path in paths.items():
            if path not in solvers:  # one load per model, whatever shapes it serves
                solvers[path] = Solver(path, dtype=dtype)
            entry[kind] = vars(score(solvers[path], puzzles))
            if rl and path.name in rl:
                if rl[path.name] not in solvers:
                    solvers[rl[path.name]] = Solver(rl[path.name], dtype=dtype)
                entry[f"{kind}_rl"] = vars(score(solvers[rl[path.name]], puzzles))
        grid[name] = entry
        advance(label=name)
    return grid


def rl_models(paths: list[Path] | None) -> dict[str, Path]:
    """RL-trained planning models (`dreamlm rl` exports) by the bundled model each was trained from (its task
    file's "rl_base", e.g. "star-10-5-diffusion"); DreamError for a directory that is not such an export."""
    from dreamlm.solver import TASK_FILE, read_task_file

    found: dict[str, Path] = {}
    for path in paths or []:
        path = Path(path)
        meta = read_task_file(path / TASK_FILE) if (path / TASK_FILE).is_file() else {}
        base = meta.get("rl_base")
        if not isinstance(base, str) or not base:
            raise DreamError(f"{path} is not a model made by `dreamlm rl` (its {TASK_FILE} names no rl_base)")
        if base in found:
            raise DreamError(f"two RL models of {base}: {found[base]} and {path}; give one")
        found[base] = path
    return found


def planning(n: int = 200, tasks: list[str] | None = None, out_dir: Path | None = None,
             steps_fractions: tuple[float, ...] = (0.25, 0.5, 1.0), grid: bool = True,
             advance: Callable[..., None] = _nothing, dtype: torch.dtype = torch.float32,
             rl: list[Path] | None = None) -> dict[str, Any]:
    """Diffusion vs AR on each task's held-out split (and Countdown's OOD split); diffusion accuracy vs steps; with
    `grid`, diffusion vs AR on star graphs of every shape in STAR_GRID. Every model runs in `dtype`. `rl`: models
    made by `dreamlm rl` from bundled ones; each is scored beside its base on the same puzzles (SFT vs SFT+RL)."""
    by_base = rl_models(rl)
    names = available_tasks(tasks)
    if not names:
        raise DreamError("no bundled planning models found (train them with recipes/planning first)")
    results: dict[str, Any] = {}
    for name in names:
        task = get_task(name)
        splits = ["test"] + (["ood"] if task.has_ood else [])
        diffusion = Solver(bundled_model_dir(f"{name}-diffusion"), dtype=dtype)
        ar = Solver(bundled_model_dir(f"{name}-ar"), dtype=dtype)
        entry: dict[str, Any] = {}
        for split in splits:
            puzzles = [e["input"] for e in make_examples(name, n, TEST_SEED, split)]
            entry[split] = {"diffusion": vars(score(diffusion, puzzles)), "ar": vars(score(ar, puzzles))}
            for kind in ("diffusion", "ar"):
                if f"{name}-{kind}" in by_base:
                    entry[split][f"{kind}_rl"] = vars(score(Solver(by_base[f"{name}-{kind}"], dtype=dtype), puzzles))
        puzzles = [e["input"] for e in make_examples(name, n, TEST_SEED, "test")]
        budget = diffusion.budget(puzzles[0])
        curve = []
        for frac in steps_fractions:
            steps = max(1, round(budget * frac))
            curve.append({"steps": steps, **vars(score(diffusion, puzzles, steps=steps))})
        entry["steps_curve"] = curve
        results[name] = entry
        advance(label=name)
    report = {"machine": machine(), "command": "dreamlm " + " ".join(sys.argv[1:]), "n": n,
              "dtype": str(dtype).removeprefix("torch."), "results": results}
    if grid:
        report["star_grid"] = star_grid(n, advance=advance, dtype=dtype, rl=by_base)
    if by_base:
        report["rl_models"] = {base: str(path) for base, path in by_base.items()}
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
    if report.get("rl_models"):
        lines += ["", rl_table(report)]
    if report.get("star_grid"):
        lines += ["", "| star graph | diffusion acc | AR acc | models (diffusion / AR) |", "|---|---|---|---|"]
        for name, entry in report["star_grid"].items():
            lines.append(f"| G({name.split('-')[1]}, {name.split('-')[2]}) | "
                         f"{100 * entry['diffusion']['accuracy']:.1f} % | {100 * entry['ar']['accuracy']:.1f} % | "
                         f"{entry['models']['diffusion']} / {entry['models']['ar']} |")
    return "\n".join(lines)


def rl_table(report: dict[str, Any]) -> str:
    """SFT vs SFT+RL: accuracy of each bundled model and of its RL-trained version on the same held-out puzzles
    (tasks, then star-graph shapes), for the rows where an RL model was given ("–" where none was)."""
    def cell(scores: dict[str, Any], key: str) -> str:
        return f"{100 * scores[key]['accuracy']:.1f} %" if key in scores else "–"

    lines = ["| held-out set | diffusion SFT | diffusion SFT+RL | AR SFT | AR SFT+RL |", "|---|---|---|---|---|"]
    for name, entry in report["results"].items():
        for split in ("test", "ood"):
            scores = entry.get(split, {})
            if "diffusion_rl" in scores or "ar_rl" in scores:
                lines.append(f"| {name} {split} | {cell(scores, 'diffusion')} | {cell(scores, 'diffusion_rl')} | "
                             f"{cell(scores, 'ar')} | {cell(scores, 'ar_rl')} |")
    for name, entry in (report.get("star_grid") or {}).items():
        if "diffusion_rl" in entry or "ar_rl" in entry:
            _, d, l = name.split("-")
            lines.append(f"| G({d}, {l}) | {cell(entry, 'diffusion')} | {cell(entry, 'diffusion_rl')} | "
                         f"{cell(entry, 'ar')} | {cell(entry, 'ar_rl')} |")
    return "\n".join(lines)


def write_planning_report(report: dict[str, Any], out_dir: Path) -> None:
    """planning.md, planning.json and planning.png under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = planning_table(report)
    (out_dir / "planning.md").write_text(f"`{report['command']}` on {report['machine']}, "
                                         f"{report.get('dtype', 'float32')}, "
                                         f"{report['n']} held-out puzzles per split\n\n{table}\n")
    (out_dir / "planning.json").write_text(json.dumps(report, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    grid = report.get("star_grid") or {}
    fig, axes = plt.subplots(1, 3 if grid else 2, figsize=(16 if grid else 11, 4))
    left, right = axes[0], axes[1]
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
    if grid:
        shapes = list(grid)
        for kind, label in (("diffusion", "diffusion"), ("ar", "AR")):
            axes[2].plot(range(len(shapes)), [100 * grid[s][kind]["accuracy"] for s in shapes], "o-", label=label)
        axes[2].set_xticks(range(len(shapes)), [s.removeprefix("star-") for s in shapes], rotation=60)
        axes[2].set_xlabel("star graph d-l")
        axes[2].set_ylabel("held-out accuracy (%)")
        axes[2].set_ylim(0, 105)
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "planning.png", dpi=120)
    plt.close(fig)


# ---- decoding speed ---------------------------------------------------------------------------------------------
# threshold modes threshold p(x0) (alg="maskgit_plus"), the confidence Fast-dLLM uses; vanilla decodes by the
# solver's own alg (entropy), one slot per step
P_X0 = {"alg": "maskgit_plus"}
FAST_MODES: dict[str, dict[str, Any]] = {
    "vanilla (steps = tokens)": {},
    "threshold 0.999": {"threshold": 0.999, **P_X0},
    "threshold 0.99": {"threshold": 0.99, **P_X0},
    "threshold 0.99 + early stop": {"threshold": 0.99, "stop_at_eos": True, **P_X0},
    "threshold 0.9": {"threshold": 0.9, **P_X0},
    "blocks 10 + prefix cache + threshold 0.99": {"block_length": 10, "cache": "prefix", "threshold": 0.99, **P_X0},
    "blocks 10 + dual cache + threshold 0.99": {"block_length": 10, "cache": "dual", "threshold": 0.99, **P_X0},
}


def _timed(fn, repeats: int = 1) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _generated_tokens(solver: Solver, puzzles: list[str], solutions: list) -> int:
    """Tokens up to and including EOS, the text a user receives."""
    return sum(len(solver.tok.encode(s.output)) + 1 for s in solutions)


def speed(task: str = "sudoku4", n: int = 100, out_dir: Path | None = None,
          shape: dict[str, int] | None = None, compile: bool = False,  # noqa: A002
          dtype: torch.dtype = torch.float32, large: bool = True, train_steps: int = 2, curve_steps: int = 100,
          advance: Callable[..., None] = _nothing) -> dict[str, Any]:
    """Side by side in one run, decoding in `dtype`: (1) vanilla Dream sampling vs each fast mode vs the same-size
    AR model with a KV cache, on one task's held-out split, one puzzle at a time; (2) training tokens/s in fp32 vs
    bf16 autocast on the small random shape and (with `large`) SmolLM2-135M's, and the loss curves of both
    precisions over `curve_steps` steps of a tiny model (0: none); (3) decoding tokens/s of the diffusion fast path
    vs transformers' AR `generate` at `dtype` on the small shape (`shape`: hidden, layers, batch, new_tokens after a
    64-token prompt, per_forward) and on SmolLM2-135M's (batch 1, 192 new tokens). With `compile`, also the
    torch.compile'd paths (compilation done in a warm-up, outside the timing)."""
    from dreamlm.throughput import SMOLLM2_135M, decode_throughput, loss_curves, small_shape, train_throughput

    require_pair(task)
    shape = {"hidden": 256, "layers": 4, "batch": 4, "new_tokens": 448, "per_forward": 4, **(shape or {})}
    puzzles = [e["input"] for e in make_examples(task, n, TEST_SEED, "test")]
    diffusion = Solver(bundled_model_dir(f"{task}-diffusion"), dtype=dtype)
    ar = Solver(bundled_model_dir(f"{task}-ar"), dtype=dtype)
    rows = []
    modes = dict(FAST_MODES)
    if compile:
        modes["threshold 0.99 + compile"] = {"threshold": 0.99, "compile": True, **P_X0}
    for label, options in modes.items():
        advance(label=label)
        if not options:  # vanilla: Dream's own schedule, one step per answer slot
            options = {"steps": diffusion.budget(puzzles[0])}
        rows.append(_speed_row(label, diffusion, puzzles, options))
    rows.append(_speed_row("AR, same size, KV cache", ar, puzzles, {}))
    base = rows[0]
    for row in rows:
        row["speedup_vs_vanilla"] = base["seconds"] / row["seconds"]
        row["passes_reduction"] = base["forward_passes"] / row["forward_passes"]
    small = small_shape(shape["hidden"], shape["layers"])
    shapes = [small] + ([SMOLLM2_135M] if large else [])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict[str, Any] = {"machine": machine(), "command": "dreamlm " + " ".join(sys.argv[1:]), "task": task,
                              "n": n, "dtype": str(dtype).removeprefix("torch."), "rows": rows}
    report["training"] = [train_throughput(s, steps=train_steps, device=device, advance=advance) for s in shapes]
    if curve_steps:
        report["loss_curves"] = loss_curves(curve_steps, device=device, advance=advance)
    report["decode"] = [decode_throughput(small, batch=shape["batch"], new_tokens=shape["new_tokens"],
                                          per_forward=shape["per_forward"], dtype=dtype, device=device,
                                          vanilla=False, compile=compile, advance=advance)]
    if large:  # one row and a 256-token canvas: on a CPU the 4 x 512 canvas takes many minutes at this size
        report["decode"].append(decode_throughput(SMOLLM2_135M, batch=1, new_tokens=192,
                                                  per_forward=shape["per_forward"], dtype=dtype, device=device,
                                                  vanilla=False, advance=advance))
    if out_dir is not None:
        write_speed_report(report, out_dir)
    return report


def _speed_row(label: str, solver: Solver, puzzles: list[str], options: dict[str, Any]) -> dict[str, Any]:
    solutions = []
    solver.solve(puzzles[:1], **options)  # warm-up (and compilation, where asked) outside the timing
    seconds = _timed(lambda: solutions.extend(solver.solve([p], **options)[0] for p in puzzles))
    tokens = _generated_tokens(solver, puzzles, solutions)
    return {"mode": label, "accuracy": sum(s.valid for s in solutions) / len(puzzles),
            "forward_passes": statistics.mean(s.forward_passes for s in solutions),
            "ms_per_solution": 1000 * seconds / len(puzzles), "tokens_per_second": tokens / seconds,
            "seconds": seconds}


def speed_table(report: dict[str, Any]) -> str:
    """Markdown tables of a speed report."""
    lines = [f"Task {report['task']}, {report['n']} held-out puzzles, batch 1, {report.get('dtype', 'float32')}:", "",
             "| mode | accuracy | forward passes | passes ÷ | ms/solution | tokens/s | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['mode']} | {100 * r['accuracy']:.1f} % | {r['forward_passes']:.1f} | "
                     f"{r['passes_reduction']:.1f}× | {r['ms_per_solution']:.1f} | {r['tokens_per_second']:.0f} | "
                     f"{r['speedup_vs_vanilla']:.2f}× |")
    if report.get("training"):
        t0 = report["training"][0]
        lines += ["", f"Training tokens/s, diffusion loss, batch {t0['batch']} x {t0['seq']}, AdamW; median of "
                  f"{t0['steps']} steps after a warm-up, fp32 and bf16 steps interleaved (bf16: autocast over fp32 "
                  "weights and optimizer state):", "",
                  "| shape | parameters | fp32 tokens/s | bf16 tokens/s | bf16 ÷ fp32 |", "|---|---:|---:|---:|---:|"]
        for t in report["training"]:
            fp32, bf16 = (r["tokens_per_second"] for r in t["rows"])
            lines.append(f"| {t['shape']} | {t['parameters'] / 1e6:.1f} M | {fp32:.0f} | {bf16:.0f} | "
                         f"{t['bf16_vs_fp32']:.2f}× |")
    curves = report.get("loss_curves")
    if curves:
        tail = max(1, len(curves["fp32"]) // 10)
        ends = {p: statistics.mean(curves[p][-tail:]) for p in ("fp32", "bf16")}
        gap = max(abs(a - b) for a, b in zip(curves["fp32"], curves["bf16"]))
        lines += ["", f"Loss curves, {curves['model']} ({curves['parameters'] / 1e6:.2f} M), {curves['steps']} steps of "
                  f"{curves['batch']} x {curves['seq']} on {curves['data']}, same seed, data and masks:", "",
                  "| precision | first loss | mean of the last 10 % | largest step-wise gap to fp32 |",
                  "|---|---:|---:|---:|"]
        for p in ("fp32", "bf16"):
            lines.append(f"| {p} | {curves[p][0]:.3f} | {ends[p]:.3f} | {'' if p == 'fp32' else f'{gap:.3f}'} |")
    for d in report.get("decode", []):
        lines += ["", f"Decoding {d['shape']} ({d['parameters'] / 1e6:.1f} M, random weights), batch {d['batch']}, "
                  f"{d['prompt']}-token prompt + {d['new_tokens']} new = {d['canvas']}-token canvas, {d['dtype']}:", "",
                  "| mode | forward passes | tokens/s | vs transformers |", "|---|---:|---:|---:|"]
        hf = d["rows"][-1]["tokens_per_second"]
        for r in d["rows"]:
            lines.append(f"| {r['mode']} | {r['forward_passes']} | {r['tokens_per_second']:.0f} | "
                         f"{r['tokens_per_second'] / hf:.2f}× |")
    return "\n".join(lines)


def write_speed_report(report: dict[str, Any], out_dir: Path) -> None:
    """speed.md, speed.json and speed.png (accuracy against tokens/s; training tokens/s and loss curves by
    precision; decoding tokens/s by mode) under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "speed.md").write_text(f"`{report['command']}` on {report['machine']}\n\n{speed_table(report)}\n")
    (out_dir / "speed.json").write_text(json.dumps(report, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    for r in report["rows"]:
        ax.scatter(r["tokens_per_second"], 100 * r["accuracy"], s=40)
        ax.annotate(r["mode"], (r["tokens_per_second"], 100 * r["accuracy"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"tokens/s (batch 1, {report.get('dtype', 'float32')})")
    ax.set_ylabel(f"{report['task']} held-out accuracy (%)")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax = axes[0][1]
    training = report.get("training", [])
    for k, p in enumerate(("fp32", "bf16")):
        ax.bar([i + 0.4 * k - 0.2 for i in range(len(training))],
               [t["rows"][k]["tokens_per_second"] for t in training], width=0.4, label=p)
    ax.set_xticks(range(len(training)), [t["shape"] for t in training])
    ax.set_ylabel("training tokens/s")
    ax.set_yscale("log")
    ax.set_title("training: fp32 vs bf16 autocast")
    ax.legend()
    ax = axes[1][0]
    curves = report.get("loss_curves")
    if curves:
        window = max(1, len(curves["fp32"]) // 10)  # the 1/t-weighted loss of one batch is noisy: a moving mean too
        for p, color in (("fp32", "tab:blue"), ("bf16", "tab:orange")):
            ys = curves[p]
            ax.plot(range(1, len(ys) + 1), ys, color=color, alpha=0.3, linewidth=0.8)
            mean = [statistics.mean(ys[max(0, i + 1 - window):i + 1]) for i in range(len(ys))]
            ax.plot(range(1, len(ys) + 1), mean, color=color, linestyle="-" if p == "fp32" else "--",
                    label=f"{p} (mean of {window} steps)")
        ax.set_xlabel("step")
        ax.set_ylabel("diffusion loss (1/t weighted)")
        ax.set_title(f"loss curves, same seed and data ({curves['model']})")
        ax.legend()
    ax = axes[1][1]
    decode = report.get("decode", [])
    modes = list(dict.fromkeys(r["mode"] for d in decode for r in d["rows"]))
    width = 0.8 / max(len(modes), 1)
    for k, mode in enumerate(modes):
        xs = [i for i, d in enumerate(decode) if any(r["mode"] == mode for r in d["rows"])]
        ys = [next(r["tokens_per_second"] for r in decode[i]["rows"] if r["mode"] == mode) for i in xs]
        ax.bar([x + width * k - 0.4 + width / 2 for x in xs], ys, width=width, label=mode)
    ax.set_xticks(range(len(decode)), [f"{d['shape']}, {d['batch']} x {d['canvas']}" for d in decode])
    ax.set_ylabel(f"decoding tokens/s ({report.get('dtype', 'float32')})")
    ax.set_yscale("log")
    ax.set_title("diffusion fast path vs AR generate")
    ax.legend(fontsize=7)
    fig.suptitle(report["machine"], fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "speed.png", dpi=120)
    plt.close(fig)
