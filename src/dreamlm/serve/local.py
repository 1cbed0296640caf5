"""A real uvicorn server on 127.0.0.1 in a background thread: what the serve bench and the tests run against."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import threading
import time
from typing import Iterator

import uvicorn

from dreamlm.errors import DreamError
from dreamlm.serve.app import Limits, bundled_models, create_app, load_models


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
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
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
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
