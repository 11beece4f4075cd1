"""A decoder joins and leaves a real-vLLM topology under streaming load. The test starts a
second decoder (the launcher's own command line for decoder 1, on ports the session topology
does not use) and a proxy of its own in front of the session's engines; it adds the decoder
through the admin API (its probe must show a real NIXL pull), sees it take client traffic,
removes it, and checks that no request was lost and that it got nothing after its removal."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from real_vllm_fixtures import STARVED_BOX_STALL, STARVED_BOX_TIMEOUTS, start_logged
from vllm_helpers import DECODE_PORT, PREFILL_PORT, SIDE_CHANNEL_PORT, Topology

from pdsim.launch import start_proxy
from proxy.engines.connectors.nixl import prefill_body
from tests.control.admin.helpers import Load

pytestmark = pytest.mark.real_vllm

XFER = "vllm:nixl_xfer_time_seconds_count"
REPO = Path(__file__).resolve().parents[2]


def second_decoder_command(topo: Topology) -> str:
    """The launcher's plan for decoder 1 of a 1P2D topology with the session's flags."""
    plan = subprocess.run(
        ["bash", str(REPO / "launchers" / "disagg.sh"), "--device", "cpu", "--connector", "nixl",
         "--model", str(topo.model_dir), "--python", topo.python, "--prefill", "1",
         "--decode", "2", "--prefill-port", str(PREFILL_PORT), "--decode-port", str(DECODE_PORT),
         "--side-channel-port", str(SIDE_CHANNEL_PORT), "--log-dir", str(topo.log_dir),
         "--dry-run", "--", "--served-model-name", topo.model, "--max-model-len", "1024"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    lines = plan.stdout.splitlines()
    return lines[lines.index(next(x for x in lines if x.startswith("# decode-1:"))) + 1]


@pytest.fixture
def second_decoder(topology: Topology) -> Iterator[str]:
    command = second_decoder_command(topology)
    url = f"http://127.0.0.1:{DECODE_PORT + 1}"
    assert f"--port {DECODE_PORT + 1}" in command  # not a port of the session topology
    log = topology.log_dir / "decode-1-joined.log"
    proc = start_logged(["bash", "-c", "exec " + command], log)
    try:
        deadline = time.monotonic() + 600
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
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


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


@pytest.fixture
def proxy(topology: Topology, tmp_path: Path) -> Iterator[str]:
    """A proxy of this test's own (a free port) in front of the session's prefiller and
    decoder, with probe deadlines for a 2-core box running three CPU engines."""
    config = tmp_path / "proxy.yaml"
    config.write_text(
        "admin: {probe_timeout: 300, probe_pull_wait: 30}\n"  # a CI run saw 120 s pass
        f"health: {{timeout: 10, {STARVED_BOX_STALL}}}\n"
        "stats: {interval: 0}\n"
        "drain_timeout: 150\n"  # a request on the starved box can outlast the default 30 s
        + STARVED_BOX_TIMEOUTS
    )
    started = start_proxy(
        [topology.prefill], [topology.decode], "--config", str(config),
        log=topology.log_dir / "proxy-join.log",
    )  # fmt: skip
    try:
        yield started.url
    finally:
        started.stop()


def test_a_decoder_joins_and_leaves_under_load(
    topology: Topology, second_decoder: str, proxy: str
) -> None:
    admin = proxy + "/admin/workers"
    before = [w["id"] for w in httpx.get(admin, timeout=10).json()["data"]]
    assert before == ["p0", "d0"]
    with Load(proxy, clients=2, max_tokens=24, model=topology.model) as load:
        deadline = time.monotonic() + 120
        while load.count() < 3:
            assert time.monotonic() < deadline, "no request finished"
            time.sleep(0.5)
        resp = httpx.post(admin, json={"url": second_decoder, "role": "decode"}, timeout=600)
        assert resp.status_code == 201, resp.text
        joined = resp.json()
        assert joined["model"] == topology.model
        kv = joined["last_probe"]["checks"][-1]
        assert kv["name"] == "kv" and "pulled the probe's KV from p0" in kv["detail"]
        probe_pulls = pulls(second_decoder)
        assert probe_pulls >= 1
        deadline = time.monotonic() + 180
        while pulls(second_decoder) < probe_pulls + 2:  # clients' KV pulled there too
            assert time.monotonic() < deadline, "the new decoder got no client traffic"
            time.sleep(1)
        resp = httpx.delete(f"{admin}/{joined['id']}", timeout=10)
        assert resp.status_code == 202 and resp.json()["state"] == "draining"
        deadline = time.monotonic() + 180
        while httpx.get(f"{admin}/{joined['id']}", timeout=10).json()["state"] != "removed":
            assert time.monotonic() < deadline, "the decoder was not removed"
            time.sleep(0.5)
        after_removal = pulls(second_decoder)
        done = load.count()
        deadline = time.monotonic() + 180
        while load.count() < done + 3:
            assert time.monotonic() < deadline, "the load stopped after the removal"
            time.sleep(0.5)
    assert load.lost() == [], load.lost()[:3]
    assert load.tally()["clear_error"] == 0, load.outcomes[:5]
    assert pulls(second_decoder) == after_removal  # no traffic after its removal
    assert [w["id"] for w in httpx.get(admin, timeout=10).json()["data"]] == ["p0", "d0"]
