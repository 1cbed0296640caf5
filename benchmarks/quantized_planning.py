"""Planning accuracy of the bundled diffusion solvers after a GGUF export at each llama.cpp type, beside the original.

Each solver is exported with `dreamlm export` (f16, q8_0 with the `gguf` library; q4_k with llama.cpp's own Q4_K_M
quantizer when llama-cpp-python is installed), read back with `dreamlm convert` (the weights dequantized to
float32: what llama.cpp multiplies with), and solves the same held-out puzzles of its task (the split every bench
uses, seed 1) as the original model in float32, with the solver's default decoding. Reports accuracy, the puzzles
whose validity changed, and the file size. What this leaves out: llama.cpp also rounds the activations to 8 bits
in its quantized matmuls; `dreamlm export --check` compares llama.cpp's own logits (argmax agreement, KL).

    OMP_NUM_THREADS=1 python benchmarks/quantized_planning.py --n 300
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from dreamlm.bench import TEST_SEED, machine
from dreamlm.formats.gguf import gguf_to_dream
from dreamlm.formats.gguf_export import export_model
from dreamlm.solver import TASK_FILE, Solver
from dreamlm.tasks import make_examples

sys.path.insert(0, str(Path(__file__).parent))
from precision_planning import planning_models, write_report  # noqa: E402

OUT = Path(__file__).parent / "results"


def types() -> list[str]:
    """The export types measured: q4_k only where llama.cpp's quantizer is installed."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return ["f16", "q8_0"]
    return ["f16", "q8_0", "q4_k"]


def measure(path: Path, n: int, kinds: list[str], work: Path) -> dict:
    """One solver: the original and each export read back, on the same n held-out puzzles."""
    task = json.loads((path / TASK_FILE).read_text())["task"]
    puzzles = [e["input"] for e in make_examples(task, n, TEST_SEED, "test")]
    base = [s.valid for s in Solver(path, dtype=torch.float32).solve_batches(puzzles)]
    entry: dict = {"model": path.name, "task": task, "n": n, "original": {"accuracy": sum(base) / n}}
    for kind in kinds:
        gguf = work / f"{path.name}-{kind}.gguf"
        export_model(str(path), gguf, kind)
        back = gguf_to_dream(gguf, work / f"{path.name}-{kind}", dtype="float32")
        shutil.copy(path / TASK_FILE, back / TASK_FILE)
        valid = [s.valid for s in Solver(back, dtype=torch.float32).solve_batches(puzzles)]
        entry[kind] = {"accuracy": sum(valid) / n, "file_mb": gguf.stat().st_size / 2**20,
                       "lost": sum(b and not v for b, v in zip(base, valid)),
                       "gained": sum(v and not b for b, v in zip(base, valid))}
    return entry


def table(report: dict) -> str:
    """Markdown table: accuracy per type, the change in points and the puzzles lost / gained against the original."""
    kinds = report["types"]
    head = "| model | n | original | " + " | ".join(f"{k} (lost / gained)" for k in kinds) + " |"
    lines = [head, "|---|---:|---:|" + "---:|" * len(kinds)]
    for e in report["rows"]:
        cells = [f"{100 * e[k]['accuracy']:.1f} % ({e[k]['lost']} / {e[k]['gained']})" for k in kinds]
        lines.append(f"| {e['model']} | {e['n']} | {100 * e['original']['accuracy']:.1f} % | " + " | ".join(cells)
                     + " |")
    sizes = " · ".join(f"{k} {report['rows'][0][k]['file_mb']:.2f} MB" for k in kinds) if report["rows"] else ""
    return "\n".join(lines) + (f"\n\nFile sizes of {report['rows'][0]['model']}: {sizes}" if sizes else "")


def plot(report: dict, out: Path) -> None:
    """Grouped bars: accuracy of each solver, original and every export type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, kinds = report["rows"], ["original", *report["types"]]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        ax.bar([r + i * width for r in range(len(rows))], [100 * e[kind]["accuracy"] for e in rows], width,
               label=kind)
    ax.set_xticks([r + width * (len(kinds) - 1) / 2 for r in range(len(rows))])
    ax.set_xticklabels([e["model"].replace("-diffusion", "") for e in rows])
    ax.set_ylabel("held-out puzzles solved (%)")
    ax.set_ylim(0, 105)
    ax.legend(ncol=len(kinds), fontsize=8, loc="lower left")
    ax.set_title("Bundled diffusion solvers after GGUF export (weights read back, float32)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    """Measure every bundled diffusion solver and write quantized_planning.{json,md,png}."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300, help="held-out puzzles per model")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    start, kinds, rows = time.perf_counter(), types(), []
    solvers = [p for p in planning_models() if p.name.endswith("-diffusion")]
    with tempfile.TemporaryDirectory() as work:
        for path in solvers:
            rows.append(measure(path, args.n, kinds, Path(work)))
            print(f"{path.name}: original {rows[-1]['original']['accuracy']:.3f}, "
                  + ", ".join(f"{k} {rows[-1][k]['accuracy']:.3f}" for k in kinds), file=sys.stderr, flush=True)
    report = {"machine": machine(), "command": "python benchmarks/quantized_planning.py " + " ".join(sys.argv[1:]),
              "n": args.n, "types": kinds, "wall_seconds": round(time.perf_counter() - start, 1), "rows": rows}
    write_report(args.out, "quantized_planning", report,
                 f"{args.n} held-out puzzles per model, the same puzzles for every type", table(report))
    plot(report, args.out / "quantized_planning.png")


if __name__ == "__main__":
    main()
