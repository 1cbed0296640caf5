"""Peak resident memory of `DreamModel.from_pretrained` against the checkpoint's size on disk.

Writes a random sharded checkpoint (default: hidden 2048, 16 layers, intermediate 5632, vocab 32000, 16 heads,
4 kv heads, bf16 -> 853M params, ~1.7 GB, 6 shards of <= 300 MB) into a temporary directory, then, each in a *fresh
subprocess* so that nothing allocated before counts, loads it with

  * `DreamModel.from_pretrained(dir, dtype=None)` (keeps the stored dtype),
  * baseline `safetensors.torch.load_file` of every shard (default backend; all tensors kept in one dict),
  * baseline `safetensors.torch.load_file(..., backend="pread")` where the installed safetensors has it
    (reads every byte into fresh memory: what an eager loader costs),

and reports `ru_maxrss` (KiB on Linux) before the load, right after it, and after touching one element of every
4 KiB page of every weight (safetensors' default backend hands back lazy mmap views, so "right after the load" says
little: the pages are only paid for when the weights are first used). Headline: peak increase after touching /
checkpoint bytes on disk (target: well under 2x, ideally about 1x). The temporary directory is removed at the end.

    python benchmarks/load_memory.py
    python benchmarks/load_memory.py --hidden 1024 --layers 8 --vocab 32000   # a smaller checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 2.0
METHODS = ("dreamlm.from_pretrained", "safetensors.load_file", "safetensors.load_file[pread]")


def proc_status_kib() -> dict[str, int]:
    """VmRSS / RssAnon / RssFile / RssShmem / VmHWM (KiB) of this process, from /proc/self/status (Linux)."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def reset_hwm() -> bool:
    """Reset this process's VmHWM (peak RSS) to its current RSS via /proc/self/clear_refs; False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def maxrss_kib() -> int:
    """Peak resident set of this process in KiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value // 1024 if sys.platform == "darwin" else value


# ---- child: one load in a fresh interpreter ---------------------------------------------------------------------
def child(method: str, directory: Path) -> None:
    # everything imported before the 'before' reading, so that import cost is not counted
    import hashlib
    import inspect

    import safetensors
    import torch
    from safetensors.torch import load_file

    from dreamlm.model import DreamModel
    import dreamlm.checkpoint  # noqa: F401  (from_pretrained imports it lazily)

    files = sorted(directory.glob("*.safetensors"))
    if method.endswith("[pread]") and "backend" not in inspect.signature(load_file).parameters:
        print(json.dumps({"method": method, "skipped": f"safetensors {safetensors.__version__} has no backend="}))
        return
    hwm_reset = reset_hwm()
    before = maxrss_kib()
    status_before = proc_status_kib()
    t0 = time.perf_counter()
    if method == "dreamlm.from_pretrained":
        model = DreamModel.from_pretrained(directory, dtype=None)
        tensors = dict(model.state_dict())
    elif method.startswith("safetensors.load_file"):
        kwargs = {"backend": "pread"} if method.endswith("[pread]") else {}
        tensors = {}
        for f in files:
            tensors.update(load_file(str(f), **kwargs))
    else:
        raise SystemExit(f"unknown method {method}")
    seconds = time.perf_counter() - t0
    after = maxrss_kib()
    status_after = proc_status_kib()
    unique = list({id(t): t for t in tensors.values()}.values())
    data_bytes = sum(t.numel() * t.element_size() for t in unique)
    # touch one element per 4 KiB page of every tensor: a loader that hands back lazy mmap views has not paid for
    # its pages yet; any use of the weights will
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in unique:
            step = max(1, 4096 // t.element_size())
            t.reshape(-1)[::step].float().sum()
    touch_seconds = time.perf_counter() - t0
    after_touch = maxrss_kib()
    status_after_touch = proc_status_kib()
    print(json.dumps({
        "method": method,
        "hwm_reset": hwm_reset,
        "maxrss_before_kib": before,
        "maxrss_after_load_kib": after,
        "maxrss_after_touch_kib": after_touch,
        "status_before_kib": status_before,
        "status_after_load_kib": status_after,
        "status_after_touch_kib": status_after_touch,
        "load_seconds": seconds,
        "touch_seconds": touch_seconds,
        "num_tensors": len(unique),
        "tensor_bytes": data_bytes,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in unique}),
        "versions": {"torch": torch.__version__, "safetensors": safetensors.__version__,
                     "torch_num_threads": torch.get_num_threads()},
        "source_sha256": {m.__name__: hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest()[:16]
                          for m in (dreamlm.checkpoint, sys.modules["dreamlm.model"])},
    }))


# ---- checkpoint writer (also a child) -------------------------------------------------------------------------------
def write_checkpoint(args: argparse.Namespace, directory: Path) -> dict:
    import torch

    from dreamlm.config import DreamConfig
    from dreamlm.model import DreamModel

    intermediate = args.intermediate or max(64, round(args.hidden * 2.75 / 64) * 64)
    config = DreamConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_position_embeddings, max_window_layers=args.layers,
        mask_token_id=args.vocab - 1, pad_token_id=args.vocab - 2, bos_token_id=args.vocab - 2,
        eos_token_id=args.vocab - 2,
    )
    t0 = time.perf_counter()
    model = DreamModel(config).init_weights(args.seed).to(getattr(torch, args.dtype))
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save_pretrained(directory, max_shard_size=args.shard_size)
    saved = time.perf_counter() - t0
    shards = sorted(directory.glob("*.safetensors"))
    return {
        "config": config.to_dict(),
        "num_parameters": model.num_parameters(),
        "dtype": args.dtype,
        "num_shards": len(shards),
        "shard_bytes": [f.stat().st_size for f in shards],
        "checkpoint_bytes": sum(f.stat().st_size for f in shards),
        "build_seconds": built,
        "save_seconds": saved,
    }


# ---- parent -----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--intermediate", type=int, default=None, help="default: hidden * 2.75 rounded to 64 (5632 for 2048)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--max-position-embeddings", type=int, default=2048)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--shard-size", default="300MB", help="save_pretrained max_shard_size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmpdir", type=Path, default=None, help="parent folder of the temporary checkpoint")
    p.add_argument("--keep", action="store_true", help="do not delete the temporary checkpoint")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "load_memory.json")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--write-child", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_child(extra: list[str], what: str) -> dict:
    """Run this script in a fresh interpreter and return the JSON it prints last.

    The parent stays small (it never imports torch): on Linux, exec carries the exec-ing process's peak RSS over
    into the new program's ru_maxrss, so a parent that had built the model would poison the child's numbers.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info(versions: dict) -> dict:
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1])
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), **versions,
            "cpu_count": os.cpu_count(), "mem_total_kib": mem_total}


def mib(kib: float) -> str:
    return f"{kib / 1024:,.0f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return 0
    if args.write_child:
        print(json.dumps(write_checkpoint(args, args.write_child)))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="dreamlm-load-mem-", dir=args.tmpdir))
    rows = []
    try:
        ckpt_dir = tmp / "ckpt"
        print(f"writing checkpoint to {ckpt_dir} ...", file=sys.stderr)
        model_args = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
                      "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--dtype", args.dtype,
                      "--max-position-embeddings", str(args.max_position_embeddings),
                      "--shard-size", args.shard_size, "--seed", str(args.seed)]
        if args.intermediate:
            model_args += ["--intermediate", str(args.intermediate)]
        ckpt = run_child([*model_args, "--write-child", str(ckpt_dir)], "writing the checkpoint")
        size = ckpt["checkpoint_bytes"]
        print(f"  {ckpt['num_parameters'] / 1e6:.0f}M params, {args.dtype}, {ckpt['num_shards']} shards, "
              f"{size / 2**20:,.0f} MiB on disk (built {ckpt['build_seconds']:.1f}s, saved {ckpt['save_seconds']:.1f}s)",
              file=sys.stderr)
        for method in METHODS:
            print(f"loading with {method} in a fresh subprocess ...", file=sys.stderr)
            r = run_child(["--child", method, str(ckpt_dir)], f"loading with {method}")
            if "skipped" in r:
                print(f"  skipped: {r['skipped']}", file=sys.stderr)
                continue
            before = r["maxrss_before_kib"]
            r["peak_increase_after_load_kib"] = r["maxrss_after_load_kib"] - before
            r["ratio_after_load_to_checkpoint"] = r["peak_increase_after_load_kib"] * 1024 / size
            r["peak_increase_kib"] = r["maxrss_after_touch_kib"] - before
            r["ratio_peak_increase_to_checkpoint"] = r["peak_increase_kib"] * 1024 / size
            # cross-check: VmHWM after touching (reset just before the load) minus VmRSS just before the load
            hwm, rss0 = r["status_after_touch_kib"].get("VmHWM"), r["status_before_kib"].get("VmRSS")
            if r["hwm_reset"] and hwm is not None and rss0 is not None:
                r["hwm_increase_kib"] = hwm - rss0
                r["ratio_hwm_increase_to_checkpoint"] = (hwm - rss0) * 1024 / size
            r["meets_target"] = r["ratio_peak_increase_to_checkpoint"] < TARGET_RATIO
            rows.append(r)
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"checkpoint: {ckpt['num_parameters'] / 1e6:.0f}M params, {args.dtype}, {ckpt['num_shards']} shards "
          f"(max_shard_size={args.shard_size}), {size:,} bytes = {size / 2**20:,.0f} MiB on disk")
    print()
    print("| loader | ru_maxrss before | after load | after touching weights | peak increase "
          f"| **increase / checkpoint** | VmHWM cross-check | right after load (lazy) | RSS anon + file after touch "
          f"| load s | < {TARGET_RATIO:g}x |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for r in rows:
        st = r["status_after_touch_kib"]
        rss = f"{mib(st['RssAnon'])} + {mib(st['RssFile'])} MiB" if "RssAnon" in st else "?"
        hwm = f"{r['ratio_hwm_increase_to_checkpoint']:.2f}x" if "ratio_hwm_increase_to_checkpoint" in r else "n/a"
        print(f"| {r['method']} | {mib(r['maxrss_before_kib'])} MiB | {mib(r['maxrss_after_load_kib'])} MiB | "
              f"{mib(r['maxrss_after_touch_kib'])} MiB | {mib(r['peak_increase_kib'])} MiB | "
              f"**{r['ratio_peak_increase_to_checkpoint']:.2f}x** | {hwm} | {r['ratio_after_load_to_checkpoint']:.2f}x | "
              f"{rss} | {r['load_seconds']:.2f} | {'yes' if r['meets_target'] else '**no**'} |")

    result = {
        "benchmark": "load_memory",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None
        else " ".join(shlex.quote(a) for a in [sys.executable, sys.argv[0], *argv]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(rows[0]["versions"] if rows else {}),
        "source_sha256": rows[0].get("source_sha256") if rows else None,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("child", "write_child")},
        "checkpoint": ckpt,
        "target_ratio_below": TARGET_RATIO,
        "results": rows,
        "notes": "ru_maxrss in KiB (Linux). Each load runs in a fresh interpreter after importing torch, safetensors "
                 "and dreamlm; the orchestrating parent never imports torch, because exec carries the parent's peak "
                 "RSS into the child's ru_maxrss. Headline ratio = (ru_maxrss after touching one element per 4 KiB "
                 "page of every weight - ru_maxrss before the load) / checkpoint bytes on disk. VmHWM cross-check: "
                 "/proc/self/status VmHWM after touching (reset via clear_refs just before the load) minus VmRSS "
                 "just before. The checkpoint was just written, so its pages are in the page cache: load times are "
                 "warm-cache times.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
