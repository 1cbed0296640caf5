"""Plot the SmolLM2 adaptation record (benchmarks/results/smollm2_adapt.json): held-out diffusion loss against
training tokens for the LoRA adapter and full fine-tuning, trained side by side on one GPU, with the base and the
rank-r delta of the full fine-tune as points.

    python benchmarks/smollm2_curves.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    record = json.loads((ROOT / "results" / "smollm2_adapt.json").read_text())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rows = []
    for name, label in (("lora", "LoRA r=32 (shipped)"), ("full", "full fine-tuning")):
        metrics = record.get(f"{name}_metrics", [])
        per_step = next((m["tokens"] for m in metrics if "tokens" in m), 0)
        val = [(m["step"] * per_step / 1e6, m["val_loss"]) for m in metrics if "val_loss" in m]
        if val:
            ax.plot(*zip(*val), "o-", label=label)
            rows.append((label, val[-1][0], val[-1][1]))
    if "val_loss_base" in record:
        ax.axhline(record["val_loss_base"], color="grey", ls="--", label="base (converted, unadapted)")
        rows.append(("base", 0.0, record["val_loss_base"]))
    if "val_loss_delta" in record:
        last = rows[1][1] if len(rows) > 1 else 0
        ax.plot([last], [record["val_loss_delta"]], "s", color="C1", label="full fine-tune as a rank-32 delta")
        rows.append(("full fine-tune, rank-32 delta", last, record["val_loss_delta"]))
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("held-out diffusion loss (CART)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "smollm2_adapt.png", dpi=120)
    print("| model | tokens (M) | held-out loss |\n|---|---|---|")
    for label, tokens, loss in rows:
        print(f"| {label} | {tokens:.1f} | {loss:.3f} |")


if __name__ == "__main__":
    main()
