"""vLLM's other endpoints through the proxy: to a decoder unchanged; the Responses API is a 501."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL, Proxy, Sim, free_port, running, start_proxy


def same(got: httpx.Response, want: httpx.Response) -> None:
    assert got.status_code == want.status_code
    assert got.headers["content-type"] == want.headers["content-type"]
    assert got.content == want.content
    assert got.headers["x-request-id"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/tokenize", {"model": MODEL, "prompt": "the river, again"}),
        ("POST", "/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        ("POST", "/detokenize", {"model": MODEL, "tokens": [100, 101, 102]}),
        ("POST", "/tokenize", {"model": "nope", "prompt": "x"}),  # the engine's 404, as it is
        ("GET", "/version", None),
        ("POST", "/v1/embeddings", {"model": MODEL, "input": "x"}),  # not a pooling model: 404
        ("POST", "/rerank", {"model": MODEL, "query": "a", "documents": ["b"]}),
    ],
)
def test_passed_to_a_decoder_unchanged(proxy: Proxy, method: str, path: str, body: object) -> None:
    decoder = proxy.decode[0]
    got = httpx.request(method, proxy.url + path, json=body, timeout=10)
    want = httpx.request(method, decoder.url + path, json=body, timeout=10)
    same(got, want)
    assert decoder.generation_records() == [] and proxy.prefill[0].records() == []


def test_large_bodies_stream_through(proxy: Proxy) -> None:
    body = {"model": MODEL, "prompt": "the river " * 100_000, "return_token_strs": True}
    got = httpx.post(proxy.url + "/tokenize", json=body, timeout=30)
    want = httpx.post(proxy.decode[0].url + "/tokenize", json=body, timeout=30)
    same(got, want)
    assert len(got.content) > 1_000_000


def test_wrong_method_and_unknown_paths(proxy: Proxy) -> None:
    resp = httpx.get(proxy.url + "/tokenize", timeout=5)
    assert resp.status_code == 405 and "POST" in resp.json()["error"]["message"]
    resp = httpx.get(proxy.url + "/v1/models/" + MODEL, timeout=5)  # vLLM 0.32 has no such path
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "NotFoundError"


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/responses"), ("GET", "/v1/responses/resp_1"),
     ("POST", "/v1/responses/resp_1/cancel")],
)  # fmt: skip
def test_responses_api_is_a_clear_501(proxy: Proxy, method: str, path: str) -> None:
    resp = httpx.request(method, proxy.url + path, json={"model": MODEL, "input": "hi"})
    assert resp.status_code == 501
    error = resp.json()["error"]
    assert error["type"] == "NotImplementedError"
    assert "/v1/chat/completions" in error["message"] and "Responses API" in error["message"]
    assert proxy.decode[0].records() == [] and proxy.prefill[0].records() == []


def test_a_dead_decoder_is_skipped(logs: Path, sims: dict[str, Sim]) -> None:
    dead = Sim(f"http://127.0.0.1:{free_port()}", [], None, sims["d0"].proc)
    config = logs / "passthrough-dead.yaml"
    config.write_text("decode_policy: round_robin\nhealth: {interval: 0}\n")
    proxy = start_proxy(logs, [sims["p0"]], [dead, sims["d0"]], "--config", str(config),
                        name="passthrough-dead")  # fmt: skip
    with running(proxy):
        body = {"model": MODEL, "prompt": "x"}
        for _ in range(2):  # one of the two goes to the dead one first, then to d0
            resp = httpx.post(proxy.url + "/tokenize", json=body, timeout=10)
            assert resp.status_code == 200 and resp.json()["count"] == 2
