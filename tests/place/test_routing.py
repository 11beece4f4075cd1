"""Load- and cache-aware routing over real sockets: the scraper, the policies' choices, and
conditional disaggregation (which legs each engine received, and the decision metrics)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import MODEL, Sim, running, start_proxy, start_sim

WORDS = "the river turned toward the sea before the city and the people knew its water well"


def chat(prompt: str, max_tokens: int = 4) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
    }


def config(tmp: Path, **keys: Any) -> str:
    path = tmp / f"routing-{len(list(tmp.iterdir()))}.yaml"
    path.write_text(json.dumps(keys))
    return str(path)


def follow_up(prompt: str) -> dict[str, Any]:
    body = chat(prompt)
    body["messages"] += [
        {"role": "assistant", "content": "fine"},
        {"role": "user", "content": "and then?"},
    ]
    return body


def wait_prefix_caching(proxy: Any, expected: bool) -> None:
    """Until the proxy has read the decoder's vllm:cache_config_info."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proxy.stats()["workers"]["decode"][0]["prefix_caching"] is expected:
            return
        time.sleep(0.05)
    raise AssertionError(f"the proxy never saw enable_prefix_caching={expected}")


def test_conditional_disaggregation(tmp_path: Path, clean_sims: dict[str, Sim]) -> None:
    p0, d0 = clean_sims["p0"], clean_sims["d0"]  # d0 runs without a prefix cache
    cfg = config(tmp_path, conditional_disagg={"enabled": True, "min_prefill_tokens": 64})
    long_prompt = " ".join([WORDS] * 10)  # ~170 tokens
    with running(start_proxy(tmp_path, [p0], [d0], "--config", cfg)) as proxy:
        wait_prefix_caching(proxy, False)
        url = proxy.url + "/v1/chat/completions"
        assert httpx.post(url, json=chat("hello there"), timeout=10).status_code == 200
        assert p0.generation_records() == []  # short: straight to the decoder
        sent = d0.generation_records()
        assert len(sent) == 1 and "kv_transfer_params" not in sent[0]["body"]

        assert httpx.post(url, json=chat(long_prompt), timeout=10).status_code == 200
        assert len(p0.generation_records()) == 1  # long: prefilled on the prefiller
        assert d0.generation_records()[-1]["body"]["kv_transfer_params"]["do_remote_prefill"]

        # the same prefix again: a decoder without a prefix cache has nothing of it
        assert httpx.post(url, json=follow_up(long_prompt), timeout=10).status_code == 200
        assert len(p0.generation_records()) == 2

        total = proxy.metrics().total
        assert total("pdproxy_disagg_decisions_total", decision="local", reason="short") == 1
        assert total("pdproxy_disagg_decisions_total", decision="remote", reason="long") == 2
        assert total("pdproxy_disagg_decisions_total", reason="cached") == 0
        assert total("pdproxy_kv_recompute_total") == 0  # a choice, not a recompute


def test_conditional_disaggregation_on_a_decoder_with_a_prefix_cache(
    tmp_path: Path, clean_sims: dict[str, Sim]
) -> None:
    p0 = clean_sims["p0"]
    d1 = start_sim(tmp_path, "d1-cache", "--enable-prefix-caching", role="decode")
    cfg = config(tmp_path, conditional_disagg={"enabled": True, "min_prefill_tokens": 64})
    long_prompt = " ".join([WORDS] * 10)
    try:
        with running(start_proxy(tmp_path, [p0], [d1], "--config", cfg)) as proxy:
            wait_prefix_caching(proxy, True)
            url = proxy.url + "/v1/chat/completions"
            assert httpx.post(url, json=chat(long_prompt), timeout=10).status_code == 200
            assert len(p0.generation_records()) == 1
            assert httpx.post(url, json=follow_up(long_prompt), timeout=10).status_code == 200
            assert len(p0.generation_records()) == 1  # mostly cached on the decoder: no prefill
            total = proxy.metrics().total
            assert total("pdproxy_disagg_decisions_total", decision="local", reason="cached") == 1
            hits = d1.metric("vllm:prefix_cache_hits_total")
            assert hits > 0  # and the decoder did find the prefix in its cache
    finally:
        d1.stop()


def test_load_aware_avoids_a_decoder_busy_with_other_clients(
    tmp_path: Path, clean_sims: dict[str, Sim]
) -> None:
    p0, d0, d1 = clean_sims["p0"], clean_sims["d0"], clean_sims["d1"]
    cfg = config(tmp_path, decode_policy="load_aware", routing={"scrape_interval": 0.05})
    stop = threading.Event()

    def other_tenant() -> None:  # long streams straight to d0, invisible to the proxy
        # each lasts about 2 s, so a scrape rarely lands in the gap before the next one
        while not stop.is_set():
            httpx.post(d0.url + "/v1/completions", json={
                "model": MODEL, "prompt": "busy", "max_tokens": 5000, "ignore_eos": True
            }, timeout=60)  # fmt: skip

    threads = [threading.Thread(target=other_tenant) for _ in range(3)]
    with running(start_proxy(tmp_path, [p0], [d0, d1], "--config", cfg)) as proxy:
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # until a scrape has seen the tenant
                loads = [w["engine_load"] for w in proxy.stats()["workers"]["decode"]]
                if loads[0] and loads[0]["running"] >= 3:
                    break
                time.sleep(0.05)
            before = len(d1.generation_records())
            for i in range(4):
                resp = httpx.post(
                    proxy.url + "/v1/chat/completions", json=chat(f"q {i}"), timeout=10
                )
                assert resp.status_code == 200
            assert len(d1.generation_records()) - before == 4
        finally:
            stop.set()
            for t in threads:
                t.join()
