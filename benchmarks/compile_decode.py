"""torch.compile for the decode step on this CPU: eager vs compiled, in fp32 and bf16, side by side in one process.

Two workloads: (1) the bundled Sudoku diffusion solver with threshold 0.99 (p(x0)), one held-out puzzle at a time
(short canvases, many small forwards); (2) a random small model (hidden 256 x 4 layers) decoding after a 64-token
prompt, 4 tokens per pass in blocks of 32: the eager fast path with a dual cache against the compiled path, which
cannot use the cache (its spans change shape), plus AR decoding for reference. Compilation happens in a warm-up,
outside the timing. Run on one thread on the shared VM:

    OMP_NUM_THREADS=1 python benchmarks/compile_decode.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dreamlm.bench import TEST_SEED, _speed_row, machine
from dreamlm.solver import Solver, bundled_model_dir
from dreamlm.tasks import make_examples
from dreamlm.throughput import decode_throughput, small_shape

OUT = Path(__file__).parent / "results"


def main() -> None:
    """Measure both workloads in both precisions; write compile_decode.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50, help="held-out Sudoku puzzles")
    parser.add_argument("--batch", type=int, default=1, help="rows of the random-model decode")
    parser.add_argument("--new-tokens", type=int, default=192, help="tokens of the random-model decode")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    puzzles = [e["input"] for e in make_examples("sudoku4", args.n, TEST_SEED, "test")]
    report: dict = {"machine": machine(), "command": "python benchmarks/compile_decode.py " + " ".join(sys.argv[1:]),
                    "solver": [], "decode": []}
    for dtype in (torch.float32, torch.bfloat16):
        solver = Solver(bundled_model_dir("sudoku4-diffusion"), dtype=dtype)
        for label, extra in (("eager", {}), ("compiled", {"compile": True})):
            start = time.perf_counter()
            row = _speed_row(label, solver, puzzles, {"threshold": 0.99, "alg": "maskgit_plus", **extra})
            row.update(dtype=str(dtype).removeprefix("torch."), wall_with_warmup=time.perf_counter() - start)
            report["solver"].append(row)
            print(f"sudoku4 {row['dtype']} {label}: {row['ms_per_solution']:.2f} ms/puzzle, accuracy "
                  f"{row['accuracy']:.3f} (wall with warm-up {row['wall_with_warmup']:.0f} s)", flush=True)
        report["decode"].append(decode_throughput(small_shape(), batch=args.batch, new_tokens=args.new_tokens,
                                                  dtype=dtype, compile=True))
        print(str(dtype), [(r["mode"], round(r["tokens_per_second"])) for r in report["decode"][-1]["rows"]],
              flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_decode.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
