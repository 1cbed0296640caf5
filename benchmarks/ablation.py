"""Small-scale training ablation on a corpus every machine has: the running Python's standard library.

Four runs of the same model size, data and optimizer-step budget:
  scratch-elbo    diffusion from random init, 1/t weights
  scratch-linear  diffusion from random init, (1 - t) weights
  scratch-cart    diffusion from random init, CART weights (p = 0.1)
  ar-init-elbo    AR (causal) pretraining for half the steps, then the same weights as a bidirectional diffusion
                  model (Dream's AR initialisation) for the other half, 1/t weights
Each is scored on held-out *modules* (whole files never trained on): the Monte-Carlo ELBO in bits per token, and
infilling accuracy of masked 8-token spans (entropy decoding, temperature 0, one step per token).

    python benchmarks/ablation.py --steps 600          # the run reported in benchmarks/README.md
    python benchmarks/ablation.py --quick              # a one-minute smoke run

Writes benchmarks/results/ablation.{json,md,png}; run directories go to --runs (default runs/ablation).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from dreamlm.model import DreamModel
from dreamlm.sampling import diffusion_generate
from dreamlm.tokenizer import train_tokenizer
from dreamlm.training.config import TrainConfig
from dreamlm.training.data import PackedBlocks, stdlib_split
from dreamlm.training.objective import bits_per_token, elbo_loglik
from dreamlm.training.trainer import train

HERE = Path(__file__).resolve().parent


def run_config(args, tok_dir: Path, train_files, valid_files, out: Path, *overrides: str) -> TrainConfig:
    return TrainConfig.load(None, [
        f"model.tokenizer={tok_dir}", f"model.hidden_size={args.hidden}", f"model.layers={args.layers}",
        f"model.heads={args.heads}", f"model.kv_heads={args.heads}", f"model.context={args.seq_len}",
        "data.train=" + ",".join(map(str, train_files)), "data.valid=" + ",".join(map(str, valid_files)),
        f"data.seq_len={args.seq_len}", f"optim.batch_size={args.batch}", f"optim.lr={args.lr}",
        f"optim.warmup_steps={max(1, args.steps // 20)}", f"run.out_dir={out}", "run.progress=false",
        f"run.log_every={max(1, args.steps // 50)}", f"run.eval_every={max(1, args.steps // 4)}",
        f"run.save_every={args.steps}", "run.export_dtype=float32", "run.eval_batches=4", *overrides])


def held_out_blocks(tok, valid_files, seq_len: int, n: int) -> torch.Tensor:
    return PackedBlocks(valid_files, tok, seq_len, seed=123).next_batch(n).x


def score(model: DreamModel, blocks: torch.Tensor, mc_num: int, span: int) -> dict:
    """ELBO bits/token of each block's tokens after the first, and infilling accuracy of one middle span."""
    model.eval()
    nll, tokens = 0.0, 0
    for row in blocks.tolist():
        nll -= elbo_loglik(model, row[:1], row[1:], mc_num=mc_num, batch_size=mc_num, seed=0)
        tokens += len(row) - 1
    mask_id = model.config.mask_token_id
    hits, exact = 0, 0
    gen = torch.Generator().manual_seed(0)
    for row in blocks:
        start = int(torch.randint(1, len(row) - span, (1,), generator=gen))
        canvas = row.clone()
        canvas[start:start + span] = mask_id
        out = diffusion_generate(model, canvas[None], max_length=len(row), steps=span, alg="entropy")[0]
        ok = out[start:start + span] == row[start:start + span]
        hits += int(ok.sum())
        exact += int(ok.all())
    return {"elbo_bits_per_token": bits_per_token(nll, tokens), "infill_token_acc": hits / (span * len(blocks)),
            "infill_span_exact": exact / len(blocks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--eval-blocks", type=int, default=48)
    parser.add_argument("--mc-num", type=int, default=32)
    parser.add_argument("--span", type=int, default=8)
    parser.add_argument("--runs", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.hidden, args.layers, args.seq_len, args.batch = 20, 64, 2, 64, 4
        args.vocab, args.eval_blocks, args.mc_num = 512, 4, 4
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.time()
    train_files, valid_files = stdlib_split()
    if args.quick:
        train_files, valid_files = train_files[:20], valid_files[:5]
    args.runs.mkdir(parents=True, exist_ok=True)
    tok_dir = args.runs / "tokenizer"
    t0 = time.time()
    tok = train_tokenizer([p.read_text(encoding="utf-8", errors="replace") for p in train_files], args.vocab)
    tok.save_pretrained(tok_dir)
    print(f"tokenizer: {tok.vocab_size} ids from {len(train_files)} files in {time.time() - t0:.0f}s; "
          f"{len(valid_files)} held-out modules", flush=True)
    half = args.steps // 2
    plans = {
        "scratch-elbo": [("objective.weighting=elbo",)],
        "scratch-linear": [("objective.weighting=linear",)],
        "scratch-cart": [("objective.weighting=cart",)],
        "ar-init-elbo": [("objective.kind=ar", f"optim.max_steps={half}"),
                         ("objective.weighting=elbo", f"optim.max_steps={args.steps - half}")],
    }
    results, curves = {}, {}
    blocks = held_out_blocks(tok, valid_files, args.seq_len, args.eval_blocks)
    for name, stages in plans.items():
        t0 = time.time()
        init, history = "", []
        for i, overrides in enumerate(stages):
            out = args.runs / (name if len(stages) == 1 else f"{name}-{i}")
            over = [f"optim.max_steps={args.steps}", *overrides] + ([f"model.init_from={init}"] if init else [])
            final = train(run_config(args, tok_dir, train_files, valid_files, out, *over))
            offset = history[-1][0] if history else 0
            history += [(offset + r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").open())
                        if "loss" in r]
            init = str(final)
        train_seconds = time.time() - t0
        model = DreamModel.from_pretrained(init, dtype=torch.float32)
        results[name] = {**score(model, blocks, args.mc_num, args.span), "train_seconds": train_seconds,
                         "tokens_per_second": args.steps * args.batch * args.seq_len / train_seconds}
        curves[name] = history
        print(name, json.dumps(results[name]), flush=True)
    write_outputs(args, results, curves, time.time() - started, len(train_files), len(valid_files), tok.vocab_size)


def write_outputs(args, results, curves, seconds, n_train, n_valid, vocab) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    lines = ["| run | val ELBO (bits/token) ↓ | infill token acc ↑ | infill span exact ↑ | train s | tok/s |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['elbo_bits_per_token']:.3f} | {r['infill_token_acc']:.3f} | "
                     f"{r['infill_span_exact']:.3f} | {r['train_seconds']:.0f} | {r['tokens_per_second']:.0f} |")
    table = "\n".join(lines)
    print(table)
    command = "python " + " ".join(sys.argv)
    meta = {"command": command, "machine": platform.platform(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "settings": {k: str(v) for k, v in vars(args).items()},
            "train_modules": n_train, "held_out_modules": n_valid, "vocab": vocab, "total_seconds": seconds}
    (args.out / f"ablation{suffix}.json").write_text(json.dumps({"meta": meta, "results": results,
                                                                 "curves": curves}, indent=2))
    (args.out / f"ablation{suffix}.md").write_text(f"`{command}` on {platform.platform()}, torch {torch.__version__}\n\n"
                                                   + table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, hist in curves.items():
        if hist:
            ax.plot(*zip(*hist), label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (each run's own weighting)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / f"ablation{suffix}.png", dpi=120)


if __name__ == "__main__":
    main()
