"""Two real vLLM CPU engines in a pool (NixlConnector, kv_role kv_both, from
`launchers/disagg.sh --pool 2`): a request prefilled on A and decoded on B, one the other way
round, and a short one served whole. Each disaggregated request's KV pull shows on the
decoding engine's own /metrics (and not on the other's), and every answer equals the one an
engine gives directly. The direction is set through the admin API (`PUT /admin/pool`), as an
operator would pin it; the controller is paused meanwhile.

vLLM 0.32 logs kv_both with the NixlConnector as deprecated ("set kv_producer for prefill
instances and kv_consumer for decode instances"); the direction of each transfer is already
per request (kv_transfer_params), and kv_both keeps both roles' precautions on (a consumer
defers freeing blocks a load might still write).

The proxy's health checks are off here. These tests name the engine each request must go to;
on a starved 2-core box an engine's /health can take over 10 s (both engines' processes and
the proxy share two cores), and the proxy rightly takes that engine off its side until a check
passes again, which would send the request elsewhere. Health checks have tests of their own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from real_vllm_fixtures import (
    LAUNCHER,
    STARVED_BOX_STALL,
    _pdproxy_cmd,
    _wait_ready,
    start_logged,
)
from vllm_helpers import Topology, metric, wait_metric

pytestmark = [pytest.mark.real_vllm, pytest.mark.own_topology]

XFER = "vllm:nixl_xfer_time_seconds_count"
PROXY_PORT, POOL_PORT, SIDE_CHANNEL_PORT = 19300, 17600, 15900
ENGINES = [f"http://127.0.0.1:{POOL_PORT + i}" for i in range(2)]
LONG = " ".join(
    [
        "A pool engine prefills for another engine one moment and decodes the next.",
        "The proxy decides per request which engine computes the prompt and which answers.",
    ]
    * 5
)


@pytest.fixture(scope="module")
def pool(
    vllm_python: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Topology]:
    log_dir = tmp_path_factory.mktemp("pool-logs")
    config = log_dir / "proxy.yaml"
    config.write_text(
        "pool_planner: {min_prefill_tokens: 32}\n"
        f"health: {{interval: 0, {STARVED_BOX_STALL}}}\n"
        "stats: {interval: 0}\n"
        "timeouts: {connect: 30, prefill: 300, decode_first_byte: 300}\n"
    )
    output = log_dir / "launcher.out"
    args = [
        "bash", str(LAUNCHER), "--device", "cpu", "--pool", "2", "--model", str(tiny_model),
        "--python", vllm_python, "--proxy-cmd", _pdproxy_cmd(), "--log-dir", str(log_dir),
        "--proxy-port", str(PROXY_PORT), "--pool-port", str(POOL_PORT),
        "--side-channel-port", str(SIDE_CHANNEL_PORT), "--proxy-args", f"--config {config}",
        "--", "--served-model-name", Topology.model, "--max-model-len", "1024",
    ]  # fmt: skip
    proc = start_logged(args, output)
    topo = Topology(
        proc, log_dir, output, tiny_model, vllm_python, f"http://127.0.0.1:{PROXY_PORT}"
    )
    try:
        _wait_ready(topo)
        yield topo
    finally:
        topo.stop()
        topo.kill_leftovers()


def completion(url: str, prompt: str, timeout: float = 300) -> dict[str, Any]:
    body = {"model": Topology.model, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    resp = httpx.post(url + "/v1/completions", json=body, timeout=timeout)
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


def lean(proxy: str, prefill: str, decode: str) -> None:
    body = {"leans": {prefill: "prefill", decode: "decode"}, "controller": "manual"}
    resp = httpx.put(proxy + "/admin/pool", json=body, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.json()["engines"] == {prefill: "prefill", decode: "decode"}


def last_plan(proxy: str) -> dict[str, Any]:
    data = httpx.get(proxy + "/admin/requests", timeout=10).json()["data"]
    plan: dict[str, Any] = data[-1]["plan"]
    return plan


def engines_state(proxy: str) -> list[dict[str, Any]]:
    """What the proxy knew of each engine (health, breaker, last error), for a failure's message."""
    data = httpx.get(proxy + "/admin/workers", timeout=10).json()["data"]
    keys = ("id", "health", "breaker", "last_error")
    return [{k: w.get(k) for k in keys} for w in data]


def handshake(proxy: str, decoder: str) -> None:
    """One disaggregated request that pulls, before measuring: on a starved CPU the first NIXL
    handshake between two engines can time out (the decoder answers 500 once)."""
    for i in range(5):
        before = metric(decoder, XFER)
        # more tokens than pool_planner.local_max_tokens, or it is answered where computed
        body = {"model": Topology.model, "prompt": f"warm {i}: {LONG}", "max_tokens": 8}
        ok = httpx.post(proxy + "/v1/completions", json=body, timeout=300).status_code == 200
        if ok and wait_metric(decoder, XFER, before + 1, timeout=30) > before:
            return
    raise AssertionError(f"{decoder} never pulled a prompt prefilled on the other engine")


@pytest.mark.parametrize(("prefiller", "decoder"), [(0, 1), (1, 0)], ids=["A->B", "B->A"])
def test_prefilled_on_one_engine_decoded_on_the_other(
    pool: Topology, prefiller: int, decoder: int
) -> None:
    ids = ["b0", "b1"]
    lean(pool.proxy, ids[prefiller], ids[decoder])
    handshake(pool.proxy, ENGINES[decoder])
    prompt = f"request {prefiller}->{decoder}: {LONG}"
    direct = completion(ENGINES[decoder], prompt)["choices"][0]["text"]
    pulls = [metric(url, XFER) for url in ENGINES]
    answer = completion(pool.proxy, prompt)
    plan = last_plan(pool.proxy)
    where = (plan["prefill"], plan["reason"], plan["prefiller"], plan["decoder"])
    assert where == ("remote", "long", ids[prefiller], ids[decoder]), engines_state(pool.proxy)
    assert wait_metric(ENGINES[decoder], XFER, pulls[decoder] + 1) == pulls[decoder] + 1
    assert metric(ENGINES[prefiller], XFER) == pulls[prefiller]  # it computed, it pulled nothing
    assert answer["choices"][0]["text"] == direct


def test_a_short_prompt_is_served_whole_without_a_pull(pool: Topology) -> None:
    lean(pool.proxy, "b0", "b1")
    prompt = "short and sweet"
    direct = completion(ENGINES[1], prompt)["choices"][0]["text"]
    pulls = [metric(url, XFER) for url in ENGINES]
    answer = completion(pool.proxy, prompt)
    plan = last_plan(pool.proxy)
    where = (plan["prefill"], plan["reason"], plan["decoder"])
    assert where == ("local", "short", "b1"), engines_state(pool.proxy)
    time.sleep(1)  # vLLM publishes transfer stats a moment later: nothing may show up
    assert [metric(url, XFER) for url in ENGINES] == pulls
    assert answer["choices"][0]["text"] == direct
