"""The estimated prefix index as one view over two serving processes (proxy.procs.prefixes)."""

from __future__ import annotations

from pathlib import Path

import httpx

from proxy.procs.prefixes import RelayedIndex
from proxy.procs.report import Reports
from tests.conftest import Proxy, Sim, start_sim, wait_for
from tests.place.test_routing import WORDS, chat, config, follow_up, wait_prefix_caching
from tests.procs.test_processes import process_of, processes, start


def learned(proxy: Proxy, name: str) -> int:
    """The other processes' prefix placements serving process `name` has taken in."""
    return int(next(p for p in processes(proxy) if p["name"] == name)["prefixes_learned"])


def test_a_placement_is_reported_once_and_what_is_learnt_is_not_sent_back() -> None:
    reports = Reports()
    index = RelayedIndex(reports, limit=2)
    index.record([1, 2, 3], "http://d0")
    index.record([1, 2, 3], "http://d0")  # d0 first already: nothing new for the others
    index.record([1, 2], "http://d1")
    assert reports.prefixes == [([1, 2, 3], "http://d0"), ([1, 2], "http://d1")]
    index.record([7], "http://d0")  # over the report's limit: counted, not sent
    assert len(reports.prefixes) == 2 and reports.prefixes_dropped == 1
    other = RelayedIndex(Reports())
    other.learn(reports.prefixes)
    assert other.matched([1, 2, 3]) == {"http://d1": 2, "http://d0": 3}
    assert other.reports.prefixes == [] and other.reports.prefixes_learned == 2


def test_a_prefix_one_process_placed_is_cached_for_the_other(
    tmp_path: Path, clean_sims: dict[str, Sim]
) -> None:
    """Conditional disaggregation: the follow-up of a long prompt is computed on the decoder that
    holds its prefix, whichever process takes it; without the relay, the process that did not
    place the first request would see nothing cached and send the prompt to the prefiller."""
    p0 = clean_sims["p0"]
    d0 = start_sim(tmp_path, "d0-cache", "--enable-prefix-caching", role="decode")
    cfg = config(tmp_path, conditional_disagg={"enabled": True, "min_prefill_tokens": 64})
    long_prompt = " ".join([WORDS] * 10)
    try:
        proxy = start(tmp_path, [p0], [d0], "--config", cfg)
        try:
            wait_prefix_caching(proxy, True)
            url = proxy.url + "/v1/chat/completions"
            first = httpx.post(url, json=chat(long_prompt), timeout=30)
            assert first.status_code == 200, first.text
            placed_by = process_of(first.headers["x-request-id"])
            assert len(p0.generation_records()) == 1
            other = next(p for p in processes(proxy) if p["name"] != placed_by)["name"]
            wait_for(lambda: learned(proxy, other) >= 1, 30)  # a report, its relay, the next report
            seen = []
            while all(name == placed_by for name in seen):
                assert len(seen) < 200, f"every follow-up went to {placed_by}"
                resp = httpx.post(url, json=follow_up(long_prompt), timeout=30)
                assert resp.status_code == 200, resp.text
                seen.append(process_of(resp.headers["x-request-id"]))
            assert len(p0.generation_records()) == 1, seen  # none prefilled remotely

            def cached() -> float:  # a serving process's counters come with its next report
                total = proxy.metrics().total
                return total("pdproxy_disagg_decisions_total", decision="local", reason="cached")

            wait_for(lambda: cached() == len(seen), 30)
        finally:
            proxy.stop()
    finally:
        d0.stop()
