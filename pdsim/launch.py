"""Starting simulated engines and proxies as processes on 127.0.0.1, for the demo, the tests and
the benchmarks. Each process runs in its own session and is stopped by its PID (process group)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Collection, Sequence
from contextlib import closing, suppress
from dataclasses import dataclass, field
from pathlib import Path

EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_ports() -> range:
    """The ports the kernel hands out for bind(0) and outgoing connections (Linux's range, or
    the IANA one elsewhere)."""
    with suppress(OSError, ValueError):
        low, high = map(int, EPHEMERAL.read_text().split())
        return range(low, high + 1)
    return range(49152, 65536)


def free_port(besides: Collection[int] = ()) -> int:
    """A port on 127.0.0.1 that nothing listens on now, for a server started next. Taken at random
    from 20000 up to the kernel's ephemeral range (fixed ports, such as the launcher's and the
    tests', stay below 20000): a port that the kernel can hand out by itself (to another server
    binding port 0, or to an outgoing connection) could be gone by the time the server binds it,
    and so could a port two calls in a row returned. `besides`: ports already promised to the
    server being started (free now, bound only once it runs), which must not be returned again."""
    below = ephemeral_ports().start
    candidates = range(20000, below) if below > 21000 else range(1024, below)
    for _ in range(200):
        port = random.choice(candidates) if len(candidates) else 0
        with closing(socket.socket()) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            found: int = sock.getsockname()[1]
            if found in besides:
                continue
            return found
    raise OSError("no free port on 127.0.0.1 below the ephemeral range")


def http_status(url: str) -> int:
    """The status of a GET, 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@dataclass
class Process:
    """A process serving on `url`, started with `args` (for `spawn`: `python -m proxy ARGS`)."""

    url: str
    args: list[str]
    log: Path | None
    proc: subprocess.Popen[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):  # it ended since the poll
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def kill(self) -> None:
        """kill -9, as a crash."""
        self.stop(signal.SIGKILL)


def spawn(
    args: Sequence[str],
    url: str,
    log: Path | None = None,
    ready_path: str = "/health",
    timeout: float = 30.0,
) -> Process:
    """Start `python -m proxy ARGS` and wait until `url + ready_path` answers below 500."""
    out = log.open("ab") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    process = Process(url, list(args), log, proc)
    try:
        wait_ready(process, ready_path, timeout, " ".join(args))
    except RuntimeError:
        process.stop()
        raise
    return process


def wait_ready(process: Process, ready_path: str, timeout: float, what: str, tail: int = 0) -> None:
    """Wait until `process.url + ready_path` answers below 500. If the process exits first or
    `timeout` passes, raise RuntimeError naming `what`, with its log (the last `tail` characters
    when `tail` is set)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            problem = f"exited {process.proc.returncode}"
            break
        if 0 < http_status(process.url + ready_path) < 500:
            return
        time.sleep(0.05)
    else:
        problem = f"not ready after {timeout:g}s"
    text = process.log_text()
    raise RuntimeError(f"{what} {problem}:\n{text[-tail:] if tail else text}")


@dataclass
class SimProcess(Process):
    side_channel_port: int = 0

    def restart(self) -> None:
        """Start again on the same ports (after a crash or a stop)."""
        self.stop()
        fresh = spawn(self.args, self.url, self.log)
        self.proc = fresh.proc


def start_sim(
    role: str = "both",
    *args: str,
    port: int = 0,
    log: Path | None = None,
    besides: Collection[int] = (),
) -> SimProcess:
    """A simulated engine; `besides`: ports its arguments already name (a replay endpoint), which
    its HTTP and side-channel ports must not take."""
    port = port or free_port(besides)
    side = free_port({*besides, port})
    cmd = ["sim", "--role", role, "--port", str(port), "--side-channel-port", str(side), *args]
    process = spawn(cmd, f"http://127.0.0.1:{port}", log)
    return SimProcess(process.url, process.args, process.log, process.proc, side)


def start_proxy(
    prefill: Sequence[str],
    decode: Sequence[str],
    *args: str,
    port: int = 0,
    log: Path | None = None,
) -> Process:
    port = port or free_port()
    cmd = ["serve", "--port", str(port), *args]
    for url in prefill:
        cmd += ["--prefill", url]
    for url in decode:
        cmd += ["--decode", url]
    return spawn(cmd, f"http://127.0.0.1:{port}", log, ready_path="/metrics")
