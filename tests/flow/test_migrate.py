"""A stream whose decoder fails mid-answer continues on another decoder (proxy.flow.migrate):
the client's answer equals the uninterrupted one, token for token, with one id, one created
time and one request's usage. Simulated engines whose greedy model continues a sequence the
same way whether its tokens came as prompt or as output, as a real model does. (Each answer
ignores EOS: the simulated model may end one before the fault it was set up to meet.)

The module's decoders are its own (a test kills one and starts it again); the prefiller is the
session's. A fault that strikes after k chunks is set on both decoders for one request each:
the one the proxy picks breaks, the continuation runs on the other. (The breaker's threshold is
high: every test breaks connections on purpose, and a decoder kept out would leave a broken
stream nowhere to go.)"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.flow.migrate import Transcript
from tests.conftest import MODEL, Proxy, Sim, sse_events, start_proxy, start_sim, wait_for
from tests.flow.rig import unique

Body = dict[str, Any]
CONFIG = "--config"
SPEED = ("--speed-factor", "0")  # untimed: one chunk per token, so a fault's k chunks = k tokens


@pytest.fixture(scope="module")
def decoders(logs: Path) -> Iterator[list[Sim]]:
    started = [start_sim(logs, f"migrate-d{i}", *SPEED, role="decode") for i in range(2)]
    yield started
    for sim in started:
        sim.stop()


@pytest.fixture(scope="module")
def _proxy(logs: Path, sims: dict[str, Sim], decoders: list[Sim]) -> Iterator[Proxy]:
    config = logs / "migrate.yaml"
    config.write_text(
        "health: {interval: 0.2, timeout: 1, failure_threshold: 100, cooldown: 1}\n"
        "timeouts: {decode_idle: 2}\n"
    )
    proxy = start_proxy(logs, [sims["p0"]], decoders, CONFIG, str(config), name="migrate")
    yield proxy
    proxy.stop()


@pytest.fixture
def proxy(_proxy: Proxy, sims: dict[str, Sim], decoders: list[Sim]) -> Proxy:
    for sim in [sims["p0"], *decoders]:
        sim.reset()
    workers = lambda: _proxy.stats()["workers"]["decode"]  # noqa: E731
    wait_for(lambda: all(w["available"] for w in workers()))
    return _proxy


def stream(proxy: Proxy, body: Body, path: str = "/v1/completions") -> list[Any]:
    resp = httpx.post(proxy.url + path, json={**body, "stream": True}, timeout=30)
    assert resp.status_code == 200, resp.text
    return sse_events(resp.content)


def text_of(events: list[Any]) -> str:
    out = []
    for event in events:
        for choice in event["choices"] if isinstance(event, dict) else ():
            out.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(out)


def whole(sim: Sim, body: Body, path: str = "/v1/completions") -> Body:
    """The uninterrupted answer, from one engine alone."""
    body = {k: v for k, v in body.items() if k != "stream_options"}
    resp = httpx.post(sim.url + path, json={**body, "stream": False}, timeout=30)
    assert resp.status_code == 200, resp.text
    data: Body = resp.json()
    return data


def check_one_stream(events: list[Any], expected: Body, chat: bool) -> None:
    """One id, one created, one object; no error; the usage of one request; [DONE] once."""
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = events[:-1]
    assert not any("error" in e for e in chunks), chunks
    assert {e["id"] for e in chunks} == {chunks[0]["id"]}
    assert {e["created"] for e in chunks} == {chunks[0]["created"]}
    obj = "chat.completion.chunk" if chat else "text_completion"
    assert {e["object"] for e in chunks} == {obj}
    assert all("token_ids" not in c or c["token_ids"] is None for e in chunks
               for c in e["choices"])  # fmt: skip
    finishes = [c["finish_reason"] for e in chunks for c in e["choices"] if c["finish_reason"]]
    assert finishes == [expected["choices"][0]["finish_reason"]]
    usage, want = chunks[-1]["usage"], expected["usage"]
    assert usage["prompt_tokens"] == want["prompt_tokens"]
    assert usage["completion_tokens"] == want["completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def migrations(proxy: Proxy) -> float:
    return proxy.metrics().total("pdproxy_migrations_total")


def test_dropped_stream_continues_on_the_other_decoder(proxy: Proxy, decoders: list[Sim]) -> None:
    body = {"model": MODEL, "prompt": unique("a long answer"), "max_tokens": 40,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    expected = whole(decoders[0], body)
    before = migrations(proxy)
    for sim in decoders:  # the first to serve drops; the continuation runs on the other
        sim.faults(drop_after_chunks=5, count=1)
    events = stream(proxy, body)
    assert text_of(events) == expected["choices"][0]["text"]
    check_one_stream(events, expected, chat=False)
    # each decoder dropped once: the answer crossed two seams (a -> b -> a)
    assert migrations(proxy) == before + 2
    # the request's timeline shows both seams, the tokens moved adding up to what came before
    recent = httpx.get(proxy.url + "/admin/requests?limit=1000", timeout=5).json()["data"]
    (seams,) = [t["seams"] for t in recent if t["seams"]][-1:]
    assert [s["reason"] for s in seams] == ["connection", "connection"]
    assert [s["from"] for s in seams] == [seams[1]["to"], seams[0]["to"]]  # a -> b -> a
    assert 0 < seams[0]["tokens_moved"] < 40 and all(s["gap_ms"] >= 0 for s in seams)


def test_chat_stays_chat_across_the_seam(proxy: Proxy, decoders: list[Sim]) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": unique("talk to me")}],
            "max_tokens": 30, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    path = "/v1/chat/completions"
    expected = whole(decoders[0], body, path)
    decoders[0].faults(error_event_after_chunks=4, count=1)
    decoders[1].faults(error_event_after_chunks=4, count=1)
    events = stream(proxy, body, path)
    assert text_of(events) == expected["choices"][0]["message"]["content"]
    check_one_stream(events, expected, chat=True)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert sum(1 for e in events[:-1] for c in e["choices"] if "role" in c["delta"]) == 1


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_whole_answer_broken_mid_way_continues(
    proxy: Proxy, decoders: list[Sim], path: str
) -> None:
    """A non-streamed answer is read from its decoder as a stream: the other decoder continues
    it from the tokens already generated, and the client gets one whole answer, the greedy
    one, with one request's usage."""
    chat = path.endswith("chat/completions")
    prompt = unique("all at once")
    body: Body = {"model": MODEL, "max_tokens": 25, "stop": ["zzz"], "ignore_eos": True}
    body |= {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    expected = whole(decoders[0], body, path)
    before = migrations(proxy)
    for sim in decoders:  # the first to serve drops after 7 tokens
        sim.faults(drop_after_chunks=7, count=1)
    resp = httpx.post(proxy.url + path, json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    got, want = resp.json(), expected["choices"][0]
    assert migrations(proxy) >= before + 1  # continued (the other may drop too), not asked again
    (choice,) = got["choices"]
    text = choice["message"]["content"] if chat else choice["text"]
    assert text == (want["message"]["content"] if chat else want["text"])
    assert (choice["finish_reason"], choice["stop_reason"]) == (
        want["finish_reason"], want["stop_reason"]
    )  # fmt: skip
    assert got["usage"] == {k: expected["usage"][k] for k in got["usage"]}
    assert got["object"] == expected["object"]


def test_a_whole_answer_that_cannot_migrate_is_asked_for_again(
    proxy: Proxy, decoders: list[Sim]
) -> None:
    """Structured output is not continued: its whole answer, broken mid-way, is asked for
    again on the other decoder (decode_retries)."""
    body = {"model": MODEL, "prompt": unique("all at once"), "max_tokens": 25,
            "structured_outputs": {"regex": "[a-z ]+"}}  # fmt: skip
    expected = whole(decoders[0], body)
    for sim in decoders:  # the first to serve sends half its body and closes
        sim.faults(truncate_body=True, count=1)
    resp = httpx.post(proxy.url + "/v1/completions", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert got["choices"][0]["text"] == expected["choices"][0]["text"]
    assert got["usage"] == expected["usage"]


def seam_string(pieces: list[str], seam: int) -> str:
    """The shortest string made of the end of piece `seam - 1` and the start of piece `seam`
    (two characters of each preferred) that does not occur whole before the seam: the text is
    the simulator's, and a short pair of characters can occur earlier in it."""
    before, after = pieces[seam - 1], pieces[seam]
    text = "".join(pieces[:seam])
    pairs = [(k, m) for k in range(1, len(before) + 1) for m in range(1, len(after) + 1)]
    pairs.sort(key=lambda p: (p != (2, 2), p[0] + p[1]))
    for k, m in pairs:
        if before[-k:] + after[:m] not in text:
            return before[-k:] + after[:m]
    raise AssertionError(f"no string across the seam first occurs there: {pieces[: seam + 1]}")


def test_a_stop_string_across_the_seam_stops_the_answer(proxy: Proxy, decoders: list[Sim]) -> None:
    """The decoder drops after 6 tokens; the stop string is the end of the 6th token's text
    and the start of the 7th's: neither engine can see it, the proxy does."""
    body: Body = {"model": MODEL, "prompt": unique("stop across"), "max_tokens": 30,
                  "ignore_eos": True, "return_token_ids": True, "stream": True}  # fmt: skip
    resp = httpx.post(decoders[0].url + "/v1/completions", json=body, timeout=30)
    pieces = [c["text"] for e in sse_events(resp.content)[:-1] for c in e["choices"]]
    assert len(pieces) == 30  # one chunk per token
    stop = seam_string(pieces, 6)
    body = {"model": MODEL, "prompt": body["prompt"], "max_tokens": 30, "stop": [stop],
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    expected = whole(decoders[0], body)
    assert expected["choices"][0]["finish_reason"] == "stop"
    for sim in decoders:
        sim.faults(drop_after_chunks=6, count=1)
    events = stream(proxy, body)
    assert text_of(events) == expected["choices"][0]["text"]
    check_one_stream(events, expected, chat=False)
    finish = [c for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
    assert finish[0]["stop_reason"] == stop


def test_a_fanned_out_sub_request_migrates_alone(proxy: Proxy, decoders: list[Sim]) -> None:
    prompts = [unique("first of two"), unique("second of two")]
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 30, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    expected = whole(decoders[0], body)
    before = migrations(proxy)
    for sim in decoders:
        sim.faults(drop_after_chunks=3, count=1)
    events = stream(proxy, body)
    assert migrations(proxy) > before
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    texts: dict[int, str] = {}
    for event in events[:-1]:
        for c in event["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert texts == {c["index"]: c["text"] for c in expected["choices"]}
    assert events[-2]["usage"] == {k: expected["usage"][k] for k in events[-2]["usage"]}


def test_a_guided_request_is_not_migrated(proxy: Proxy, decoders: list[Sim]) -> None:
    body = {"model": MODEL, "prompt": unique("json please"), "max_tokens": 30,
            "ignore_eos": True, "structured_outputs": {"regex": "[a-z ]+"}}  # fmt: skip
    for sim in decoders:
        sim.faults(drop_after_chunks=3, count=1)
    before = proxy.metrics().total("pdproxy_migrations_failed_total", why="structured_output")
    events = stream(proxy, body)
    assert "error" in events[-2] and events[-1] == "[DONE]"
    after = proxy.metrics().total("pdproxy_migrations_failed_total", why="structured_output")
    assert after == before + 1


def test_killed_decoder_mid_stream(proxy: Proxy, decoders: list[Sim]) -> None:
    """The decoder's process dies (SIGKILL) after 3 chunks; the answer is 5 tokens, so the
    continuation (2 tokens) ends before the same fault could strike the survivor. Last in the
    module: the dead decoder stays dead."""
    body = {"model": MODEL, "prompt": unique("die now"), "max_tokens": 5, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    expected = whole(decoders[0], body)
    for sim in decoders:
        sim.faults(exit_after_chunks=3, count=1)
    events = stream(proxy, body)
    dead = [i for i, sim in enumerate(decoders) if sim.proc.poll() is not None]
    assert len(dead) == 1 and decoders[dead[0]].proc.returncode == -signal.SIGKILL
    assert text_of(events) == expected["choices"][0]["text"]
    check_one_stream(events, expected, chat=False)


def test_a_continuation_starts_after_the_last_token_whose_text_came_out() -> None:
    """vLLM streams a token that ends inside a character with empty text; a continuation from
    a prompt that ends there would get the whole prompt's text back (vLLM 0.32), so it starts
    before such tokens and generates them again."""
    head = b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":'
    events = [
        b'[{"index":0,"text":" a","prompt_token_ids":[1,2],"token_ids":[7]}]}\n\n',
        b'[{"index":0,"text":"","prompt_token_ids":null,"token_ids":[8]}]}\n\n',
        b'[{"index":0,"text":"","prompt_token_ids":null,"token_ids":[9]}]}\n\n',
    ]
    transcript = Transcript(keep_ids=False)
    out = transcript.feed(b"".join(head + e for e in events))
    assert b"[7]" not in out and out.count(b'"token_ids":null') == 3
    assert transcript.prompt() == [1, 2] and transcript.generated == [7, 8, 9]
    assert transcript.moved == [7]
    transcript.feed(head + b'[{"index":0,"text":"\\u00e9","token_ids":[10]}]}\n\n')
    assert transcript.moved == [7, 8, 9, 10]


def _reference(events: list[bytes]) -> tuple[list[int] | None, list[int], int]:
    """What a transcript notes of `events`, taken event by event: (prompt ids, generated ids,
    silent: the ids at the end whose event's text was empty)."""
    prompt, generated, silent = None, [], 0
    for event in events:
        body = orjson.loads(event[len(b"data: ") :])
        if body.get("prompt_token_ids") is not None:
            prompt = body["prompt_token_ids"]
        for choice in body["choices"]:
            ids = choice.get("token_ids") or []
            generated += ids
            text = choice.get("text", (choice.get("delta") or {}).get("content"))
            if text == "":
                silent += len(ids)
            elif ids:
                silent = 0
    return prompt, generated, silent


_EVENT = st.tuples(
    st.sampled_from(["", " a", "\\u00e9"]),  # the token's text: empty, a word, an escape
    st.lists(st.integers(0, 150_000), max_size=3),  # its ids
    st.booleans(),  # chat (delta.content) or completion (text)
)


@given(
    prompt=st.none() | st.lists(st.integers(0, 150_000), max_size=5),
    events=st.lists(_EVENT, min_size=1, max_size=12),
    cuts=st.lists(st.integers(1, 11), max_size=4),
    keep=st.booleans(),
)
def test_transcript_notes_ids_as_taken_event_by_event(
    prompt: list[int] | None,
    events: list[tuple[str, list[int], bool]],
    cuts: list[int],
    keep: bool,
) -> None:
    """Batches of whole events, cut anywhere between events: the ids noted, the `moved` ids and
    the events passed on are those of taking each event alone."""
    raw = []
    for i, (text, ids, chat) in enumerate(events):
        piece = f'"delta":{{"content":"{text}"}}' if chat else f'"text":"{text}"'
        body = f'{{"id":"x","choices":[{{"index":0,{piece},"token_ids":{ids}}}]'
        if i == 0 and prompt is not None:
            body += f',"prompt_token_ids":{prompt}'
        raw.append(f"data: {body}}}".encode().replace(b" ", b"") + b"\n\n")
    raw = [e.replace(b"data:", b"data: ", 1) for e in raw]
    transcript = Transcript(keep_ids=keep)
    out, last = b"", 0
    for cut in [*sorted(set(c for c in cuts if c < len(raw))), len(raw)]:
        out += transcript.feed(b"".join(raw[last:cut]))
        last = cut
    want_prompt, want_generated, want_silent = _reference([e.rstrip(b"\n") for e in raw])
    assert transcript.prompt() == want_prompt
    assert transcript.generated == want_generated
    assert transcript.moved == want_generated[: len(want_generated) - want_silent]
    if keep:
        assert out == b"".join(raw)
    else:
        for sent, taken in zip(out.split(b"\n\n")[:-1], raw, strict=True):
            body, given_body = orjson.loads(sent[6:]), orjson.loads(taken[6:])
            assert body["choices"][0]["token_ids"] is None
            assert body.get("prompt_token_ids") is None
            given_body["choices"][0]["token_ids"] = None
            if "prompt_token_ids" in given_body:
                given_body["prompt_token_ids"] = None
            assert body == given_body
