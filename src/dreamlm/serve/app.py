"""The HTTP server: OpenAI-compatible completions and chat over the step machine, batched per model by `Engine`.

Each prompt of a request becomes one `DecodeState` (its n answers are rows of that state's canvas) and one `Job` in
its model's engine; the engine steps every active job of the model in one forward. Non-streamed requests wait for
their jobs; streamed ones turn the engine's per-step canvas snapshots into SSE chunks of newly settled text (the
answer's prefix with no mask before it) and, when asked, `event: dreamlm.step` frames with the whole canvas.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Union

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dreamlm.errors import DreamError
from dreamlm.hub import model_label
from dreamlm.sampling import Constraints, SamplerOptions, plan, steps_for_blocks
from dreamlm.sampling.infill import (AUTO_MAX_SPAN, AUTO_START, MASK_SPAN, apply_stop, parse_template,
                                     unwritable_ids)
from dreamlm.serve.engine import Engine, Job, QueueFull, ShuttingDown
from dreamlm.serve.gate import DISCONNECTED, Gate, Guard
from dreamlm.serve.metrics import ServeMetrics
from dreamlm.serve.protocol import (
    ERROR_RESPONSES,
    EVENT_SCHEMA,
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
    error_json,
)
from dreamlm.view import newly_filled

if TYPE_CHECKING:
    from dreamlm.model import DreamModel
    from dreamlm.tokenizer import DreamTokenizer

log = logging.getLogger("dreamlm.serve")


@dataclass
class Limits:
    """Server settings: caps on what one request may ask, admission, timeouts, security."""

    max_tokens: int = 1024
    max_n: int = 16
    max_steps: int = 2048
    default_max_tokens: int = 16
    timeout: float = 300.0
    max_body_bytes: int = 1 << 20
    max_queue: int = 256
    max_batch_tokens: int = 16384
    batching: bool = True
    api_key: str | None = None
    grace: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_n", "max_steps", "default_max_tokens", "max_body_bytes", "max_queue",
                     "max_batch_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DreamError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("timeout", "grace"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise DreamError(f"{name} must be a number of seconds > 0, got {value!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise DreamError("the API key is empty")


@dataclass
class Served:
    """One model the server answers for, with its engine."""

    name: str
    model: "DreamModel"
    tokenizer: "DreamTokenizer"
    engine: Engine
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def banned(self) -> list[int]:
        """Ids never written: the mask and ids past the tokenizer."""
        return unwritable_ids(self.model, self.tokenizer)

    @property
    def end_ids(self) -> set[int]:
        """Ids that end an answer: EOS, and the chat turn's end where the tokenizer has one."""
        ids = {self.model.config.eos_token_id}
        im_end = self.tokenizer.token_to_id("<|im_end|>")
        if im_end is not None:
            ids.add(im_end)
        return {i for i in ids if i is not None}


class ApiError(Exception):
    """An answer in OpenAI's error format."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 503: "server_overloaded", 504: "timeout", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        """The JSON response."""
        return JSONResponse(error_json(self.message, self.TYPES.get(self.status, "invalid_request_error"),
                                       self.param, self.code), status_code=self.status, headers=self.headers)


def bad_value(exc: DreamError, fields: set[str]) -> ApiError:
    """A sampler check's message as a 400, naming the parameter when the message starts with one."""
    message = str(exc)
    head = re.match(r"[a-z_]+", message)
    param = head.group(0) if head and head.group(0) in fields else None
    return ApiError(400, message, param)


# ---- one prompt's canvas ----------------------------------------------------------------------------------------
@dataclass
class Prompt:
    """A prompt laid out on its canvas: the ids (masks where the answer goes), where the answer lies, and how much
    of it counts as prompt."""

    ids: list[int]
    lo: int  # the answer region [lo, hi) (plain prompts); template prompts: the text starts at lo
    hi: int
    prompt_tokens: int
    spans: list[tuple[int, int]] | None = None  # template prompts: the mask spans
    auto_tail: int | None = None  # a suffix with automatic length (DreamOn): its tokens; the answer ends before it

    @property
    def masked(self) -> int:
        """Masked slots on the canvas."""
        return sum(b - a for a, b in self.spans) if self.spans is not None else self.hi - self.lo


def layout(served: Served, prompt: Union[str, list[int]], max_tokens: int | None, suffix: str | None,
           default_max_tokens: int) -> Prompt:
    """The canvas of one prompt: prompt + max_tokens masks + suffix, or a template's own spans."""
    tok, config = served.tokenizer, served.model.config
    mask_id, context = config.mask_token_id, config.context_length
    bos = config.bos_token_id if config.bos_token_id is not None else tok.bos_token_id
    if isinstance(prompt, str):
        unknown = [s for s in tok.unknown_specials(prompt) if not MASK_SPAN.fullmatch(s)]
        if unknown:
            raise ApiError(400, f"unknown special token {unknown[0]} in the prompt", "prompt")
        if MASK_SPAN.search(prompt):
            if max_tokens is not None or suffix is not None:
                param = "max_tokens" if max_tokens is not None else "suffix"
                raise ApiError(400, f"{param} does not apply to a template prompt: its <|mask:N|> spans set what "
                                    "is filled", param)
            try:
                tpl = parse_template(tok, prompt, mask_id, bos)
            except DreamError as exc:
                raise ApiError(400, str(exc), "prompt") from None
            if len(tpl.ids) > context:
                raise ApiError(400, f"the template needs {len(tpl.ids)} tokens, more than the model's context of "
                                    f"{context}", "prompt")
            start = 1 if MASK_SPAN.match(prompt) else 0  # parse_template put BOS before a leading mask
            return Prompt(tpl.ids, start, len(tpl.ids), len(tpl.ids) - sum(b - a for a, b in tpl.spans), tpl.spans)
        ids = tok.encode(prompt)
    else:
        ids = list(prompt)
        if any(i < 0 or i >= tok.vocab_size for i in ids):
            bad = next(i for i in ids if i < 0 or i >= tok.vocab_size)
            raise ApiError(400, f"prompt token id {bad} is outside the vocabulary (0..{tok.vocab_size - 1})",
                           "prompt")
        if mask_id in ids:
            raise ApiError(400, f"prompt token ids hold the mask id {mask_id}; write a text template with "
                                "<|mask:N|> spans instead", "prompt")
    if not ids:
        if bos is None:
            raise ApiError(400, "the prompt is empty and this model has no BOS token to start from", "prompt")
        ids = [bos]
    tail = tok.encode(suffix) if suffix else []
    if suffix is not None and max_tokens is None and config.length_states:  # the model chooses the length
        if len(ids) + AUTO_START + len(tail) > context:
            raise ApiError(400, f"prompt ({len(ids)} tokens) + suffix ({len(tail)} tokens) leave no room in the "
                                f"model's context of {context}", "prompt")
        return Prompt(ids + [mask_id] * AUTO_START + tail, len(ids), len(ids) + AUTO_START, len(ids) + len(tail),
                      auto_tail=len(tail))
    n_new = default_max_tokens if max_tokens is None else max_tokens
    total = len(ids) + n_new + len(tail)
    if total > context:
        param = "max_tokens" if len(ids) + len(tail) < context else "prompt"
        raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({n_new}) + suffix ({len(tail)} tokens) = "
                            f"{total} tokens, more than the model's context of {context}", param)
    return Prompt(ids + [mask_id] * n_new + tail, len(ids), len(ids) + n_new, len(ids) + len(tail))


def default_steps(p: Prompt, block_length: int | None) -> int:
    """One step per masked token, rounded up to a multiple of the number of blocks."""
    if p.auto_tail is not None:
        return 2 * AUTO_MAX_SPAN  # the most steps; decoding ends when no mask is left
    first = p.lo if p.spans is None else p.spans[0][0]
    return steps_for_blocks(max(p.masked, 1), len(p.ids) - first, block_length)


# ---- answers ----------------------------------------------------------------------------------------------------
def cut_at_end(ids: list[int], end_ids: set[int]) -> tuple[list[int], bool]:
    """ids before the first end id, and whether one was found."""
    for i, t in enumerate(ids):
        if t in end_ids:
            return ids[:i], True
    return ids, False


def held_back(text: str, stops: list[str]) -> str:
    """What a stream may send of unfinished text: without a trailing partial character or a possible start of a
    stop string."""
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text[:len(text) - hold]


@dataclass
class Answer:
    """One choice's text so far, and whether it is final."""

    text: str
    final: bool
    reason: str  # "stop" or "length"
    tokens: int
    fills: list[str] | None = None


def read_row(served: Served, p: Prompt, row: list[int], stops: list[str], chat: bool) -> Answer:
    """The answer on a canvas row: settled text (up to the first mask), final when nothing after it can change."""
    tok, mask_id = served.tokenizer, served.model.config.mask_token_id
    end_ids = served.end_ids if chat else {served.model.config.eos_token_id} - {None}
    if p.spans is not None:
        body = row[p.lo:]
        settled = body[:body.index(mask_id)] if mask_id in body else body
        text = tok.decode(settled)
        done = mask_id not in body
        text, stopped = apply_stop(text, stops)
        fills = [tok.decode(row[a:b]) for a, b in p.spans] if done else None
        return Answer(text, done or stopped, "stop", p.masked, fills)
    region = row[p.lo:p.hi if p.auto_tail is None else len(row) - p.auto_tail]
    settled = region[:region.index(mask_id)] if mask_id in region else region
    ids, ended = cut_at_end(settled, end_ids)
    text, stopped = apply_stop(tok.decode(ids), stops)
    final = ended or stopped or mask_id not in region
    return Answer(text, final, "stop" if ended or stopped else "length", len(ids))


# ---- the request -------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """A request in flight: its prompts' jobs (one per prompt) sharing one event queue."""

    served: Served
    prompts: list[Prompt]
    jobs: list[Job]
    n: int
    stops: list[str]
    chat: bool
    events: asyncio.Queue
    outcome: str | None = None  # how it ended, for /metrics: ok, disconnected, timeout, shutdown, error

    def cancel(self) -> None:
        """Every job leaves at its next step."""
        for job in self.jobs:
            job.cancel()

    def answers(self) -> list[Answer]:
        """Every choice, index = prompt * n + row."""
        return [read_row(self.served, p, row, self.stops, self.chat)
                for p, job in zip(self.prompts, self.jobs) for row in job.state.x.tolist()]

    def usage(self, answers: list[Answer] | None = None) -> dict[str, int]:
        """OpenAI's usage plus steps and forward passes (`answers`: this run's, when already read)."""
        prompt = sum(p.prompt_tokens for p in self.prompts)
        completion = sum(a.tokens for a in (answers if answers is not None else self.answers()))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "steps": max(job.state.step_index for job in self.jobs),
                "forward_passes": sum(job.state.passes for job in self.jobs)}


def check_caps(req: CompletionRequest | ChatRequest, limits: Limits, max_tokens: int | None) -> None:
    """The server's own caps (lower than the schema's bounds)."""
    for name, value, cap in (("max_tokens", max_tokens, limits.max_tokens), ("n", req.n, limits.max_n),
                             ("steps", req.steps, limits.max_steps)):
        if value is not None and value > cap:
            raise ApiError(400, f"{name} is {value}, above this server's cap of {cap}", name)
    if req.stream_steps and not req.stream:
        raise ApiError(400, "stream_steps sends per-step events on a stream; set stream to true", "stream_steps")
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options applies only with stream set to true", "stream_options")


def stop_list(stop: str | list[str] | None) -> list[str]:
    """The stop strings, checked."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop takes up to 4 non-empty strings", "stop")
    return stops


def auto_length_limit(served: Served, p: Prompt, n: int) -> int | None:
    """The canvas limit of a suffix request with automatic length (prompt + suffix + AUTO_MAX_SPAN), else None."""
    if p.auto_tail is None:
        return None
    if n > 1:
        raise ApiError(400, "n > 1 with a suffix of automatic length is not supported; send n requests, or give "
                            "max_tokens for a fixed length", "n")
    return min(len(p.ids) - (p.hi - p.lo) + AUTO_MAX_SPAN, served.model.config.context_length)


def start_run(app: FastAPI, served: Served, req: CompletionRequest | ChatRequest, prompts: list[Prompt],
              stops: list[str], chat: bool) -> Run:
    """Plan each prompt and queue its job; every check happens before the first job is queued."""
    limits: Limits = app.state.limits
    fields = set(type(req).model_fields)
    if len(prompts) > limits.max_queue:  # each prompt waits as one job: a retry could never fit (not a 503)
        raise ApiError(400, f"the request has {len(prompts)} prompts, more than this server queues per model "
                            f"({limits.max_queue}, serve --max-queue); send them in smaller requests", "prompt")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    states = []
    for p in prompts:
        steps = req.steps if req.steps is not None else default_steps(p, req.block_length)
        if steps > limits.max_steps:
            raise ApiError(400, f"this request needs {steps} steps (one per masked token), above this server's "
                                f"cap of {limits.max_steps}; set steps lower", "steps")
        try:
            options = SamplerOptions(steps, req.eps, req.temperature or 0.0, req.top_p, req.top_k, req.alg,
                                     req.alg_temp, req.block_length, req.cache, req.refresh_every, req.threshold,
                                     req.stop_at_eos, auto_length_limit(served, p, req.n))
            seed = req.seed if req.seed is not None else secrets.randbits(63)
            canvas = torch.tensor([p.ids], dtype=torch.long)
            states.append(plan(served.model, canvas, max_length=len(p.ids), options=options,
                               num_return_sequences=req.n, constraints=Constraints(banned_token_ids=served.banned),
                               seed=seed))
        except DreamError as exc:
            raise bad_value(exc, fields) from None
    deadline = time.monotonic() + limits.timeout
    jobs = [Job(state, loop, deadline, events, tag=i, snapshots=req.stream) for i, state in enumerate(states)]
    run = Run(served, prompts, jobs, req.n, stops, chat, events)
    try:
        for job in jobs:
            served.engine.submit(job)
    except QueueFull as exc:
        run.cancel()
        raise ApiError(503, str(exc), code="queue_full", headers={"Retry-After": "1"}) from None
    except ShuttingDown as exc:
        run.cancel()
        raise ApiError(503, str(exc), code="shutting_down", headers={"Retry-After": "5"}) from None
    return run


OUTCOMES = {"timeout": "timeout", "cancelled": "shutdown", "error": "error"}  # an engine event -> /metrics outcome


async def wait_all(request: Request, run: Run) -> None:
    """Wait until every job is done; a timeout is a 504, an engine failure a 500, shutdown a 503, a client gone
    cancels (499, which only the log sees)."""
    pending = len(run.jobs)
    try:
        while pending:
            try:
                event = await asyncio.wait_for(run.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    run.outcome = "disconnected"
                    raise ApiError(DISCONNECTED, "the client went away") from None
                continue
            kind = event["type"]
            if kind == "step":
                continue
            if kind != "done":
                run.outcome = OUTCOMES.get(kind, "error")
                raise end_error(kind, event.get("error"))
            pending -= 1
        run.outcome = "ok"
    except asyncio.CancelledError:  # the drain cut the request after the grace period
        run.outcome = "shutdown"
        raise
    finally:
        if pending:
            run.cancel()


def end_error(kind: str, message: str | None) -> ApiError:
    """The error for a job that did not finish."""
    if kind == "timeout":
        return ApiError(504, message or "the request took longer than the server's timeout", code="timeout")
    if kind == "cancelled":
        return ApiError(503, message or "the server is shutting down and ended this request before it finished",
                        code="shutting_down", headers={"Retry-After": "5"})
    return ApiError(500, message or "the model failed on this request", code="engine_error")


def sse(data: Any, event: str | None = None) -> str:
    """One server-sent event."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_run(run: Run, req: CompletionRequest | ChatRequest, rid: str, created: int,
                     want_steps: bool, metrics: ServeMetrics, state: Any = None) -> AsyncIterator[str]:
    """SSE: chunks of newly settled text per choice, optional dreamlm.step frames, a finish chunk per choice,
    usage when asked, then [DONE]; a job that fails, times out or is ended by shutdown: an error event, then [DONE].
    The client going away cancels the jobs (the generator is closed). `state`: the request's, for the log line."""
    served, n, chat = run.served, run.n, run.chat
    obj = "chat.completion.chunk" if chat else "text_completion"
    sent = [""] * (len(run.prompts) * n)
    closed = [False] * len(sent)
    prev: dict[int, list[list[int]]] = {}

    def chunk(index: int, text: str | None, reason: str | None, role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
        return sse({"id": rid, "object": obj, "created": created, "model": served.name, "choices": [choice]})

    def settle(index: int, answer: Answer, done: bool) -> list[str]:
        if closed[index]:
            return []
        final = answer.final or done
        visible = answer.text if final else held_back(answer.text, run.stops)
        out = []
        if visible.startswith(sent[index]) and len(visible) > len(sent[index]):
            out.append(chunk(index, visible[len(sent[index]):], None))
            sent[index] = visible
        if final:
            closed[index] = True
            out.append(chunk(index, None, answer.reason))
        return out

    try:
        if chat:
            for index in range(len(sent)):
                yield chunk(index, None, None, role=True)
        pending = len(run.jobs)
        while pending:
            event = await run.events.get()
            kind, tag = event["type"], event.get("tag", 0)
            p = run.prompts[tag]
            if kind == "step":
                rows = event["x"].tolist()
                if want_steps:
                    yield sse(step_frame(served, p, tag, n, rows, prev.get(tag), event), event="dreamlm.step")
                prev[tag] = rows
                for r, row in enumerate(rows):
                    for piece in settle(tag * n + r, read_row(served, p, row, run.stops, chat), False):
                        yield piece
                continue
            if kind != "done":
                run.outcome = OUTCOMES.get(kind, "error")
                error = end_error(kind, event.get("error"))
                if state is not None:
                    state.error = error.message
                yield sse(error_json(error.message, ApiError.TYPES.get(error.status, "server_error"),
                                     code=error.code))
                yield "data: [DONE]\n\n"
                return
            pending -= 1
            for r, row in enumerate(run.jobs[tag].state.x.tolist()):
                for piece in settle(tag * n + r, read_row(served, p, row, run.stops, chat), True):
                    yield piece
        if req.stream_options is not None and req.stream_options.include_usage:
            yield sse({"id": rid, "object": obj, "created": created, "model": served.name, "choices": [],
                       "usage": run.usage()})
        yield "data: [DONE]\n\n"
        run.outcome = "ok"
    finally:  # also when the client went away (the generator is closed) or the drain cut the stream
        run.cancel()
        if run.outcome is None:
            run.outcome = "disconnected" if served.engine.running else "shutdown"
        metrics.observe_request(served.name, run)


def step_frame(served: Served, p: Prompt, tag: int, n: int, rows: list[list[int]], before: list[list[int]] | None,
               event: dict[str, Any]) -> dict[str, Any]:
    """The dreamlm.step frame: each row's whole canvas as token strings (null = still masked), the positions
    committed at this step, the step index and the forward passes so far."""
    tok, mask_id = served.tokenizer, served.model.config.mask_token_id
    before = before or [p.ids] * len(rows)
    out = []
    for r, row in enumerate(rows):
        out.append({"index": tag * n + r,
                    "tokens": [None if t == mask_id else tok.decode([t]) for t in row],
                    "committed": newly_filled(before[r], row, mask_id),
                    "masked": sum(t == mask_id for t in row)})
    answer = None
    if p.spans is None:  # an automatic-length answer ends where the suffix starts, however long the canvas now is
        answer = [p.lo, p.hi if p.auto_tail is None else len(rows[0]) - p.auto_tail]
    return {"step": event["step"], "passes": event["passes"], "prompt": tag, "answer": answer,
            "spans": p.spans, "rows": out}


# ---- the app -----------------------------------------------------------------------------------------------------
def create_app(models: dict[str, Served], limits: Limits | None = None) -> FastAPI:
    """The FastAPI app serving `models` (engines are started and stopped with the app's lifespan)."""
    limits = limits or Limits()
    metrics = ServeMetrics(models)
    gate = Gate([s.engine for s in models.values()], limits.grace)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for served in models.values():
            served.engine.observer = metrics.observe_step
            if not served.engine.running:
                served.engine.start()
        yield
        await gate.drain()  # done already when a signal started the shutdown (serve.local.GracefulServer)
        # nothing is in flight now; a step still running (its requests already answered) is not waited for long
        await asyncio.gather(*(asyncio.to_thread(s.engine.stop, 0.0, 0.1) for s in models.values()))

    app = FastAPI(title="dreamlm", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions and chat for Dream-style diffusion LMs, batched per "
                              "model at every denoising step.")
    app.state.limits, app.state.models, app.state.metrics, app.state.gate = limits, models, metrics, gate

    async def authorized(request: Request) -> None:
        if limits.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), limits.api_key.encode()):
            raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key")

    def served_model(name: str) -> Served:
        if name not in models:
            raise ApiError(404, f"the model {name!r} does not exist; GET /v1/models lists the served models",
                           "model", "model_not_found")
        return models[name]

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        request.state.error = exc.message
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        # a union (content: str | parts) reports every branch; the value error says what is really wrong
        error = next((e for e in errors if e.get("type") == "value_error"), errors[0]) if errors else \
            {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        param = loc[0] if loc else None
        if error.get("type") == "extra_forbidden":
            message = f"unsupported parameter: {'.'.join(loc)} (this server does not implement it)"
        elif error.get("type") == "json_invalid":
            message, param = "the body is not valid JSON", None
        elif error.get("type") == "missing" and not loc:
            message = "the body is missing; send a JSON object"
        else:
            where = ".".join(p for p in loc if not any(c in p for c in "[]")) or "body"
            message = f"{where}: {error.get('msg', 'invalid value').removeprefix('Value error, ')}"
        request.state.error = message
        return ApiError(400, message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc,
                  exc_info=exc)
        return ApiError(500, "internal server error (logged on the server)", code="internal_error").response()

    @app.get("/health", responses={503: ERROR_RESPONSES[503]})
    async def health() -> JSONResponse:
        """200 while every engine runs."""
        dead = [name for name, s in models.items() if not s.engine.running]
        if dead:
            return ApiError(503, f"engine not running: {', '.join(dead)}").response()
        return JSONResponse({"status": "ok", "models": list(models)})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        """Prometheus text: requests, queue depth, batch size, step latency, tokens/s."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(authorized)],
             responses={401: ERROR_RESPONSES[401]})
    async def list_models() -> dict[str, Any]:
        """The served models."""
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": s.created, "owned_by": "dreamlm",
             "context_length": s.model.config.context_length, "chat": bool(s.tokenizer.chat_template)}
            for name, s in models.items()]}

    stream_doc = {"content": {"application/json": {}, "text/event-stream": {"schema": EVENT_SCHEMA}},
                  "description": "The answer; with stream: server-sent events, one per chunk or step frame"}

    @app.post("/v1/completions", response_model=CompletionResponse, dependencies=[Depends(authorized)],
              responses={**ERROR_RESPONSES, 200: stream_doc})
    async def completions(req: CompletionRequest, request: Request) -> Any:
        """Text completion and infilling (suffix, or <|mask:N|> spans in the prompt)."""
        served = served_model(req.model)
        request.state.model = served.name
        check_caps(req, limits, req.max_tokens)
        stops = stop_list(req.stop)
        raw = req.prompt
        if isinstance(raw, list) and not raw:
            raise ApiError(400, "the prompt list is empty", "prompt")
        items: list[Union[str, list[int]]] = ([raw] if isinstance(raw, str) or isinstance(raw[0], int)
                                             else list(raw))  # type: ignore[arg-type]
        prompts = [layout(served, item, req.max_tokens, req.suffix, limits.default_max_tokens) for item in items]
        return await answer(request, served, req, prompts, stops, chat=False)

    @app.post("/v1/chat/completions", response_model=ChatResponse, dependencies=[Depends(authorized)],
              responses={**ERROR_RESPONSES, 200: stream_doc})
    async def chat_completions(req: ChatRequest, request: Request) -> Any:
        """Chat through the model's chat template."""
        served = served_model(req.model)
        request.state.model = served.name
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        max_tokens = req.max_completion_tokens or req.max_tokens
        check_caps(req, limits, max_tokens)
        stops = stop_list(req.stop)
        if not served.tokenizer.chat_template:
            raise ApiError(400, f"the model {served.name!r} has no chat template; use /v1/completions", "model")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            text = served.tokenizer.apply_chat_template(messages)
        except DreamError as exc:
            raise ApiError(400, str(exc), "messages") from None
        if MASK_SPAN.search(text):
            raise ApiError(400, "chat messages may not hold <|mask|> spans; use /v1/completions for templates",
                           "messages")
        ids = served.tokenizer.encode(text)
        room = served.model.config.context_length - len(ids)
        if room < 1:
            raise ApiError(400, f"the conversation has {len(ids)} tokens, which fills the model's context of "
                                f"{served.model.config.context_length}", "messages")
        prompts = [layout(served, ids, max_tokens or min(limits.max_tokens, room), None, limits.default_max_tokens)]
        return await answer(request, served, req, prompts, stops, chat=True)

    async def answer(request: Request, served: Served, req: CompletionRequest | ChatRequest, prompts: list[Prompt],
                     stops: list[str], chat: bool) -> Any:
        run = start_run(app, served, req, prompts, stops, chat)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        request.state.prompt_tokens = sum(p.prompt_tokens for p in prompts)
        if req.stream:
            return StreamingResponse(stream_run(run, req, rid, created, req.stream_steps, metrics, request.state),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            await wait_all(request, run)
        finally:
            metrics.observe_request(served.name, run)
        answers = run.answers()
        usage = run.usage(answers)
        request.state.completion_tokens = usage["completion_tokens"]
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": a.text}, "finish_reason": a.reason,
                        "logprobs": None} for i, a in enumerate(answers)]
            return {"id": rid, "object": "chat.completion", "created": created, "model": served.name,
                    "choices": choices, "usage": usage}
        choices = [{"index": i, "text": a.text, "finish_reason": a.reason, "logprobs": None, "fills": a.fills}
                   for i, a in enumerate(answers)]
        return {"id": rid, "object": "text_completion", "created": created, "model": served.name,
                "choices": choices, "usage": usage}

    from dreamlm.serve.playground import add_playground

    add_playground(app, authorized)
    app.add_middleware(Guard, gate=gate, max_body=limits.max_body_bytes)
    return app


def bundled_models() -> list[Path]:
    """The models a bare `dreamlm serve` answers for: the text model, every diffusion solver, and the adapted SmolLM2
    when it has been pulled."""
    from importlib import resources

    from dreamlm.hub import is_pulled, resolve

    root = Path(str(resources.files("dreamlm") / "assets"))
    bundled = sorted(p for p in root.iterdir() if (p / "config.json").is_file() and not p.name.endswith("-ar"))
    return bundled + ([resolve("smollm2")] if is_pulled("smollm2") else [])


def load_models(paths: list[Path], limits: Limits, dtype: str = "float32", device: str | None = None,
                threads: int | None = None) -> dict[str, Served]:
    """Load each model directory (named by its folder) with an engine of its own (not yet started)."""
    from dreamlm.model import DreamModel

    models: dict[str, Served] = {}
    for path in paths:
        name = model_label(path)
        if name in models:
            raise DreamError(f"two models are named {name!r}; serve folders with different names")
        model = DreamModel.from_pretrained(path, dtype=dtype, device=device)
        if model.tokenizer is None:
            raise DreamError(f"{path} has no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
        if model.config.mask_token_id is None:
            raise DreamError(f"{path} is not a diffusion checkpoint (no mask_token_id); convert it first")
        model.eval()
        engine = Engine(name, model, max_batch_tokens=limits.max_batch_tokens, max_queue=limits.max_queue,
                        batching=limits.batching)
        models[name] = Served(name, model, model.tokenizer, engine)
    return models
