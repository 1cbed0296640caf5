"""Iteration-level batching over the step machine: one engine thread per served model.

Requests arrive as `Job`s (a planned `DecodeState` and how to report it). At every step the engine admits waiting
jobs while the batch stays within its token budget, runs `advance` (one forward for every cacheless job), then
reports each job's progress: per-step canvas events, newly settled text for streams, the result when done. Jobs
join and leave between steps; a cancelled or timed-out job leaves at the next step and frees its slot. The model is
touched only by this thread.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from dreamlm.errors import DreamError
from dreamlm.sampling import DecodeState, advance

if TYPE_CHECKING:
    from dreamlm.model import DreamModel

log = logging.getLogger("dreamlm.serve")


class QueueFull(DreamError):
    """The engine's waiting queue is full (the server answers 503 with Retry-After)."""


class ShuttingDown(DreamError):
    """The engine no longer accepts work."""


@dataclass
class Job:
    """One request's decoding in the engine: its state and where its events go (an asyncio queue on `loop`,
    filled from the engine thread). Events: {"type": "step", "tag", "x", "step", "passes"} after each step when
    `snapshots` is set (x: a copy of the canvas), then one of {"type": "done" | "cancelled" | "timeout" | "error",
    "tag", "error"}. `tag` tells apart the jobs of one request that share a queue."""

    state: DecodeState
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() after which the job is dropped ("timeout")
    events: asyncio.Queue
    tag: int = 0
    snapshots: bool = False
    cancelled: bool = False
    finished: bool = False

    @property
    def tokens(self) -> int:
        """Canvas positions this job holds in a batch (rows x length)."""
        return self.state.x.shape[0] * self.state.x.shape[1]

    def cancel(self) -> None:
        """Leave at the next step (a client went away)."""
        self.cancelled = True

    def emit(self, event: dict[str, Any]) -> None:
        """Put an event on the job's queue from any thread (dropped once the loop is closed)."""
        event["tag"] = self.tag
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass


class Engine:
    """The scheduler of one model: a bounded waiting queue, a batch capped by a token budget, one thread."""

    def __init__(self, name: str, model: "DreamModel", max_batch_tokens: int = 8192, max_queue: int = 256,
                 batching: bool = True) -> None:
        self.name, self.model = name, model
        self.max_batch_tokens, self.max_queue, self.batching = max_batch_tokens, max_queue, batching
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"dreamlm-engine-{name}", daemon=True)
        self.observer: Optional[Callable[[str, float, int, int], None]] = None  # (model, seconds, rows, committed)
        self._recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=256)

    def start(self) -> "Engine":
        """Start the engine thread."""
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """True while the engine thread is alive and accepts work."""
        return self._thread.is_alive() and not self._stopping

    def submit(self, job: Job) -> None:
        """Queue a job; QueueFull when the waiting queue is at its bound, ShuttingDown after `stop`."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue for {self.name} is full ({self.max_queue} waiting); retry shortly")
            self._waiting.append(job)
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        """Jobs waiting to join the batch."""
        return len(self._waiting)

    @property
    def active(self) -> int:
        """Jobs in the running batch."""
        return len(self._active)

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Tokens of the requests finished in the last `window` seconds, per second (0 when idle)."""
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window]
        if not recent:
            return 0.0
        return sum(n for _, n in recent) / max(now - recent[0][0], 1e-3)

    def close(self) -> None:
        """Refuse new work from now on (`submit` raises ShuttingDown); queued and running jobs go on, and the thread
        ends once none is left."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def cancel_all(self) -> None:
        """Cancel every queued and running job: each leaves at the engine's next step with a "cancelled" event."""
        with self._cond:
            for job in list(self._waiting) + list(self._active):
                job.cancel()
            self._cond.notify()

    @property
    def idle(self) -> bool:
        """No job waiting or running."""
        return not self._waiting and not self._active

    def stop(self, grace: float = 30.0, wait: float = 5.0) -> None:
        """Refuse new work, let running and waiting jobs finish for up to `grace` seconds, cancel the rest, and wait
        up to `wait` seconds for the thread to end (it ends after the step it is in)."""
        self.close()
        deadline = time.monotonic() + grace
        while not self.idle and time.monotonic() < deadline:
            time.sleep(0.02)
        self.cancel_all()
        if self._thread.is_alive():
            self._thread.join(timeout=wait)

    # ---- the engine thread ------------------------------------------------------------------------------------
    def _admit(self) -> None:
        budget = self.max_batch_tokens - sum(job.tokens for job in self._active)
        limit = None if self.batching else 1
        while self._waiting and (limit is None or len(self._active) < limit):
            job = self._waiting[0]
            if self._active and job.tokens > budget:
                break  # waits for room; a job larger than the budget still runs alone
            self._waiting.popleft()
            self._active.append(job)
            budget -= job.tokens

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._active and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._waiting and not self._active:
                    return
                self._drop_waiting_cancelled()
                self._admit()
            self._leave_cancelled()
            if not self._active:
                continue
            try:
                self._step()
            except Exception as exc:  # a failure inside the model: every job of this batch gets an error event
                log.exception("engine %s: step failed", self.name)
                for job in self._active:
                    self._finish(job, "error", f"the model failed: {type(exc).__name__}: {exc}")
                self._active = []

    def _drop_waiting_cancelled(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._waiting if j.cancelled or now > j.deadline]:
            self._waiting.remove(job)
            self._finish(job, "cancelled" if job.cancelled else "timeout")

    def _leave_cancelled(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._active if j.cancelled or now > j.deadline]:
            self._active.remove(job)
            self._finish(job, "cancelled" if job.cancelled else "timeout")

    def _step(self) -> None:
        active = list(self._active)
        start = time.perf_counter()
        failed: dict[int, Exception] = {}
        with torch.inference_mode():  # cheaper than no_grad; the states are only read outside the engine
            advance(self.model, [job.state for job in active],
                    on_error=lambda state, exc: failed.__setitem__(id(state), exc))
        for job in [j for j in active if id(j.state) in failed]:  # only the requests that failed leave
            exc = failed[id(job.state)]
            log.error("engine %s: a request failed: %s: %s", self.name, type(exc).__name__, exc)
            active.remove(job)
            self._active.remove(job)
            self._finish(job, "error", f"the model failed on this request: {type(exc).__name__}: {exc}")
        seconds = time.perf_counter() - start
        committed = 0
        for job in active:
            if job.snapshots:
                state = job.state
                job.emit({"type": "step", "x": state.x.clone(), "step": state.step_index, "passes": state.passes})
            if job.state.done:
                committed += int(job.state.slots.sum())  # every slot of a finished job holds a token
                self._active.remove(job)
                self._finish(job, "done")
        if committed:
            self._recent.append((time.perf_counter(), committed))
        if self.observer is not None:
            self.observer(self.name, seconds, sum(job.state.x.shape[0] for job in active), committed)

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        job.finished = True
        if status == "timeout":
            error = "the request took longer than the server's timeout"
        job.emit({"type": status, "error": error})
