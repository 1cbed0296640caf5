"""Per-step overhead of `diffusion_generate` over a bare model forward, measured side by side in one process.

For a small random DreamModel, times
  (a) `steps` bare forwards `model(x)` under `torch.no_grad()` on a canvas of prompt + new tokens, and
  (b) one `diffusion_generate(..., steps=steps)` call per sampler configuration (each step = one forward + selection),
and reports per-step milliseconds and overhead = sampler_per_step / bare_per_step - 1 (target <= 5 %).

Measurements are interleaved (every round runs all configurations, in an order rotated per round). Forward hooks
stamp the clock around each model call, so every step of every call splits into forward time and the sampler's own
time; the per-step figures are medians over rounds taken step by step and then summed, which keeps them honest when
other processes on a shared machine burst. Reported next to it: the whole-call median (the plain "time the call,
divide by steps" figure) and the same per-step statistic on process CPU time.

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
    p.add_argument("--repeats", type=int, default=3, help="timed rounds over all configurations; medians reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of every configuration first")
    p.add_argument("--warmup-steps", type=int, default=16, help="steps per warm-up call")
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


def source_fingerprint(*modules: str) -> dict[str, str]:
    """sha256 (first 16 hex digits) of the dreamlm source files measured, to tie the numbers to a version."""
    import hashlib
    import importlib

    out = {}
    for name in modules:
        path = Path(importlib.import_module(name).__file__)
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return out


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

    # ---- instrumented runs ----------------------------------------------------------------------------------------
    # Forward pre/post hooks stamp the clocks around every model call, so one generate call yields, per step i, the
    # forward time f_i and the sampler's own time o_i (from the end of forward i to the start of forward i + 1, or
    # to the return). Per-step medians over rounds, summed over steps, keep the totals robust to bursts of load
    # from other processes, which a whole-call median over a handful of calls is not. Two clocks: wall
    # (perf_counter, the headline) and this process's CPU time (process_time, all threads; robust to being
    # preempted, exact for --threads 1, while with more threads serial Python work weighs less than parallel ops).
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    stamps: list[tuple[float, float]] = []

    def stamp() -> tuple[float, float]:
        sync(device)
        return time.perf_counter(), time.process_time()

    model.register_forward_pre_hook(lambda m, a: stamps.append(stamp()))
    model.register_forward_hook(lambda m, a, o: stamps.append(stamp()))

    def split(t0, t1) -> dict:
        """Per-clock setup / per-step forward / per-step own times from the stamps of one call."""
        pres, posts = stamps[0::2], stamps[1::2]
        assert len(pres) == len(posts) == args.steps, (len(pres), len(posts), args.steps)
        out = {}
        for c, name in enumerate(clocks):
            fwd = [b[c] - a[c] for a, b in zip(pres, posts)]
            own = [nxt[c] - b[c] for b, nxt in zip(posts, pres[1:] + [t1])]
            out[name] = {"total": t1[c] - t0[c], "setup": pres[0][c] - t0[c], "forward": fwd, "own": own}
        return out

    def run_bare() -> dict:
        stamps.clear()
        t0 = stamp()
        with torch.no_grad():
            for _ in range(args.steps):
                model(canvas_ids)
        t1 = stamp()
        out = split(t0, t1)
        for c in out.values():  # a bare step is the forward alone; the loop's own few microseconds are not charged
            c["own"] = [0.0] * args.steps
            c["setup"] = 0.0
        return out

    def make_sampler(kwargs: dict):
        def run() -> dict:
            stamps.clear()
            t0 = stamp()
            diffusion_generate(model, prompt, max_new_tokens=args.new_tokens, steps=args.steps, seed=args.seed,
                               **kwargs)
            t1 = stamp()
            return split(t0, t1)
        return run

    runs = {"bare forward": run_bare}
    runs.update({name: make_sampler(kw) for name, kw in SAMPLER_CONFIGS.items()})
    names = list(runs)

    print(f"model: {model.num_parameters() / 1e6:.2f}M params, {args.dtype}, {device}; canvas {args.batch}x{canvas} "
          f"({args.prompt_len} prompt + {args.new_tokens} new), steps {args.steps}, threads {torch.get_num_threads()}",
          file=sys.stderr)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load_before and load_before[0] > 0.5:
        print(f"warning: 1-minute load average is {load_before[0]:.2f} before the run; other processes compete for "
              "the cores and the timings will be noisier", file=sys.stderr)
    for _ in range(args.warmup):
        with torch.no_grad():
            for _ in range(args.warmup_steps):
                model(canvas_ids)
        for kwargs in SAMPLER_CONFIGS.values():
            diffusion_generate(model, prompt, max_new_tokens=args.new_tokens, steps=args.warmup_steps, seed=args.seed,
                               **kwargs)
    samples: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate so no config always runs first/last
        for name in order:
            samples[name].append(runs[name]())
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(
            f"{n} {samples[n][-1]['wall']['total'] * 1e3 / args.steps:.2f} ms/step" for n in names), file=sys.stderr)

    med = statistics.median

    def robust(name: str, clock: str) -> dict:
        """Per-step medians over rounds, summed over steps, divided by steps: ms per step."""
        rs = [run[clock] for run in samples[name]]
        setup = med(r["setup"] for r in rs)
        fwd = sum(med(r["forward"][i] for r in rs) for i in range(args.steps))
        own = sum(med(r["own"][i] for r in rs) for i in range(args.steps)) + setup
        step = sum(med(r["forward"][i] + r["own"][i] for r in rs) for i in range(args.steps)) + setup
        # step-paired: the sampler's own time after forward i over forward i itself, measured microseconds apart
        # (so under the same load); median over rounds per step, then the mean over steps (setup spread evenly)
        paired = [med((r["own"][i] + r["setup"] / args.steps) / r["forward"][i] for r in rs)
                  for i in range(args.steps)]
        return {"step_ms": step * 1e3 / args.steps, "forward_ms": fwd * 1e3 / args.steps,
                "own_ms": own * 1e3 / args.steps, "own_over_forward_pct": statistics.fmean(paired) * 100}

    bare = {c: robust("bare forward", c) for c in clocks}
    bare_whole = med(run["wall"]["total"] for run in samples["bare forward"]) / args.steps
    rows = []
    for name in names:
        whole = [run["wall"]["total"] / args.steps * 1e3 for run in samples[name]]
        rb = {c: robust(name, c) for c in clocks}
        row = {
            "config": name,
            "kwargs": SAMPLER_CONFIGS.get(name),
            "per_step_ms": rb["wall"]["step_ms"],
            "forward_in_call_ms_per_step": rb["wall"]["forward_ms"],
            "sampler_own_ms_per_step": rb["wall"]["own_ms"],
            "whole_call_ms_per_step_median": med(whole),
            "whole_call_ms_per_step_all": whole,
            "cpu_time": rb["cpu"],
        }
        if name != "bare forward":
            row["overhead_pct"] = (rb["wall"]["step_ms"] / bare["wall"]["step_ms"] - 1) * 100
            row["own_time_pct_of_bare_forward"] = rb["wall"]["own_ms"] / bare["wall"]["step_ms"] * 100
            row["own_over_forward_in_call_pct"] = rb["wall"]["own_over_forward_pct"]
            row["forward_in_call_vs_bare_pct"] = (rb["wall"]["forward_ms"] / bare["wall"]["forward_ms"] - 1) * 100
            row["overhead_pct_whole_call_median"] = (med(whole) / (bare_whole * 1e3) - 1) * 100
            row["overhead_pct_cpu_time"] = (rb["cpu"]["step_ms"] / bare["cpu"]["step_ms"] - 1) * 100
            row["meets_target"] = row["overhead_pct"] <= TARGET_OVERHEAD_PCT
            row["meets_target_step_paired"] = row["own_over_forward_in_call_pct"] <= TARGET_OVERHEAD_PCT
        rows.append(row)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    # ---- table ----
    print()
    print(f"| config | ms/step | forward in call | sampler's own | **overhead vs bare** | own / forward, step-paired "
          f"| whole-call median ms/step (min–max) | whole-call overhead | CPU-time overhead "
          f"| <= {TARGET_OVERHEAD_PCT:g} % (vs bare / paired) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for row in rows:
        w = row["whole_call_ms_per_step_all"]
        whole = f"{row['whole_call_ms_per_step_median']:.2f} ({min(w):.2f}–{max(w):.2f})"
        if "overhead_pct" in row:
            ov, own = f"**{row['overhead_pct']:+.1f} %**", f"{row['own_over_forward_in_call_pct']:.1f} %"
            wov, cov = f"{row['overhead_pct_whole_call_median']:+.1f} %", f"{row['overhead_pct_cpu_time']:+.1f} %"
            ok = " / ".join("yes" if row[k] else "**no**" for k in ("meets_target", "meets_target_step_paired"))
        else:
            ov = own = wov = cov = ok = "—"
        print(f"| {row['config']} | {row['per_step_ms']:.2f} | {row['forward_in_call_ms_per_step']:.2f} | "
              f"{row['sampler_own_ms_per_step']:.2f} | {ov} | {own} | {whole} | {wov} | {cov} | {ok} |")
    if load_before and load_after:
        print(f"\nload average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}")
        if max(load_before[0], load_after[0]) > 0.5 + (args.threads if args.threads > 1 else 1):
            print("the machine was shared during this run. 'overhead vs bare' compares calls made seconds apart, "
                  "so it is only as good as the load was steady; 'own / forward, step-paired' compares times taken "
                  "microseconds apart. With more than one thread on oversubscribed cores the OpenMP-parallel forward "
                  "slows far more than the serial sampler code, which skews both figures: rerun with --threads 1 "
                  "(or on a quiet machine) before trusting them.")

    profile = None
    if args.profile:
        profile = run_profile(model, prompt, args)

    result = {
        "benchmark": "sampler_overhead",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None
        else " ".join(shlex.quote(a) for a in [sys.executable, sys.argv[0], *argv]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(device),
        "source_sha256": source_fingerprint("dreamlm.sampling.generate", "dreamlm.model"),
        "loadavg_before_after": [load_before, load_after],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {"num_parameters": model.num_parameters(), "config": config.to_dict()},
        "canvas_length": canvas,
        "target_overhead_pct": TARGET_OVERHEAD_PCT,
        "bare_per_step_ms": bare["wall"]["step_ms"],
        "bare_cpu_ms_per_step": bare["cpu"]["step_ms"],
        "bare_whole_call_ms_per_step_median": bare_whole * 1e3,
        "results": rows,
        "all_meet_target": all(r.get("meets_target", True) for r in rows),
        "all_meet_target_step_paired": all(r.get("meets_target_step_paired", True) for r in rows),
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
