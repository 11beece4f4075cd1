"""A request without `model` is served as vLLM serves it: by the engines' served model."""

from __future__ import annotations

import httpx

from tests.conftest import MODEL, Proxy, sse_events, wait_for

PULLS = "vllm:nixl_xfer_time_seconds_count"
RECOMPUTED = "pdsim:recomputed_requests_total"


def test_a_request_without_model_is_disaggregated_for_the_served_model(proxy: Proxy) -> None:
    decoder = proxy.decode[0]
    body = {"prompt": "a client that never names the model", "max_tokens": 4}
    resp = httpx.post(proxy.url + "/v1/completions", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == MODEL and resp.json()["choices"][0]["text"]
    chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "stream": True}
    resp = httpx.post(proxy.url + "/v1/chat/completions", json=chat, timeout=30)
    assert resp.status_code == 200, resp.text
    events = sse_events(resp.content)
    assert events[-1] == "[DONE]" and all(e["model"] == MODEL for e in events[:-1])
    wait_for(lambda: decoder.metric(PULLS) == 2)  # both legs ran: the decoder pulled the KV
    assert decoder.metric(RECOMPUTED) == 0
    assert all("model" not in r["body"] for r in proxy.prefill[0].generation_records())


def test_a_wrong_model_is_still_the_engines_404(proxy: Proxy) -> None:
    body = {"model": "not-served", "prompt": "x", "max_tokens": 2}
    resp = httpx.post(proxy.url + "/v1/completions", json=body, timeout=30)
    assert resp.status_code == 404 and "not-served" in resp.json()["error"]["message"]
    resp = httpx.post(proxy.url + "/v1/completions", json={**body, "model": 7}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "model"
