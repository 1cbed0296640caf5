"""The server's door: every HTTP request passes `Guard` (an ASGI middleware), which keeps the `Gate`'s list of
requests in flight, enforces the body limit while the body is read, and writes one log line per request.

Shutdown (`Gate.drain`, started by SIGTERM through `serve.local.GracefulServer`): from the signal on, every new
request gets a 503 (JSON, `code: shutting_down`) and the engines queue nothing new; requests in flight run on for up
to the grace period; then the engines cancel what is left, whose handlers answer with their own error (a 503 JSON
body, or an SSE error event then `data: [DONE]`); a handler that has not answered soon after is cut by the guard,
which writes the same ending itself. Nothing is left for uvicorn to cancel, so no traceback reaches the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from dreamlm.serve.protocol import error_json

if TYPE_CHECKING:
    from dreamlm.serve.engine import Engine

log = logging.getLogger("dreamlm.serve")

DISCONNECTED = 499  # nginx's status for a client that closed the connection before the answer


class BodyTooLarge(Exception):
    """The body passed the server's limit while it was read."""


@dataclass(eq=False)
class Flight:
    """One request in progress, as the guard sees it."""

    task: Optional[asyncio.Task] = None
    status: int = 0  # the response's status once it started
    stream: bool = False  # the response is an event stream
    done: bool = False  # the last body message went out
    disconnected: bool = False  # the client left before the answer was complete
    too_large: bool = False  # the body passed the limit: the guard answers 413 instead of the app
    cut: bool = False  # ended by the drain after the grace period
    error: Optional[str] = None  # the message of the guard's own answer


class Gate:
    """Requests in flight and the drain on shutdown: refuse new requests, let the others finish for up to `grace`
    seconds, then end the rest with an error (`settle`: how long handlers get to answer a cancellation themselves)."""

    def __init__(self, engines: "list[Engine]", grace: float, settle: float = 0.4) -> None:
        self.engines, self.grace, self.settle = engines, grace, settle
        self.flights: set[Flight] = set()
        self.draining = False
        self._deadline = float("inf")  # time.monotonic() at which requests still in flight are ended
        self._drained: Optional[asyncio.Event] = None

    def hurry(self) -> None:
        """End the requests in flight now instead of at the end of the grace period (a second signal)."""
        self._deadline = time.monotonic()

    async def drain(self) -> None:
        """Stop admission, wait for the requests in flight up to the grace period, end the rest; returns once none
        is left (a second call waits for the first)."""
        if self._drained is not None:
            await self._drained.wait()
            return
        self._drained = asyncio.Event()
        self.draining = True
        self._deadline = min(self._deadline, time.monotonic() + self.grace)
        for engine in self.engines:
            engine.close()
        if self.flights:
            log.info("shutting down: %d request(s) in flight get up to %g s to finish", len(self.flights), self.grace)
        while self.flights and time.monotonic() < self._deadline:
            await asyncio.sleep(0.02)
        if self.flights:
            log.warning("shutting down: ending %d request(s) still in flight with an error", len(self.flights))
            for engine in self.engines:
                engine.cancel_all()  # each handler answers its cancellation at the engine's next step
            await self._wait(self.settle)
            for flight in list(self.flights):  # not answered yet (e.g. a step longer than `settle`): cut
                flight.cut = True
                if flight.task is not None:
                    flight.task.cancel()
            await self._wait(self.settle)
        self._drained.set()

    async def _wait(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while self.flights and time.monotonic() < end:
            await asyncio.sleep(0.01)


def shutdown_error() -> dict[str, Any]:
    """The error body of a request refused or ended by shutdown."""
    return error_json("the server is shutting down; retry the request (on another replica)", "server_overloaded",
                      code="shutting_down")


class Guard:
    """ASGI middleware over the app: the gate's bookkeeping, the body limit (413, however the body is sent: by
    Content-Length or counted while a chunked body is read) and one log line per request (499 for a client that left
    before its answer)."""

    def __init__(self, app: Any, gate: Gate, max_body: int) -> None:
        self.app, self.gate, self.max_body = app, gate, max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope.setdefault("state", {})
        flight = Flight()
        length = dict(scope.get("headers", [])).get(b"content-length")
        if self.gate.draining:
            await self.answer(send, flight, 503, shutdown_error(), {"retry-after": "5"})
        elif length is not None and (not length.isdigit() or int(length) > self.max_body):
            await self.answer(send, flight, 413, self.too_large())
        else:
            error = await self.run(scope, receive, send, flight)
            self.log(scope, flight, start)
            if error is not None:
                raise error  # Starlette's outer middleware answers 500 through the app's handler
            return
        self.log(scope, flight, start)

    async def run(self, scope: dict, receive: Any, send: Any, flight: Flight) -> Optional[BaseException]:
        """Run the app for one request as a task of its own (so that the drain can cut it without cancelling this
        one); returns the exception it raised, if any, once its answer is complete."""
        seen = [0]

        async def limited() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_body and flight.status == 0:
                    flight.too_large = True
                    raise BodyTooLarge
            elif message["type"] == "http.disconnect" and not flight.done:
                flight.disconnected = True
            return message

        async def sent(message: dict) -> None:
            if flight.too_large or flight.cut:
                return  # the guard answers instead
            if message["type"] == "http.response.start":
                flight.status = message["status"]
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                flight.stream = content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                flight.done = True  # before sending: from here on a disconnect message means "answered"
            await send(message)

        flight.task = asyncio.create_task(self.app(scope, limited, sent))
        self.gate.flights.add(flight)
        try:
            await asyncio.wait({flight.task})
        except asyncio.CancelledError:  # uvicorn gave up on this request (a forced exit): so does the app
            flight.task.cancel()
            raise
        finally:
            self.gate.flights.discard(flight)
        error = None if flight.task.cancelled() else flight.task.exception()
        if flight.too_large:
            flight.status = 0
            await self.answer(send, flight, 413, self.too_large(), {"connection": "close"})
            return None
        if flight.cut:
            await self.end_cut(send, flight)
            return None
        if isinstance(error, BodyTooLarge):
            return None
        if error is not None and flight.status == 0:
            flight.status = 500
        return error

    async def end_cut(self, send: Any, flight: Flight) -> None:
        """End a request the drain cut: the shutdown error as JSON, or as an SSE event then [DONE] on a stream."""
        if flight.status == 0:
            await self.answer(send, flight, 503, shutdown_error(), {"retry-after": "5"})
        elif not flight.done:
            body = b""
            if flight.stream:
                body = f"data: {json.dumps(shutdown_error())}\n\ndata: [DONE]\n\n".encode()
            await send({"type": "http.response.body", "body": body, "more_body": False})
            flight.done = True

    def too_large(self) -> dict[str, Any]:
        return error_json(f"the body is larger than this server's limit of {self.max_body} bytes",
                          "invalid_request_error")

    @staticmethod
    async def answer(send: Any, flight: Flight, status: int, body: dict[str, Any],
                     headers: dict[str, str] | None = None) -> None:
        """Send a whole JSON answer (the guard's own: 413, or 503 while shutting down)."""
        data = json.dumps(body).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        flight.status, flight.error = status, body["error"]["message"]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": data, "more_body": False})
        flight.done = True

    @staticmethod
    def log(scope: dict, flight: Flight, start: float) -> None:
        """The request's one log line: client, method and path, status, time, model and tokens, error."""
        state = scope.get("state", {})
        client = scope.get("client") or ("-", 0)
        status = DISCONNECTED if flight.disconnected and not flight.cut else flight.status
        extra = " ".join(f"{k}={state[k]}" for k in ("model", "prompt_tokens", "completion_tokens") if k in state)
        message = ("ended by shutdown" if flight.cut else "the client went away" if status == DISCONNECTED
                   else flight.error or state.get("error"))
        error = f' error="{message}"' if message else ""
        log.info('%s "%s %s" %d %.1fms %s%s', client[0], scope.get("method"), scope.get("path"), status,
                 (time.perf_counter() - start) * 1000, extra, error)
