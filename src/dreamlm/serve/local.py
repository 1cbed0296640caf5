"""A real uvicorn server on 127.0.0.1 in a background thread: what the serve bench and the tests run against."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import threading
import time
from types import FrameType
from typing import Any, Iterator, Optional

import uvicorn

from dreamlm.errors import DreamError
from dreamlm.serve.app import Limits, bundled_models, create_app, load_models
from dreamlm.serve.gate import Gate


class GracefulServer(uvicorn.Server):
    """uvicorn whose SIGTERM (or Ctrl-C) drains the app first (`Gate.drain`: new requests get 503, those in flight
    finish within the grace period or end with an error) and only then shuts down; a second signal ends the requests
    in flight at once, a third exits without waiting."""

    def __init__(self, config: uvicorn.Config, gate: Gate) -> None:
        super().__init__(config)
        self.gate = gate
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._signals = 0
        self._drain: Optional[asyncio.Task] = None

    async def serve(self, sockets: Optional[list[socket.socket]] = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:
        """A signal: the first drains, the second hurries the drain, the third is uvicorn's own (exit now)."""
        self._signals += 1
        if self._loop is None or self._signals > 2:
            super().handle_exit(sig, frame)
        else:
            self._loop.call_soon_threadsafe(self._begin, sig)

    def request_exit(self) -> None:
        """Drain and shut down, from any thread (what SIGTERM does)."""
        if self._loop is None:
            self.should_exit = True
        else:
            self._loop.call_soon_threadsafe(self._begin, None)

    def _begin(self, sig: Optional[int]) -> None:
        if self._drain is not None:
            self.gate.hurry()
            return
        self._drain = asyncio.ensure_future(self._drained(sig))

    async def _drained(self, sig: Optional[int]) -> None:
        await self.gate.drain()
        if sig is None:
            self.should_exit = True
        else:  # uvicorn's own handling from here: it exits, then re-raises the signal as servers do
            super().handle_exit(sig, None)


def serve_app(app: Any, sock: socket.socket, log_level: str = "warning") -> GracefulServer:
    """A `GracefulServer` for `app` (made by `create_app`) on a bound socket; run it with `.run(sockets=[sock])`."""
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=1)
    return GracefulServer(config, app.state.gate)


def listen(host: str, port: int) -> tuple[socket.socket, bool]:
    """A socket bound to (host, port) for `dreamlm serve`, and whether it is reachable beyond this machine
    (not loopback); DreamError in one line for an unknown host or a port in use, before any model loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise DreamError(f"cannot listen on {host}: not an address or a known host name ({exc})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        busy = exc.errno == errno.EADDRINUSE
        hint = " (another server is using the port; choose another with --port)" if busy else ""
        raise DreamError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
    return sock, not ipaddress.ip_address(address[0].split("%")[0]).is_loopback


def model_paths(*names: str):
    """Bundled model directories by name."""
    paths = {p.name: p for p in bundled_models()}
    return [paths[name] for name in names]


@contextlib.contextmanager
def live_server(names: tuple[str, ...] = ("tiny-dream", "sudoku4-diffusion"), limits: Limits | None = None,
                models: dict | None = None) -> Iterator[tuple[str, dict]]:
    """Yield (base URL, served models) of a server running on a free port; stopped on exit."""
    limits = limits or Limits(max_tokens=128, max_n=8, max_steps=256, timeout=60)
    models = models if models is not None else load_models(model_paths(*names), limits)
    app = create_app(models, limits)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = serve_app(app, sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", models
    finally:
        server.request_exit()
        thread.join(timeout=limits.grace + 5)
        sock.close()
