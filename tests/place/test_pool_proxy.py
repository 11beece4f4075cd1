"""A pool of simulated kv_both engines behind the proxy, over real sockets: the plan's choices
as the engines saw them (which legs each got, the pulls in their own metrics), the controller
moving leans under load, the admin API, failover, and colocated mode."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL, Proxy, Sim, running, sse_events, start_proxy, start_sim, wait_for
from tests.procs.clients import pinned_clients

WORDS = "the river turned toward the sea before the city and the people knew its water well"
LONG = " ".join([WORDS] * 40)  # ~680 tokens
PULLS = "vllm:nixl_xfer_time_seconds_count"


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Sim]]:
    logs = tmp_path_factory.mktemp("pool")
    started = [start_sim(logs, f"b{i}", "--speed-factor", "0.05") for i in range(3)]
    try:
        yield started
    finally:
        for sim in started:
            sim.stop()


@pytest.fixture
def pool(engines: list[Sim]) -> list[Sim]:
    for sim in engines:
        sim.reset()
    return engines


def config(tmp: Path, **keys: Any) -> str:
    path = tmp / f"pool-{len(list(tmp.iterdir()))}.yaml"
    path.write_text(json.dumps(keys))
    return str(path)


def start_pool_proxy(tmp: Path, engines: list[Sim], workers: int = 1, **keys: Any) -> Proxy:
    planner = {
        "interval": 0.1,
        "hold": 1,
        "min_dwell": 0.0,
        "window": 3.0,
        **keys.pop("planner", {}),
    }
    cfg = config(tmp, pool=[e.url for e in engines], pool_planner=planner, **keys)
    return start_proxy(tmp, [], [], "--config", cfg, workers=workers)


def complete(
    proxy: Proxy, prompt: str, max_tokens: int = 8, stream: bool = False, **extra: Any
) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": stream, **extra}
    resp = httpx.post(proxy.url + "/v1/completions", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp


def set_leans(proxy: Proxy, leans: dict[str, str], controller: str = "manual") -> dict[str, Any]:
    resp = httpx.put(proxy.url + "/admin/pool", json={"leans": leans, "controller": controller})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def legs(sim: Sim) -> list[dict[str, Any]]:
    return sim.generation_records()


def test_short_prompts_are_served_whole_and_long_ones_split(
    tmp_path: Path, pool: list[Sim]
) -> None:
    b0, b1, b2 = pool
    with running(start_pool_proxy(tmp_path, pool)) as proxy:
        set_leans(proxy, {"b0": "prefill", "b1": "decode", "b2": "decode"})
        complete(proxy, "hello there")
        assert legs(b0) == []  # short: one decode-side engine does all of it
        [whole] = legs(b1) + legs(b2)
        assert "kv_transfer_params" not in whole["body"]

        direct = complete_direct(b2, LONG)
        for sim in pool:
            sim.reset()
        answer = complete(proxy, LONG).json()
        [prefill] = legs(b0)
        assert prefill["body"]["max_tokens"] == 1
        assert prefill["body"]["kv_transfer_params"]["do_remote_decode"] is True
        [decode] = legs(b1) + legs(b2)
        assert decode["body"]["kv_transfer_params"]["do_remote_prefill"] is True
        decoder = b1 if legs(b1) else b2
        assert decoder.metric(PULLS) == 1 and b0.metric(PULLS) == 0
        assert answer["choices"][0]["text"] == direct["choices"][0]["text"]

        total = proxy.metrics().total
        assert total("pdproxy_disagg_decisions_total", decision="local", reason="short") == 1
        assert total("pdproxy_disagg_decisions_total", decision="remote", reason="long") == 1
        assert total("pdproxy_kv_recompute_total") == 0

        # the timeline of each says what the plan was
        recent = httpx.get(proxy.url + "/admin/requests").json()["data"]
        plans = [
            (t["plan"]["prefill"], t["plan"]["reason"], t["plan"]["prefiller"]) for t in recent
        ]
        assert plans == [("local", "short", None), ("remote", "long", "b0")]
        assert recent[1]["plan"]["tokens"] > 512 and recent[1]["kv"] == "handed_over"


def complete_direct(sim: Sim, prompt: str) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8}
    data: dict[str, Any] = httpx.post(sim.url + "/v1/completions", json=body, timeout=30).json()
    return data


def test_either_engine_prefills_for_the_other(tmp_path: Path, pool: list[Sim]) -> None:
    b0, b1, _ = pool
    with running(start_pool_proxy(tmp_path, pool[:2])) as proxy:
        set_leans(proxy, {"b0": "prefill", "b1": "decode"})
        complete(proxy, LONG, stream=True)
        assert b1.metric(PULLS) == 1 and len(legs(b0)) == 1
        set_leans(proxy, {"b0": "decode", "b1": "prefill"})  # the other way round
        # (another prompt: the same one is cached on both now, and would be served whole)
        events = sse_events(complete(proxy, "again: " + LONG, stream=True).content)
        assert events[-1] == "[DONE]"
        assert b0.metric(PULLS) == 1 and b1.metric(PULLS) == 1
        assert [r["body"]["max_tokens"] for r in legs(b1)] == [8, 1]


def test_no_prompt_counts_as_cached_on_engines_without_a_prefix_cache(
    tmp_path: Path, pool: list[Sim]
) -> None:
    b0, b1, _ = pool  # sims keep no prefix cache unless --enable-prefix-caching, and say so
    with running(start_pool_proxy(tmp_path, pool[:2])) as proxy:
        set_leans(proxy, {"b0": "prefill", "b1": "decode"})
        deadline = time.monotonic() + 10
        while any(w["prefix_caching"] is not False for w in proxy.stats()["workers"]["pool"]):
            assert time.monotonic() < deadline, "the engines' cache_config_info was never read"
            time.sleep(0.05)
        complete(proxy, LONG)
        complete(proxy, LONG)  # the same prompt: nothing of it is kept on b1
        assert b1.metric(PULLS) == 2 and len(legs(b0)) == 2
        reasons = [
            t["plan"]["reason"] for t in httpx.get(proxy.url + "/admin/requests").json()["data"]
        ]
        assert reasons == ["long", "long"]


@pytest.mark.workers2
def test_the_controller_moves_an_engine_to_prefill_under_long_prompts(
    tmp_path: Path, pool: list[Sim], serving_procs: int
) -> None:
    planner = {"prefill_tokens_per_second": 2000, "decode_streams": 8, "decode_prefill_share": 0.2}
    with running(start_pool_proxy(tmp_path, pool, serving_procs, planner=planner)) as proxy:
        stats = proxy.stats()["pool"]
        assert stats["mode"] == "adaptive" and stats["controller"] == "auto"
        assert stats["engines"] == {"b0": "decode", "b1": "decode", "b2": "decode"}
        # long prompts: first served where they are decoded (nobody leans to prefill yet) ...
        complete(proxy, LONG)
        # (a serving process's counters reach /metrics with its next report: waited for)
        total = proxy.metrics
        wait_for(lambda: total().total("pdproxy_disagg_decisions_total", reason="no_prefiller"))
        assert total().total("pdproxy_disagg_decisions_total", reason="no_prefiller") == 1
        deadline = time.monotonic() + 10
        while proxy.stats()["pool"]["prefill"] == 0 and time.monotonic() < deadline:
            complete(proxy, f"{time.monotonic()} {LONG}")
        stats = proxy.stats()["pool"]
        assert stats["prefill"] >= 1, stats
        change = stats["changes"][0]
        assert change["lean"] == "prefill" and "long prompt tokens/s" in change["why"]
        # ... then prefilled apart (by every serving process once the lean reached it: its
        # snapshot follows the change by tens of milliseconds)
        deadline = time.monotonic() + 10
        while not total().total("pdproxy_disagg_decisions_total", reason="long"):
            assert time.monotonic() < deadline, "no long prompt was prefilled apart"
            complete(proxy, f"once more {time.monotonic()}: {LONG}")
        metrics = proxy.metrics()  # one scrape: the controller may move more meanwhile
        leaning = metrics.total("pdproxy_pool_engine_lean", lean="prefill")
        assert metrics.total("pdproxy_pool_engines", lean="prefill") == leaning >= 1
        assert metrics.total("pdproxy_pool_lean_changes_total", lean="prefill") >= 1
        assert metrics.total("pdproxy_pool_demand", kind="long_tokens_per_second") > 0
        lean = metrics.total("pdproxy_pool_engine_lean", id=change["id"], lean="prefill")
        assert lean == 1
        # /admin/workers shows each engine's lean and the proxy's own load on it
        workers = httpx.get(proxy.url + "/admin/workers").json()["data"]
        assert {w["id"]: w["lean"] for w in workers}[change["id"]] == "prefill"

        def idle() -> bool:  # (each serving process's share comes with its next report)
            listed = httpx.get(proxy.url + "/admin/workers").json()["data"]
            return all(w["prefill_tokens"] == 0 and w["decode_streams"] == 0 for w in listed)

        wait_for(idle, 10)


def test_a_failed_prefill_is_retried_on_another_engine_never_the_decoder(
    tmp_path: Path, pool: list[Sim]
) -> None:
    b0, b1, b2 = pool
    with running(start_pool_proxy(tmp_path, pool)) as proxy:
        set_leans(proxy, {"b0": "prefill", "b1": "prefill", "b2": "decode"})
        b0.faults(error_status=500, count=1)
        b1.faults(error_status=500, count=1)
        complete(proxy, LONG)
        # b0 or b1 was planned and failed, the other prefill-side engine failed too; b2 (the
        # decoder) is never asked to prefill for itself: it computes the prompt (a fallback)
        assert [r["status"] for r in legs(b0)] == [500] and [r["status"] for r in legs(b1)] == [500]
        assert len(legs(b2)) == 1 and "kv_transfer_params" not in legs(b2)[0]["body"]
        assert (
            proxy.metrics().total("pdproxy_prefill_fallbacks_total", reason="prefill_failed") == 1
        )


def test_admin_pool_api_validates(tmp_path: Path, pool: list[Sim]) -> None:
    with running(start_pool_proxy(tmp_path, pool[:2])) as proxy:
        url = proxy.url + "/admin/pool"
        assert httpx.put(url, json={"leans": {"b9": "prefill"}}).status_code == 404
        resp = httpx.put(url, json={"leans": {"b0": "sideways"}})
        assert resp.status_code == 400 and "leans.b0" in resp.json()["error"]["message"]
        assert httpx.put(url, json={"auto": True}).status_code == 400
        assert httpx.get(url).json()["controller"] == "auto"
        body = set_leans(proxy, {"b1": "prefill"})
        assert body["controller"] == "manual" and body["engines"]["b1"] == "prefill"
        assert body["changes"][-1]["why"] == "set through the admin API"
        assert set_leans(proxy, {}, "auto")["controller"] == "auto"


@pytest.mark.workers2
def test_colocated_serves_every_request_whole_without_tokenize(
    tmp_path: Path, pool: list[Sim], serving_procs: int
) -> None:
    """Six in flight together, each on a connection of its own and sent once the one before
    was placed: with `serving_procs` 2, four on one serving process and two on the other,
    spread as one process spreads them (placed at the same instant, two processes could both
    take the same least loaded engine: the shared table has no lock)."""
    with running(start_pool_proxy(tmp_path, pool, serving_procs, pool_mode="colocated")) as proxy:
        clients = [c for group in pinned_clients(proxy, [4, 2]) for c in group]
        probes = sum(len(legs(sim)) for sim in pool)  # where each client landed
        for sim in pool:
            sim.reset()

        def one(i: int) -> int:  # a second or more each: all in flight together
            body = {"model": MODEL, "prompt": f"{i} {LONG}", "max_tokens": 1500,
                    "stream": i % 2 == 0, "ignore_eos": True}  # fmt: skip
            try:
                return clients[i].post("/v1/completions", json=body).status_code
            finally:
                clients[i].close()

        def inflight() -> int:
            return sum(w["inflight"] for w in proxy.stats()["workers"]["pool"])

        with ThreadPoolExecutor(6) as threads:
            answers = []
            for i in range(6):
                answers.append(threads.submit(one, i))
                wait_for(lambda n=i + 1: inflight() == n)  # type: ignore[misc]
            assert [answer.result() for answer in answers] == [200] * 6
        for sim in pool:
            assert all("kv_transfer_params" not in r["body"] for r in legs(sim))
            assert [r for r in sim.records() if r["path"] == "/tokenize"] == []
        assert sorted(len(legs(s)) for s in pool) == [2, 2, 2]  # load-aware spread
        total = proxy.metrics
        wait_for(
            lambda: total().total("pdproxy_disagg_decisions_total", decision="local",
                                  reason="colocated") == probes + 6
        )  # fmt: skip
        assert proxy.stats()["pool"]["controller"] == "off"
        assert httpx.put(proxy.url + "/admin/pool", json={"controller": "auto"}).status_code == 409


@pytest.mark.workers2
def test_a_pool_engine_joins_through_the_admin_api_with_both_kv_probes(
    tmp_path: Path, pool: list[Sim], serving_procs: int
) -> None:
    b0, b1, b2 = pool
    with running(start_pool_proxy(tmp_path, [b0, b1], serving_procs)) as proxy:
        resp = httpx.post(
            proxy.url + "/admin/workers", json={"url": b2.url, "role": "pool"}, timeout=60
        )
        assert resp.status_code == 201, resp.text
        worker = resp.json()
        assert worker["id"] == "b2" and worker["role"] == "pool"
        kv = next(c for c in worker["last_probe"]["checks"] if c["name"] == "kv")
        assert "pulled the probe's KV" in kv["detail"] and "decoded them" in kv["detail"]
        assert b2.metric(PULLS) == 1  # it pulled one probe, and another engine pulled its own
        # ... and the configured engine that had not reported its NIXL engine id yet (the
        # other one prefilled b2's probe) was asked for it, to compare with b2's: one more pull
        assert b0.metric(PULLS) + b1.metric(PULLS) == 2
        listed = httpx.get(proxy.url + "/admin/workers", timeout=10).json()["data"]
        assert all(len(w["engine_ids"]) == 1 for w in listed)
        wait_for(lambda: "b2" in proxy.stats()["pool"]["engines"])
        assert proxy.stats()["pool"]["engines"]["b2"] == "decode"
        # health and models count pool engines as engines that answer
        assert httpx.get(proxy.url + "/health").json()["status"] == "ok"
        assert [m["id"] for m in httpx.get(proxy.url + "/v1/models").json()["data"]] == [MODEL]
