"""`dreamlm bench serve`: requests/s, tokens/s and latency of a real `dreamlm serve` process under a mixed-length load,
at several concurrency levels, with batching on vs off (one request per forward), same model and requests.

Both servers run in their own processes (as in production) for the whole run, the clients in this one; at each level
the batching server is measured and then, at once, the other, so that a change in the machine's load hits both
alike. `c` asyncio workers each send requests back to back until the level's requests are done. Request i takes its
prompt, max_tokens and streaming from the mix by i (every prompt length meets every max_tokens, half the requests
stream), with its own seed, so both servers do the same work.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dreamlm.errors import DreamError

LEVELS = (1, 4, 16, 64)
MAX_TOKENS = (16, 32, 64)
# three prompt lengths (about 5, 15 and 40 tokens for a BPE code tokenizer, at most 150 characters); {i} is the
# request's number
PROMPTS = (
    "# request {i}\n",
    "# request {i}\nimport os\n\n\ndef count_lines(path):\n",
    "# request {i}\nimport collections\n\n\nclass Queue:\n    def __init__(self, limit):\n"
    "        self.items = collections.deque()\n        self.limit = limit\n\n    def put(self, item):\n",
)


def request_mix(prompts: tuple[str, ...] = PROMPTS, max_tokens: tuple[int, ...] = MAX_TOKENS
                ) -> list[tuple[str, int, bool]]:
    """The cycle of (prompt, max_tokens, stream) that request i takes entry i % len of: every prompt with every
    max_tokens, once streamed and once not."""
    return [(p, m, stream) for (p, m), stream in itertools.product(itertools.product(prompts, max_tokens),
                                                                   (False, True))]


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`dreamlm serve MODEL` in a child process, on a free port, until `close`."""

    def __init__(self, model_dir: Path, batching: bool, threads: int | None = None, dtype: str = "float32") -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, "-m", "dreamlm", "serve", str(model_dir), "--port", str(self.port),
               "--max-queue", "4096", "--log-level", "warning", "--batching" if batching else "--no-batching",
               "--dtype", dtype]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise DreamError(f"the server did not start: {self.proc.stderr.read().strip()[-300:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise DreamError("the server did not answer /health within 120 s")
            time.sleep(0.1)

    def close(self) -> None:
        """SIGTERM, then wait (graceful shutdown)."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _one(client: Any, model: str, i: int, prompt: str, max_tokens: int, stream: bool, temperature: float,
               seed: int) -> int:
    """Send request i; the completion tokens it got (from usage, streamed or not). Raises on any failure."""
    body = {"model": model, "prompt": prompt.replace("{i}", str(i)), "max_tokens": max_tokens, "seed": seed,
            "temperature": temperature}
    if not stream:
        r = await client.post("/v1/completions", json=body)
        if r.status_code != 200:
            raise DreamError(f"status {r.status_code}")
        return int(r.json()["usage"]["completion_tokens"])
    body.update(stream=True, stream_options={"include_usage": True})
    tokens = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise DreamError(f"status {r.status_code}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise DreamError(chunk["error"].get("message", "error event"))
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    if tokens is None:
        raise DreamError("the stream ended without usage")
    return tokens


async def _level(url: str, model: str, concurrency: int, requests: int, mix: list[tuple[str, int, bool]],
                 temperature: float, seed0: int, until: float | None = None) -> dict[str, Any]:
    """`requests` requests from `concurrency` workers; with `until` (a time.monotonic()), workers instead start
    requests until then (the soak) and `requests` is what they sent."""
    import httpx

    latencies: list[float] = []
    tokens = canvas = errors = 0
    next_id = 0

    def more() -> bool:
        return time.monotonic() < until if until is not None else next_id < requests

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_id, tokens, canvas, errors
        while more():
            i = next_id
            next_id += 1
            prompt, max_tokens, stream = mix[i % len(mix)]
            start = time.perf_counter()
            try:
                tokens += await _one(client, model, i, prompt, max_tokens, stream, temperature, seed0 + i)
                canvas += max_tokens
            except (httpx.HTTPError, DreamError, ValueError, KeyError):
                errors += 1
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    requests = len(latencies)
    if not requests:
        raise DreamError("no request was sent (the soak ended before the first one)")
    latencies.sort()

    def pct(q: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {"concurrency": concurrency, "requests": requests, "errors": errors, "seconds": seconds,
            "requests_per_second": requests / seconds, "tokens_per_second": tokens / seconds,
            "canvas_tokens_per_second": canvas / seconds, "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": pct(0.95), "p99_ms": pct(0.99)}


def probe(url: str, model: str, mix: list[tuple[str, int, bool]], temperature: float) -> None:
    """Each kind of request the benchmark sends, once; DreamError with the server's reason if one is refused (a
    table of failed requests measures nothing)."""
    import httpx

    for prompt, max_tokens, _ in mix:
        body = {"model": model, "prompt": prompt.replace("{i}", "0"), "max_tokens": max_tokens, "seed": 0,
                "temperature": temperature}
        r = httpx.post(url + "/v1/completions", json=body, timeout=900)
        if r.status_code != 200:
            try:
                reason = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                reason = r.text[:200]
            raise DreamError(f"the server refuses the benchmark's requests ({r.status_code}): {reason}")


def serve_bench(model_dir: Path, levels: tuple[int, ...] = LEVELS, max_tokens: tuple[int, ...] = MAX_TOKENS,
                temperature: float = 0.0, requests_per_client: int = 4, out_dir: Path | None = None,
                prompts: tuple[str, ...] = PROMPTS, dtype: str = "float32", threads: int | None = None,
                soak: float = 0.0, soak_clients: int | None = None) -> dict[str, Any]:
    """Both servers (weights in `dtype`, `threads` CPU threads each) at every level, then, with `soak` > 0, the
    batching server under `soak_clients` (default: the largest level) for `soak` seconds; the report (and files in
    out_dir)."""
    from dreamlm.bench import machine
    from dreamlm.hub import model_label

    model = model_label(model_dir)
    mix = request_mix(prompts, max_tokens)
    report: dict[str, Any] = {"machine": machine(), "command": "dreamlm " + " ".join(sys.argv[1:]), "model": model,
                              "max_tokens": list(max_tokens), "prompts": list(prompts), "temperature": temperature,
                              "dtype": dtype, "threads": threads, "rows": []}
    servers: dict[bool, ServerProcess] = {}
    try:
        for batching in (True, False):
            servers[batching] = ServerProcess(Path(model_dir), batching, threads=threads, dtype=dtype)
            probe(servers[batching].url, model, mix, temperature)
            asyncio.run(_level(servers[batching].url, model, 4, 8, mix, temperature, 10**6))  # warm-up
        for c in levels:
            n = max(c * requests_per_client, 2 * len(mix))
            for batching in (True, False):
                row = asyncio.run(_level(servers[batching].url, model, c, n, mix, temperature, 1000 * c))
                report["rows"].append({"batching": batching, **row})
        if soak > 0:
            servers.pop(False).close()
            report["soak"] = asyncio.run(_soak(servers[True], model, soak_clients or max(levels), soak, mix,
                                               temperature))
    finally:
        for server in servers.values():
            server.close()
    rows = report["rows"]
    for row in rows:
        if row["batching"]:
            off = next(r for r in rows if not r["batching"] and r["concurrency"] == row["concurrency"])
            row["speedup_vs_off"] = row["canvas_tokens_per_second"] / off["canvas_tokens_per_second"]
    on = {r["concurrency"]: r for r in rows if r["batching"]}
    if 1 in on:
        for c, row in on.items():
            row["scaling_vs_1_client"] = row["canvas_tokens_per_second"] / on[1]["canvas_tokens_per_second"]
    if out_dir is not None:
        write_serve_report(report, Path(out_dir))
    return report


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MB (Linux /proc; None elsewhere or once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


async def _soak(server: ServerProcess, model: str, concurrency: int, seconds: float,
                mix: list[tuple[str, int, bool]], temperature: float, every: float = 5.0) -> dict[str, Any]:
    """The mixed load from `concurrency` clients for `seconds`, the server's RSS sampled every `every` s."""
    samples: list[tuple[float, float]] = []
    start = time.monotonic()
    until = start + seconds

    async def sample() -> None:
        while time.monotonic() < until:
            rss = rss_mb(server.proc.pid)
            if rss is not None:
                samples.append((time.monotonic() - start, rss))
            await asyncio.sleep(every)

    sampler = asyncio.create_task(sample())
    row = await _level(server.url, model, concurrency, 0, mix, temperature, 10**7, until=until)
    await sampler
    rss_end = rss_mb(server.proc.pid)
    if rss_end is not None:
        samples.append((time.monotonic() - start, rss_end))
    warm = [mb for t, mb in samples if t >= seconds / 3]  # the first third is warm-up (allocator arenas, caches)
    return {**row, "soak_seconds": seconds, "rss_samples": samples,
            "rss_after_warmup_mb": [min(warm), max(warm)] if warm else None,
            "rss_growth_after_warmup_mb": (warm[-1] - warm[0]) if warm else None}


def soak_line(soak: dict[str, Any]) -> str:
    """One line on a soak: requests, errors, latency, memory."""
    rss = soak["rss_after_warmup_mb"]
    memory = (f"server RSS after warm-up {rss[0]:.0f}–{rss[1]:.0f} MB (first to last sample "
              f"{soak['rss_growth_after_warmup_mb']:+.1f} MB)") if rss else "server RSS not measured (no /proc)"
    return (f"Soak: {soak['concurrency']} clients for {soak['soak_seconds']:.0f} s with batching on: "
            f"{soak['requests']} requests, {soak['errors']} errors, {soak['requests_per_second']:.2f} requests/s, "
            f"p95 {soak['p95_ms']:.0f} ms; {memory}.")


def serve_table(report: dict[str, Any]) -> str:
    """Markdown table of a report."""
    threads = f", {report['threads']} thread(s) per server" if report.get("threads") else ""
    lines = [f"`{report['command']}` on {report['machine']}", "",
             f"Model {report['model']} in {report['dtype']}{threads}; a mixed load: prompts of "
             f"{len(report['prompts'])} lengths x max_tokens {report['max_tokens']} (one step per token), half of the "
             f"requests streamed, temperature {report['temperature']}, a seed per request. Canvas tokens/s counts "
             "max_tokens per finished request (the work done); ratios compare canvas tokens/s.", "",
             "| batching | clients | requests | errors | requests/s | canvas tok/s | p50 ms | p95 ms | p99 ms | "
             "vs off | vs 1 client |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        ratio = f"{r['speedup_vs_off']:.2f}×" if "speedup_vs_off" in r else ""
        scaling = f"{r['scaling_vs_1_client']:.2f}×" if "scaling_vs_1_client" in r else ""
        lines.append(f"| {'on' if r['batching'] else 'off'} | {r['concurrency']} | {r['requests']} | {r['errors']} | "
                     f"{r['requests_per_second']:.2f} | {r['canvas_tokens_per_second']:.0f} | {r['p50_ms']:.0f} | "
                     f"{r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {ratio} | {scaling} |")
    if report.get("soak"):
        lines += ["", soak_line(report["soak"])]
    return "\n".join(lines)


def write_serve_report(report: dict[str, Any], out_dir: Path) -> None:
    """serve.json, serve.md and serve.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dreamlm.checkpoint import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "serve.json", lambda p: p.write_text(json.dumps(report, indent=2)))
    atomic_write(out_dir / "serve.md", lambda p: p.write_text(serve_table(report) + "\n"))
    soak = report.get("soak")
    fig, axes = plt.subplots(1, 3 if soak else 2, figsize=(15 if soak else 10, 4))
    left, right = axes[0], axes[1]
    if soak:
        samples = soak["rss_samples"]
        axes[2].plot([t for t, _ in samples], [mb for _, mb in samples], "o-")
        axes[2].set_xlabel("seconds")
        axes[2].set_title(f"server RSS (MB), soak at {soak['concurrency']} clients")
    for batching, style in ((True, "o-"), (False, "s--")):
        rows = [r for r in report["rows"] if r["batching"] is batching]
        label = "batching on" if batching else "batching off (one request per forward)"
        left.plot([r["concurrency"] for r in rows], [r["canvas_tokens_per_second"] for r in rows], style, label=label)
        right.plot([r["concurrency"] for r in rows], [r["p95_ms"] for r in rows], style, label=label)
    for ax, title in ((left, "canvas tokens/s"), (right, "p95 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"dreamlm serve, mixed-length load, {report['model']} ({report['dtype']})")
    fig.tight_layout()
    fig.savefig(out_dir / "serve.png", dpi=110)
    plt.close(fig)
