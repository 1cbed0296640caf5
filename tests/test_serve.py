"""`dreamlm serve` against a real uvicorn on 127.0.0.1: the official openai client, SSE parsing, concurrency equal
to alone, cancellation, admission, errors in OpenAI's format, schemathesis, a 64-client load run."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import httpx
import openai
import pytest
import torch

from dreamlm.sampling import Constraints, cut_at_eos, diffusion_generate
from dreamlm.sampling.infill import unwritable_ids
from dreamlm.serve import Limits
from dreamlm.sampling.infill import apply_stop
from dreamlm.serve.app import held_back
from dreamlm.serve.local import live_server

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def server():
    with live_server() as (url, models):
        yield url, models


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def alone(served, prompt: str, max_tokens: int, seed: int, n: int = 1, suffix: str = "", **options) -> list[str]:
    """What the library returns for the request on its own (diffusion_generate, no server, no batching)."""
    tok, model = served.tokenizer, served.model
    ids = tok.encode(prompt)
    tail = tok.encode(suffix) if suffix else []
    canvas = ids + [model.config.mask_token_id] * max_tokens + tail
    options = {"alg": "entropy", "steps": max_tokens, **options}
    out = diffusion_generate(model, torch.tensor([canvas]), max_length=len(canvas), seed=seed,
                             num_return_sequences=n, constraints=Constraints(banned_token_ids=unwritable_ids(model, tok)),
                             **options)
    return [tok.decode(cut_at_eos(row[len(ids):len(ids) + max_tokens], model.config.eos_token_id))
            for row in out.tolist()]


def sse_events(body: str) -> list[tuple[str | None, str]]:
    """(event name, data) of each server-sent event."""
    events = []
    for block in body.strip().split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        events.append((name, "\n".join(data)))
    return events


# ---- the openai client -------------------------------------------------------------------------------------------
def test_completion_equals_the_library_alone(client, server):
    res = client.completions.create(model="tiny-dream", prompt=PROMPT, max_tokens=10, seed=7)
    assert res.object == "text_completion" and res.model == "tiny-dream"
    assert [c.text for c in res.choices] == alone(server[1]["tiny-dream"], PROMPT, 10, seed=7)
    usage = res.model_dump()["usage"]
    assert usage["prompt_tokens"] == len(server[1]["tiny-dream"].tokenizer.encode(PROMPT))
    assert usage["steps"] == 10 and usage["forward_passes"] == 10
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_sampling_with_a_seed_is_reproducible_and_n_gives_n_answers(client, server):
    kw = dict(model="tiny-dream", prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, n=3, seed=11)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    texts = [c.text for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.text for c in b.choices]
    assert texts == alone(server[1]["tiny-dream"], PROMPT, 8, seed=11, n=3, temperature=1.0, top_p=0.9)
    assert len(set(texts)) > 1  # three draws, not one copied
    c = client.completions.create(**{**kw, "seed": 12})
    assert [x.text for x in c.choices] != texts


def test_a_list_of_prompts_gives_n_choices_per_prompt_in_order(client, server):
    prompts = [PROMPT, "The cat"]
    res = client.completions.create(model="tiny-dream", prompt=prompts, max_tokens=5, n=2, seed=3)
    assert [c.index for c in res.choices] == [0, 1, 2, 3]
    served = server[1]["tiny-dream"]
    assert [c.text for c in res.choices] == alone(served, prompts[0], 5, 3, n=2) + alone(served, prompts[1], 5, 3, n=2)


def test_suffix_infills_between_prompt_and_suffix(client, server):
    res = client.completions.create(model="tiny-dream", prompt=PROMPT, suffix=" and they lived", max_tokens=6,
                                    seed=5)
    assert res.choices[0].text == alone(server[1]["tiny-dream"], PROMPT, 6, 5, suffix=" and they lived")[0]
    assert res.usage.prompt_tokens == len(server[1]["tiny-dream"].tokenizer.encode(PROMPT)) + \
        len(server[1]["tiny-dream"].tokenizer.encode(" and they lived"))


def test_a_template_prompt_fills_its_spans_and_keeps_the_rest(client):
    puzzle = "1200\n0012\n2100\n0021"
    res = client.completions.create(model="sudoku4-diffusion", prompt=f"{puzzle}<|sep|><|mask:19|>", seed=0)
    choice = res.choices[0].model_dump()
    assert choice["text"].startswith(puzzle + "<|sep|>")
    assert len(choice["fills"]) == 1 and len(choice["fills"][0]) == 19
    assert choice["text"] == puzzle + "<|sep|>" + choice["fills"][0]
    assert res.usage.completion_tokens == 19 and res.usage.steps == 19


def test_chat_runs_the_chat_template_and_streams_the_same_text(client):
    messages = [{"role": "user", "content": "Hello"}]
    res = client.chat.completions.create(model="tiny-dream", messages=messages, max_tokens=8, seed=2)
    assert res.object == "chat.completion" and res.choices[0].message.role == "assistant"
    text = res.choices[0].message.content
    pieces, reasons = [], []
    for chunk in client.chat.completions.create(model="tiny-dream", messages=messages, max_tokens=8, seed=2,
                                                stream=True):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == text
    assert reasons[-1] in ("stop", "length") and reasons.count(None) == len(reasons) - 1


def test_streamed_completion_text_equals_the_answer_and_usage_comes_last(client):
    kw = dict(model="tiny-dream", prompt=PROMPT, max_tokens=12, seed=9)
    text = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # text arrives as it settles
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_a_chat_without_a_template_and_an_unknown_model_are_client_errors(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="sudoku4-diffusion", messages=[{"role": "user", "content": "x"}])
    assert exc.value.body["param"] == "model" and "chat template" in exc.value.body["message"]
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="gpt-4", prompt="x")
    assert exc.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("kwargs, param", [
    (dict(max_tokens=500), "max_tokens"),             # past the context
    (dict(max_tokens=129), "max_tokens"),             # above the server's cap
    (dict(n=9), "n"),                                 # above the server's cap
    (dict(extra_body={"steps": 257}), "steps"),       # above the server's cap
    (dict(temperature=-1), "temperature"),
    (dict(temperature=1e-300), "temperature"),      # would overflow the scaled logits
    (dict(top_p=0), "top_p"),
    (dict(seed=-1), "seed"),
    (dict(extra_body={"alg": "greedy"}), "alg"),
    (dict(extra_body={"threshold": 0.9, "alg": "origin"}), "threshold"),
    (dict(extra_body={"block_length": 3, "steps": 5}), "steps"),
    (dict(extra_body={"refresh_every": 2}), "refresh_every"),
    (dict(logprobs=2), "logprobs"),                   # not implemented: refused, not ignored
    (dict(echo=True), "echo"),
    (dict(best_of=2), "best_of"),
    (dict(frequency_penalty=0.5), "frequency_penalty"),
    (dict(logit_bias={"5": 1}), "logit_bias"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(stream_options={"include_usage": True}), "stream_options"),
    (dict(extra_body={"stream_steps": True}), "stream_steps"),
    (dict(prompt="a <|im_sep|> b"), "prompt"),
    (dict(prompt=[5, 99999]), "prompt"),
    (dict(prompt="<|mask:3|> x", max_tokens=4), "max_tokens"),
])
def test_invalid_values_are_400s_naming_the_parameter(client, kwargs, param):
    kwargs = {"model": "tiny-dream", "prompt": PROMPT, **kwargs}
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(**kwargs)
    body = exc.value.body
    assert exc.value.status_code == 400 and body["param"] == param, body
    assert body["type"] == "invalid_request_error" and body["message"]


def test_errors_are_openai_json_without_tracebacks(server):
    url = server[0]
    cases = [("POST", "/v1/completions", b"{not json", 400), ("POST", "/v1/completions", b"[]", 400),
             ("POST", "/v1/completions", b'{"model": "tiny-dream"}', 400), ("GET", "/v2/nothing", None, 404),
             ("GET", "/v1/completions", None, 405)]
    for method, path, body, status in cases:
        r = httpx.request(method, url + path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (path, body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in r.text
    big = json.dumps({"model": "tiny-dream", "prompt": "x" * (2 << 20)})
    r = httpx.post(url + "/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_health_and_metrics(server, client):
    client.completions.create(model="tiny-dream", prompt=PROMPT, max_tokens=4, seed=0)
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"
    text = httpx.get(server[0] + "/metrics").text
    for name in ("dreamlm_requests_total", "dreamlm_queue_depth", "dreamlm_batch_rows_bucket",
                 "dreamlm_step_seconds_bucket", "dreamlm_tokens_per_second", "dreamlm_generated_tokens_total"):
        assert name in text
    assert 'dreamlm_requests_total{model="tiny-dream",outcome="ok"}' in text


# ---- the per-step stream -----------------------------------------------------------------------------------------
def test_step_events_come_in_order_and_end_on_the_plain_answer(server, client):
    kw = {"model": "tiny-dream", "prompt": PROMPT, "max_tokens": 10, "seed": 4}
    answer = client.completions.create(**kw).choices[0].text
    r = httpx.post(server[0] + "/v1/completions", json={**kw, "stream": True, "stream_steps": True}, timeout=60)
    events = sse_events(r.text)
    steps = [json.loads(d) for name, d in events if name == "dreamlm.step"]
    assert [s["step"] for s in steps] == list(range(1, 11)) and steps[-1]["passes"] == 10
    lo, hi = steps[0]["answer"]
    seen = set()
    for frame in steps:
        row = frame["rows"][0]
        assert row["masked"] == sum(t is None for t in row["tokens"])
        assert not seen & set(row["committed"]) and all(lo <= i < hi for i in row["committed"])
        seen |= set(row["committed"])
    assert seen == set(range(lo, hi))  # every answer slot committed exactly once
    final = steps[-1]["rows"][0]["tokens"]
    tok = server[1]["tiny-dream"].tokenizer
    eos = server[1]["tiny-dream"].model.config.eos_token_id
    ids = [tok.token_to_id(t) if tok.token_to_id(t) is not None else tok.encode(t)[0] for t in final[lo:hi]]
    assert "".join(final[lo:hi]).startswith(answer) and tok.decode(cut_at_eos(ids, eos)) == answer
    texts = [json.loads(d)["choices"][0]["text"] for name, d in events if name is None and d != "[DONE]"]
    assert "".join(texts) == answer and events[-1][1] == "[DONE]"


def test_stream_holds_back_partial_stop_strings_and_characters():
    assert held_back("hello wor", ["world"]) == "hello "
    assert held_back("abc\ufffd", []) == "abc"
    assert held_back("abc", ["x"]) == "abc"
    assert apply_stop("one two three", ["three", "two"]) == ("one ", True)
    assert apply_stop("one", ["z"]) == ("one", False)


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model="tiny-dream", prompt=PROMPT, max_tokens=12, seed=7).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    res = client.completions.create(model="tiny-dream", prompt=PROMPT, max_tokens=12, seed=7, stop=stop)
    assert res.choices[0].text == full[:full.index(stop)] and res.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-dream", prompt=PROMPT, max_tokens=12, seed=7, stop=stop, stream=True) if c.choices)
    assert streamed == res.choices[0].text


# ---- batching ----------------------------------------------------------------------------------------------------
MIXED = [
    dict(prompt=PROMPT, max_tokens=12, seed=1),
    dict(prompt="The cat sat", max_tokens=7, seed=2, temperature=0.8, top_p=0.9),
    dict(prompt="A", max_tokens=16, seed=3, n=2, temperature=1.0),
    dict(prompt=PROMPT, max_tokens=12, seed=4, extra_body={"alg": "maskgit_plus", "threshold": 0.2}),
    dict(prompt="Hello world", max_tokens=10, seed=5, extra_body={"alg": "topk_margin", "steps": 5}),
    dict(prompt=PROMPT, max_tokens=16, seed=6, extra_body={"block_length": 4, "alg": "entropy", "threshold": 0.5}),
    dict(prompt=PROMPT, max_tokens=8, seed=7, extra_body={"alg": "origin", "eps": 0.01}),
    dict(prompt=PROMPT, max_tokens=16, seed=8, extra_body={"block_length": 8, "cache": "dual", "alg": "entropy"}),
    dict(prompt="x", max_tokens=6, seed=9, suffix=" end", extra_body={"stop_at_eos": True}),
]


def test_concurrent_mixed_requests_return_what_they_return_alone(client, server):
    alone_texts = [[c.text for c in client.completions.create(model="tiny-dream", **kw).choices] for kw in MIXED]
    rows_before = batched_rows(server[0])
    results: list = [None] * len(MIXED) * 2

    def send(i: int) -> None:
        kw = MIXED[i % len(MIXED)]
        results[i] = [c.text for c in client.completions.create(model="tiny-dream", **kw).choices]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone_texts * 2
    steps, rows = (a - b for a, b in zip(batched_rows(server[0]), rows_before))
    assert rows > steps  # requests really shared forwards


def batched_rows(url: str) -> tuple[float, float]:
    """(steps, rows) of tiny-dream so far, from /metrics."""
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        for key in ("dreamlm_batch_rows_count", "dreamlm_batch_rows_sum"):
            if line.startswith(key + '{model="tiny-dream"}'):
                values[key] = float(line.split()[-1])
    return values["dreamlm_batch_rows_count"], values["dreamlm_batch_rows_sum"]


def test_a_client_that_goes_away_frees_its_slot(server, client):
    served = server[1]["tiny-dream"]
    body = {"model": "tiny-dream", "prompt": PROMPT, "max_tokens": 128, "steps": 256, "stream": True, "seed": 0}
    with httpx.stream("POST", server[0] + "/v1/completions", json=body, timeout=60) as r:
        next(r.iter_lines())
        assert served.engine.active == 1
    deadline = time.monotonic() + 10
    while served.engine.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert served.engine.active == 0
    assert 'outcome="disconnected"' in httpx.get(server[0] + "/metrics").text  # not a failure of the server
    assert client.completions.create(model="tiny-dream", prompt=PROMPT, max_tokens=3, seed=0).choices


# ---- admission, timeouts, keys (own servers) ---------------------------------------------------------------------
def test_api_key_is_required_when_set():
    with live_server(("sudoku4-diffusion",), Limits(api_key="sekret")) as (url, _):
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert [m.id for m in good.models.list()] == ["sudoku4-diffusion"]
        assert httpx.get(url + "/health").status_code == 200


def test_a_request_past_the_timeout_is_a_504():
    with live_server(("tiny-dream",), Limits(timeout=0.05)) as (url, _):
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as exc:
            c.completions.create(model="tiny-dream", prompt=PROMPT, max_tokens=200, extra_body={"steps": 2000})
        assert exc.value.status_code == 504


def test_a_full_queue_is_a_503_with_retry_after():
    async def scenario() -> httpx.Response:
        from dreamlm.serve import create_app, load_models
        from dreamlm.serve.local import model_paths

        limits = Limits(max_queue=1)
        models = load_models(model_paths("sudoku4-diffusion"), limits)  # engine not started: nothing drains
        app = create_app(models, limits)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            body = {"model": "sudoku4-diffusion", "prompt": "1200<|sep|><|mask:4|>"}
            first = asyncio.create_task(c.post("/v1/completions", json=body))
            while models["sudoku4-diffusion"].engine.queue_depth == 0:
                await asyncio.sleep(0.01)
            second = await c.post("/v1/completions", json=body)
            first.cancel()
            return second

    r = asyncio.run(scenario())
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full"


# ---- schema and load ---------------------------------------------------------------------------------------------
def test_schemathesis_finds_no_server_errors_or_schema_violations(server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(server[0] + "/openapi.json")
    failures = []
    def served_model(case):  # most generated names are unknown (404); send most cases to a served model
        if isinstance(case.body, dict) and "model" in case.body and hash(str(case.body)) % 4:
            case.body["model"] = "tiny-dream"
        return case

    for op in schema.get_all_operations():
        operation = op.ok()

        @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy().map(served_model))
        def run(case) -> None:
            response = case.call(base_url=server[0], timeout=60)
            for check in (not_a_server_error, status_code_conformance, content_type_conformance,
                          response_schema_conformance):
                try:
                    case.validate_response(response, checks=[check])
                except Exception as exc:  # noqa: BLE001 - collected and reported below
                    failures.append(f"{operation.label}: {type(exc).__name__}: {str(exc)[:300]}")

        run()
    assert not failures, "\n".join(failures[:5])


def test_64_concurrent_clients_get_answers_without_errors(server):
    async def load() -> list[int]:
        async with httpx.AsyncClient(base_url=server[0], timeout=120) as c:
            async def one(i: int) -> int:
                r = await c.post("/v1/completions", json={"model": "tiny-dream", "prompt": f"Story {i}",
                                                          "max_tokens": 8, "seed": i})
                return r.status_code if r.status_code != 200 or r.json()["choices"] else -1
            return await asyncio.gather(*(one(i) for i in range(64)))

    assert asyncio.run(load()) == [200] * 64


# ---- the command line --------------------------------------------------------------------------------------------
def test_serve_refuses_bad_arguments_in_one_line(tmp_path):
    import subprocess
    import sys

    for args in (["serve", str(tmp_path / "missing")], ["serve", "--port", "70000"], ["serve", "--max-n", "0"],
                 ["serve", "--timeout", "nan"]):
        r = subprocess.run([sys.executable, "-m", "dreamlm", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error:"), r.stderr


def test_sigterm_lets_the_running_request_finish_then_exits():
    import signal

    from dreamlm.serve.bench import ServerProcess
    from dreamlm.serve.local import model_paths

    server = ServerProcess(model_paths("tiny-dream")[0], batching=True, threads=1)  # steady steps on a busy machine
    result: dict = {}

    def long_request() -> None:
        body = {"model": "tiny-dream", "prompt": PROMPT, "max_tokens": 128, "steps": 200, "seed": 0}  # well in 30 s
        result["response"] = httpx.post(server.url + "/v1/completions", json=body, timeout=120)

    thread = threading.Thread(target=long_request)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while "dreamlm_active_requests{model=\"tiny-dream\"} 1.0" not in httpx.get(server.url + "/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        thread.join(timeout=120)
        assert result["response"].status_code == 200
        assert result["response"].json()["usage"]["steps"] == 200
        # uvicorn re-raises the caught SIGTERM once shut down, so the exit status is the signal's, as for any server
        assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        server.close()


def test_a_request_that_fails_inside_the_engine_leaves_the_others_running(server, client, monkeypatch):
    from dreamlm.sampling import generate as generate_module

    real = generate_module.DecodeState.step

    def step(self, logits):  # the request of 9 new tokens (a 13-token canvas) fails at its 2nd step
        if self.x.shape[1] == 4 + 9 and self.step_index == 1:
            raise RuntimeError("boom")
        return real(self, logits)

    expected = [c.text for c in client.completions.create(model="tiny-dream", prompt=PROMPT, max_tokens=12,
                                                          seed=1).choices]
    monkeypatch.setattr(generate_module.DecodeState, "step", step)
    results: dict = {}

    def good() -> None:
        results["good"] = [c.text for c in client.completions.create(model="tiny-dream", prompt=PROMPT,
                                                                     max_tokens=12, seed=1).choices]

    def bad() -> None:
        try:
            client.completions.create(model="tiny-dream", prompt=PROMPT, max_tokens=9, seed=1)
        except openai.APIStatusError as exc:
            results["bad"] = (exc.status_code, exc.body["message"])

    threads = [threading.Thread(target=good), threading.Thread(target=bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["good"] == expected
    assert results["bad"][0] == 500 and "RuntimeError: boom" in results["bad"][1]


def test_bench_serve_soak_reports_errors_latency_and_the_servers_memory(tmp_path):
    from dreamlm.serve.bench import rss_mb, serve_bench, serve_table
    from dreamlm.serve.local import model_paths

    assert rss_mb(os.getpid()) > 1 and rss_mb(2**22 + 7) is None  # this process; no such process
    report = serve_bench(model_paths("tiny-dream")[0], levels=(1,), max_tokens=(4,), requests_per_client=1,
                         out_dir=tmp_path, threads=1, soak=3.0, soak_clients=2)
    soak = report["soak"]
    assert soak["concurrency"] == 2 and soak["errors"] == 0 and soak["requests"] >= 2
    assert soak["rss_samples"] and all(mb > 1 for _, mb in soak["rss_samples"])
    assert "Soak: 2 clients for 3 s with batching on" in serve_table(report)
    assert json.loads((tmp_path / "serve.json").read_text())["soak"]["requests"] == soak["requests"]
    assert (tmp_path / "serve.png").stat().st_size > 0


def test_serve_keeps_onednn_kernel_cache_small_unless_told(monkeypatch):
    from typer.testing import CliRunner

    from dreamlm.cli import SERVE_ONEDNN_CACHE, app

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    result = CliRunner().invoke(app, ["serve", "--log-level", "loud"])  # refused after the variable is set
    assert result.exit_code == 2 and "unknown log level" in result.output
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(SERVE_ONEDNN_CACHE) == "16"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")  # the user's own setting wins
    CliRunner().invoke(app, ["serve", "--log-level", "loud"])
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "256"
