"""Shared pieces of the benchmarks: pinned processes, CPU accounting, a streaming SSE client,
percentiles, and the provenance block every result file carries.

Processes are started in their own session, pinned with `taskset`, and stopped by their PID.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from pdsim.launch import Process, free_port, wait_ready
from proxy import __version__

MODEL = "pdsim/llama-8b"
RESULTS = Path(__file__).resolve().parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def worktree(ref: str, logdir: Path) -> Path:
    """A checkout of `ref` (git worktree, detached) to run a baseline proxy from."""
    path = logdir / f"src-{ref.replace('/', '_')}"
    repo = Path(__file__).resolve().parent.parent
    subprocess.run(
        ["git", "-C", str(repo), "worktree", "add", "--detach", "-f", str(path), ref],
        check=True,
        capture_output=True,
    )
    return path


def drop_worktree(path: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    subprocess.run(
        ["git", "-C", str(repo), "worktree", "remove", "--force", str(path)], capture_output=True
    )


@dataclass
class Proc(Process):
    """A process a benchmark started: a sim, a proxy or a router, by name."""

    name: str = ""


@dataclass
class Procs:
    """Every process a benchmark started; `stop_all` ends them by PID (process group)."""

    logdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        url: str,
        cpus: str | None,
        ready: str = "/health",
        timeout: float = 120.0,
        src: Path | None = None,
    ) -> Proc:
        """Start `argv` pinned to `cpus`; with `src`, Python imports `proxy` from that tree."""
        log = self.logdir / f"{name}.log"
        cmd = (["taskset", "-c", cpus] if cpus else []) + list(argv)
        env = {**os.environ, "PYTHONPATH": str(src)} if src else None
        with log.open("wb") as out:
            popen = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=src,
            )
        proc = Proc(url, list(argv), log, popen, name)
        self.procs.append(proc)
        wait_ready(proc, ready, timeout, name, tail=2000)
        return proc

    def sim(self, name: str, cpus: str | None, *args: str) -> Proc:
        port, side = free_port(), free_port()
        argv = [sys.executable, "-m", "proxy", "sim", "--port", str(port)]
        argv += ["--side-channel-port", str(side), "--log-level", "WARNING", *args]
        return self.start(name, argv, f"http://127.0.0.1:{port}", cpus)

    def pdproxy(
        self,
        name: str,
        cpus: str | None,
        prefill: Sequence[str],
        decode: Sequence[str],
        *args: str,
        src: Path | None = None,
    ) -> Proc:
        port = free_port()
        argv = [sys.executable, "-m", "proxy", "serve", "--port", str(port), *args]
        for url in prefill:
            argv += ["--prefill", url]
        for url in decode:
            argv += ["--decode", url]
        url = f"http://127.0.0.1:{port}"
        return self.start(name, argv, url, cpus, ready="/metrics", src=src)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


def pd_router_argv(
    program: Sequence[str],
    prefill: Sequence[str],
    decode: Sequence[str],
    port: int,
    policy: str,
    log_level: str,
) -> list[str]:
    """A PD router's command line: the flags vllm-router and sglang-router share."""
    argv = list(program)
    for url in prefill:
        argv += ["--prefill", url]
    for url in decode:
        argv += ["--decode", url]
    argv += ["--port", str(port), "--policy", policy, "--log-level", log_level]
    return [*argv, "--prometheus-port", str(free_port())]


def vllm_router_argv(
    binary: Path, prefill: Sequence[str], decode: Sequence[str], port: int, policy: str
) -> list[str]:
    """`vllm-router` in its NIXL PD mode, with admission limits well above any benchmark's."""
    program = [str(binary), "--vllm-pd-disaggregation", "--kv-connector", "nixl"]
    argv = pd_router_argv(program, prefill, decode, port, policy, "warning")
    return [*argv, "--max-concurrent-requests", "4096", "--queue-size", "4096"]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    kids = [int(p) for p in text.split()]
    return kids + [g for k in kids for g in _children(k)]


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process and its live descendants (all threads), in seconds."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def chat_body(prompt: str, max_tokens: int, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": stream,
        "ignore_eos": True,
        **extra,
    }


@dataclass(slots=True)
class Sample:
    """One streamed request as the client saw it (seconds from its start)."""

    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    events: int = 0
    tokens: int = 0
    itl: float = 0.0  # mean gap between token events after the first
    error: str = ""


_TOKEN_MARKS = (b'"content":"', b'"text":"')


def _token_events(data: bytes) -> int:
    """How many SSE events in `data` carry generated text (not a role header, not usage)."""
    n = 0
    for mark in _TOKEN_MARKS:
        start = 0
        while (i := data.find(mark, start)) >= 0:
            start = i + len(mark)
            if data[start : start + 1] != b'"':
                n += 1
    return n


async def stream_once(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    start: float | None = None,
) -> Sample:
    """POST a streaming request and read it to the end. TTFT is the first event with generated
    text, as `vllm bench serve` measures it; `start` lets a caller include earlier legs."""
    t0 = time.perf_counter() if start is None else start
    first = last = 0.0
    events = tokens = 0
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                return Sample(False, error=f"{resp.status} {(await resp.read())[:200]!r}")
            done = False
            async for data in resp.content.iter_any():
                now = time.perf_counter()
                events += data.count(b"\n\n")
                n = _token_events(data)
                if n:
                    if not first:
                        first = now
                    last = now
                    tokens += n
                if b"data: [DONE]" in data:
                    done = True
            end = time.perf_counter()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return Sample(False, error=f"{type(exc).__name__}: {exc}")
    if not done or not first:
        return Sample(False, error="stream ended without tokens or [DONE]")
    itl = (last - first) / (tokens - 1) if tokens > 1 else 0.0
    return Sample(True, first - t0, end - t0, events, tokens, itl)


def new_session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=60),
        timeout=aiohttp.ClientTimeout(total=600),
        headers={"Content-Type": "application/json"},
        skip_auto_headers=("User-Agent",),
    )


def provenance(command: Sequence[str]) -> dict[str, Any]:
    def pkg(name: str) -> str:
        try:
            from importlib.metadata import version

            return version(name)
        except Exception:
            return "-"

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(command),
        "pdproxy": __version__,
        "python": platform.python_version(),
        "packages": {p: pkg(p) for p in ("aiohttp", "uvicorn", "uvloop", "httptools", "orjson")},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {_cpu_model()}, "
        f"{_mem_gib():.0f} GiB, {platform.platform()}",
    }


def provenance_lines(prov: dict[str, Any]) -> list[str]:
    """The command, date, versions and machine, as the first lines of a results file."""
    return [
        f"- command: `{prov['command']}`",
        f"- date: {prov['date']}; pdproxy {prov['pdproxy']}, Python {prov['python']}; "
        + ", ".join(f"{k} {v}" for k, v in prov["packages"].items()),
        f"- machine: {prov['machine']}",
    ]


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _mem_gib() -> float:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def pin_self(cpus: set[int]) -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(0, cpus)
