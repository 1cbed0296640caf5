"""Held-out loss curves of the text pipeline's runs (recipes/text/pipeline.sh) against training tokens seen.

    python benchmarks/text_curves.py --runs runs/text --out benchmarks/results

A run that continues another (its model.init_from names that run's final/ folder, or the `-dream` conversion of it)
starts where its parent ended, so AR → diffusion, AR, AR + FIM and the variants start at stage 1's tokens and the
75/25 split's diffusion half at 4.72 M. AR runs log the next-token NLL; diffusion runs log their training objective
(CART-weighted masked CE, always with independent masks), which is not a likelihood: compare diffusion likelihoods
with `dreamlm bench infill`'s ELBO column instead. --runs may be given more than once (runs trained in different
folders); --carry keeps the entries of an existing text_curves.json whose runs are not found now (a run trained in
another session), marked "carried". Writes text_curves.png and text_curves.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

LABELS = {  # run directory -> label (others are labelled by their directory)
    "ar-stage": "AR stage 1",
    "ar2diff": "AR → diffusion (CART)",
    "ar-full": "AR",
    "ar-fim": "AR + FIM",
    "diff-scratch": "diffusion from scratch",
    "split75-ar": "AR stage 1 + 1.57 M (75 % AR)",
    "split75-diff": "AR 75 % → diffusion 25 %",
    "ar2diff-span50": "AR → diffusion, 50 % span masks",
    "ar2diff-span75": "AR → diffusion, 75 % span masks",
}


def read_run(run: Path) -> dict:
    """(tokens, value) of the held-out losses and of the training loss, the tokens per step and the parent run."""
    cfg = json.loads((run / "train_config.json").read_text())
    per_step = cfg["optim"]["batch_size"] * cfg["optim"]["grad_accum"] * cfg["data"]["seq_len"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    init = Path(cfg["model"].get("init_from") or "")
    parent = (init.parent.name if init.name == "final" else init.name.removesuffix("-dream")) or None
    return {"per_step": per_step, "steps": cfg["optim"]["max_steps"], "parent": parent,
            "objective": cfg["objective"]["kind"],
            "val": [(r["step"] * per_step, r["val_loss"]) for r in records if "val_loss" in r],
            "train": [(r["step"] * per_step, r["loss"]) for r in records if "loss" in r]}


def start_tokens(name: str, found: dict) -> int:
    """Tokens seen before the run started: its ancestors' budgets (a parent not found counts 0)."""
    parent = found[name]["parent"]
    if parent not in found or parent == name:
        return 0
    return start_tokens(parent, found) + found[parent]["per_step"] * found[parent]["steps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, action="append", help="folder of runs (default runs/text; repeatable)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--carry", action="store_true", help="keep earlier entries of runs not found now")
    args = parser.parse_args()
    found = {}
    for root in args.runs or [Path("runs/text")]:
        for run in sorted(root.glob("*/metrics.jsonl")):
            if (run.parent / "train_config.json").is_file():
                found.setdefault(run.parent.name, read_run(run.parent))
    if not found:
        raise SystemExit(f"no runs under {', '.join(map(str, args.runs or ['runs/text']))}; "
                         "run recipes/text/pipeline.sh first")
    report = {}
    for name, run in found.items():
        offset = start_tokens(name, found)
        report[name] = {"label": LABELS.get(name, name), "objective": run["objective"], "start_tokens": offset,
                        "val_bits": [(offset + t, v / math.log(2)) for t, v in run["val"]]}
    earlier = args.out / "text_curves.json"
    if args.carry and not earlier.is_file():
        print(f"--carry: no earlier {earlier} to carry runs from")
    elif args.carry:
        for name, row in json.loads(earlier.read_text()).items():
            if name not in report:
                report[name] = {**row, "carried": True}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "text_curves.json").write_text(json.dumps(report, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ar_ax, diff_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, row in report.items():
        ax = ar_ax if row["objective"] == "ar" else diff_ax
        xs, ys = zip(*row["val_bits"]) if row["val_bits"] else ((), ())
        label = row["label"] + (" (earlier run)" if row.get("carried") else "")
        ax.plot([x / 1e6 for x in xs], ys, "o-", label=label)
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
