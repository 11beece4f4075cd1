"""The control endpoints: /health, /v1/models, /metrics, /stats."""

from __future__ import annotations

import httpx

from tests.conftest import MODEL, Proxy


def test_health_names_workers_and_follows_them(proxy: Proxy) -> None:
    resp = httpx.get(proxy.url + "/health")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ok"
    assert [w["url"] for w in body["prefill"]] == [proxy.prefill[0].url]
    assert body["decode"][0]["health"] == "healthy"
    proxy.decode[0].faults(unhealthy=True)
    resp = httpx.get(proxy.url + "/health")
    assert resp.status_code == 503
    assert resp.json()["decode"][0]["health"] == "unhealthy"
    proxy.decode[0].reset()
    assert httpx.get(proxy.url + "/health").status_code == 200


def test_models_come_from_decoders(proxy: Proxy) -> None:
    body = httpx.get(proxy.url + "/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [MODEL]


def test_metrics_and_stats_after_traffic(proxy: Proxy) -> None:
    for stream in (False, True):
        resp = httpx.post(
            proxy.url + "/v1/completions",
            json={"model": MODEL, "prompt": "count me", "max_tokens": 8, "stream": stream},
        )
        assert resp.status_code == 200
    metrics = httpx.get(proxy.url + "/metrics").text
    assert 'pdproxy_requests_total{endpoint="/v1/completions",status="200"}' in metrics
    assert "pdproxy_ttft_seconds_bucket" in metrics
    assert (
        f'pdproxy_worker_inflight_requests{{role="decode",url="{proxy.decode[0].url}"}} 0.0'
        in metrics
    )
    stats = proxy.stats()
    assert stats["requests"] >= 2
    assert stats["latency_seconds"]["ttft"]["count"] >= 1
    prefill = stats["latency_seconds"]["prefill"]
    assert 0 < prefill["p50"] <= prefill["p95"] <= prefill["p99"]
    assert stats["latency_seconds"]["tpot"]["count"] >= 1  # the streamed one
    assert stats["workers"]["decode"][0]["requests_total"] >= 2
    assert stats["connector"] == "nixl" and stats["policies"]["decode"] == "least_loaded"
