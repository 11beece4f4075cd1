"""pdproxy in front of real vLLM (CPU build, NIXL over UCX), 1P1D from launchers/disagg.sh.

Every proxied request must (a) give the same greedy tokens as the decoder run directly and
(b) make the decoder really pull the prompt's KV from the prefiller: its
`vllm:nixl_xfer_time_seconds_count` rises by exactly one (a recompute would give the same
tokens, so equal outputs alone prove nothing). A direct call to the decoder carries no
kv_transfer_params and must not move that counter.

Tests run in file order; the last one stops the launcher and checks nothing is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
from vllm_helpers import Topology, metric, wait_metric

pytestmark = pytest.mark.real_vllm

XFER = "vllm:nixl_xfer_time_seconds_count"
SHORT = "The quick brown fox jumps over the lazy dog"
# Longer than several KV blocks, so the pull moves more than one block.
LONG = " ".join(
    [
        "Disaggregated prefill and decode split one request across two engines.",
        "A proxy forwards the prompt to a prefiller, then streams tokens from a decoder.",
    ]
    * 6
)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "hello, how are you today?"},
]

Body = dict[str, Any]
T = TypeVar("T")


@pytest.fixture(autouse=True)
def proxy_sees_both_roles(topology: Topology) -> None:
    """The proxy marks a worker unhealthy when its /health takes over 2 s, which a busy 2-core
    box causes now and then (a NIXL handshake, the protocol suite just before); start each test
    once the proxy sees a healthy prefiller and decoder again."""
    deadline = time.monotonic() + 60
    while httpx.get(topology.proxy + "/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the proxy saw no healthy prefiller and decoder"
        time.sleep(0.5)


def post(url: str, body: Body) -> Body:
    resp = httpx.post(url, json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    data: Body = resp.json()
    return data


def post_stream(url: str, body: Body) -> list[Body]:
    chunks: list[Body] = []
    with httpx.stream("POST", url, json=body, timeout=120) as resp:
        assert resp.status_code == 200, resp.read().decode()
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: "), line
        chunks.append(json.loads(line.removeprefix("data: ")))
    return chunks


def pulled_once(topo: Topology, call: Callable[[], T], times: int = 1) -> T:
    """Run one proxied request and check that the decoder pulled KV exactly `times` times (one
    per prompt and sample of a fanned-out request)."""
    before = metric(topo.decode, XFER)
    result = call()
    after = wait_metric(topo.decode, XFER, before + times)
    assert after == before + times, (
        f"decoder NIXL transfers went {before} -> {after}, expected +{times}"
    )
    return result


def direct(topo: Topology, call: Callable[[], T]) -> T:
    """Run one request on the decoder alone; it recomputes and must not count as a pull."""
    before = metric(topo.decode, XFER)
    result = call()
    assert metric(topo.decode, XFER) == before
    return result


def choice_tokens(resp: Body) -> tuple[list[int], str]:
    choice = resp["choices"][0]
    text = choice["text"] if "text" in choice else choice["message"]["content"]
    return choice["token_ids"], text


def stream_tokens(chunks: list[Body]) -> tuple[list[int], str, Body | None]:
    tokens: list[int] = []
    text = ""
    usage = None
    for chunk in chunks:
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            tokens += choice.get("token_ids") or []
            text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return tokens, text, usage


def completion(topo: Topology, prompt: str, **extra: Any) -> Body:
    return {
        "model": topo.model,
        "prompt": prompt,
        "max_tokens": 16,
        "temperature": 0,
        "return_token_ids": True,
        **extra,
    }


def chat(topo: Topology, **extra: Any) -> Body:
    return {
        "model": topo.model,
        "messages": MESSAGES,
        "max_tokens": 16,
        "temperature": 0,
        "return_token_ids": True,
        **extra,
    }


@pytest.mark.parametrize("prompt", [SHORT, LONG], ids=["short", "long"])
def test_completion_equals_direct(topology: Topology, prompt: str) -> None:
    body = completion(topology, prompt)
    want = direct(topology, lambda: post(topology.decode + "/v1/completions", body))
    got = pulled_once(topology, lambda: post(topology.proxy + "/v1/completions", body))
    assert choice_tokens(got) == choice_tokens(want)
    assert len(choice_tokens(got)[0]) == 16
    assert got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
    assert got["usage"]["completion_tokens"] == want["usage"]["completion_tokens"]


@pytest.mark.parametrize("prompt", [SHORT, LONG], ids=["short", "long"])
def test_completion_stream_equals_direct(topology: Topology, prompt: str) -> None:
    body = completion(topology, prompt, stream=True, stream_options={"include_usage": True})
    want = direct(topology, lambda: post_stream(topology.decode + "/v1/completions", body))
    got = pulled_once(topology, lambda: post_stream(topology.proxy + "/v1/completions", body))
    assert stream_tokens(got) == stream_tokens(want)
    assert stream_tokens(got)[2] is not None
    assert got[-1]["choices"] == []


def test_chat_equals_direct(topology: Topology) -> None:
    body = chat(topology)
    want = direct(topology, lambda: post(topology.decode + "/v1/chat/completions", body))
    got = pulled_once(topology, lambda: post(topology.proxy + "/v1/chat/completions", body))
    assert choice_tokens(got) == choice_tokens(want)
    assert got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]


def test_chat_max_completion_tokens_only(topology: Topology) -> None:
    """Chat clients such as `vllm bench serve` send only max_completion_tokens."""
    body = chat(topology)
    body["max_completion_tokens"] = body.pop("max_tokens")
    want = direct(topology, lambda: post(topology.decode + "/v1/chat/completions", body))
    got = pulled_once(topology, lambda: post(topology.proxy + "/v1/chat/completions", body))
    assert choice_tokens(got) == choice_tokens(want)
    assert len(choice_tokens(got)[0]) == 16


def test_chat_stream_equals_direct(topology: Topology) -> None:
    body = chat(topology, stream=True, stream_options={"include_usage": True})
    url = "/v1/chat/completions"
    want = direct(topology, lambda: post_stream(topology.decode + url, body))
    got = pulled_once(topology, lambda: post_stream(topology.proxy + url, body))
    assert stream_tokens(got) == stream_tokens(want)
    assert got[0]["choices"][0]["delta"]["role"] == "assistant"
    usage = stream_tokens(got)[2]
    assert usage is not None and usage["completion_tokens"] == 16


def test_openai_sdk(topology: Topology) -> None:
    client = openai.OpenAI(base_url=topology.proxy + "/v1", api_key="unused", max_retries=0)
    models = client.models.list()
    assert topology.model in [m.id for m in models.data]
    want = post(topology.decode + "/v1/completions", completion(topology, SHORT))
    got = pulled_once(
        topology,
        lambda: client.completions.create(
            model=topology.model, prompt=SHORT, max_tokens=16, temperature=0
        ),
    )
    assert got.choices[0].text == choice_tokens(want)[1]
    assert got.usage is not None and got.usage.completion_tokens == 16

    want_chat = post(topology.decode + "/v1/chat/completions", chat(topology))

    def stream_chat() -> str:
        stream = client.chat.completions.create(
            model=topology.model,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert pulled_once(topology, stream_chat) == choice_tokens(want_chat)[1]


PROMPTS = [SHORT, LONG, "hello, how are you today?"]


def by_index(resp: Body) -> list[tuple[int, list[int], str]]:
    return [(c["index"], *choice_tokens({"choices": [c]})) for c in resp["choices"]]


def test_prompt_list_equals_direct(topology: Topology) -> None:
    """Three prompts in one request: each one disaggregated (a pull each), the merged answer
    equal to the decoder's own answer to the same batch."""
    body = completion(topology, PROMPTS)
    url = "/v1/completions"
    want = direct(topology, lambda: post(topology.decode + url, body))
    got = pulled_once(topology, lambda: post(topology.proxy + url, body), times=3)
    assert by_index(got) == by_index(want) and [i for i, *_ in by_index(got)] == [0, 1, 2]
    assert got["usage"] == want["usage"]


def test_prompt_list_stream_with_usage_equals_direct(topology: Topology) -> None:
    body = completion(topology, PROMPTS, stream=True, stream_options={"include_usage": True})
    url = "/v1/completions"
    want = direct(topology, lambda: post_stream(topology.decode + url, body))
    got = pulled_once(topology, lambda: post_stream(topology.proxy + url, body), times=3)

    def per_index(chunks: list[Body]) -> dict[int, tuple[list[int], str]]:
        out: dict[int, tuple[list[int], str]] = {}
        for chunk in chunks:
            for c in chunk["choices"]:
                tokens, text = out.get(c["index"], ([], ""))
                out[c["index"]] = (tokens + (c.get("token_ids") or []), text + c["text"])
        return out

    assert per_index(got) == per_index(want) and sorted(per_index(got)) == [0, 1, 2]
    assert got[-1]["choices"] == [] and got[-1]["usage"] == want[-1]["usage"]
    assert sum(1 for c in got if c.get("usage")) == 1


def test_chat_n2_with_a_seed_equals_direct(topology: Topology) -> None:
    """vLLM refuses n > 1 with greedy sampling; with a seed its samples are reproducible: the
    proxy's two disaggregated samples (seeds s and s + 1) equal vLLM's own n=2."""
    body = chat(topology, n=2, seed=1234, temperature=1.0)
    url = "/v1/chat/completions"
    want = direct(topology, lambda: post(topology.decode + url, body))
    got = pulled_once(topology, lambda: post(topology.proxy + url, body), times=2)
    assert by_index(got) == by_index(want) and len(by_index(got)) == 2
    assert got["usage"] == want["usage"]
    greedy = httpx.post(topology.proxy + url, json=chat(topology, n=2), timeout=60)
    assert greedy.status_code == 400 and "greedy" in greedy.json()["error"]["message"]


def test_token_id_prompt_equals_direct(topology: Topology) -> None:
    ids = post(topology.decode + "/tokenize", {"model": topology.model, "prompt": LONG})["tokens"]
    body = completion(topology, ids)
    want = direct(topology, lambda: post(topology.decode + "/v1/completions", body))
    got = pulled_once(topology, lambda: post(topology.proxy + "/v1/completions", body))
    assert by_index(got) == by_index(want) and got["usage"] == want["usage"]


def test_echo_with_logprobs_is_served_by_the_decoder_alone(topology: Topology) -> None:
    """A decoder that pulled the prompt's KV never computed its logits (REAL_VLLM_FACTS §10):
    the proxy sends such a request to a decoder without a prefill leg, and says so."""
    body = completion(topology, SHORT, echo=True, logprobs=2)
    url = "/v1/completions"

    def local() -> float:
        text = httpx.get(topology.proxy + "/metrics", timeout=10).text
        return metric("", 'pdproxy_disagg_decisions_total{decision="local",'
                          'reason="prompt_logprobs"}', text)  # fmt: skip

    want = direct(topology, lambda: post(topology.decode + url, body))
    before = local()
    got = direct(topology, lambda: post(topology.proxy + url, body))  # no pull either
    assert local() == before + 1
    assert got["choices"] == want["choices"] and got["usage"] == want["usage"]
    assert got["choices"][0]["logprobs"]["token_logprobs"][0] is None


def test_priority_reaches_both_engines(topology: Topology) -> None:
    """The engines run `--scheduling-policy priority`; both legs carry the client's priority."""
    body = completion(topology, SHORT, priority=-3)
    want = direct(topology, lambda: post(topology.decode + "/v1/completions", body))
    got = pulled_once(topology, lambda: post(topology.proxy + "/v1/completions", body))
    assert choice_tokens(got) == choice_tokens(want)


def test_passthrough_endpoints(topology: Topology) -> None:
    for method, path, body in [
        ("POST", "/tokenize", {"model": topology.model, "prompt": SHORT}),
        ("POST", "/detokenize", {"model": topology.model, "tokens": [5, 6, 7]}),
        ("GET", "/version", None),
        ("POST", "/v1/embeddings", {"model": topology.model, "input": SHORT}),
    ]:
        got = httpx.request(method, topology.proxy + path, json=body, timeout=30)
        want = httpx.request(method, topology.decode + path, json=body, timeout=30)
        assert (got.status_code, got.content) == (want.status_code, want.content), path
    resp = httpx.post(topology.proxy + "/v1/responses", json={"model": topology.model,
                                                              "input": "hi"})  # fmt: skip
    assert resp.status_code == 501 and "/v1/chat/completions" in resp.json()["error"]["message"]


def run_bench(
    topo: Topology, base_url: str, out: Path, num_prompts: int, chat_api: bool = False
) -> Body:
    api = ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions"] if chat_api else [
        "--backend", "vllm", "--endpoint", "/v1/completions"]  # fmt: skip
    cmd = [
        topo.python, str(Path(__file__).parents[2] / "launchers" / "bench_serve.py"),
        *api, "--base-url", base_url, "--model", topo.model,
        "--tokenizer", str(topo.model_dir), "--dataset-name", "random",
        "--random-input-len", "64", "--random-output-len", "16", "--ignore-eos",
        "--num-prompts", str(num_prompts), "--max-concurrency", "4", "--seed", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
    ]  # fmt: skip
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data: Body = json.loads(out.read_text())
    return data


def test_vllm_bench_serve(topology: Topology, tmp_path: Path) -> None:
    num_prompts = 20
    before = metric(topology.decode, XFER)
    data = run_bench(topology, topology.proxy, tmp_path / "proxy.json", num_prompts)
    assert data["completed"] == num_prompts, data.get("errors")
    assert data.get("failed", 0) == 0
    assert data["mean_ttft_ms"] > 0
    after = wait_metric(topology.decode, XFER, before + num_prompts)
    assert after == before + num_prompts
    # The same load on the decoder alone (it prefills locally), for the record.
    alone = run_bench(topology, topology.decode, tmp_path / "decoder.json", num_prompts)
    assert alone["completed"] == num_prompts
    keys = ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_e2el_ms", "median_e2el_ms")
    summary = {"proxy_1p1d": {k: data.get(k) for k in keys}}
    summary["decoder_alone"] = {k: alone.get(k) for k in keys}
    (topology.log_dir / "bench-summary.json").write_text(json.dumps(summary, indent=2))


def test_vllm_bench_serve_chat(topology: Topology, tmp_path: Path) -> None:
    num_prompts = 10
    before = metric(topology.decode, XFER)
    data = run_bench(topology, topology.proxy, tmp_path / "chat.json", num_prompts, chat_api=True)
    assert data["completed"] == num_prompts and data.get("failed", 0) == 0, data.get("errors")
    assert wait_metric(topology.decode, XFER, before + num_prompts) == before + num_prompts


@pytest.mark.stops_topology
def test_sigterm_stops_everything(topology: Topology) -> None:
    pids = topology.started_pids()
    assert set(pids) == {"prefill-0", "decode-0", "proxy"}
    for name, pid in pids.items():
        assert os.getpgid(pid) == pid, f"{name} (pid {pid}) does not lead its process group"
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert (b"pdproxy" if name == "proxy" else b"vllm.entrypoints") in cmdline
    code = topology.stop(signal.SIGTERM)
    assert code == 128 + signal.SIGTERM
    left = []
    for name, pgid in pids.items():
        try:
            os.killpg(pgid, 0)
            left.append(name)
        except ProcessLookupError:
            pass
    assert not left, f"still running after SIGTERM: {left}"
    for url in (topology.proxy, topology.prefill, topology.decode):
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
