"""A decoder joins and leaves a real-vLLM topology under streaming load. The test starts a
second decoder (the launcher's own command line for decoder 1, on ports the session topology
does not use) and a proxy of its own in front of the session's engines; it adds the decoder
through the admin API (its probe must show a real NIXL pull), sees it take client traffic,
removes it, and checks that no request was lost and that it got nothing after its removal."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from real_vllm_fixtures import STARVED_BOX_STALL, STARVED_BOX_TIMEOUTS, pulls
from vllm_helpers import Topology

from pdsim.launch import start_proxy
from tests.control.admin.helpers import Load

pytestmark = pytest.mark.real_vllm


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
        # a starved box's NIXL pulls took 63 s on average (90th percentile 95 s) in one CI run,
        # and three requests of two clients need two of them one after the other
        deadline = time.monotonic() + 300
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
        # three more requests of two clients, two of them one after the other, as at the start
        # (a CI run saw 180 s pass here)
        deadline = time.monotonic() + 300
        while load.count() < done + 3:
            assert time.monotonic() < deadline, "the load stopped after the removal"
            time.sleep(0.5)
    assert load.lost() == [], load.lost()[:3]
    assert load.tally()["clear_error"] == 0, load.outcomes[:5]
    assert pulls(second_decoder) == after_removal  # no traffic after its removal
    assert [w["id"] for w in httpx.get(admin, timeout=10).json()["data"]] == ["p0", "d0"]
