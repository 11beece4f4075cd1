"""The proxy's own errors and the engines' passed-through ones speak one vocabulary: the `type`
vLLM gives an error of that status."""

from __future__ import annotations

from http import HTTPStatus

import httpx

from proxy.errors import error_type, openai_error_body
from tests.conftest import MODEL, Proxy


def test_the_proxys_refusals_carry_the_type_the_engine_gives_the_same_status(
    proxy: Proxy,
) -> None:
    greedy_n = {"model": MODEL, "prompt": "a", "n": 2, "temperature": 0}  # refused by the proxy
    ours = httpx.post(proxy.url + "/v1/completions", json=greedy_n, timeout=10)
    too_long = {"model": MODEL, "prompt": "river " * 20_000, "max_tokens": 2}  # by the engine
    theirs = httpx.post(proxy.url + "/v1/completions", json=too_long, timeout=30)
    assert ours.status_code == theirs.status_code == 400
    assert "maximum context length" in theirs.json()["error"]["message"]
    assert ours.json()["error"]["type"] == theirs.json()["error"]["type"] == "BadRequestError"

    ours = httpx.get(proxy.url + "/v1/nothing-here", timeout=10)  # the proxy's own 404
    wrong_model = {"model": "no-such-model", "prompt": "a", "max_tokens": 2}
    theirs = httpx.post(proxy.url + "/v1/completions", json=wrong_model, timeout=10)
    assert ours.status_code == theirs.status_code == 404
    assert ours.json()["error"]["type"] == theirs.json()["error"]["type"] == "NotFoundError"


def test_statuses_vllm_has_no_class_for_are_named_by_their_phrase() -> None:
    assert [error_type(s) for s in (400, 404, 422, 500, 501)] == [
        "BadRequestError", "NotFoundError", "UnprocessableEntityError", "InternalServerError",
        "NotImplementedError",
    ]  # fmt: skip
    assert error_type(409) == "Conflict" and error_type(503) == "Service Unavailable"
    assert error_type(413) == HTTPStatus(413).phrase
    # an engine's answer that is not OpenAI-shaped is wrapped with the same vocabulary
    assert b'"type":"Bad Gateway"' in openai_error_body(502, b"upstream went away")
