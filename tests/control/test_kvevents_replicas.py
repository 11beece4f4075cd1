"""Two proxy processes (replicas) subscribed to the same engines' KV-cache events see the same
exact prefix index.

Only one process can bind an address, so several replicas need the engines to bind their PUB
sockets and every replica to connect (`kv_events.bind: false`). vLLM's publisher binds a
wildcard address (tcp://*:port) or an ipc:// path and connects to anything else; here the
simulated engines publish on ipc:// paths (a test listens on no outside address) and serve
replays on the loopback. The replicas join after the engines have published (a late join,
repaired from the replay buffer), one of them places the requests, and an engine's batch that
was never sent (as one dropped at the high-water mark) is repaired through replay by both.
Their indexes must agree with each other (the same digest and the same predicted cached tokens
per engine for every prompt) and with what the engines hold (`/_sim/prefix-cache`)."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdsim.launch import free_port
from tests.conftest import MODEL, Proxy, Sim, start_publishing_sim
from tests.flow.rig import start_proxy_config

WORDS = ["block", "cache", "event", "index", "token", "river", "stone", "light"]


def text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[list[tuple[Sim, dict[str, Any]]]]:
    started: list[tuple[Sim, dict[str, Any]]] = []
    try:
        for name in ("e0", "e1"):
            endpoint = {
                "publisher": f"ipc://{tmp_path}/{name}-kv-events",
                "replay": f"tcp://127.0.0.1:{free_port()}",
                "bind": False,
            }
            sim = start_publishing_sim(
                tmp_path, name, endpoint["publisher"], endpoint["replay"], 64
            )
            started.append((sim, endpoint))
        yield started
    finally:
        for sim, _ in started:
            sim.stop()


def replica(tmp: Path, name: str, engines: list[tuple[Sim, dict[str, Any]]]) -> Proxy:
    (e0, _), (e1, _) = engines
    config = {
        "prefill": [e0.url],
        "decode": [e1.url],
        "conditional_disagg": {"enabled": True},
        "kv_events": {"enabled": True, "endpoints": {s.url: ep for s, ep in engines}},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(config))
    return start_proxy_config(tmp, path, name)


def tokens(sim: Sim, prompt: str) -> list[int]:
    body = {"model": MODEL, "prompt": prompt}
    ids: list[int] = httpx.post(sim.url + "/tokenize", json=body, timeout=10).json()["tokens"]
    return ids


def complete(url: str, prompt: str) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    answer = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert answer.status_code == 200, answer.text


def index(proxy: Proxy) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(proxy.url + "/admin/prefix-index", timeout=10).json()
    return data["engines"]


def predicted(proxy: Proxy, ids: list[int]) -> dict[str, int]:
    answer = httpx.post(proxy.url + "/admin/prefix-index", json={"token_ids": ids}, timeout=10)
    assert answer.status_code == 200, answer.text
    cached: dict[str, int] = answer.json()["cached_tokens"]
    return cached


def truth(engines: list[tuple[Sim, dict[str, Any]]], ids: list[int]) -> dict[str, int]:
    return {
        s.url: httpx.post(s.url + "/_sim/prefix-cache", json={"token_ids": ids}, timeout=10).json()[
            "cached_tokens"
        ]
        for s, _ in engines
    }


def agreed(
    replicas: list[Proxy], engines: list[tuple[Sim, dict[str, Any]]], prompts: list[list[int]]
) -> list[dict[str, int]]:
    """Once both replicas' indexes answer as the engines hold, for every prompt (within 30 s):
    what they predict, per prompt."""
    deadline = time.monotonic() + 30
    while True:
        want = [truth(engines, ids) for ids in prompts]
        seen = [[predicted(r, ids) for ids in prompts] for r in replicas]
        if all(s == want for s in seen):
            return want
        assert time.monotonic() < deadline, (want, seen, [index(r) for r in replicas])
        time.sleep(0.3)


def test_two_replicas_connected_to_the_engines_see_the_same_index(
    tmp_path: Path, engines: list[tuple[Sim, dict[str, Any]]]
) -> None:
    (e0, _), (e1, _) = engines
    base = text(1, 200)
    prompts = [base, base + " " + text(2, 60), text(3, 200), text(4, 150), base[: len(base) // 2]]
    complete(e0.url, base)  # before the replicas start: they join late
    complete(e1.url, text(3, 200))
    replicas: list[Proxy] = []
    try:
        for name in ("a", "b"):
            replicas.append(replica(tmp_path, name, engines))
        deadline = time.monotonic() + 30
        while not all(e["prefix_source"] == "events" for r in replicas for e in index(r).values()):
            assert time.monotonic() < deadline, [index(r) for r in replicas]
            time.sleep(0.2)
        ids = [tokens(e0, p) for p in prompts]
        for prompt in prompts[:3]:
            complete(replicas[0].url, prompt)  # placed by replica a only
        complete(e1.url, prompts[3])  # sent to an engine directly
        first = agreed(replicas, engines, ids)
        assert any(n > 0 for p in first for n in p.values()), first

        # a batch of e0's is never sent: both replicas see the gap and replay it
        e0.faults(kv_events_unsent=True)
        complete(e0.url, prompts[3])
        e0.faults()
        complete(e0.url, text(5, 120))
        second = agreed(replicas, engines, [*ids, tokens(e0, text(5, 120))])
        assert second[3][e0.url] > 0, second  # what only the replayed batch said
        described = [index(r) for r in replicas]
        for url in (e0.url, e1.url):
            a, b = (d[url] for d in described)
            assert a["digest"] == b["digest"] and a["blocks"] == b["blocks"] > 0, (a, b)
            assert a["next_seq"] == b["next_seq"], (a, b)
            assert a["bind"] is b["bind"] is False
        assert all(d[e0.url]["repaired"] >= 2 for d in described), described  # join + gap
        assert all(d[e0.url]["lost"] == 0 for d in described), described
    finally:
        for r in replicas:
            r.stop()
