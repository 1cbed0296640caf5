"""Run model-written Python in a separate, limited process: the function-body and chat benches (and rewards) use it.

Limits: a wall-clock timeout (the process group is killed), CPU seconds, address space, file size and open files
(rlimits), an empty temporary working directory removed afterwards, no inherited environment, isolated mode (-I:
no user site, no PYTHON* variables), and an audit hook installed before the code runs that refuses network use,
starting processes and opening files for writing outside the temporary directory. The hook cannot be removed by the
code it watches. This keeps honest mistakes and most misbehaviour in; it is not a security boundary against a
determined attacker (use a container for that).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

_GUARD = r'''
import sys, os
_ROOT = os.path.realpath(os.getcwd())
def _guard(event, args):
    if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo", "subprocess.Popen",
                 "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "pty.spawn",
                 "ctypes.dlopen", "os.kill", "os.putenv"):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and len(args) > 1 and isinstance(args[1], str) and any(c in args[1] for c in "wax+"):
        path = os.path.realpath(str(args[0])) if not isinstance(args[0], int) else _ROOT
        if not (path == _ROOT or path.startswith(_ROOT + os.sep)):
            raise PermissionError("sandbox: writing outside the working directory is not allowed")
    if event in ("os.remove", "os.rename", "os.rmdir", "shutil.rmtree", "os.mkdir", "os.chmod"):
        path = os.path.realpath(str(args[0]))
        if not (path == _ROOT or path.startswith(_ROOT + os.sep)):
            raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")
sys.addaudithook(_guard)
del _guard
'''


@dataclass
class RunResult:
    """What a sandboxed run did: ok (exit 0 in time), the exit code (None on timeout), its output's tail."""

    ok: bool
    returncode: int | None
    output: str
    timed_out: bool = False


def _limits(cpu_seconds: int, memory_bytes: int) -> None:
    os.setsid()  # its own process group, so a timeout kills everything it started
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def run_python(code: str, timeout: float = 5.0, memory_mb: int = 512) -> RunResult:
    """Run `code` with the limits above; never raises for anything the code does."""
    with tempfile.TemporaryDirectory(prefix="dreamlm-sandbox-") as tmp:
        script = Path(tmp) / "main.py"
        script.write_text(code, encoding="utf-8", errors="surrogatepass")
        runner = _GUARD + "\nimport runpy\nrunpy.run_path('main.py', run_name='__main__')\n"
        cpu = max(1, int(timeout) + 1)
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-c", runner], cwd=tmp, env={"PATH": "/usr/bin:/bin"},
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    preexec_fn=lambda: _limits(cpu, memory_mb << 20))
        except OSError as exc:
            return RunResult(False, None, f"could not start: {exc}")
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            out, _ = proc.communicate()
            return RunResult(False, None, out.decode("utf-8", "replace")[-2000:], timed_out=True)
        return RunResult(proc.returncode == 0, proc.returncode, out.decode("utf-8", "replace")[-2000:])
