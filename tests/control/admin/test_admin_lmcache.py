"""Joining over the LMCache connector: the probe's "transfer done" notification must arrive."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Sim, free_port, start_sim
from tests.flow.rig import WIRES, Engines, Topology, start_topology

ARGS = ("--speed-factor", "0.05", "--lmcache-chunk-size", "2")


@pytest.fixture(scope="module")
def rig(logs: Path) -> Iterator[Topology]:
    engines = Engines(logs, WIRES["lmcache"])
    try:
        config = "admin: {probe_timeout: 5}\ndecode_policy: round_robin\n"
        topo = start_topology(engines, "lmc-admin", config=config)
        yield topo
        topo.stop()
    finally:
        engines.stop()


def receiver(logs: Path, name: str) -> tuple[Sim, int, int]:
    init, alloc = free_port(), free_port()
    sim = start_sim(logs, name, "--lmcache-role", "receiver", "--pd-peer-init-port", str(init),
                    "--pd-peer-alloc-port", str(alloc), *ARGS, role="decode")  # fmt: skip
    return sim, init, alloc


def test_a_decoder_joins_once_the_push_into_it_is_reported(logs: Path, rig: Topology) -> None:
    sim, init, alloc = receiver(logs, "lmc-admin-d1")
    try:
        wrong = {"init_ports": [free_port()], "alloc_ports": [free_port()]}  # nobody listens
        resp = httpx.post(
            rig.proxy.url + "/admin/workers",
            json={"url": sim.url, "role": "decode", "lmcache": wrong},
            timeout=30,
        )
        assert resp.status_code == 422, resp.text
        message = resp.json()["error"]["message"]
        assert "admission probe 'kv' failed" in message and "did not report" in message
        resp = httpx.post(
            rig.proxy.url + "/admin/workers",
            json={"url": sim.url, "role": "decode",
                  "lmcache": {"init_ports": [init], "alloc_ports": [alloc]}},
            timeout=30,
        )  # fmt: skip
        assert resp.status_code == 201, resp.text
        joined = resp.json()
        assert "LMCache reported" in joined["last_probe"]["checks"][-1]["detail"]
        body = {"model": "pdsim/llama-8b", "prompt": "word " * 40, "max_tokens": 3}
        for _ in range(4):  # round robin: the new decoder gets half
            assert httpx.post(rig.proxy.url + "/v1/completions", json=body).status_code == 200
        assert sim.metric("pdsim:lmcache_hit_requests_total") >= 2  # the probe's and a client's
    finally:
        sim.stop()


def test_a_prefiller_that_reports_elsewhere_is_refused(logs: Path, rig: Topology) -> None:
    elsewhere = start_sim(logs, "lmc-admin-p1", "--lmcache-role", "sender", "--pd-proxy-port",
                          str(free_port()), *ARGS, role="prefill")  # fmt: skip
    try:
        resp = httpx.post(
            rig.proxy.url + "/admin/workers",
            json={"url": elsewhere.url, "role": "prefill"},
            timeout=30,
        )
        assert resp.status_code == 422, resp.text
        message = resp.json()["error"]["message"]
        assert "did not report its LMCache KV transfer" in message
        assert "pd_proxy_host/pd_proxy_port" in message
    finally:
        elsewhere.stop()
