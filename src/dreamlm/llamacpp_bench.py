"""`dreamlm bench speed --peer llamacpp`: dreamlm next to llama.cpp on the same exported models, in one process.

For each model: the interop check (`formats.llamacpp.check_interop`: logits of one masked canvas at f32, q8_0 and
q4_k, one greedy generation at f32 and q8_0), then decoding speed, every mode on the same prompt and number of
new tokens, timed in rounds that interleave the modes:

- dreamlm vanilla (Dream's sampler, one token per forward) and the fast path (blocks, dual cache, threshold 0.9),
  at the run's dtype;
- llama.cpp at the same dtype class (an f32 GGUF for float32, bf16 for bfloat16) and at q8_0, each forward by
  llama.cpp (its default attention: flash attention on a CPU) and each step by dreamlm's step machine: vanilla, and
  threshold 0.9 in blocks (no cache: llama.cpp's dream graph keeps no key/value memory);
- `llama-diffusion-cli` (llama.cpp's own C++ loop) when a binary is given, same canvas, steps and threads; its
  own timing line (model load excluded) is what is reported.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dreamlm.errors import DreamError

SOLVERS = ("sudoku4-diffusion", "star-2-5-diffusion", "star-3-5-diffusion", "star-5-5-diffusion",
           "star-10-5-diffusion")
TEXT_MODELS = ("stdlib-code", "smollm2")
TEXT_NEW_TOKENS = 64
THRESHOLD = 0.9
BLOCK = 32
ROUND_SECONDS = 3.0  # timed rounds per model continue until every mode has run this long (at least one round)


def default_models() -> list[str]:
    """The bundled solvers, the bundled code model and SmolLM2 when `dreamlm pull smollm2` has run."""
    from dreamlm.hub import is_pulled

    return [*SOLVERS, "stdlib-code", *(["smollm2"] if is_pulled("smollm2") else [])]


def _nothing(n: int = 1, label: str | None = None) -> None:
    pass


def _diffusion_cli_seconds(binary: Path, gguf: Path, prompt: str, canvas: int, steps: int, threads: int) -> float:
    """Seconds llama-diffusion-cli reports for its loop (greedy: top-k 1; confidence-ordered; Dream's schedule)."""
    cmd = [str(binary), "-m", str(gguf), "-p", prompt, "-ub", str(canvas), "-b", str(canvas), "-c", str(canvas),
           "--diffusion-steps", str(steps), "--diffusion-eps", "0.001", "--diffusion-algorithm", "4",
           "--temp", "0", "--top-k", "1", "-t", str(threads)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    log = run.stdout + run.stderr
    found = re.search(r"total time: ([0-9.]+)ms", log)
    if run.returncode == 0 and found is not None:
        return float(found.group(1)) / 1000
    # its log is written by a thread that can lose the last lines at exit (often, on a busy machine): then the
    # timestamps (minutes.seconds.ms.us) of its per-step progress lines give the time per step
    stamps = [(int(k), 60 * int(m) + int(sec) + int(ms) / 1e3 + int(us) / 1e6) for m, sec, ms, us, k in
              re.findall(r"(\d+)\.(\d+)\.(\d+)\.(\d+) I\s+diffusion step: (\d+)/", log)]
    if run.returncode != 0 or len(stamps) < 2 or stamps[-1][0] == stamps[0][0]:
        tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DreamError(f"llama-diffusion-cli failed (exit {run.returncode}): {tail[0]}")
    (k0, t0), (k1, t1) = stamps[0], stamps[-1]
    return (t1 - t0) / (k1 - k0) * steps


def model_speed(name: str, dtype: torch.dtype, workdir: Path, diffusion_cli: Path | None = None, threads: int = 1,
                advance: Callable[..., None] = _nothing) -> dict[str, Any]:
    """Tokens/s of every mode on one model (see the module docstring), dreamlm and llama.cpp on `threads` threads."""
    from dreamlm.formats.gguf_export import export_model
    from dreamlm.formats.llamacpp import LlamaCppDream, llamacpp_generate, sample_prompt
    from dreamlm.hub import model_label, resolve
    from dreamlm.model import DreamModel
    from dreamlm.sampling import diffusion_generate, steps_for_blocks
    from dreamlm.solver import TASK_FILE

    path = resolve(name)
    model = DreamModel.from_pretrained(path, dtype=dtype).eval()
    cfg = model.config
    prompt_ids = sample_prompt(path, model.tokenizer, cfg.context_length)
    free = cfg.context_length - len(prompt_ids)
    slots = free if (path / TASK_FILE).is_file() else min(TEXT_NEW_TOKENS, free)  # a puzzle: its whole canvas
    prompt = torch.tensor([prompt_ids])
    canvas = len(prompt_ids) + slots
    block = min(BLOCK, slots)
    fast = dict(block_length=block, threshold=THRESHOLD, alg="maskgit_plus",
                steps=steps_for_blocks(slots, slots, block))
    vanilla = dict(steps=slots, alg="maskgit_plus")
    kind = "f32" if dtype == torch.float32 else "bf16"
    files = {t: export_model(str(path), workdir / f"{path.name}-{t}.gguf", type=t) for t in (kind, "q8_0")}
    # llama.cpp's default attention (flash attention on a CPU), as llama-diffusion-cli runs; the check runs without
    llms = {t: LlamaCppDream(f, canvas, threads=threads, flash_attn=None) for t, f in files.items()}
    passes: dict[str, int] = {}

    def ours(label: str, **kw: Any) -> Callable[[], None]:
        def run() -> None:
            out = diffusion_generate(model, prompt, max_new_tokens=slots, return_dict_in_generate=True, seed=0, **kw)
            passes[label] = out.forward_passes
        return run

    def theirs(label: str, llm: LlamaCppDream, **kw: Any) -> Callable[[], None]:
        def run() -> None:
            _, passes[label] = llamacpp_generate(llm, model, prompt, slots, seed=0, **kw)
        return run

    dt = str(dtype).removeprefix("torch.")
    modes: dict[str, Callable[[], None]] = {
        f"dreamlm {dt}, vanilla": ours(f"dreamlm {dt}, vanilla", **vanilla),
        f"dreamlm {dt}, fast path (blocks {block}, dual cache, threshold {THRESHOLD})":
            ours(f"dreamlm {dt}, fast path (blocks {block}, dual cache, threshold {THRESHOLD})", cache="dual", **fast),
        f"llama.cpp {kind}, vanilla": theirs(f"llama.cpp {kind}, vanilla", llms[kind], **vanilla),
        f"llama.cpp {kind}, blocks {block} + threshold {THRESHOLD} (no cache)":
            theirs(f"llama.cpp {kind}, blocks {block} + threshold {THRESHOLD} (no cache)", llms[kind], **fast),
        "llama.cpp q8_0, vanilla": theirs("llama.cpp q8_0, vanilla", llms["q8_0"], **vanilla),
    }
    seconds: dict[str, list[float]] = {label: [] for label in modes}
    try:
        full = torch.cat([prompt, torch.full((1, slots), cfg.mask_token_id)], dim=1)
        with torch.no_grad():  # warm-up: one forward each (weights paged in, thread pools up)
            model(full)
        for llm in llms.values():
            llm.forward(full[0].tolist())
        start = time.perf_counter()
        while True:  # rounds interleave the modes, so a noisy neighbour hits them alike
            for label, run in modes.items():
                t0 = time.perf_counter()
                run()
                seconds[label].append(time.perf_counter() - t0)
            advance(label=f"{name}: round {len(seconds[label])}")
            if time.perf_counter() - start >= ROUND_SECONDS * len(modes) or len(seconds[label]) >= 20:
                break
    finally:
        for llm in llms.values():
            llm.close()
    rows = [{"mode": label, "forward_passes": passes[label], "seconds": statistics.median(s), "runs": len(s),
             "tokens_per_second": slots / statistics.median(s)} for label, s in seconds.items()]
    if diffusion_cli is not None:
        text = model.tokenizer.decode(prompt_ids)
        runs = [_diffusion_cli_seconds(diffusion_cli, files[kind], text, canvas, slots, threads) for _ in range(2)]
        rows.append({"mode": f"llama-diffusion-cli {kind} (llama.cpp's C++ loop)", "forward_passes": slots,
                     "seconds": min(runs), "runs": len(runs), "tokens_per_second": slots / min(runs)})
    base = rows[0]["tokens_per_second"]
    for row in rows:
        row["vs_dreamlm_vanilla"] = row["tokens_per_second"] / base
    return {"model": model_label(path), "parameters": model.num_parameters(), "prompt_tokens": len(prompt_ids),
            "new_tokens": slots, "canvas": canvas, "threads": threads, "dtype": dt, "rows": rows}


def peer_speed(models: Sequence[str] | None = None, dtype: torch.dtype = torch.float32,
               out_dir: Path | None = None, diffusion_cli: Path | None = None, threads: int = 1,
               advance: Callable[..., None] = _nothing) -> dict[str, Any]:
    """The interop check and the speed rows for each model; writes llamacpp.(json|md|png) into `out_dir`. Both
    sides run on `threads` threads (1 by default: on a shared 2-core machine a second spinning thread that loses
    its core stalls every op of llama.cpp and torch alike, by 10-100x)."""
    from dreamlm.bench import machine
    from dreamlm.formats.llamacpp import check_interop, require_llama_cpp

    lib = require_llama_cpp()
    models = list(models or default_models())
    if diffusion_cli is not None and not diffusion_cli.is_file():
        raise DreamError(f"--llama-diffusion-cli {diffusion_cli} does not exist")
    report: dict[str, Any] = {"machine": machine(), "command": "dreamlm " + " ".join(sys.argv[1:]),
                              "llama_cpp_python": getattr(lib, "__version__", "?"),
                              "dtype": str(dtype).removeprefix("torch."), "threads": threads, "interop": [],
                              "speed": []}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in models:
                advance(label=f"{name}: interop check")
                check = check_interop(name, types=("f32", "q8_0", "q4_k"), workdir=tmp)
                report["interop"].append(check.to_dict())
                report["speed"].append(model_speed(name, dtype, Path(tmp), diffusion_cli, threads, advance))
    finally:
        torch.set_num_threads(before)
    if out_dir is not None:
        write_peer_report(report, out_dir)
    return report


def peer_table(report: dict[str, Any]) -> str:
    """Markdown tables of a peer report: interop, then speed per model."""
    from dreamlm.formats.llamacpp import GenerationComparison, InteropReport, LogitsComparison, interop_table

    checks = [InteropReport(model=r["model"], prompt_tokens=r["prompt_tokens"],
                            logits=[LogitsComparison(**c) for c in r["logits"]],
                            generation=[GenerationComparison(**g) for g in r["generation"]])
              for r in report["interop"]]
    lines = [f"llama.cpp interop (llama-cpp-python {report['llama_cpp_python']}); dreamlm in float32:", "",
             interop_table(checks), "",
             f"Decoding speed, batch 1, dreamlm at {report['dtype']}, {report['threads']} thread(s) each side, "
             f"{report['machine']}:", "",
             "| model | params | prompt + new | mode | forward passes | tokens/s | × dreamlm vanilla |",
             "|---|---|---|---|---|---|---|"]
    for m in report["speed"]:
        for r in m["rows"]:
            lines.append(f"| {m['model']} | {m['parameters'] / 1e6:.1f} M | {m['prompt_tokens']} + {m['new_tokens']} | "
                         f"{r['mode']} | {r['forward_passes']} | {r['tokens_per_second']:.1f} | "
                         f"{r['vs_dreamlm_vanilla']:.2f} |")
    return "\n".join(lines)


def _mode_key(mode: str) -> str:
    """A mode's label without its per-model numbers (block sizes, details), for the plot's legend."""
    return re.sub(r"blocks \d+ ", "blocks ", mode).split(" (")[0]


def write_peer_report(report: dict[str, Any], out_dir: Path) -> None:
    """llamacpp.json, llamacpp.md and llamacpp.png (tokens/s per model and mode)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "llamacpp.json").write_text(json.dumps(report, indent=2))
    (out_dir / "llamacpp.md").write_text(f"`{report['command']}`\n\n{peer_table(report)}\n")
    speed = report["speed"]
    modes = list(dict.fromkeys(_mode_key(r["mode"]) for m in speed for r in m["rows"]))
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(speed)), 4.5))
    width = 0.8 / len(modes)
    for k, mode in enumerate(modes):
        values = [next((r["tokens_per_second"] for r in m["rows"] if _mode_key(r["mode"]) == mode), 0)
                  for m in speed]
        ax.bar([i + k * width for i in range(len(speed))], values, width, label=mode)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(speed))], [m["model"] for m in speed], rotation=20,
                  ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("new tokens / s (batch 1)")
    ax.set_title(f"dreamlm vs llama.cpp, same exported models ({report['dtype']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "llamacpp.png", dpi=120)
    plt.close(fig)
