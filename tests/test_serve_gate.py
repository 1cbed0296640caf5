"""The server's door (`dreamlm.serve.gate`): graceful shutdown on SIGTERM (new requests 503, short requests finish,
long ones end with a JSON error or an SSE error event then [DONE], no traceback, exit within the grace period plus a
second), one log line per request (499 for a client that left, counted as `disconnected`), and 413 for a body over
the limit however it is sent."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import httpx
import pytest

import dreamlm.serve.engine as engine_module
from dreamlm.sampling import advance
from dreamlm.serve import Limits, create_app, load_models
from dreamlm.serve.local import live_server, model_paths, serve_app

PROMPT = "Once upon a time"
LONG = {"model": "tiny-dream", "prompt": PROMPT, "max_tokens": 64, "steps": 2000, "seed": 0}  # tens of seconds
POST_LINE = re.compile(r'"POST /v1/completions" (\d{3}) ')


def sse_data(body: str) -> list[str]:
    """The data of each server-sent event."""
    return [line[6:] for line in body.splitlines() if line.startswith("data: ")]


def request_lines(text: str) -> list[int]:
    """Statuses of the log lines for POST /v1/completions."""
    return [int(m.group(1)) for m in POST_LINE.finditer(text)]


@pytest.fixture
def log_text(caplog) -> Iterator:
    """Everything the server's and uvicorn's loggers write, as one text (call it)."""
    uvicorn_logger = logging.getLogger("uvicorn")
    uvicorn_logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    yield lambda: "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" + (" Traceback" if r.exc_info else "")
                            for r in caplog.records)
    uvicorn_logger.removeHandler(caplog.handler)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread while the test runs: on a busy 2-core machine two threads make a tiny step 100x slower,
    and the timing of these tests is about the drain, not the machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def graceful(limits: Limits) -> Iterator[tuple[str, dict, object, threading.Thread]]:
    """A GracefulServer (what `dreamlm serve` runs) on a free port in a thread: (url, models, server, thread)."""
    models = load_models(model_paths("tiny-dream"), limits)
    app = create_app(models, limits)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = serve_app(app, sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", models, server, thread
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


# ---- shutdown ----------------------------------------------------------------------------------------------------
def test_sigterm_refuses_new_requests_ends_long_ones_with_errors_and_exits_within_grace(tmp_path):
    grace = 1.0
    log = tmp_path / "serve.log"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # steps of a few ms even on a busy 2-core machine
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dreamlm", "serve", "tiny-dream", "--port", "0", "--grace",
                                 str(grace), "--dtype", "float32"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (match := re.search(r"on http://127\.0\.0\.1:(\d+)/v1", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        url = f"http://127.0.0.1:{match.group(1)}"
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        results: dict = {}
        streaming = threading.Event()

        def plain() -> None:
            results["plain"] = httpx.post(url + "/v1/completions", json=LONG, timeout=60)

        def stream() -> None:
            body = dict(LONG, stream=True, stream_steps=True)
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                lines = []
                for line in r.iter_lines():
                    lines.append(line)
                    streaming.set()
                results["stream"] = (r.status_code, "\n".join(lines))

        threads = [threading.Thread(target=plain), threading.Thread(target=stream)]
        for t in threads:
            t.start()
        assert streaming.wait(60)
        while 'dreamlm_active_requests{model="tiny-dream"} 2.0' not in httpx.get(url + "/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.02)

        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        refused = httpx.post(url + "/v1/completions", json=dict(LONG, max_tokens=2, steps=2), timeout=10)
        health = httpx.get(url + "/health", timeout=10)
        code = proc.wait(timeout=grace + 10)
        elapsed = time.monotonic() - start
        for t in threads:
            t.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()

    assert elapsed <= grace + 1.0, (elapsed, text)
    assert code in (0, -signal.SIGTERM), text  # uvicorn re-raises the signal once shut down
    for r in (refused, health):  # while draining: a JSON 503, not a refused connection
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    plain = results["plain"]  # long, not streamed: ended with OpenAI's JSON error, not a plain-text 500
    assert plain.status_code == 503 and plain.headers["content-type"].startswith("application/json"), plain.text
    assert plain.json()["error"]["code"] == "shutting_down" and plain.headers["retry-after"]
    status, body = results["stream"]  # long, streamed: steps, then an error event, then [DONE]
    data = sse_data(body)
    assert status == 200 and data[-1] == "[DONE]", body[-500:]
    assert json.loads(data[-2])["error"]["code"] == "shutting_down"
    assert "step" in json.loads(data[0])  # it was running when the signal came
    assert "Traceback" not in text and "CancelledError" not in text and "Internal Server Error" not in text, text
    assert sorted(request_lines(text)) == [200, 503, 503], text  # one line per request: stream, plain, refused


def test_drain_lets_short_requests_finish_and_ends_long_ones(monkeypatch, log_text, one_thread):
    grace = 3.0
    with graceful(Limits(max_tokens=128, max_steps=4000, grace=grace)) as (url, models, server, thread):
        def slowed(*args, **kwargs):  # a step of at least 50 ms: a short request lasts at least 0.2 s
            time.sleep(0.05)
            return advance(*args, **kwargs)

        monkeypatch.setattr(engine_module, "advance", slowed)
        short = {"model": "tiny-dream", "prompt": PROMPT, "max_tokens": 4, "seed": 1}  # 4 steps
        results: dict = {}

        def send(name: str, body: dict) -> None:
            if body.get("stream"):
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                    results[name] = (r.status_code, r.read().decode(), time.monotonic())
            else:
                r = httpx.post(url + "/v1/completions", json=body, timeout=60)
                results[name] = (r.status_code, r.text, time.monotonic())

        engine = models["tiny-dream"].engine
        threads = []
        for cases in ({"long": LONG, "long stream": dict(LONG, stream=True)},  # the long ones first: then the
                      {"short": short, "short stream": dict(short, stream=True)}):  # short ones join them
            threads += [threading.Thread(target=send, args=item) for item in cases.items()]
            for t in threads[-2:]:
                t.start()
            wait_for(lambda: engine.active == len(threads), seconds=30)
        start = time.monotonic()
        server.request_exit()  # what SIGTERM does
        thread.join(timeout=grace + 10)
        elapsed = time.monotonic() - start
        for t in threads:
            t.join(timeout=10)

    assert not thread.is_alive() and elapsed <= grace + 1.0, elapsed
    status, body, at = results["short"]
    assert status == 200 and json.loads(body)["usage"]["steps"] == 4 and at > start, body
    status, body, at = results["short stream"]
    data = sse_data(body)
    assert status == 200 and data[-1] == "[DONE]" and at > start
    assert not any("error" in json.loads(d) for d in data[:-1]) and json.loads(data[-2])["choices"][0]["finish_reason"]
    status, body, _ = results["long"]
    assert status == 503 and json.loads(body)["error"]["code"] == "shutting_down", body
    status, body, _ = results["long stream"]
    data = sse_data(body)
    assert status == 200 and data[-1] == "[DONE]" and json.loads(data[-2])["error"]["code"] == "shutting_down"
    text = log_text()
    assert sorted(request_lines(text)) == [200, 200, 200, 503], text
    assert "Traceback" not in text and "CancelledError" not in text, text


def test_drain_cuts_what_does_not_answer_in_time_with_the_same_errors(monkeypatch, log_text, one_thread):
    grace = 0.5
    with graceful(Limits(max_tokens=128, max_steps=4000, grace=grace)) as (url, models, server, thread):
        def stuck(*args, **kwargs):  # one step outlasts the grace period: the engine cannot answer in time
            time.sleep(3)
            return advance(*args, **kwargs)

        monkeypatch.setattr(engine_module, "advance", stuck)
        results: dict = {}

        def send(name: str, body: dict) -> None:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                results[name] = (r.status_code, r.headers["content-type"], r.read().decode())

        threads = [threading.Thread(target=send, args=("plain", LONG)),
                   threading.Thread(target=send, args=("stream", dict(LONG, stream=True)))]
        for t in threads:
            t.start()
        wait_for(lambda: models["tiny-dream"].engine.active == 2)
        start = time.monotonic()
        server.request_exit()
        thread.join(timeout=grace + 10)
        elapsed = time.monotonic() - start
        for t in threads:
            t.join(timeout=10)

    assert not thread.is_alive() and elapsed <= grace + 1.0, elapsed
    status, kind, body = results["plain"]
    assert status == 503 and kind == "application/json" and json.loads(body)["error"]["code"] == "shutting_down"
    status, kind, body = results["stream"]
    data = sse_data(body)
    assert status == 200 and data[-1] == "[DONE]" and json.loads(data[-2])["error"]["code"] == "shutting_down"
    text = log_text()
    assert sorted(request_lines(text)) == [200, 503] and text.count('error="ended by shutdown"') == 2, text
    assert "Traceback" not in text and "CancelledError" not in text, text


# ---- log lines, disconnects, body limit ----------------------------------------------------------------------------
def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_client_that_leaves_gets_one_log_line_with_499_and_counts_as_disconnected(log_text):
    with live_server(("tiny-dream",), Limits(max_tokens=128, max_steps=4000, timeout=60)) as (url, models):
        engine = models["tiny-dream"].engine
        with httpx.stream("POST", url + "/v1/completions", json=dict(LONG, stream=True, stream_steps=True),
                          timeout=60) as r:
            next(r.iter_lines())  # the stream runs; then the client hangs up
        wait_for(lambda: engine.active == 0)
        with pytest.raises(httpx.ReadTimeout):  # not streamed: the client gives up waiting
            httpx.post(url + "/v1/completions", json=LONG, timeout=0.3)
        wait_for(lambda: engine.active == 0)
        wait_for(lambda: len(request_lines(log_text())) == 2)
        ok = httpx.post(url + "/v1/completions", json=dict(LONG, max_tokens=3, steps=3), timeout=60)
        assert ok.status_code == 200
        metrics = httpx.get(url + "/metrics").text
    assert request_lines(log_text()) == [499, 499, 200], log_text()
    assert 'outcome="disconnected"} 2.0' in metrics and 'outcome="failed"' not in metrics
    assert 'outcome="ok"} 1.0' in metrics
    assert log_text().count("the client went away") == 2


def test_a_body_over_the_limit_is_a_413_chunked_or_not(log_text):
    limit = 10_000
    with live_server(("tiny-dream",), Limits(max_body_bytes=limit)) as (url, _):
        def chunks(total: int, size: int = 4096) -> Iterator[bytes]:
            body = json.dumps({"model": "tiny-dream", "prompt": "x" * total, "max_tokens": 2}).encode()
            for i in range(0, len(body), size):
                yield body[i:i + size]

        chunked = httpx.post(url + "/v1/completions", content=chunks(2 << 20), timeout=60,
                             headers={"content-type": "application/json"})  # a generator: Transfer-Encoding chunked
        declared = httpx.post(url + "/v1/completions", content=b"x" * (limit + 1), timeout=60,
                              headers={"content-type": "application/json"})
        small = httpx.post(url + "/v1/completions", content=chunks(8), timeout=60,
                           headers={"content-type": "application/json"})
    assert chunked.request.headers.get("transfer-encoding") == "chunked"
    for r in (chunked, declared):
        assert r.status_code == 413, r.text
        assert r.json()["error"]["message"] == f"the body is larger than this server's limit of {limit} bytes"
    assert small.status_code == 200, small.text  # a chunked body within the limit is read as usual
    assert request_lines(log_text()) == [413, 413, 200], log_text()


@pytest.mark.parametrize("grace, message", [("0", "grace must be a number of seconds > 0"),
                                            ("nan", "grace must be a finite number")])
def test_serve_refuses_a_bad_grace_in_one_line(grace, message):
    from typer.testing import CliRunner

    from dreamlm.cli import app

    res = CliRunner().invoke(app, ["serve", "tiny-dream", "--port", "0", "--grace", grace])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and message in lines[0], res.output
