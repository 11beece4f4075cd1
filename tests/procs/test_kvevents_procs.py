"""kv_events with `workers: 2`: every serving process plans from the exact prefix index, the
control process's, copied to each (proxy.procs.kvreplica).

The unit half replays an index's changes into a copy, and a copy made late from the whole index
(in small chunks), and finds them equal. The process half is real processes on real sockets:
simulated engines that publish their KV-cache events (tests/control/test_kvevents_replicas.py's),
a prompt cached on the decoder by a request sent to it directly (the proxy's own estimate knows
nothing of it), and a proxy of one process or of three; conditional disaggregation must find the
prompt cached on the decoder and prefill it there (reason `cached`) in whichever process takes
it, as one process does, also in a serving process started again after the index was built."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

import proxy.procs.kvreplica as kvreplica
from proxy.engines.kvevents_wire import AllBlocksCleared, BlockRemoved, BlockStored, Event
from proxy.place.kvindex import KvIndex, prompt_keys
from proxy.procs.kvreplica import PublishedIndex, Replica, state
from tests.conftest import MODEL, Proxy, Sim, wait_for
from tests.control.test_kvevents_replicas import text
from tests.flow.rig import start_proxy_config

SIZE = 4


# --- the copy, in one process ---


def stored(hashes: list[Any], parent: Any, tokens: list[int]) -> BlockStored:
    return BlockStored(hashes, parent, tokens, SIZE, None, "GPU", None)


def wired(message: dict[str, Any]) -> dict[str, Any]:
    """A message as the channel carries it (JSON)."""
    loaded: dict[str, Any] = orjson.loads(orjson.dumps(message))
    return loaded


def same(a: KvIndex, b: KvIndex) -> None:
    assert set(a.engines) == set(b.engines)
    for url, blocks in a.engines.items():
        other = b.engines[url]
        assert (blocks.digest(), blocks.copies, blocks.keys) == (
            other.digest(), other.copies, other.keys)  # fmt: skip
        assert (blocks.block_size, blocks.skipped, blocks.removed) == (
            other.block_size, other.skipped, other.removed)  # fmt: skip


def changes(index: KvIndex) -> None:
    """Stores (one block twice, bytes and int hashes), removals, a clear, a reset, a forget."""
    batches: list[tuple[str, list[Event]]] = [
        ("e0", [stored([b"a", b"b"], None, list(range(8)))]),
        ("e0", [stored([b"c"], b"b", [8, 9, 10, 11]), stored([b"a"], None, list(range(4)))]),
        ("e1", [stored([1, 2, 3], None, list(range(20, 32)))]),
        ("e1", [BlockRemoved([3], "GPU"), stored([9], 7, [1, 2, 3, 4])]),  # 7: never seen
        ("e2", [stored([5], None, [0, 0, 0, 0])]),
        ("e2", [AllBlocksCleared()]),
        ("e2", [stored([6], None, [1, 1, 1, 1])]),
    ]
    for url, events in batches:
        index.apply(url, events)
    index.apply("e3", ())
    index.clear("e1")
    index.apply("e1", [stored([4], None, list(range(20, 24)))])
    index.forget("e3")


def test_the_copy_follows_every_change_and_a_late_copy_gets_the_whole_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[dict[str, Any]] = []
    published = PublishedIndex(sent.append)
    changes(published)
    copy = KvIndex()
    replica = Replica(copy)
    for message in sent:
        replica.take(wired(message))
    same(published, copy)
    assert copy.cached(list(range(9)), ["e0"]) == {"e0": 8}

    monkeypatch.setattr(kvreplica, "CHUNK", 1)  # every block in a message of its own
    late = KvIndex()
    late.apply("gone", ())  # what it held before is replaced
    replica = Replica(late)
    for message in state(published):
        replica.take(wired(message))
    same(published, late)
    # the copies of a block came too: one removal leaves the other copy held
    for index in (published, late):
        index.apply("e0", [BlockRemoved([b"a"], "GPU")])
        assert index.engines["e0"].leading(prompt_keys(list(range(9)), SIZE)) == 2


# --- the processes ---


def start(tmp: Path, engines: list[tuple[Sim, dict[str, Any]]], workers: int) -> Proxy:
    (e0, _), (e1, _) = engines
    config = {
        "prefill": [e0.url],
        "decode": [e1.url],
        "workers": workers,
        "conditional_disagg": {"enabled": True, "min_prefill_tokens": 32},
        "kv_events": {"enabled": True, "endpoints": {s.url: ep for s, ep in engines}},
    }
    path = tmp / f"workers-{workers}.yaml"
    path.write_text(json.dumps(config))
    proxy = start_proxy_config(tmp, path, f"workers-{workers}")
    try:
        if workers > 1:
            wait_for(lambda: all(p["connected"] for p in proxy.stats()["processes"]), 120)
    except AssertionError:
        proxy.stop()
        raise
    return proxy


def send(url: str, prompt: str) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    answer = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer


def tokens(sim: Sim, prompt: str) -> list[int]:
    body = {"model": MODEL, "prompt": prompt}
    ids: list[int] = httpx.post(sim.url + "/tokenize", json=body, timeout=10).json()["tokens"]
    return ids


def cached_on(proxy: Proxy, sim: Sim, prompt: str) -> bool:
    """Whether the proxy's index says `sim` holds `prompt` as `sim` itself says."""
    ids = tokens(sim, prompt)
    truth = httpx.post(sim.url + "/_sim/prefix-cache", json={"token_ids": ids}, timeout=10)
    said = httpx.post(proxy.url + "/admin/prefix-index", json={"token_ids": ids}, timeout=10)
    cached: int = truth.json()["cached_tokens"]
    return cached > 0 and said.json()["cached_tokens"].get(sim.url) == cached


def plans(
    proxy: Proxy, prompt: str, workers: int, least: int = 4
) -> dict[str, list[dict[str, Any]]]:
    """`prompt` sent on new connections until every process took it (at least `least` times),
    and the plans each process made for it, by process."""
    ids: list[str] = []
    while len(ids) < least or (len({i.split("-")[1] for i in ids}) < workers and len(ids) < 300):
        ids.append(send(proxy.url, prompt).headers["x-request-id"])
    wanted = set(ids)
    made: dict[str, list[dict[str, Any]]] = {}

    def found() -> bool:
        made.clear()
        data = httpx.get(proxy.url + "/admin/requests", timeout=10).json()["data"]
        for timeline in data:
            if timeline["request_id"] in wanted:
                name = timeline["request_id"].split("-")[1] if workers > 1 else "one"
                made.setdefault(name, []).append(timeline["plan"])
        return sum(map(len, made.values())) == len(wanted)

    wait_for(found, 30)
    return made


@pytest.mark.parametrize("workers", [1, 2])
def test_every_process_finds_what_the_decoder_cached_as_one_process_does(
    tmp_path: Path, engines: list[tuple[Sim, dict[str, Any]]], workers: int
) -> None:
    (e0, _), (e1, _) = engines
    early, later, fresh = text(1, 200), text(2, 200), text(3, 200)
    send(e1.url, early)  # cached on the decoder before the proxy starts: replayed to it
    proxy = start(tmp_path, engines, workers)
    try:
        wait_for(lambda: cached_on(proxy, e1, early), 30)
        send(e1.url, later)  # cached while the proxy runs: a change of the index
        wait_for(lambda: cached_on(proxy, e1, later), 30)
        names = {"one"} if workers == 1 else {"w1", "w2"}
        for prompt in (early, later):
            made = plans(proxy, prompt, workers)
            assert set(made) == names, made
            assert all(p["prefill"] == "local" and p["reason"] == "cached"
                       for ps in made.values() for p in ps), made  # fmt: skip
        # a prompt nobody cached is prefilled on the prefiller (once: then the decoder has it)
        [plan] = [p for ps in plans(proxy, fresh, 1, least=1).values() for p in ps]
        assert (plan["prefill"], plan["reason"]) == ("remote", "long"), plan
        if workers == 1:
            return
        # a serving process started again gets the whole index before it serves
        [w1] = [p for p in proxy.stats()["processes"] if p["name"] == "w1"]
        os.kill(w1["pid"], signal.SIGKILL)
        wait_for(lambda: restarted(proxy, w1["pid"]), 60)
        made = plans(proxy, later, workers)
        assert all(p["reason"] == "cached" for ps in made.values() for p in ps), made
        assert "w1" in made
        assert [p["kv_index_behind"] for p in proxy.stats()["processes"]] == [False, False]
        # /metrics says which index answers for each engine, as the serving processes use it
        metrics = proxy.metrics()
        for sim in (e0, e1):
            source = "pdproxy_prefix_index_source"
            assert metrics.total(source, url=sim.url, source="events") == 1, sim.url
    finally:
        proxy.stop()


def restarted(proxy: Proxy, pid: int) -> bool:
    [w1] = [p for p in proxy.stats()["processes"] if p["name"] == "w1"]
    return bool(w1["connected"] and w1["pid"] and w1["pid"] != pid)


def test_the_index_is_sent_whole_again_to_a_channel_that_fell_behind() -> None:
    """A channel over its buffer gets no change, then the whole index once it has drained."""

    class Transport:
        size = 0

        def get_write_buffer_size(self) -> int:
            return self.size

    class Writer:
        def __init__(self) -> None:
            self.transport = Transport()
            self.frames: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.frames.append(data)

    writer = Writer()
    publisher = kvreplica.IndexPublisher(lambda: {"w1": writer})  # type: ignore[dict-item]
    publisher.index.apply("e0", [stored([b"a"], None, [1, 2, 3, 4])])
    assert len(writer.frames) == 1
    writer.transport.size = kvreplica.MAX_BUFFERED + 1
    publisher.index.apply("e0", [stored([b"b"], b"a", [5, 6, 7, 8])])
    publisher.catch_up()
    assert len(writer.frames) == 1 and publisher.behind == {"w1"}
    writer.transport.size = 0
    publisher.index.apply("e0", [stored([b"c"], b"b", [9, 9, 9, 9])])  # not sent: behind
    publisher.catch_up()
    copy = KvIndex()
    replica = Replica(copy)
    for data in writer.frames:
        replica.take(orjson.loads(data[4:]))
    same(publisher.index, copy)
    assert publisher.behind == set()
