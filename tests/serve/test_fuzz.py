"""Fuzzing the API with hypothesis: whatever arrives, the proxy answers with a non-5xx of its own
making (a 502/504 would name an engine), in OpenAI's error shape, and keeps serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import MODEL, Proxy, Sim, running, start_proxy

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
fields = {
    "model": st.sampled_from([MODEL, "", "unknown-model"]) | json_values,
    "prompt": st.text(max_size=40)
    | st.lists(st.integers(-5, 600), max_size=6)
    | st.lists(st.text(max_size=12) | st.lists(st.integers(-5, 600), max_size=4), max_size=4)
    | json_values,
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant"]) | json_values},
            optional={"content": st.text(max_size=30) | json_values},
        ),
        max_size=3,
    )
    | json_values,
    "max_tokens": st.integers(-3, 20) | st.sampled_from([10**12, 2**31]) | json_values,
    "max_completion_tokens": st.integers(-3, 20) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "n": st.integers(0, 3) | json_values,
    "temperature": st.floats(-1, 3) | json_values,
    "seed": st.integers(-2, 2**64) | json_values,
    "stop": st.text(max_size=4) | json_values,
    "echo": st.booleans() | json_values,
    "logprobs": st.integers(-2, 5) | st.booleans() | json_values,
    "top_logprobs": st.integers(-1, 5) | json_values,
    "prompt_logprobs": st.integers(-2, 3) | json_values,
    "priority": st.integers(-(2**64), 2**64) | json_values,
    "use_beam_search": st.booleans(),
}
bodies = st.fixed_dictionaries({}, optional=fields) | json_values
raw_bodies = st.binary(max_size=64)


@pytest.fixture(scope="module")
def fuzz_proxy(logs: Path, sims: dict[str, Sim]) -> Iterator[Proxy]:
    config = logs / "fuzz.yaml"
    config.write_text("max_body_bytes: 4096\nhealth: {interval: 0}\n")
    with running(
        start_proxy(logs, [sims["p0"]], [sims["d0"]], "--config", str(config), name="fuzz")
    ) as proxy:
        yield proxy  # type: ignore[misc]


def check(resp: httpx.Response) -> None:
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        error = resp.json()["error"]
        assert isinstance(error["message"], str) and error["message"]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=bodies)
def test_json_bodies(fuzz_proxy: Proxy, path: str, body: Any) -> None:
    with httpx.Client(base_url=fuzz_proxy.url, timeout=10) as client:
        check(client.post(path, content=json.dumps(body)))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), raw=raw_bodies)
def test_raw_bytes(fuzz_proxy: Proxy, path: str, raw: bytes) -> None:
    with httpx.Client(base_url=fuzz_proxy.url, timeout=10) as client:
        check(client.post(path, content=raw))


def test_still_serving_after_fuzz(fuzz_proxy: Proxy) -> None:
    resp = httpx.post(
        fuzz_proxy.url + "/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 2}
    )
    assert resp.status_code == 200
    oversize = httpx.post(fuzz_proxy.url + "/v1/completions", content=b"x" * 5000)
    assert oversize.status_code == 413 and "4096" in oversize.json()["error"]["message"]
    assert fuzz_proxy.stats()["workers"]["decode"][0]["inflight"] == 0
