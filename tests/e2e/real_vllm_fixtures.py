"""Fixtures for tests against real vLLM (CPU build) started by launchers/disagg.sh.

Skipped unless PDPROXY_VLLM_PYTHON names a python that can import vllm (.ci/setup-vllm.sh
makes one). The 1P1D topology is started once per session, for tests/e2e and tests/protocol
alike (tests/conftest.py registers these fixtures): engines take about a minute.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

if str(Path(__file__).parent) not in sys.path:  # pytest runs in importlib mode
    sys.path.insert(0, str(Path(__file__).parent))

from vllm_helpers import DECODE_PORT, PREFILL_PORT, PROXY_PORT, SIDE_CHANNEL_PORT, Topology

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launchers" / "disagg.sh"
START_TIMEOUT_S = 600
# Two CPU cores for two or three vLLM engines, the proxy and the tests: an engine can take
# seconds to accept a connection (a CI run saw a decoder miss the default 5 s), so the proxies
# in front of real engines wait longer for one. A CI run also saw an engine's worker hang for
# 60 s (vLLM: "No available shared memory broadcast block found in 60 seconds") while a new
# decoder's first NIXL pulls ran, so every decoder completed nothing for a minute: the stall watch
# (health.stall_timeout, 60 s by default, made for a GPU host) would take them all out.
STARVED_BOX_TIMEOUTS = "timeouts: {connect: 30}\n"
STARVED_BOX_STALL = "stall_timeout: 300"


def _unavailable(reason: str) -> NoReturn:
    """Skip, unless PDPROXY_REQUIRE_REAL_VLLM is set (CI): then a missing engine is a failure."""
    if os.environ.get("PDPROXY_REQUIRE_REAL_VLLM"):
        pytest.fail(reason)
    pytest.skip(reason)


def _vllm_python() -> str:
    python = os.environ.get("PDPROXY_VLLM_PYTHON", "")
    if not python:
        _unavailable("real vLLM tests need PDPROXY_VLLM_PYTHON (see .ci/setup-vllm.sh)")
    if not Path(python).exists():
        _unavailable(f"PDPROXY_VLLM_PYTHON={python} does not exist")
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, timeout=120)
    if probe.returncode != 0:
        _unavailable(f"PDPROXY_VLLM_PYTHON={python} cannot import vllm")
    return python


@pytest.fixture(scope="session")
def vllm_python() -> str:
    return _vllm_python()


@pytest.fixture(scope="session")
def tiny_model(vllm_python: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Llama (fixed seed) with a BPE tokenizer trained on the fly."""
    out = tmp_path_factory.mktemp("model")
    subprocess.run(
        [vllm_python, str(Path(__file__).with_name("make_model.py")), str(out)],
        check=True,
        capture_output=True,
        timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    return out


def _wait_ready(topo: Topology) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        text = topo.output.read_text(errors="replace")
        if "[disagg] supervising" in text:
            return
        if topo.proc.poll() is not None:
            raise RuntimeError(f"launcher exited {topo.proc.returncode}:\n{text[-6000:]}")
        time.sleep(1)
    raise RuntimeError(f"topology not ready in {START_TIMEOUT_S}s:\n{text[-6000:]}")


def start_logged(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """`args` in a session of their own (stopped as a group), offline, output into `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
        )


def _pdproxy_cmd() -> str:
    beside = Path(sys.executable).with_name("pdproxy")
    return str(beside) if beside.exists() else "pdproxy"


@pytest.fixture(scope="session")
def topology(
    vllm_python: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Topology]:
    log_dir = tmp_path_factory.mktemp("disagg-logs")
    output = log_dir / "launcher.out"
    config = log_dir / "proxy.yaml"
    config.write_text(STARVED_BOX_TIMEOUTS + f"health: {{{STARVED_BOX_STALL}}}\n")
    args = [
        "bash", str(LAUNCHER), "--device", "cpu", "--connector", "nixl",
        "--model", str(tiny_model), "--python", vllm_python, "--proxy-cmd", _pdproxy_cmd(),
        "--proxy-args", f"--config {config}",
        "--log-dir", str(log_dir), "--proxy-port", str(PROXY_PORT),
        "--prefill-port", str(PREFILL_PORT), "--decode-port", str(DECODE_PORT),
        "--side-channel-port", str(SIDE_CHANNEL_PORT),
        "--", "--served-model-name", Topology.model, "--max-model-len", "1024",
        "--scheduling-policy", "priority",
    ]  # fmt: skip
    proc = start_logged(args, output)
    topo = Topology(proc, log_dir, output, tiny_model, vllm_python)
    try:
        _wait_ready(topo)
        yield topo
    finally:
        topo.stop()
        topo.kill_leftovers()
