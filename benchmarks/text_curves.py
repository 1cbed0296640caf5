"""Held-out loss curves of the text pipeline's runs (recipes/text/pipeline.sh) against training tokens seen.

    python benchmarks/text_curves.py --runs runs/text --out benchmarks/results

The continuations (AR → diffusion, AR, AR + FIM) start where stage 1 ended, so their curves start at stage 1's
tokens. AR runs log the next-token NLL; diffusion runs log their training objective (CART-weighted masked CE), which
is not a likelihood: compare diffusion likelihoods with `dreamlm bench infill`'s ELBO column instead. Writes
text_curves.png and text_curves.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RUNS = {  # run directory -> (label, the run it continues)
    "ar-stage": ("AR stage 1", None),
    "ar2diff": ("AR → diffusion (CART)", "ar-stage"),
    "ar-full": ("AR", "ar-stage"),
    "ar-fim": ("AR + FIM", "ar-stage"),
    "diff-scratch": ("diffusion from scratch", None),
}


def read_run(run: Path) -> dict:
    """(tokens, value) of the held-out losses and of the training loss, and the tokens per step."""
    cfg = json.loads((run / "train_config.json").read_text())
    per_step = cfg["optim"]["batch_size"] * cfg["optim"]["grad_accum"] * cfg["data"]["seq_len"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"per_step": per_step, "steps": cfg["optim"]["max_steps"],
            "objective": cfg["objective"]["kind"],
            "val": [(r["step"] * per_step, r["val_loss"]) for r in records if "val_loss" in r],
            "train": [(r["step"] * per_step, r["loss"]) for r in records if "loss" in r]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/text"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    found = {name: read_run(args.runs / name) for name in RUNS if (args.runs / name / "metrics.jsonl").is_file()}
    if not found:
        raise SystemExit(f"no runs under {args.runs}; run recipes/text/pipeline.sh first")
    report = {}
    for name, run in found.items():
        parent = RUNS[name][1]
        offset = found[parent]["per_step"] * found[parent]["steps"] if parent in found else 0
        report[name] = {"label": RUNS[name][0], "objective": run["objective"], "start_tokens": offset,
                        "val_bits": [(offset + t, v / math.log(2)) for t, v in run["val"]]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "text_curves.json").write_text(json.dumps(report, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ar_ax, diff_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, row in report.items():
        ax = ar_ax if row["objective"] == "ar" else diff_ax
        xs, ys = zip(*row["val_bits"]) if row["val_bits"] else ((), ())
        ax.plot([x / 1e6 for x in xs], ys, "o-", label=row["label"])
    ar_ax.set_title("AR runs: held-out next-token NLL")
    diff_ax.set_title("diffusion runs: held-out CART objective (not a likelihood)")
    for ax in (ar_ax, diff_ax):
        ax.set_xlabel("training tokens seen (M)")
        ax.set_ylabel("bits per token")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "text_curves.png", dpi=120)
    print(f"wrote {args.out}/text_curves.(json|png)")


if __name__ == "__main__":
    main()
