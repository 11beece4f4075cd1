"""Requests for several completions through the proxy: prompt lists and n > 1 fan out into one
disaggregated sub-request each and merge as vLLM merges them. The simulated decoder serves the
same batch itself (as vLLM does), which is the reference. Through the proxy, every test runs
over every connector (rig.py)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from proxy.flow.fanout import Part, merge_usage, split
from proxy.request import CHAT, COMPLETIONS, parse_request
from tests.conftest import MODEL, Sim, sse_events, wait_for
from tests.flow.rig import RECOMPUTED, Engines, Topology, start_topology

PROMPTS = ["The quick brown fox", "a cache of blocks moves", "decode me now"]
MESSAGES = [{"role": "user", "content": "Tell me about KV caches."}]
Body = dict[str, Any]


def post(url: str, body: Body, rid: str | None = None, status: int = 200) -> Body:
    headers = {"X-Request-Id": rid} if rid else {}
    resp = httpx.post(url, json=body, headers=headers, timeout=30)
    assert resp.status_code == status, resp.text
    data: Body = resp.json()
    return data


def stream(url: str, body: Body, rid: str | None = None) -> list[Any]:
    headers = {"X-Request-Id": rid} if rid else {}
    resp = httpx.post(url, json=body, headers=headers, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "text/event-stream"
    return sse_events(resp.content)


def streamed_choices(events: list[Any]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for event in events:
        if isinstance(event, dict):
            for c in event["choices"]:
                piece = c.get("text") or (c.get("delta") or {}).get("content") or ""
                texts[c["index"]] = texts.get(c["index"], "") + piece
    return texts


def text_of(choice: Body) -> str:
    return str(choice["text"] if "text" in choice else choice["message"]["content"])


def same_choices(got: Body, want: Body) -> None:
    assert [c["index"] for c in got["choices"]] == list(range(len(want["choices"])))
    for g, w in zip(got["choices"], want["choices"], strict=True):
        assert {**g, "index": 0} == {**w, "index": 0}


# -- splitting and merging (units) ---------------------------------------------------------


def test_split_numbers_choices_and_derives_seeds() -> None:
    req = parse_request(
        COMPLETIONS,
        b'{"model":"m","prompt":["a","b"],"n":2,"seed":7,"temperature":1,"stream":true}',
        "rid",
    )
    parts = split(req, 8)
    assert [(p.index, p.prompt, p.sample) for p in parts] == [(0, 0, 0), (1, 0, 1), (2, 1, 0),
                                                              (3, 1, 1)]  # fmt: skip
    assert [p.request.body["prompt"] for p in parts] == ["a", "a", "b", "b"]
    assert [p.request.body["seed"] for p in parts] == [7, 8, 7, 8]  # vLLM: sample j, seed + j
    assert all(p.request.body["n"] == 1 and p.request.fanout == 1 for p in parts)
    assert [p.request.request_id for p in parts] == ["rid-0", "rid-1", "rid-2", "rid-3"]
    assert all(p.request.stream for p in parts)
    unseeded = split(parse_request(CHAT, b'{"model":"m","messages":[{"role":"u"}],"n":2,'
                                         b'"seed":-1}', "r"), 8)  # fmt: skip
    assert all(p.request.body["seed"] == -1 for p in unseeded)  # -1 is vLLM's "no seed"


def test_split_keeps_beam_width_and_refuses_beyond_the_limit() -> None:
    beams = parse_request(COMPLETIONS, b'{"model":"m","prompt":["a","b"],"n":3,'
                                       b'"use_beam_search":true}', "r")  # fmt: skip
    parts = split(beams, 8)
    assert [(p.index, p.request.body["n"]) for p in parts] == [(0, 3), (3, 3)]
    assert all(p.request.local_reason == "beam_search" for p in parts)
    with pytest.raises(Exception, match=r"asks for 6 completions .* at most 5"):
        split(parse_request(COMPLETIONS, b'{"model":"m","prompt":["a","b"],"n":3}', "r"), 5)


def test_usage_counts_each_prompt_once() -> None:
    req = parse_request(COMPLETIONS, b'{"model":"m","prompt":["a","b"],"n":2}', "r")
    parts: list[Part] = split(req, 8)
    usages = [
        {"prompt_tokens": 5, "total_tokens": 8, "completion_tokens": 3, "x": None},
        {"prompt_tokens": 5, "total_tokens": 9, "completion_tokens": 4, "x": None},
        {"prompt_tokens": 2, "total_tokens": 3, "completion_tokens": 1, "x": None},
        {"prompt_tokens": 2, "total_tokens": 4, "completion_tokens": 2, "x": None},
    ]
    merged = merge_usage(parts, usages)
    assert merged == {"prompt_tokens": 7, "total_tokens": 17, "completion_tokens": 10, "x": None}
    assert list(merged) == ["prompt_tokens", "total_tokens", "completion_tokens", "x"]


# -- through the proxy (1p1d) --------------------------------------------------------------


@pytest.mark.workers2
def test_prompt_list_equals_the_decoders_own_batch(pd: Topology) -> None:
    decoder = pd.decode[0]
    body = {"model": MODEL, "prompt": PROMPTS, "max_tokens": 8, "return_token_ids": True}
    got = post(pd.url + "/v1/completions", body, rid="batch-1")
    assert pd.kv_in(decoder) == 3  # each prompt was disaggregated
    legs = pd.prefill[0].generation_records()
    assert sorted(r["x_request_id"] for r in legs) == ["batch-1-0", "batch-1-1", "batch-1-2"]
    assert sorted(r["body"]["prompt"] for r in legs) == sorted(PROMPTS)
    want = post(decoder.url + "/v1/completions", body, rid="batch-1")
    assert got["id"] == want["id"] == "cmpl-batch-1"
    same_choices(got, want)
    assert got["usage"] == want["usage"]
    assert set(got) == set(want) and got["metrics"] is None


@pytest.mark.workers2
def test_prompt_list_stream_merges_into_one_stream(pd: Topology) -> None:
    body = {"model": MODEL, "prompt": PROMPTS, "max_tokens": 12, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    events = stream(pd.url + "/v1/completions", body)
    assert pd.kv_in(pd.decode[0]) == 3
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert usage["choices"] == [] and set(usage["usage"]) == {
        "prompt_tokens", "total_tokens", "completion_tokens"}  # fmt: skip
    assert all(c["choices"] and "usage" not in c for c in chunks)
    assert len({(c["id"], c["created"]) for c in events[:-1]}) == 1
    assert sum(c["choices"][0]["finish_reason"] is not None for c in chunks) == 3
    want = post(pd.decode[0].url + "/v1/completions", {**body, "stream": False,
                                                          "stream_options": None})  # fmt: skip
    assert streamed_choices(events) == {c["index"]: c["text"] for c in want["choices"]}
    assert usage["usage"] == {k: want["usage"][k] for k in usage["usage"]}


def test_token_id_prompts(pd: Topology) -> None:
    decoder = pd.decode[0]
    ids = post(decoder.url + "/tokenize", {"model": MODEL, "prompt": PROMPTS[0]})["tokens"]
    for prompt in (ids, [ids, ids[:3]]):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "return_token_ids": True}
        before = pd.kv_in(decoder)
        got = post(pd.url + "/v1/completions", body)
        assert pd.kv_in(decoder) - before == (1 if prompt is ids else 2)
        same_choices(got, post(decoder.url + "/v1/completions", body))


@pytest.mark.workers2
def test_n_with_a_seed_answers_as_vllm_answers_n(pd: Topology) -> None:
    """vLLM gives its j-th sample the seed seed + j: so does the fan-out, so the n choices equal
    the decoder's own n-sample answer, each one disaggregated."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 10, "n": 3, "seed": 11,
            "temperature": 0.8}  # fmt: skip
    got = post(pd.url + "/v1/chat/completions", body, rid="n3")
    assert pd.kv_in(pd.decode[0]) == 3
    legs = sorted(pd.prefill[0].generation_records(), key=lambda r: r["x_request_id"])
    assert [(r["body"]["n"], r["body"]["seed"]) for r in legs] == [(1, 11), (1, 12), (1, 13)]
    want = post(pd.decode[0].url + "/v1/chat/completions", body, rid="n3")
    assert got["id"] == "chatcmpl-n3"
    same_choices(got, want)
    assert len({text_of(c) for c in got["choices"]}) == 3  # three different samples
    assert got["usage"] == want["usage"]


def test_list_with_n_streamed_chat_n(pd: Topology) -> None:
    body = {"model": MODEL, "prompt": PROMPTS[:2], "max_tokens": 6, "n": 2, "seed": 3,
            "temperature": 1.0}  # fmt: skip
    got = post(pd.url + "/v1/completions", body)
    same_choices(got, post(pd.decode[0].url + "/v1/completions", body))
    chat = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "n": 2, "seed": 5,
            "stream": True}  # fmt: skip
    events = stream(pd.url + "/v1/chat/completions", chat)
    roles = [e["choices"][0]["index"] for e in events[:-1] if "role" in e["choices"][0]["delta"]]
    assert sorted(roles) == [0, 1]
    want = post(pd.decode[0].url + "/v1/chat/completions", {**chat, "stream": False})
    assert streamed_choices(events) == {c["index"]: text_of(c) for c in want["choices"]}


def test_prompt_list_and_n_fan_out_one_transfer_each(pd: Topology) -> None:
    """Each completion of a batch is a prefill leg and a KV transfer of its own, merged as the
    decoder merges the same batch."""
    before = pd.notified() if pd.wire.notifies else 0
    body = {"model": MODEL, "prompt": ["The quick brown fox", "concurrent request x"],
            "max_tokens": 6, "n": 2, "seed": 5}  # fmt: skip
    got = post(pd.url + "/v1/completions", body)
    if pd.wire.notifies:
        assert pd.notified() - before == 4
    assert len(pd.prefill[0].generation_records()) == 4
    assert pd.kv_in(pd.decode[0]) == 4 and pd.decode[0].metric(RECOMPUTED) == 0
    want = post(pd.decode[0].url + "/v1/completions", body)
    assert [c["text"] for c in got["choices"]] == [c["text"] for c in want["choices"]]
    assert got["usage"] == want["usage"]


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        ("/v1/completions", {"prompt": PROMPTS[0], "echo": True, "logprobs": 2}),
        ("/v1/completions", {"prompt": PROMPTS[0], "prompt_logprobs": 1}),
        ("/v1/chat/completions", {"messages": MESSAGES, "prompt_logprobs": 2, "logprobs": True}),
        ("/v1/completions", {"prompt": PROMPTS[:2], "echo": True, "logprobs": 1}),
    ],
    ids=["echo-logprobs", "prompt-logprobs", "chat-prompt-logprobs", "batch-echo-logprobs"],
)
def test_prompt_logprobs_are_served_by_the_decoder_alone(
    pd: Topology, path: str, extra: Body
) -> None:
    """A decoder given the prompt's KV never computed the prompt's logits (vLLM then loads
    nothing and recomputes): such requests go to a decoder without a prefill leg, counted."""
    body = {"model": MODEL, "max_tokens": 4, **extra}
    before = pd.proxy.metrics().total("pdproxy_disagg_decisions_total", reason="prompt_logprobs")
    got = post(pd.url + path, body)
    assert pd.prefill[0].generation_records() == []
    assert pd.transfers() == 0
    after = pd.proxy.metrics().total("pdproxy_disagg_decisions_total", reason="prompt_logprobs")
    assert after - before == len(extra.get("prompt") if isinstance(extra.get("prompt"), list)
                                 else [None])  # fmt: skip
    want = post(pd.decode[0].url + path, body)
    same_choices(got, want)
    assert got.get("prompt_logprobs") == want.get("prompt_logprobs")


def test_echo_without_logprobs_is_disaggregated(pd: Topology) -> None:
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4, "echo": True}
    got = post(pd.url + "/v1/completions", body)
    assert pd.kv_in(pd.decode[0]) == 1
    same_choices(got, post(pd.decode[0].url + "/v1/completions", body))
    assert text_of(got["choices"][0]).startswith(PROMPTS[0])


def test_priority_goes_on_both_legs(pd: Topology) -> None:
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 2, "priority": 3}
    post(pd.url + "/v1/completions", body)
    resp = httpx.post(
        pd.url + "/v1/completions",
        json={**body, "priority": 9},
        headers={"X-Vllm-Priority": "-2"},  # vLLM's header overrides the body
    )
    assert resp.status_code == 200
    for sim in (pd.prefill[0], pd.decode[0]):
        assert [r["body"]["priority"] for r in sim.generation_records()] == [3, -2]


# -- limits and failures -------------------------------------------------------------------


FANOUT_STRICT = (  # no failover of any kind: a failure ends the request
    "failover: {prefill_retries: 0, decode_retries: 0, fallback_local_prefill: false, "
    "migrations: 0}\n"
    "prefill_policy: round_robin\ndecode_policy: round_robin\nhealth: {interval: 0}\n"
    "fanout: {max_batch_prompts: 4, max_parallel: 2}\n"
)


@pytest.fixture(scope="module")
def strict(engines: Engines, serving_procs: int) -> Iterator[Topology]:
    """2p2d, round robin, no failover, at most 4 completions and 2 sub-requests at a time."""
    topo = start_topology(engines, "fanout-strict", 2, 2, FANOUT_STRICT, workers=serving_procs)
    try:
        yield topo
    finally:
        topo.stop()


@pytest.fixture
def fresh(strict: Topology) -> Topology:
    return strict.reset()


@pytest.mark.workers2
def test_batch_over_the_limit_is_a_400_naming_it(fresh: Topology) -> None:
    err = post(fresh.url + "/v1/completions", {"model": MODEL, "prompt": ["a"] * 5}, status=400)
    message = err["error"]["message"]
    assert "5 completions" in message and "at most 4" in message
    assert "fanout.max_batch_prompts" in message and err["error"]["param"] == "prompt"
    err = post(fresh.url + "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES,
                                                    "n": 6}, status=400)  # fmt: skip
    assert err["error"]["param"] == "n"
    assert all(s.generation_records() == [] for s in fresh.prefill + fresh.decode)


@pytest.mark.workers2
def test_at_most_max_parallel_sub_requests_in_flight(fresh: Topology) -> None:
    for p in fresh.prefill:
        p.faults(stall_seconds=0.3)
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            workers = fresh.proxy.stats()["workers"]
            seen.append(sum(w["inflight"] for w in workers["decode"]))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        got = post(fresh.url + "/v1/completions", {"model": MODEL, "prompt": [*PROMPTS, "x"],
                                                   "max_tokens": 2})  # fmt: skip
    finally:
        done.set()
        watcher.join()
    assert len(got["choices"]) == 4 and max(seen) == 2


def test_an_engine_4xx_for_one_prompt_is_the_answer(fresh: Topology) -> None:
    """Before anything was sent, one sub-request's 4xx is the whole request's, as the engine
    wrote it (vLLM rejects the whole batch for one bad prompt too)."""
    body = {"model": MODEL, "prompt": [PROMPTS[0], "hello " * 20000], "max_tokens": 4}
    resp = httpx.post(fresh.url + "/v1/completions", json=body, timeout=30)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "BadRequestError" and error["param"] == "input_tokens"


def test_an_engine_error_event_ends_the_merged_stream(fresh: Topology) -> None:
    d0 = fresh.decode[0]
    d0.faults(error_event_after_chunks=2, error_message="the engine broke")
    body = {"model": MODEL, "prompt": PROMPTS[:2], "max_tokens": 16000, "ignore_eos": True,
            "stream": True}  # fmt: skip
    events = stream(fresh.url + "/v1/completions", body)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    assert events[-2]["error"]["message"] == "the engine broke"  # the engine's own event
    the_rest_was_cancelled(fresh)


def the_rest_was_cancelled(topo: Topology) -> None:
    """After one sub-request failed, its sibling ends wherever it was: aborted on its decoder if
    it had reached it (or on its prefiller, or never sent, when the failure came first: a slow
    box can take longer over one prefill than the other decoder over two tokens); no decode leg
    is left running and none ran to its end."""

    def settled() -> bool:
        legs = [r for d in topo.decode for r in d.generation_records()]
        idle = all(w["inflight"] == 0 for w in topo.proxy.stats()["workers"]["decode"])
        return idle and all(r["outcome"] != "in_progress" for r in legs)

    wait_for(settled)
    outcomes = sorted(r["outcome"] for d in topo.decode for r in d.generation_records())
    assert outcomes in (["dropped"], ["aborted", "dropped"]), outcomes


def held(sims: list[Sim], rid: str) -> bool:
    """Whether any of `sims` still holds KV blocks for a request whose id starts with `rid`."""
    return any(any(rid in r for r in s.control("GET", "info")["leased_requests"]) for s in sims)


def aborted(sims: list[Sim]) -> float:
    return sum(s.metric("pdsim:aborted_requests_total") for s in sims)


def test_a_prefiller_dying_fails_the_batch_and_cancels_the_rest(engines: Engines) -> None:
    """One sub-request's prefiller is killed mid-prefill: the client gets a 502 at once, and the
    other sub-request, waiting on its decoder, is aborted there. Over NIXL its KV waited on the
    other prefiller for the pull and is freed; over LMCache it was pushed, nothing waits."""
    config = (
        "failover: {prefill_retries: 0, decode_retries: 0, fallback_local_prefill: false}\n"
        "prefill_policy: round_robin\nhealth: {interval: 0}\n"
    )
    topo = start_topology(engines, "fanout-dying", prefillers=2, config=config, own_prefillers=1)
    try:
        topo.reset()
        (dying, p0), d0 = topo.prefill, topo.decode[0]
        dying.faults(stall_seconds=30)
        d0.faults(stall_seconds=30)
        rid = f"dies-{time.monotonic_ns()}"
        result: list[httpx.Response] = []
        body = {"model": MODEL, "prompt": PROMPTS[:2], "max_tokens": 4}
        thread = threading.Thread(target=lambda: result.append(httpx.post(
            topo.url + "/v1/completions", json=body, headers={"X-Request-Id": rid},
            timeout=20)))  # fmt: skip
        thread.start()
        wait_for(lambda: len(d0.generation_records()) == 1 and dying.generation_records(), 10)
        # the other prompt's KV waits on p0 for d0 (NIXL)
        assert held([p0], rid) is topo.wire.prefiller_holds_kv
        t0 = time.monotonic()
        dying.stop(signal.SIGKILL)
        thread.join(timeout=15)
        assert result and result[0].status_code == 502 and time.monotonic() - t0 < 5
        assert dying.url in result[0].json()["error"]["message"]
        wait_for(lambda: aborted([d0]) == 1)  # the decoder aborted the other one
        wait_for(lambda: not held([p0], rid))  # ... and freed its KV on p0
    finally:
        topo.stop()


@pytest.mark.workers2
def test_a_decoder_failing_mid_stream_ends_the_stream_and_cancels_the_rest(
    fresh: Topology,
) -> None:
    d0 = fresh.decode[0]
    d0.faults(drop_after_chunks=3)  # the other decoder streams on: 20000 tokens take seconds
    body = {"model": MODEL, "prompt": PROMPTS[:2], "max_tokens": 16000, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    rid = f"fails-mid-stream-{time.monotonic_ns()}"
    t0 = time.monotonic()
    events = stream(fresh.url + "/v1/completions", body, rid)
    assert time.monotonic() - t0 < 10
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    assert "closed the connection early" in events[-2]["error"]["message"]
    assert not any(isinstance(e, dict) and e.get("usage") for e in events)
    assert any(isinstance(e, dict) and e.get("choices") for e in events)  # it had started
    the_rest_was_cancelled(fresh)
    # no KV of the request left behind on the prefillers (earlier tests' faults may have left
    # blocks of theirs, until the lease runs out)
    assert not held(fresh.prefill, rid)


@pytest.mark.workers2
def test_a_client_leaving_cancels_every_sub_request(pd: Topology) -> None:
    d0 = pd.decode[0]
    body = {"model": MODEL, "prompt": PROMPTS, "max_tokens": 16000, "ignore_eos": True,
            "stream": True}  # fmt: skip
    before = pd.proxy.metrics().total("pdproxy_client_disconnects_total", phase="decode")
    rid = f"leaves-{time.monotonic_ns()}"
    headers = {"X-Request-Id": rid}
    with httpx.stream(
        "POST", pd.url + "/v1/completions", json=body, headers=headers, timeout=20
    ) as resp:
        assert resp.status_code == 200
        wait_for(lambda: len(d0.generation_records()) == 3)
        next(resp.iter_bytes())  # the stream started; then the client goes
    wait_for(lambda: d0.metric("pdsim:aborted_requests_total", phase="decode") == 3, 5)
    # (a serving process's counters reach /metrics with its next report: waited for)
    metrics = pd.proxy.metrics
    wait_for(
        lambda: metrics().total("pdproxy_client_disconnects_total", phase="decode") - before == 1
    )
    assert not held(pd.prefill, rid)
    assert pd.kv_in(d0) == 3
