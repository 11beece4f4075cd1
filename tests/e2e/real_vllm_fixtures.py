"""Fixtures for tests against real vLLM (CPU build) started by launchers/disagg.sh.

Skipped unless PDPROXY_VLLM_PYTHON names a python that can import vllm (.ci/setup-vllm.sh
makes one). The 1P1D topology is started once per session, for tests/e2e and tests/protocol
alike (tests/conftest.py registers these fixtures): engines take about a minute.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import httpx
import pytest

if str(Path(__file__).parent) not in sys.path:  # pytest runs in importlib mode
    sys.path.insert(0, str(Path(__file__).parent))

from vllm_helpers import DECODE_PORT, PREFILL_PORT, PROXY_PORT, SIDE_CHANNEL_PORT, Topology

from proxy.engines.connectors.nixl import prefill_body

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launchers" / "disagg.sh"
START_TIMEOUT_S = 600
SECOND_DECODER = f"http://127.0.0.1:{DECODE_PORT + 1}"  # decoder 1 of a 1P2D plan
XFER = "vllm:nixl_xfer_time_seconds_count"
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


ENGINE_SITE = Path(__file__).with_name("engine_site")
# NIXL's progress thread sleeps up to this long when nothing wakes it (engine_site's
# sitecustomize): at NIXL's own 0 each idle engine spins a core, and this box has two.
NIXL_PROGRESS_DELAY_US = "1000"


def engine_env() -> dict[str, str]:
    """The environment of what the tests start around real vLLM: offline, and with NIXL's
    progress thread made to sleep when idle (engine_site/sitecustomize.py says why)."""
    path = os.pathsep.join(p for p in (str(ENGINE_SITE), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=path,
                PDPROXY_NIXL_PROGRESS_DELAY_US=NIXL_PROGRESS_DELAY_US)  # fmt: skip


def start_logged(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """`args` in a session of their own (stopped as a group), output into `log`, in the
    engines' environment (`engine_env`)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=engine_env()
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


def second_decoder_command(topo: Topology) -> str:
    """The launcher's plan for decoder 1 of a 1P2D topology with the session's flags."""
    plan = subprocess.run(
        ["bash", str(LAUNCHER), "--device", "cpu", "--connector", "nixl",
         "--model", str(topo.model_dir), "--python", topo.python, "--prefill", "1",
         "--decode", "2", "--prefill-port", str(PREFILL_PORT), "--decode-port", str(DECODE_PORT),
         "--side-channel-port", str(SIDE_CHANNEL_PORT), "--log-dir", str(topo.log_dir),
         "--dry-run", "--", "--served-model-name", topo.model, "--max-model-len", "1024"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    lines = plan.stdout.splitlines()
    return lines[lines.index(next(x for x in lines if x.startswith("# decode-1:"))) + 1]


@contextmanager
def second_decoder_running(topology: Topology) -> Iterator[subprocess.Popen[bytes]]:
    """Decoder 1 of a 1P2D topology (its own process group), started, warmed up and stopped."""
    command = second_decoder_command(topology)
    url = SECOND_DECODER
    assert f"--port {DECODE_PORT + 1}" in command  # not a port of the session topology
    log = topology.log_dir / "decode-1-joined.log"
    proc = start_logged(["bash", "-c", "exec " + command], log)
    try:
        # a CI-equivalent run's second decoder was not up after 600 s, and the next test's took
        # 46 s to load a tiny model: that was while the session's two idle engines each spun a
        # core in NIXL's progress thread (engine_env now stops that); the deadline stays wide
        deadline = time.monotonic() + 1200
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the second decoder did not start"
            time.sleep(1)
        warm_up(topology, url)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)  # a test may have stopped it
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        wait_group_gone(proc.pid)


def wait_group_gone(pgid: int, timeout: float = 60) -> None:
    """Until no process of the group is left; SIGKILL for the rest after `timeout`. vLLM's
    engine-core and worker processes outlive the API server for a while, and one left behind
    takes memory and, started outside `engine_env`, a core (NIXL's progress thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline + 10:  # zombies of an init that does not reap stay
        try:
            os.killpg(pgid, signal.SIGKILL if time.monotonic() > deadline else 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)


@pytest.fixture
def second_decoder(topology: Topology) -> Iterator[str]:
    """A second decoder's URL, while it runs."""
    with second_decoder_running(topology):
        yield SECOND_DECODER


def pulls(url: str) -> float:
    """The decoder's NIXL transfers so far; a starved engine may take a while to answer."""
    for _ in range(10):
        try:
            resp = httpx.get(url + "/metrics", timeout=30)
        except httpx.TimeoutException:
            continue
        return sum(
            float(line.rpartition(" ")[2])
            for line in resp.text.splitlines()
            if line.startswith(XFER + "{") or line.startswith(XFER + " ")
        )
    raise AssertionError(f"{url}/metrics did not answer")


def warm_up(topo: Topology, url: str) -> None:
    """What an operator's readiness check would do before adding the engine: one request of
    its own, then one prefilled on the prefiller, until one passes (on a starved CPU the first
    NIXL handshake can time out: the decoder answers 500 and tries again on the next)."""
    body = {"model": topo.model, "prompt": "warm up", "max_tokens": 2, "temperature": 0}
    assert httpx.post(url + "/v1/completions", json=body, timeout=300).status_code == 200
    for _ in range(5):
        leg = prefill_body(body)
        prefilled = httpx.post(topo.prefill + "/v1/completions", json=leg, timeout=300).json()
        pulled = {**body, "kv_transfer_params": prefilled["kv_transfer_params"]}
        if httpx.post(url + "/v1/completions", json=pulled, timeout=300).status_code == 200:
            return
    raise AssertionError("the second decoder never pulled a prefilled prompt")
