"""A decoder that fails mid-answer, on real vLLM (CPU build): the stream continues on the
session's decoder, its KV computed by the prefiller and pulled over NIXL, and the client's
greedy answer equals the uninterrupted one token for token.

The test starts a second decoder (the launcher's decoder 1) and, for each scenario, a proxy of
its own over the prefiller and [second decoder, session decoder] with round-robin routing, so
the first request goes to the second decoder. A chat stream loses that decoder to SIGSTOP (the
proxy's decode_idle fires; the decoder is let go on afterwards), a completion stream to SIGKILL.
(Fan-out, a whole answer and a stop string across the seam are in test_real_vllm_migrate_cut.py,
whose cuts are aimed at one token by a relay: on a starved 2-core box the moment a signal lands
is too loose to aim at one sub-stream or one token.)
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from real_vllm_fixtures import (
    SECOND_DECODER,
    STARVED_BOX_STALL,
    STARVED_BOX_TIMEOUTS,
    second_decoder_running,
)
from vllm_helpers import Topology, metric

from pdsim.launch import start_proxy

pytestmark = pytest.mark.real_vllm

TOKENS = 160  # long enough that the decoder is still at it when the signal lands
CUT_AFTER = 6  # events the client has when its decoder is stopped


@pytest.fixture
def doomed(topology: Topology) -> Iterator[subprocess.Popen[bytes]]:
    with second_decoder_running(topology) as proc:
        yield proc


def own_proxy(topology: Topology, tmp: Path, name: str) -> Any:
    assert STARVED_BOX_TIMEOUTS == "timeouts: {connect: 30}\n"  # kept in the one line below
    config = tmp / f"{name}.yaml"
    config.write_text(
        "decode_policy: round_robin\nstats: {interval: 0}\n"
        # the test decides what failed, not a health check; a starved box's stall timeout
        f"health: {{interval: 0, {STARVED_BOX_STALL}}}\n"
        "timeouts: {connect: 30, decode_idle: 8}\n"  # STARVED_BOX_TIMEOUTS, and a short idle
    )
    return start_proxy(
        [topology.prefill], [SECOND_DECODER, topology.decode], "--config", str(config),
        log=topology.log_dir / f"proxy-{name}.log",
    )  # fmt: skip


def reference(topology: Topology, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The uninterrupted answer, from the session's decoder alone."""
    resp = httpx.post(topology.decode + path, json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    return answer


def stream_and_cut(url: str, body: dict[str, Any], cut: Any) -> list[Any]:
    """Stream `body`; after CUT_AFTER events, call `cut` (once); the events, parsed."""
    events: list[Any] = []
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url, json=body, timeout=300) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append("[DONE]" if line == "data: [DONE]" else orjson.loads(line[6:]))
            if len(events) == CUT_AFTER:
                cut()
    return events


def check(events: list[Any], answer: dict[str, Any], chat: bool) -> None:
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), events[-3:]
    chunks = events[:-1]
    assert len({(e["id"], e["created"], e["object"]) for e in chunks}) == 1
    choice = answer["choices"][0]
    if chat:
        text = "".join(c["delta"].get("content") or "" for e in chunks for c in e["choices"])
        assert text == choice["message"]["content"]
    else:
        assert "".join(c["text"] for e in chunks for c in e["choices"]) == choice["text"]
    finishes = [c["finish_reason"] for e in chunks for c in e["choices"] if c["finish_reason"]]
    assert finishes == [choice["finish_reason"]]
    assert chunks[-1]["usage"] == {k: answer["usage"][k] for k in chunks[-1]["usage"]}


def migrations(url: str, reason: str) -> float:
    """The proxy's pdproxy_migrations_total for one reason."""
    wanted = f'pdproxy_migrations_total{{reason="{reason}"}} '
    lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
    return sum(float(line[len(wanted) :]) for line in lines if line.startswith(wanted))


def test_a_stream_survives_its_decoder(
    topology: Topology, doomed: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    pulled = metric(topology.decode, "vllm:nixl_xfer_time_seconds_count")
    # chat: the decoder freezes; decode_idle gives up on it, the stream goes on elsewhere
    chat = {"model": topology.model, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me about KV caches."}]}  # fmt: skip
    answer = reference(topology, "/v1/chat/completions", chat)
    proxy = own_proxy(topology, tmp_path, "migrate-chat")
    try:
        url = proxy.url + "/v1/chat/completions"
        # the signal must land while the doomed decoder is still generating; on a starved box
        # the client once read its 6th event after the whole answer was out (no migration, the
        # answer right): up to three tries, each answer checked (round robin alternates the
        # decoders, so the third goes to the doomed one again)
        for _ in range(3):
            events = stream_and_cut(url, chat, lambda: os.killpg(doomed.pid, signal.SIGSTOP))
            os.killpg(doomed.pid, signal.SIGCONT)
            check(events, answer, chat=True)
            if migrations(proxy.url, "timeout") >= 1:
                break
        # at least the one the SIGSTOP caused (a starved box can idle past 8 s once more)
        assert migrations(proxy.url, "timeout") >= 1
    finally:
        proxy.stop()
    # completions: the decoder is killed outright
    body = {"model": topology.model, "prompt": "The quick brown fox jumps over the lazy dog",
            "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}  # fmt: skip
    answer = reference(topology, "/v1/completions", body)
    proxy = own_proxy(topology, tmp_path, "migrate-kill")
    try:
        url = proxy.url + "/v1/completions"
        done = metric(SECOND_DECODER, "vllm:request_success_total")
        finished: list[bool] = []

        def kill() -> None:
            # whether the doomed decoder had already sent the whole answer (a starved box's
            # client once read its 6th event that late): then nothing is left to migrate
            finished.append(metric(SECOND_DECODER, "vllm:request_success_total") > done)
            os.killpg(doomed.pid, signal.SIGKILL)

        events = stream_and_cut(url, body, kill)
        assert doomed.wait(30) == -signal.SIGKILL
        check(events, answer, chat=False)
        killed_mid_answer = migrations(proxy.url, "connection")
        assert killed_mid_answer == (0 if finished[0] else 1)
    finally:
        proxy.stop()
    # each continuation's prompt (with what was generated) was prefilled and its KV pulled
    pulls = metric(topology.decode, "vllm:nixl_xfer_time_seconds_count")
    assert pulls >= pulled + 1 + killed_mid_answer
