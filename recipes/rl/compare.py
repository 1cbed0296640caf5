"""Reward and validation-accuracy curves of several `dreamlm rl` runs in one plot (e.g. the three estimators on
one task at equal rollouts: same seed, so the same puzzles each step).

    python recipes/rl/compare.py runs/rl/est-one_step runs/rl/est-coupled runs/rl/est-elbo --out docs/rl-estimators.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for run in args.runs:
        history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        label = json.loads((run / "rl_config.json").read_text())["grpo"]["estimator"]
        for ax, key in zip(axes, ("reward", "val_acc")):
            points = [(h["step"], h[key]) for h in history if key in h]
            if points:
                ax.plot(*zip(*points), "o-" if key == "val_acc" else "-", label=f"{label} ({run.name})")
        print(run.name, label, "mean reward", sum(h["reward"] for h in history if "reward" in h) /
              max(1, sum("reward" in h for h in history)), "val_acc", [h["val_acc"] for h in history if "val_acc" in h])
    for ax, label in zip(axes, ("mean rollout reward", "validation accuracy")):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
