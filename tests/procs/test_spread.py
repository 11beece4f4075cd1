"""Skewed load over two serving processes: the requests per engine stay within the spread one
process gives with the same load, because every process's picks count in the shared load table
(proxy.procs.loadtable). Counted as requests per decoder, never timed."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL, Proxy, Sim, running, start_proxy, start_sim
from tests.procs.clients import pinned_clients, process_of, run_clients

HEAVY, LIGHT = 3, 1  # keep-alive clients on the busier process, on the other one
ROUNDS = 12  # requests each client sends, one after the other
BODY = {"model": MODEL, "max_tokens": 6, "ignore_eos": True}
# one process, the same load, gives a spread of a few requests at most; a table of each
# process's own picks gives the lighter process's every request to the first decoder
SLACK = 4


@pytest.fixture(scope="module")
def decoders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Sim]]:
    """Two decoders slow enough (about 20 ms a token) that every client's request overlaps the
    others', so that each pick meets the others in flight."""
    logs = tmp_path_factory.mktemp("spread")
    slow = ("--decode-base-ms", "20", "--eos-probability", "0")
    started = [start_sim(logs, f"spread-d{i}", *slow, role="decode") for i in range(2)]
    try:
        yield started
    finally:
        for sim in started:
            sim.stop()


def per_decoder(proxy: Proxy, decoders: list[Sim], prefill: Sim) -> tuple[list[int], Counter[str]]:
    """The skewed load through `proxy`: requests each decoder got, and which processes served."""
    # with two processes HEAVY on one, LIGHT on the other, as a few long-lived connections can
    # land; with one process, all on it
    clients = [c for group in pinned_clients(proxy, [HEAVY, LIGHT]) for c in group]
    for sim in [prefill, *decoders]:
        sim.reset()
    served: Counter[str] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(len(clients))

    def run(i: int, client: httpx.Client) -> None:
        start.wait(30)
        for n in range(ROUNDS):
            # uneven sizes: the clients' prompts differ in length (the ties' second key)
            prompt = f"client {i} request {n}: " + "more words " * (i * 5)
            resp = client.post("/v1/completions", json={**BODY, "prompt": prompt})
            assert resp.status_code == 200, resp.text
            with lock:
                served[process_of(resp)] += 1

    run_clients(clients, run, 120)
    assert sum(served.values()) == len(clients) * ROUNDS, served  # no client failed
    return [len(d.generation_records()) for d in decoders], served


def test_skewed_load_over_two_processes_spreads_as_one_process_does(
    tmp_path: Path, clean_sims: dict[str, Sim], decoders: list[Sim]
) -> None:
    p0 = clean_sims["p0"]
    with running(start_proxy(tmp_path, [p0], decoders, name="one")) as one:
        alone, _ = per_decoder(one, decoders, p0)
    with running(start_proxy(tmp_path, [p0], decoders, name="two", workers=2)) as two:
        shared, served = per_decoder(two, decoders, p0)
    print(f"requests per decoder: one process {alone}, two processes {shared} ({served})")
    assert sum(alone) == sum(shared) == (HEAVY + LIGHT) * ROUNDS
    # the load was skewed: one process served HEAVY clients' requests, the other LIGHT's
    assert sorted(served.values()) == [LIGHT * ROUNDS, HEAVY * ROUNDS], served
    assert max(shared) - min(shared) <= max(alone) - min(alone) + SLACK, (alone, shared)
