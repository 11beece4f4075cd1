"""The exact prefix index against a real vLLM CPU engine: before each request of a sequence
sharing prefixes of various lengths, the index (fed by the proxy's subscriber to the engine's
KV-cache events) predicts how many prompt tokens the engine will reuse, and the engine's answer
says how many it did (`usage.prompt_tokens_details.cached_tokens`, --enable-prompt-tokens-details).
They must be equal for every request: while the cache fills, after evictions forced by a KV
cache of 12 blocks of 32 tokens, and after the engine restarts.

The engine connects its PUB socket to the subscriber bound on 127.0.0.1 (vLLM connects for an
endpoint without a wildcard) and binds its replay socket there too.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from real_vllm_fixtures import start_logged

from proxy.control.kvevents import Endpoints, KvEvents, Subscriber
from proxy.control.workers import Worker
from proxy.place.kvindex import KvIndex

pytestmark = [pytest.mark.real_vllm, pytest.mark.own_topology]

HTTP_PORT, PUB_PORT, REPLAY_PORT = 17850, 17851, 17852
URL = f"http://127.0.0.1:{HTTP_PORT}"
BLOCK, BLOCKS = 32, 12  # the CPU attention's block size is a multiple of 32
QUIET = 1.0  # seconds without a batch before the index is taken as up to date


def engine_args(python: str, model: Path) -> list[str]:
    config = (
        '{"enable_kv_cache_events": true, "publisher": "zmq", '
        f'"endpoint": "tcp://127.0.0.1:{PUB_PORT}", '
        f'"replay_endpoint": "tcp://127.0.0.1:{REPLAY_PORT}"}}'
    )
    return [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(HTTP_PORT),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
        "--enable-prefix-caching", "--enable-prompt-tokens-details",
        "--block-size", str(BLOCK), "--num-gpu-blocks-override", str(BLOCKS),
        "--kv-events-config", config,
    ]  # fmt: skip


class Engine:
    def __init__(self, python: str, model: Path, logs: Path) -> None:
        self.args = engine_args(python, model)
        self.logs = logs
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    async def start(self, client: httpx.AsyncClient) -> None:
        self.starts += 1
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.proc = start_logged(self.args, self.logs / f"engine-{self.starts}.log")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.logs / f"engine-{self.starts}.log").read_text()
            try:
                if (await client.get(URL + "/health", timeout=5)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(1)
        raise AssertionError("the engine did not start in 300 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    vocab = ["cache", "block", "prefix", "engine", "token", "event", "replay", "index", "proxy"]
    return " ".join(rng.choice(vocab) for _ in range(words))


async def settled(sub: Subscriber) -> None:
    """Wait until no batch has arrived for QUIET seconds."""
    last = -1
    while last != sub.counts.batches:
        last = sub.counts.batches
        await asyncio.sleep(QUIET)


async def check(
    client: httpx.AsyncClient, index: KvIndex, sub: Subscriber, prompt: str
) -> tuple[int, int]:
    """(predicted, reused) for one request of `prompt`."""
    body: dict[str, Any] = {"model": "tiny", "prompt": prompt}
    tokens = (await client.post(URL + "/tokenize", json=body, timeout=60)).json()["tokens"]
    await settled(sub)
    predicted = index.cached(tokens, [URL])[URL]
    answer = await client.post(
        URL + "/v1/completions", json={**body, "max_tokens": 1, "temperature": 0}, timeout=120
    )
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    assert usage["prompt_tokens"] == len(tokens)
    return predicted, usage["prompt_tokens_details"]["cached_tokens"]


SYSTEM = text(1, 40)
SEQUENCE = [
    SYSTEM,
    SYSTEM,  # the whole prompt again: all but its last block
    SYSTEM + " " + text(2, 30),  # a longer prompt on the same prefix
    SYSTEM[: len(SYSTEM) // 2] + " " + text(3, 30),  # half of the prefix
    text(4, 60),  # another prefix
    text(5, 60),  # long prompts: the cache's 12 blocks evict the older ones
    text(6, 60),
    text(6, 60) + " " + text(7, 5),  # a hit after the evictions
    SYSTEM + " " + text(2, 30),  # evicted
    text(5, 60),
]
AFTER_RESTART = [SYSTEM, SYSTEM, text(6, 60)]


async def scenario(engine: Engine) -> tuple[list[tuple[str, int, int]], int]:
    index = KvIndex()
    # the first engine's last batch can be read after it left; its repair then asks the
    # replay socket of a dead engine, which answers only once the restarted engine binds it
    # (seen taking 10 s and more on a loaded 2-core box): the test gives it 30 s
    events = KvEvents(index, "", replay_timeout=30.0)
    sub = events.start(
        Worker("pool", "e0", URL),
        Endpoints(f"tcp://127.0.0.1:{PUB_PORT}", f"tcp://127.0.0.1:{REPLAY_PORT}", bind=True),
    )
    seen: list[tuple[str, int, int]] = []
    try:
        async with httpx.AsyncClient() as client:
            await engine.start(client)
            for i, prompt in enumerate(SEQUENCE):
                seen.append((f"run 1, request {i}", *await check(client, index, sub, prompt)))
            evicted = index.engines[URL].removed
            engine.stop()
            deadline = time.monotonic() + 30
            while sub.counts.lost == 0 and time.monotonic() < deadline:  # noqa: ASYNC110 - a counter
                await asyncio.sleep(0.2)
            assert sub.counts.lost >= 1, "the subscriber did not see the engine go"
            await engine.start(client)
            for i, prompt in enumerate(AFTER_RESTART):
                seen.append((f"run 2, request {i}", *await check(client, index, sub, prompt)))
    finally:
        engine.stop()
        await events.close()
    return seen, evicted


def test_predicted_cached_tokens_equal_the_engines_reuse(
    vllm_python: str, tiny_model: Path, tmp_path: Path
) -> None:
    seen, evicted = asyncio.run(scenario(Engine(vllm_python, tiny_model, tmp_path)))
    report = "\n".join(f"{name}: predicted {p}, engine reused {r}" for name, p, r in seen)
    print(report, f"\nblocks evicted: {evicted}")
    assert all(p == r for _, p, r in seen), report
    reused = [r for _, _, r in seen]
    assert reused[1] > 0 and reused[3] > 0, report  # hits, whole and partial
    assert reused[7] > 0, report  # and one after evictions
    assert evicted > 0, report  # the small cache evicted blocks, which the index followed
    assert reused[len(SEQUENCE)] == 0 and reused[len(SEQUENCE) + 1] > 0, report  # restarted
