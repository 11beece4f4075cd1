"""KV-cache events as engines publish them: the proxy's subscriber against a simulator process
(its predictions equal the reuse the simulator counts, `vllm:prefix_cache_hits_total`, through
evictions), and the session's real-vLLM topology, whose launcher turns events on: the proxy
indexes both engines from them (the exact comparison against real vLLM, with evictions and a
restart, is tests/e2e/test_real_vllm_kvevents.py)."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import httpx
import pytest

from pdsim import launch
from proxy.control.kvevents import Endpoints, KvEvents, Subscriber
from proxy.control.workers import Worker
from proxy.place.kvindex import KvIndex
from tests.conftest import parse_metrics

HITS = "vllm:prefix_cache_hits_total"


def hits(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(HITS):
            return float(line.split()[-1])
    raise AssertionError(f"{url} has no {HITS}")


def text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(["block", "cache", "event", "index", "token"]) for _ in range(words))


async def settled(sub: Subscriber) -> None:
    last = -1
    while last != sub.counts.batches:
        last = sub.counts.batches
        await asyncio.sleep(0.3)


async def predictions(url: str, sub: Subscriber, prompts: list[str]) -> list[tuple[int, int]]:
    out = []
    async with httpx.AsyncClient(timeout=30) as client:
        for prompt in prompts:
            body = {"model": "tiny", "prompt": prompt}
            tokens = (await client.post(url + "/tokenize", json=body)).json()["tokens"]
            await settled(sub)
            predicted = sub.index.cached(tokens, [url])[url]
            before = hits(url)
            answer = await client.post(url + "/v1/completions", json={**body, "max_tokens": 1})
            assert answer.status_code == 200, answer.text
            out.append((predicted, int(hits(url) - before)))
    return out


def test_the_simulators_events_predict_its_reuse(tmp_path: Path) -> None:
    pub, replay = launch.free_port(), launch.free_port()
    config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://127.0.0.1:{pub}",  # no wildcard: the simulator connects, as vLLM
        "replay_endpoint": f"tcp://127.0.0.1:{replay}",
    }
    base = text(1, 300)
    prompts = [base, base, base + " " + text(2, 40), text(3, 300), text(4, 300)]
    prompts += [text(4, 300) + " " + text(5, 9), base, base[: len(base) // 3]]

    async def main() -> list[tuple[int, int]]:
        events = KvEvents(KvIndex(), "", replay_timeout=5.0)
        sim = launch.start_sim(
            "both", "--model", "tiny", "--enable-prefix-caching", "--num-gpu-blocks", "64",
            "--kv-events-config", json.dumps(config), log=tmp_path / "sim.log",
        )  # fmt: skip
        try:
            sub = events.start(
                Worker("pool", "b0", sim.url),
                Endpoints(f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{replay}", bind=True),
            )
            return await predictions(sim.url, sub, prompts)
        finally:
            sim.stop()
            await events.close()

    seen = asyncio.run(main())
    assert all(p == r for p, r in seen), seen
    assert seen[1][1] > 0 and seen[5][1] > 0, seen  # hits, also after evictions
    assert seen[6][1] == 0, seen  # base was evicted


@pytest.mark.real_vllm
def test_the_session_proxy_indexes_the_real_engines_from_their_events(topology: object) -> None:
    proxy = topology.proxy  # type: ignore[attr-defined]
    stats = httpx.get(proxy + "/stats", timeout=30).json()
    workers = [w for role in ("prefill", "decode") for w in stats["workers"][role]]
    assert workers and all(w["prefix_source"] == "events" for w in workers), workers
    metrics = parse_metrics(httpx.get(proxy + "/metrics", timeout=30).text)
    for w in workers:
        source = metrics.total("pdproxy_prefix_index_source", role=w["role"], url=w["url"])
        assert (
            source
            == metrics.total(
                "pdproxy_prefix_index_source", role=w["role"], url=w["url"], source="events"
            )
            == 1.0
        ), w["url"]
