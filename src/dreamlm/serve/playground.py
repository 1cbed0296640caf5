"""The playground: a static page at `/` (no build step, no network) and the puzzle routes it uses.

Text and infill modes talk to `/v1/completions` with `stream_steps`. Puzzle mode uses `/playground/solve`, which
runs the bundled solvers exactly as `dreamlm solve` does (the diffusion model one token per step, most confident
first; the AR baseline left to right) and streams one frame per step, then the answer and its validity by the rules.
"""

from __future__ import annotations

import asyncio
import random
import threading
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from dreamlm.errors import DreamError
from dreamlm.serve.protocol import ERROR_RESPONSES, EVENT_SCHEMA

STATIC = Path(str(resources.files("dreamlm") / "serve" / "static"))


class SolveRequest(BaseModel):
    """POST /playground/solve."""

    model_config = ConfigDict(extra="forbid", strict=True)
    kind: str = Field(description="sudoku, path, countdown, or a task name such as star-3-5.", max_length=40)
    puzzle: str = Field(max_length=4000)
    solver: Literal["diffusion", "ar"] = "diffusion"


class Solvers:
    """Bundled solvers loaded on first use, one lock each (a solver's model serves one puzzle at a time)."""

    def __init__(self) -> None:
        self._solvers: dict[Path, Any] = {}
        self._locks: dict[Path, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, kind: str, puzzle: str, objective: str) -> tuple[Any, str, threading.Lock]:
        from dreamlm.solver import Solver, bundled_solver_dir, normalise_puzzle, resolve_task

        text = normalise_puzzle(puzzle)
        task = resolve_task(kind, text)
        path = bundled_solver_dir(task, objective)
        with self._guard:
            if path not in self._solvers:
                self._solvers[path] = Solver(path)
                self._locks[path] = threading.Lock()
        solver = self._solvers[path]
        solver.prompt_ids(text)  # a malformed puzzle fails here, before the stream starts
        return solver, text, self._locks[path]


def frame(solver: Any, prompt_len: int, x: Any, step: int) -> dict[str, Any]:
    """The answer region of the canvas: a token string per slot, null where nothing is written yet."""
    row = x[0].tolist()[prompt_len:]
    mask = solver.model.config.mask_token_id
    if solver.kind == "ar":
        row = row[:step] + [None] * (len(row) - step)
    return {"type": "step", "step": step,
            "tokens": [None if t is None or t == mask else solver.tok.decode([t]) for t in row]}


def add_playground(app: FastAPI, authorized: Any) -> None:
    """Mount the page and its puzzle routes on the server's app (`authorized`: the API-key dependency)."""
    solvers = Solvers()
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/playground/tasks")
    async def tasks() -> dict[str, Any]:
        """Puzzle tasks with a bundled diffusion model and AR baseline."""
        from dreamlm.bench import available_tasks

        return {"tasks": available_tasks()}

    @app.get("/playground/puzzle", responses={400: ERROR_RESPONSES[400]})
    async def puzzle(task: str = "sudoku4") -> dict[str, Any]:
        """A random held-out puzzle of a task."""
        from dreamlm.bench import available_tasks
        from dreamlm.serve.app import ApiError
        from dreamlm.tasks import make_examples

        if task not in available_tasks():
            raise ApiError(400, f"no bundled models for task {task!r}; GET /playground/tasks lists them", "task")
        example = make_examples(task, 1, random.randrange(1 << 30), "test")[0]
        return {"task": task, "puzzle": example["input"]}

    @app.post("/playground/solve", dependencies=[Depends(authorized)], response_class=StreamingResponse,
              responses={400: ERROR_RESPONSES[400], 401: ERROR_RESPONSES[401], 200: {
                  "content": {"text/event-stream": {"schema": EVENT_SCHEMA}},
                  "description": "Server-sent events: a frame per step, then the answer and its validity"}})
    async def solve(req: SolveRequest) -> StreamingResponse:
        """SSE: {"type": "step", "step", "tokens"} per step, then {"type": "done", "answer", "valid", ...}."""
        from dreamlm.serve.app import ApiError, sse

        try:
            solver, text, lock = await asyncio.to_thread(solvers.get, req.kind, req.puzzle, req.solver)
        except DreamError as exc:
            raise ApiError(400, str(exc), "puzzle") from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        prompt_len = len(solver.prompt_ids(text))

        def put(event: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def work() -> None:
            try:
                with lock:
                    if solver.kind == "ar":
                        budget = solver.seq_len - prompt_len
                        put({"type": "step", "step": 0, "tokens": [None] * budget})
                    [sol] = solver.solve([text], watch=lambda step, x: put(frame(solver, prompt_len, x, step)))
                put({"type": "done", "answer": sol.output, "valid": sol.valid, "passes": sol.forward_passes,
                     "ms": round(1000 * sol.seconds, 1), "view": solver.view_note.strip(" ·")})
            except Exception as exc:  # noqa: BLE001 - reported to the page as an error event
                put({"type": "error", "message": str(exc) if isinstance(exc, DreamError) else
                     f"the solver failed: {type(exc).__name__}"})

        async def stream() -> AsyncIterator[str]:
            worker = loop.run_in_executor(None, work)
            while True:
                event = await events.get()
                yield sse(event)
                if event["type"] in ("done", "error"):
                    break
            await worker
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
