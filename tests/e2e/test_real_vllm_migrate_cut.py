"""A decoder connection cut mid-answer, on real vLLM (CPU build): the answer continues on the
session's decoder, its KV computed by the prefiller and pulled over NIXL, and equals the
uninterrupted greedy answer token for token, with one request's usage.

No third engine and no signal: decoder 0 of each test's proxy is a relay (a real socket) in
front of the session's decoder that cuts one response after a set number of SSE events; decoder
1 is the session's decoder itself. Round-robin sends the first decode leg to the relay, so the
place of the cut is exact: a chosen token for a stop string across the seam, one sub-stream of
a fan-out. Both "decoders" are one engine: the NIXL plan does not mind, since a decoder pulls
from the prefiller's side channel and offers none of its own, and the continuation's prompt
(with what was generated) is prefilled and pulled again like any other.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
from real_vllm_fixtures import STARVED_BOX_STALL, STARVED_BOX_TIMEOUTS
from vllm_helpers import Topology, metric

from pdsim.launch import start_proxy

pytestmark = pytest.mark.real_vllm

Body = dict[str, Any]
TOKENS = 24
XFER = "vllm:nixl_xfer_time_seconds_count"


_GENERATED = re.compile(rb'"token_ids":\[([0-9, ]*)\]')  # not "prompt_token_ids"
_FINISHED = re.compile(rb'"finish_reason":"')
T = TypeVar("T")


class Relay:
    """Relays TCP connections to `upstream`; once armed, cuts the next response whose SSE
    events have carried `tokens` generated token ids, right after that event (both sides
    closed, as a dying engine's would be). The proxy asks its decoders for token ids."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._tokens = 0  # 0: not armed
        self._lock = threading.Lock()
        self.cut_at: list[int] = []  # the generated ids the client's decoder had sent, per cut
        # per cut: whether the answer had already finished (nothing left to migrate)
        self.after_finish: list[bool] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, tokens: int) -> None:
        with self._lock:
            self._tokens = tokens

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            pair = (client, upstream)
            threading.Thread(target=_pump, args=(client, upstream, pair), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, pair), daemon=True).start()

    def _down(
        self, src: socket.socket, dst: socket.socket, pair: tuple[socket.socket, ...]
    ) -> None:
        """Upstream to client, event by event: whole events go on, the rest waits."""
        buffer, tokens, finished = b"", 0, False  # generated ids seen on this connection
        try:
            while data := src.recv(65536):
                buffer += data
                end = buffer.rfind(b"\n\n")
                if end < 0:
                    if b"data: " not in buffer:  # not a stream: pass it on
                        dst.sendall(buffer)
                        buffer = b""
                    continue
                cut, pos = None, 0
                while cut is None and (nxt := buffer.find(b"\n\n", pos)) >= 0:
                    event, pos = buffer[pos:nxt], nxt + 2
                    tokens += sum(len(m[1].split(b",")) for m in _GENERATED.finditer(event))
                    finished = finished or _FINISHED.search(event) is not None
                    cut = pos if self._take(tokens, finished) else None
                if cut is not None:
                    dst.sendall(buffer[:cut])
                    break
                dst.sendall(buffer[: end + 2])
                buffer = buffer[end + 2 :]
        except OSError:
            pass
        _close(pair)

    def _take(self, tokens: int, finished: bool) -> bool:
        """Whether the armed cut falls at `tokens` (it is then disarmed)."""
        with self._lock:
            if not self._tokens or tokens < self._tokens:
                return False
            self._tokens = 0
            self.cut_at.append(tokens)
            self.after_finish.append(finished)
            return True


def _pump(src: socket.socket, dst: socket.socket, pair: tuple[socket.socket, ...]) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    _close(pair)


def _close(pair: tuple[socket.socket, ...]) -> None:
    for sock in pair:
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


@pytest.fixture
def relay(topology: Topology) -> Iterator[Relay]:
    cutter = Relay(topology.decode)
    yield cutter
    cutter.close()


@contextmanager
def proxy_over(topology: Topology, relay: Relay, tmp: Path, name: str) -> Iterator[str]:
    """A proxy whose decoder 0 is the relay and decoder 1 the session's decoder."""
    config = tmp / f"{name}.yaml"
    config.write_text(
        "decode_policy: round_robin\nstats: {interval: 0}\n"
        f"health: {{interval: 0, {STARVED_BOX_STALL}}}\n" + STARVED_BOX_TIMEOUTS
    )
    proxy = start_proxy(
        [topology.prefill], [relay.url, topology.decode], "--config", str(config),
        log=topology.log_dir / f"proxy-{name}.log",
    )  # fmt: skip
    try:
        yield proxy.url
    finally:
        proxy.stop()


def reference(topology: Topology, path: str, body: Body) -> Body:
    """The uninterrupted answer, from the session's decoder alone, not streamed."""
    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    resp = httpx.post(topology.decode + path, json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    answer: Body = resp.json()
    return answer


def streamed(url: str, body: Body) -> list[Any]:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    resp = httpx.post(url, json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    lines = [x[6:] for x in resp.text.split("\n\n") if x.startswith("data: ")]
    return [x if x == "[DONE]" else orjson.loads(x) for x in lines]


def texts(events: list[Any]) -> dict[int, str]:
    out: dict[int, str] = {}
    for event in events[:-1]:
        for c in event["choices"]:
            piece = c.get("text") if "text" in c else c["delta"].get("content")
            out[c["index"]] = out.get(c["index"], "") + (piece or "")
    return out


def check_stream(events: list[Any], answer: Body) -> None:
    """Text per choice, finish reasons, one id and created, usage: the uninterrupted answer's."""
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), events[-3:]
    chunks = events[:-1]
    assert len({(e["id"], e["created"], e["object"]) for e in chunks}) == 1
    want = {c["index"]: c.get("text", (c.get("message") or {}).get("content")) for c in
            answer["choices"]}  # fmt: skip
    assert texts(events) == want
    finishes = sorted(
        c["finish_reason"] for e in chunks for c in e["choices"] if c["finish_reason"]
    )
    assert finishes == sorted(c["finish_reason"] for c in answer["choices"])
    assert chunks[-1]["usage"] == {k: answer["usage"][k] for k in chunks[-1]["usage"]}


def token_texts(topology: Topology, ids: list[int]) -> list[str]:
    """The text each token adds (the engine's /detokenize of each prefix)."""
    texts = [""]
    for n in range(1, len(ids) + 1):
        resp = httpx.post(topology.decode + "/detokenize", json={"tokens": ids[:n]}, timeout=60)
        texts.append(resp.json()["prompt"])
    return [texts[n + 1][len(texts[n]) :] for n in range(len(ids))]


def migrated(url: str) -> float:
    lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
    wanted = "pdproxy_migrations_total{"
    return sum(float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith(wanted))


def cut_and_migrate(
    url: str, relay: Relay, tokens: int, send: Callable[[], T], exact: bool = False
) -> T:
    """What `send` got, through a decoder connection cut after `tokens` generated ids (`exact`:
    right after them, not later), and continued on the other decoder. A starved engine can send
    several tokens in one event, so that the cut comes later than aimed, even after the answer's
    end with nothing left to migrate: tried again then (six sends at most)."""
    for _ in range(6):
        before, cuts = migrated(url), len(relay.cut_at)
        relay.arm(tokens)
        got = send()
        if len(relay.cut_at) == cuts:
            continue  # round-robin sent it to the other decoder: the relay stays armed
        if not relay.after_finish[-1] and not (exact and relay.cut_at[-1] != tokens):
            assert migrated(url) == before + 1
            return got
    raise AssertionError(f"no cut fell where it was aimed ({tokens}): {relay.cut_at}")


def seams(url: str) -> list[Any]:
    recent = httpx.get(url + "/admin/requests?limit=100", timeout=10).json()["data"]
    return [s for t in recent for s in t["seams"]]


def test_cut_streams_continue_exactly(topology: Topology, relay: Relay, tmp_path: Path) -> None:
    """Chat, a stop string across the seam, and fan-out with one sub-stream cut; each through a
    fresh proxy (round-robin starts at the relay)."""
    pulled = metric(topology.decode, XFER)
    chat = {"model": topology.model, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me about KV caches."}]}  # fmt: skip
    with proxy_over(topology, relay, tmp_path, "cut-chat") as url:
        events = cut_and_migrate(
            url, relay, 6, lambda: streamed(url + "/v1/chat/completions", chat)
        )
        check_stream(events, reference(topology, "/v1/chat/completions", chat))
    # fan-out: sub-request 0 goes to the relay (cut), sub-request 1 to the session's decoder
    fan = {"model": topology.model, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
           "prompt": ["The quick brown fox", "A slow green turtle"]}  # fmt: skip
    with proxy_over(topology, relay, tmp_path, "cut-fan") as url:
        events = cut_and_migrate(url, relay, 5, lambda: streamed(url + "/v1/completions", fan))
        check_stream(events, reference(topology, "/v1/completions", fan))
    assert metric(topology.decode, XFER) >= pulled + 2  # the continuations' KV came over NIXL


def test_a_stop_string_across_the_seam(topology: Topology, relay: Relay, tmp_path: Path) -> None:
    """The stop string is the end of one token's text and the start of the next's, and the cut
    comes right between them: neither engine's stop check sees it, the proxy's does."""
    body = {"model": topology.model, "prompt": "The quick brown fox jumps over the lazy dog",
            "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}  # fmt: skip
    ids = reference(topology, "/v1/completions", {**body, "return_token_ids": True})
    pieces = token_texts(topology, ids["choices"][0]["token_ids"])
    k = next(i for i in range(5, TOKENS - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2
             and (pieces[i][-2:] + pieces[i + 1][:2]) not in "".join(pieces[: i + 1]))  # fmt: skip
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    body["stop"] = [stop]
    answer = reference(topology, "/v1/completions", body)
    assert answer["choices"][0]["finish_reason"] == "stop"
    with proxy_over(topology, relay, tmp_path, "cut-stop") as url:

        def send() -> list[Any]:
            events = streamed(url + "/v1/completions", body)
            check_stream(events, answer)
            return events

        # the client gets tokens 0..k (the stop's first half); a cut after k+1 would come after
        # the engine's own stop
        events = cut_and_migrate(url, relay, k + 1, send, exact=True)
        finish = [c for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
        assert finish[0]["stop_reason"] == stop
        assert [s["tokens_moved"] for s in seams(url)] == [k + 1]  # the seam where it was aimed


def test_a_cut_whole_answer(topology: Topology, relay: Relay, tmp_path: Path) -> None:
    """A non-streamed answer whose decoder connection is cut mid-way: one whole answer equal
    to the uninterrupted one."""
    body = {"model": topology.model, "prompt": "Once upon a time", "max_tokens": TOKENS,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    answer = reference(topology, "/v1/completions", body)
    with proxy_over(topology, relay, tmp_path, "cut-whole") as url:
        resp = cut_and_migrate(
            url, relay, 6, lambda: httpx.post(url + "/v1/completions", json=body, timeout=300)
        )
        assert resp.status_code == 200, resp.text
        got = resp.json()
        assert got["choices"][0]["text"] == answer["choices"][0]["text"]
        assert got["choices"][0]["finish_reason"] == answer["choices"][0]["finish_reason"]
        assert got["usage"] == answer["usage"]
