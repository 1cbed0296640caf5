"""Adapt SmolLM2-135M on one accelerator within a fixed wall-clock budget: the LoRA recipe and full fine-tuning side by
side (same data, masks and token budget per second of GPU), then a rank-r low-rank delta of the full fine-tune, and
validation losses of the base, both adapters and the full model on the same held-out batches.

This is the script that trained the shipped adapter (see README.md beside it). It needs only torch, tokenizers,
safetensors, numpy, jinja2 and gguf, with PYTHONPATH=src:

    python3 recipes/smollm2/device_adapt.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out OUT --budget 420

OUT receives lora/ and delta/ (adapter directories; safetensors split into <16 MB parts, joined with `cat`) and
summary.json; every run directory stays under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def train_one(recipe: str, base: str, out_dir: str, deadline: float, extra: list[str]) -> None:
    """One training run that ends its training by `deadline` (seconds since the epoch)."""
    from dreamlm.training.config import TrainConfig
    from dreamlm.training.trainer import Trainer

    cfg = TrainConfig.load(HERE / recipe, [f"model.init_from={base}", f"run.out_dir={out_dir}", "adapter.base=smollm2-base",
                                           *extra])
    trainer = Trainer(cfg)
    trainer.cfg.run.time_budget_s = max(deadline - time.time(), 30.0)
    trainer.fit()


def val_loss(recipe: str, base: str, model, extra: list[str]) -> float:
    """Held-out diffusion loss of `model` on the recipe's fixed validation batches and masks."""
    import torch

    from dreamlm.training.config import TrainConfig
    from dreamlm.training.trainer import Trainer

    cfg = TrainConfig.load(HERE / recipe, [f"model.init_from={base}", "run.out_dir=/tmp/eval-unused", *extra])
    trainer = Trainer(cfg)
    trainer.model = model.to(trainer.world.device).train()
    with torch.no_grad():
        return float(trainer.evaluate())


def split_copy(src: Path, dst_dir: Path, part_bytes: int = 15_000_000) -> list[str]:
    """Copy a file into dst_dir as NAME.00, NAME.01, … of at most part_bytes each (the way back allows 16 MB)."""
    data = src.read_bytes()
    names = []
    for i in range(0, max(len(data), 1), part_bytes):
        name = f"{src.name}.{i // part_bytes:02d}"
        (dst_dir / name).write_bytes(data[i:i + part_bytes])
        names.append(name)
    return names


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/smollm2")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds of training for each run (side by side)")
    ap.add_argument("--set", action="append", default=[], help="extra overrides for both runs")
    ap.add_argument("--rank", type=int, default=32, help="rank of the full fine-tune's low-rank delta")
    ap.add_argument("--post-only", action="store_true", help="skip training: evaluate and package existing runs")
    ap.add_argument("--runs", default="lora,full", help="which recipes to train side by side")
    ap.add_argument("--skip-base-eval", action="store_true", help="do not measure the base model's held-out loss")
    args = ap.parse_args()
    if os.environ.get("DREAMLM_ROLE"):
        recipe, base, out_dir, deadline = os.environ["DREAMLM_ROLE"].split("|")
        train_one(recipe, base, out_dir, float(deadline), args.set)
        return

    import torch

    from dreamlm.adapter import LoraSpec, extract_adapter, save_adapter
    from dreamlm.formats.gguf import gguf_to_dream
    from dreamlm.model import DreamModel

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # adapters name their base "smollm2-base": a cache laid out as `dreamlm pull` lays it out resolves that name
    os.environ["DREAMLM_HOME"] = str(work / "home")
    base = work / "home" / "smollm2"
    if not (base / "config.json").is_file():
        gguf_to_dream(args.gguf, base)
    print(f"converted in {time.time() - t0:.0f} s", flush=True)
    deadline = time.time() + args.budget
    procs = {}
    runs = [r for r in args.runs.split(",") if r]
    for name in runs if not args.post_only else ():
        env = dict(os.environ, DREAMLM_ROLE=f"{name}.toml|{base}|{work / name}|{deadline}",
                   OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
        procs[name] = subprocess.Popen([sys.executable, __file__, *sys.argv[1:]], env=env,
                                       stdout=open(work / f"{name}.log", "w"), stderr=subprocess.STDOUT)
    codes = {name: p.wait() for name, p in procs.items()}
    print(f"trained: {codes} after {time.time() - t0:.0f} s", flush=True)
    summary: dict = {"exit_codes": codes, "budget_s": args.budget, "device": torch.cuda.get_device_name(0)
                     if torch.cuda.is_available() else "cpu"}
    for name in runs:
        log = (work / name / "metrics.jsonl")
        if log.is_file():
            summary[f"{name}_metrics"] = [json.loads(line) for line in log.read_text().splitlines()]
        if (work / f"{name}.log").is_file():
            summary[f"{name}_log_tail"] = (work / f"{name}.log").read_text()[-3000:]
    spec = LoraSpec(rank=args.rank, alpha=float(args.rank), train_norms=True)
    if (work / "full" / "final" / "config.json").is_file():
        tuned = DreamModel.from_pretrained(work / "full" / "final", dtype=torch.float32)
        spec.train_rows = [tuned.config.mask_token_id]
        delta = extract_adapter(DreamModel.from_pretrained(base, dtype=torch.float32), tuned, spec)
        save_adapter(delta, spec, work / "delta", base="smollm2-base")
        summary["val_loss_full"] = val_loss("full.toml", str(base), tuned, args.set)
        summary["val_loss_delta"] = val_loss("full.toml", str(base), DreamModel.from_pretrained(
            work / "delta", dtype=torch.float32), args.set)
    if not args.skip_base_eval:
        summary["val_loss_base"] = val_loss("lora.toml", str(base), DreamModel.from_pretrained(base, dtype=torch.float32),
                                            args.set)
    if (work / "lora" / "final" / "adapter_config.json").is_file():
        lora_dir = work / "lora" / "final"
        (lora_dir / "adapter_config.json").write_text(
            (lora_dir / "adapter_config.json").read_text().replace(str(base), "smollm2-base"))
        summary["val_loss_lora"] = val_loss("lora.toml", str(base), DreamModel.from_pretrained(
            lora_dir, dtype=torch.float32), args.set)
    for name, src in (("lora", work / "lora" / "final"), ("delta", work / "delta")):
        if (src / "adapter_model.safetensors").is_file():
            (out / name).mkdir(exist_ok=True)
            (out / name / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
            summary[f"{name}_parts"] = split_copy(src / "adapter_model.safetensors", out / name)
    summary["total_s"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if not k.endswith(("metrics", "tail"))}, indent=1))


if __name__ == "__main__":
    main()
