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
              advance: Callable[..., None] = _nothing) -> dict[str, Any]:
    """Diffusion vs AR on held-out star graphs of each shape G(d, l), each solved by the bundled pair that
    `dreamlm solve path` picks for it (its own, or one of more arms or longer arms, see `bundled_solver_dir`);
    shapes no bundled pair covers are left out."""
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
                solvers[path] = Solver(path)
            entry[kind] = vars(score(solvers[path], puzzles))
        grid[name] = entry
        advance(label=name)
    return grid


def planning(n: int = 200, tasks: list[str] | None = None, out_dir: Path | None = None,
             steps_fractions: tuple[float, ...] = (0.25, 0.5, 1.0), grid: bool = True,
             advance: Callable[..., None] = _nothing) -> dict[str, Any]:
    """Diffusion vs AR on each task's held-out split (and Countdown's OOD split); diffusion accuracy vs steps; with
    `grid`, diffusion vs AR on star graphs of every shape in STAR_GRID."""
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
        budget = diffusion.budget(puzzles[0])
        curve = []
        for frac in steps_fractions:
            steps = max(1, round(budget * frac))
            curve.append({"steps": steps, **vars(score(diffusion, puzzles, steps=steps))})
        entry["steps_curve"] = curve
        results[name] = entry
        advance(label=name)
    report = {"machine": machine(), "command": "dreamlm " + " ".join(sys.argv[1:]), "n": n, "results": results}
    if grid:
        report["star_grid"] = star_grid(n, advance=advance)
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
    if report.get("star_grid"):
        lines += ["", "| star graph | diffusion acc | AR acc | models (diffusion / AR) |", "|---|---|---|---|"]
        for name, entry in report["star_grid"].items():
            lines.append(f"| G({name.split('-')[1]}, {name.split('-')[2]}) | "
                         f"{100 * entry['diffusion']['accuracy']:.1f} % | {100 * entry['ar']['accuracy']:.1f} % | "
                         f"{entry['models']['diffusion']} / {entry['models']['ar']} |")
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
          advance: Callable[..., None] = _nothing) -> dict[str, Any]:
    """Vanilla Dream sampling vs each fast mode vs the same-size AR model with a KV cache, on one task's held-out
    split, one puzzle at a time (latency) — plus a random-weight throughput run at `shape`. With `compile`, also
    the torch.compile'd static-shape path (compilation is done in a warm-up, outside the timing)."""
    if not available_tasks([task]):
        raise DreamError(f"no bundled {task} models (diffusion and AR) to benchmark")
    puzzles = [e["input"] for e in make_examples(task, n, TEST_SEED, "test")]
    diffusion = Solver(bundled_model_dir(f"{task}-diffusion"))
    ar = Solver(bundled_model_dir(f"{task}-ar"))
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
    report = {"machine": machine(), "command": "dreamlm " + " ".join(sys.argv[1:]), "task": task, "n": n,
              "rows": rows, "throughput": throughput(**(shape or {}), compile=compile)}
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


def throughput(hidden: int = 256, layers: int = 4, vocab: int = 4096, prompt: int = 64, new_tokens: int = 256,
               per_forward: int = 4, block_length: int = 32, dtype: str = "float32",
               compile: bool = False) -> dict[str, Any]:  # noqa: A002
    """Random weights: diffusion forced to commit `per_forward` tokens per pass (dual cache, blocks) vs AR with a
    KV cache, batch 1 — the machinery's speed without accuracy (with `compile`, also the compiled no-cache path)."""
    from dreamlm.config import DreamConfig
    from dreamlm.model import DreamModel
    from dreamlm.sampling import diffusion_generate
    from dreamlm.sampling.autoregressive import ar_generate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    heads = max(1, hidden // 64)
    config = DreamConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                         max_position_embeddings=prompt + new_tokens + 8, mask_token_id=vocab - 1,
                         pad_token_id=vocab - 2, bos_token_id=vocab - 2, eos_token_id=vocab - 2)
    model = DreamModel(config).init_weights(0).to(device=device, dtype=getattr(torch, dtype)).eval()
    x = torch.randint(0, vocab - 2, (1, prompt), device=device)
    steps = new_tokens // per_forward
    runs = {
        "diffusion vanilla": dict(steps=new_tokens),
        f"diffusion {per_forward}/pass, blocks {block_length}, dual cache": dict(
            steps=steps, block_length=block_length, cache="dual"),
    }
    if compile:
        runs[f"diffusion {per_forward}/pass, blocks {block_length}, no cache, compiled"] = dict(
            steps=steps, block_length=block_length, compile=True)
    out: dict[str, Any] = {"shape": {"hidden": hidden, "layers": layers, "vocab": vocab, "prompt": prompt,
                                     "new_tokens": new_tokens, "dtype": dtype, "device": device}, "rows": []}
    for label, kw in runs.items():
        diffusion_generate(model, x, max_new_tokens=new_tokens, alg="maskgit_plus", **{**kw, "steps": kw["steps"]})
        seconds = _timed(lambda: diffusion_generate(model, x, max_new_tokens=new_tokens, alg="maskgit_plus", **kw))
        out["rows"].append({"mode": label, "forward_passes": kw["steps"], "tokens_per_second": new_tokens / seconds})
    model.causal = True
    ar_generate(model, x, new_tokens, stop_at_eos=False)
    seconds = _timed(lambda: ar_generate(model, x, new_tokens, stop_at_eos=False))
    out["rows"].append({"mode": "AR, KV cache", "forward_passes": new_tokens, "tokens_per_second": new_tokens / seconds})
    hf = _transformers_ar_tokens_per_second(model, x, new_tokens)
    if hf is not None:
        out["rows"].append({"mode": "transformers Qwen2 generate (reference)", "forward_passes": new_tokens,
                            "tokens_per_second": hf})
    return out


def _transformers_ar_tokens_per_second(model, x: torch.Tensor, new_tokens: int) -> float | None:
    """The same weights in transformers' Qwen2ForCausalLM, greedy generate with its cache; None if absent."""
    try:
        import transformers
    except ImportError:
        return None
    c = model.config
    hf_config = transformers.Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                         intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                                         num_attention_heads=c.num_attention_heads,
                                         num_key_value_heads=c.num_key_value_heads,
                                         max_position_embeddings=c.max_position_embeddings, rope_theta=c.rope_theta,
                                         rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=False)
    hf = transformers.Qwen2ForCausalLM(hf_config).to(device=x.device, dtype=model.dtype).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        hf.generate(x, **kwargs)
        seconds = _timed(lambda: hf.generate(x, **kwargs))
    return new_tokens / seconds


def speed_table(report: dict[str, Any]) -> str:
    """Markdown tables of a speed report."""
    lines = [f"Task {report['task']}, {report['n']} held-out puzzles, batch 1:", "",
             "| mode | accuracy | forward passes | passes ÷ | ms/solution | tokens/s | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['mode']} | {100 * r['accuracy']:.1f} % | {r['forward_passes']:.1f} | "
                     f"{r['passes_reduction']:.1f}× | {r['ms_per_solution']:.1f} | {r['tokens_per_second']:.0f} | "
                     f"{r['speedup_vs_vanilla']:.2f}× |")
    t = report["throughput"]
    lines += ["", f"Throughput on random weights ({t['shape']}):", "", "| mode | forward passes | tokens/s |",
              "|---|---|---|"]
    for r in t["rows"]:
        lines.append(f"| {r['mode']} | {r['forward_passes']} | {r['tokens_per_second']:.0f} |")
    return "\n".join(lines)


def write_speed_report(report: dict[str, Any], out_dir: Path) -> None:
    """speed.md, speed.json and speed.png (accuracy against tokens/s) under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "speed.md").write_text(f"`{report['command']}` on {report['machine']}\n\n{speed_table(report)}\n")
    (out_dir / "speed.json").write_text(json.dumps(report, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["rows"]:
        ax.scatter(r["tokens_per_second"], 100 * r["accuracy"], s=40)
        ax.annotate(r["mode"], (r["tokens_per_second"], 100 * r["accuracy"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("tokens/s (batch 1)")
    ax.set_ylabel(f"{report['task']} held-out accuracy (%)")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "speed.png", dpi=120)
    plt.close(fig)
