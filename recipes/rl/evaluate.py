"""SFT vs SFT+RL on held-out star graphs (the bench's split: test, seed 1), every shape the G(10, 5) pair was
trained on (or --shapes), bench-style (`dreamlm.bench.score`, greedy solving as `dreamlm solve`, bf16 as `--dtype auto` here).

    nice -n 10 python recipes/rl/evaluate.py runs/rl/star-10-5-diffusion/final runs/rl/star-10-5-ar/final --n 200

Prints a markdown table and writes it (with the JSON) next to the first RL model's run directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dreamlm.bench import TEST_SEED, machine, rl_models, score
from dreamlm.solver import Solver, bundled_model_dir
from dreamlm.tasks import make_examples

SHAPES = ("star-10-5", "star-8-5", "star-6-5", "star-5-5", "star-3-7", "star-2-11")  # the G(10, 5) pair's training shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rl", nargs="+", type=Path, help="models made by `dreamlm rl`")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="star-D-L task names")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    pairs = {base: (Solver(bundled_model_dir(base), dtype=dtype), Solver(path, dtype=dtype))
             for base, path in rl_models(args.rl).items()}
    rows, report = [], {"machine": machine(), "n": args.n, "dtype": args.dtype, "results": {}}
    for shape in args.shapes:
        puzzles = [e["input"] for e in make_examples(shape, args.n, TEST_SEED, "test")]
        cells = []
        for base, (sft, rl) in pairs.items():
            a, b = score(sft, puzzles), score(rl, puzzles)
            report["results"].setdefault(shape, {})[base] = {"sft": vars(a), "rl": vars(b)}
            cells += [f"{100 * a.accuracy:.1f} %", f"{100 * b.accuracy:.1f} %"]
        rows.append(f"| G({shape.split('-')[1]}, {shape.split('-')[2]}) | " + " | ".join(cells) + " |")
    header = "| held-out set | " + " | ".join(f"{b} SFT | {b} SFT+RL" for b in pairs) + " |"
    table = "\n".join([header, "|---|" + "---|" * (2 * len(pairs)), *rows])
    print(f"{args.n} held-out puzzles per shape, {args.dtype}, {report['machine']}\n\n{table}")
    out = args.rl[0].parent
    (out / "evaluate.md").write_text(table + "\n")
    (out / "evaluate.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
