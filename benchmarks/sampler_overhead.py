"""Per-step overhead of `diffusion_generate` over a bare model forward, measured side by side in one process.

For a small random DreamModel, times
  (a) `steps` bare forwards `model(x)` under `torch.no_grad()` on a canvas of prompt + new tokens, and
  (b) one `diffusion_generate(..., steps=steps)` call per sampler configuration (each step = one forward + selection),
and reports per-step milliseconds and overhead = sampler_per_step / bare_per_step - 1 (target <= 5 %).

Measurements are interleaved: every repeat runs all configurations in a rotated order, and the median over repeats is
reported, so drift on a shared machine hits all configurations alike.

    python benchmarks/sampler_overhead.py            # defaults: vocab 8192, hidden 256, 4 layers, 256-token canvas, 64 steps
    python benchmarks/sampler_overhead.py --profile  # also print the sampler's costliest calls (cProfile)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from dreamlm.config import DreamConfig
from dreamlm.model import DreamModel
from dreamlm.sampling import diffusion_generate

TARGET_OVERHEAD_PCT = 5.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# name -> diffusion_generate keyword arguments
SAMPLER_CONFIGS: dict[str, dict] = {
    "origin": {"alg": "origin"},
    "entropy": {"alg": "entropy"},
    "maskgit_plus": {"alg": "maskgit_plus"},
    "entropy T=0.2 top_p=0.95": {"alg": "entropy", "temperature": 0.2, "top_p": 0.95},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=224)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of every configuration first")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="after timing, cProfile one generate call per config and "
                   "print the sampler calls (outside the model forward) that cost most")
    p.add_argument("--profile-top", type=int, default=15)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "sampler_overhead.json")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    canvas = args.prompt_len + args.new_tokens
    config = DreamConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, canvas), mask_token_id=args.vocab - 1, pad_token_id=args.vocab - 2,
        bos_token_id=args.vocab - 2, eos_token_id=args.vocab - 2,
    )
    model = DreamModel(config).init_weights(args.seed).to(device=device, dtype=dtype).eval()

    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, args.vocab - 2, (args.batch, args.prompt_len), generator=gen).to(device)
    # the bare forward sees exactly the sampler's first canvas: prompt followed by masks
    canvas_ids = torch.cat(
        [prompt, torch.full((args.batch, args.new_tokens), config.mask_token_id, dtype=torch.long, device=device)], dim=1)

    def run_bare() -> None:
        with torch.no_grad():
            for _ in range(args.steps):
                model(canvas_ids)

    def make_sampler(kwargs: dict):
        def run() -> None:
            diffusion_generate(model, prompt, max_new_tokens=args.new_tokens, steps=args.steps, seed=args.seed, **kwargs)
        return run

    runs = {"bare forward": run_bare}
    runs.update({name: make_sampler(kw) for name, kw in SAMPLER_CONFIGS.items()})
    names = list(runs)

    def timed(fn) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    print(f"model: {model.num_parameters() / 1e6:.2f}M params, {args.dtype}, {device}; canvas {args.batch}x{canvas} "
          f"({args.prompt_len} prompt + {args.new_tokens} new), steps {args.steps}, threads {torch.get_num_threads()}",
          file=sys.stderr)
    for _ in range(args.warmup):
        for name in names:
            timed(runs[name])
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate so no config always runs first/last
        for name in order:
            samples[name].append(timed(runs[name]))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n} {samples[n][-1] * 1e3 / args.steps:.2f} ms/step"
                                                          for n in names), file=sys.stderr)

    bare_step = statistics.median(samples["bare forward"]) / args.steps
    rows = []
    for name in names:
        per_step = [s / args.steps for s in samples[name]]
        med = statistics.median(per_step)
        row = {
            "config": name,
            "kwargs": SAMPLER_CONFIGS.get(name),
            "per_step_ms_median": med * 1e3,
            "per_step_ms_min": min(per_step) * 1e3,
            "per_step_ms_max": max(per_step) * 1e3,
            "per_step_ms_all": [v * 1e3 for v in per_step],
        }
        if name != "bare forward":
            row["overhead_pct"] = (med / bare_step - 1) * 100
            row["overhead_pct_best_of"] = (min(per_step) / (min(samples["bare forward"]) / args.steps) - 1) * 100
            row["meets_target"] = row["overhead_pct"] <= TARGET_OVERHEAD_PCT
        rows.append(row)

    # ---- table ----
    print()
    print(f"| config | per-step ms (median of {args.repeats}) | min | max | overhead vs bare | <= {TARGET_OVERHEAD_PCT:g} % |")
    print("|---|---:|---:|---:|---:|:---:|")
    for row in rows:
        ov = f"{row['overhead_pct']:+.1f} %" if "overhead_pct" in row else "—"
        ok = ("yes" if row["meets_target"] else "**no**") if "meets_target" in row else "—"
        print(f"| {row['config']} | {row['per_step_ms_median']:.2f} | {row['per_step_ms_min']:.2f} | "
              f"{row['per_step_ms_max']:.2f} | {ov} | {ok} |")

    profile = None
    if args.profile:
        profile = run_profile(model, prompt, args)

    result = {
        "benchmark": "sampler_overhead",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None
        else " ".join(shlex.quote(a) for a in [sys.executable, sys.argv[0], *argv]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(device),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {"num_parameters": model.num_parameters(), "config": config.to_dict()},
        "canvas_length": canvas,
        "target_overhead_pct": TARGET_OVERHEAD_PCT,
        "bare_per_step_ms_median": bare_step * 1e3,
        "results": rows,
        "all_meet_target": all(r.get("meets_target", True) for r in rows),
        "profile": profile,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


def run_profile(model: DreamModel, prompt: torch.Tensor, args: argparse.Namespace) -> dict:
    """cProfile over one generate call per config: time inside DreamModel.forward vs. the sampler's own calls.

    cProfile rather than torch.profiler: on this small CPU model torch.profiler's per-op bookkeeping distorts the
    timings many times over, while cProfile sees every torch function/method called from Python, which is the
    sampler's granularity anyway. "Sampler calls" are the functions defined in dreamlm/sampling plus the self time of
    whatever they call directly (torch ops), counted only for calls made from there.
    """
    import cProfile
    import pstats

    fwd_code = DreamModel.forward.__code__
    fwd_key = (fwd_code.co_filename, fwd_code.co_firstlineno, fwd_code.co_name)
    import dreamlm.sampling.generate as generate_module

    sampling_dir = str(Path(generate_module.__file__).resolve().parent)
    out = {}
    for name, kwargs in SAMPLER_CONFIGS.items():
        prof = cProfile.Profile()
        prof.enable()
        diffusion_generate(model, prompt, max_new_tokens=args.new_tokens, steps=args.steps, seed=args.seed, **kwargs)
        prof.disable()
        stats = pstats.Stats(prof).stats
        total = sum(v[2] for v in stats.values())
        fwd = stats[fwd_key][3] if fwd_key in stats else 0.0

        def in_sampler(key) -> bool:
            return key[0].startswith(sampling_dir)

        entries = []
        for key, (cc, nc, tt, ct, callers) in stats.items():
            if in_sampler(key):
                calls, self_t = nc, tt
            else:  # only the calls made directly from sampler code
                parts = [v for c, v in callers.items() if in_sampler(c)]
                if not parts:
                    continue
                calls, self_t = sum(v[1] for v in parts), sum(v[2] for v in parts)
            file, line, func = key
            label = func if file == "~" else f"{Path(file).name}:{line}({func})"
            entries.append({"function": label, "calls": calls, "self_ms": self_t * 1e3})
        entries.sort(key=lambda e: e["self_ms"], reverse=True)
        top = entries[: args.profile_top]
        outside = total - fwd
        out[name] = {"steps": args.steps, "total_ms": total * 1e3, "in_model_forward_ms": fwd * 1e3,
                     "outside_forward_ms": outside * 1e3, "outside_pct_of_forward": outside / fwd * 100 if fwd else None,
                     "top_sampler_calls_by_self_time": top}
        print(f"\nprofile [{name}] (cProfile, {args.steps} steps): total {total * 1e3:.1f} ms, "
              f"in DreamModel.forward {fwd * 1e3:.1f} ms, outside {outside * 1e3:.1f} ms "
              f"(= {outside / fwd * 100:.1f} % of forward; cProfile inflates Python-level overhead)")
        print("| sampler call | calls | self ms | ms/step |")
        print("|---|---:|---:|---:|")
        for e in top:
            print(f"| `{e['function']}` | {e['calls']} | {e['self_ms']:.1f} | {e['self_ms'] / args.steps:.3f} |")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
