"""Shared by the real-vLLM fixtures and tests: the running topology and metric reading."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

# Ports away from the launcher's defaults, so a topology a developer runs does not clash.
PROXY_PORT, PREFILL_PORT, DECODE_PORT, SIDE_CHANNEL_PORT = 19100, 17100, 17200, 15600


@dataclass
class Topology:
    """A running launchers/disagg.sh and the addresses of what it started."""

    proc: subprocess.Popen[bytes]
    log_dir: Path
    output: Path
    model_dir: Path
    python: str
    proxy: str = f"http://127.0.0.1:{PROXY_PORT}"
    prefill: str = f"http://127.0.0.1:{PREFILL_PORT}"
    decode: str = f"http://127.0.0.1:{DECODE_PORT}"
    model: str = "tiny"

    def started_pids(self) -> dict[str, int]:
        pids: dict[str, int] = {}
        for line in (self.log_dir / "pids").read_text().splitlines():
            name, pid = line.split()
            pids[name] = int(pid)
        return pids

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def kill_leftovers(self) -> None:
        """Last resort after a failed test: kill every process group the launcher started."""
        for pid in self.started_pids().values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def metrics(url: str) -> str:
    """An engine's /metrics text."""
    resp = httpx.get(url + "/metrics", timeout=60)  # a starved CI box once took over 10 s
    assert resp.status_code == 200
    return resp.text


def metric(url: str, name: str, text: str | None = None) -> float:
    """Sum of all samples of one Prometheus metric (all label sets) on an engine's /metrics, or
    in `text` already read from it."""
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return sum(float(v) for v in pattern.findall(text if text is not None else metrics(url)))


def wait_metric(url: str, name: str, at_least: float, timeout: float = 10) -> float:
    """The metric's value once it reaches `at_least` (or after `timeout`: the caller asserts)."""
    deadline = time.monotonic() + timeout
    value = metric(url, name)
    while value < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
        value = metric(url, name)
    return value
