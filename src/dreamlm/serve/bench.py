"""`dreamlm bench serve`: requests/s, tokens/s and latency of a real `dreamlm serve` process at several
concurrency levels, with batching on vs off (one request per forward), same model and requests.

The server runs in its own process (as in production), the clients in this one: `c` asyncio workers each send
requests back to back until the level's requests are done. Every request asks for the same number of tokens with
its own seed, so both servers do the same work.
"""

from __future__ import annotations

import asyncio
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
PROMPT = "Request {i}:"  # {i}: the request's number


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


async def _level(url: str, model: str, concurrency: int, requests: int, max_tokens: int, temperature: float,
                 seed0: int, prompt: str = PROMPT) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    tokens = errors = 0
    next_id = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_id, tokens, errors
        while next_id < requests:
            i = next_id
            next_id += 1
            body = {"model": model, "prompt": prompt.replace("{i}", str(i)), "max_tokens": max_tokens, "seed": seed0 + i,
                    "temperature": temperature}
            start = time.perf_counter()
            try:
                r = await client.post("/v1/completions", json=body)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            if ok:
                tokens += r.json()["usage"]["completion_tokens"]
            else:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    latencies.sort()
    return {"concurrency": concurrency, "requests": requests, "errors": errors, "seconds": seconds,
            "requests_per_second": requests / seconds, "tokens_per_second": tokens / seconds,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def probe(url: str, model: str, max_tokens: int, temperature: float, prompt: str) -> None:
    """One request as the benchmark sends them; DreamError with the server's reason if it is refused (a table of
    failed requests measures nothing)."""
    import httpx

    body = {"model": model, "prompt": prompt.replace("{i}", "0"), "max_tokens": max_tokens, "seed": 0,
            "temperature": temperature}
    r = httpx.post(url + "/v1/completions", json=body, timeout=600)
    if r.status_code != 200:
        try:
            reason = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            reason = r.text[:200]
        raise DreamError(f"the server refuses the benchmark's requests ({r.status_code}): {reason}")


def serve_bench(model_dir: Path, levels: tuple[int, ...] = LEVELS, max_tokens: int = 32, temperature: float = 0.0,
                requests_per_client: int = 4, out_dir: Path | None = None, prompt: str = PROMPT,
                dtype: str = "float32") -> dict[str, Any]:
    """Both servers (weights in `dtype`) at every level; the report (and files in out_dir)."""
    from dreamlm.bench import machine

    model = Path(model_dir).resolve().name
    report: dict[str, Any] = {"machine": machine(), "command": "dreamlm " + " ".join(sys.argv[1:]), "model": model,
                              "max_tokens": max_tokens, "steps": max_tokens, "temperature": temperature, "prompt": prompt,
                              "dtype": dtype, "rows": []}
    for batching in (True, False):
        server = ServerProcess(Path(model_dir), batching, dtype=dtype)
        try:
            probe(server.url, model, max_tokens, temperature, prompt)
            asyncio.run(_level(server.url, model, 4, 8, max_tokens, temperature, 10**6, prompt))  # warm-up
            for c in levels:
                n = max(c * requests_per_client, 16)
                row = asyncio.run(_level(server.url, model, c, n, max_tokens, temperature, 1000 * c, prompt))
                report["rows"].append({"batching": batching, **row})
        finally:
            server.close()
    for row in report["rows"]:
        if row["batching"]:
            off = next(r for r in report["rows"] if not r["batching"] and r["concurrency"] == row["concurrency"])
            row["speedup_vs_off"] = row["tokens_per_second"] / off["tokens_per_second"]
    if out_dir is not None:
        write_serve_report(report, Path(out_dir))
    return report


def serve_table(report: dict[str, Any]) -> str:
    """Markdown table of a report."""
    lines = [f"`{report['command']}` on {report['machine']}", "",
             f"Model {report['model']} in {report.get('dtype', 'float32')}, {report['max_tokens']} tokens per request, "
             f"one step per token, temperature "
             f"{report['temperature']}, a seed per request, prompt {json.dumps(report['prompt'])}.", "",
             "| batching | concurrency | requests | errors | requests/s | tokens/s | p50 ms | p99 ms | tokens/s vs off |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        ratio = f"{r['speedup_vs_off']:.2f}×" if "speedup_vs_off" in r else ""
        lines.append(f"| {'on' if r['batching'] else 'off'} | {r['concurrency']} | {r['requests']} | {r['errors']} | "
                     f"{r['requests_per_second']:.1f} | {r['tokens_per_second']:.0f} | {r['p50_ms']:.0f} | "
                     f"{r['p99_ms']:.0f} | {ratio} |")
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
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for batching, style in ((True, "o-"), (False, "s--")):
        rows = [r for r in report["rows"] if r["batching"] is batching]
        label = "batching on" if batching else "batching off (one request per forward)"
        left.plot([r["concurrency"] for r in rows], [r["tokens_per_second"] for r in rows], style, label=label)
        right.plot([r["concurrency"] for r in rows], [r["p50_ms"] for r in rows], style, label=label)
    for ax, title in ((left, "tokens/s"), (right, "p50 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"dreamlm serve, {report['model']} ({report.get('dtype', 'float32')})")
    fig.tight_layout()
    fig.savefig(out_dir / "serve.png", dpi=110)
    plt.close(fig)
