"""The seam (proxy.flow.seam) when a stop string across it completes inside an event that
carries several tokens, as vLLM's API server sends what was generated while the client lagged
(seen with real vLLM on a loaded 2-core box: usage counted 16 tokens where the engine alone
counted 13). The tokens' texts come from the simulator's tokenizer, as its /detokenize answers."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from pdsim.tokenizer import SimTokenizer
from proxy.flow.migrate import Transcript
from proxy.flow.seam import Seam, SeamStopped
from proxy.request import COMPLETIONS, ClientRequest

TOKENIZER = SimTokenizer()
IDS = TOKENIZER.encode("the quick brown fox jumps over the lazy dog again", False)
PIECES = [TOKENIZER.token_text(t) for t in IDS]
K = 3  # the client got tokens 0..K; the stop is the end of token K and the start of K + 1
STOP = PIECES[K][-2:] + PIECES[K + 1][:2]


class Collect:
    """A sink that keeps what the client would get."""

    def __init__(self) -> None:
        self.data = b""
        self.started = True

    async def whole(self, status: int, body: bytes) -> None:
        raise AssertionError

    async def start_stream(self) -> None:
        return None

    async def chunk(self, data: bytes) -> None:
        self.data += data

    async def end(self, data: bytes = b"") -> None:
        self.data += data


async def detokenize(ids: list[int]) -> str | None:
    return TOKENIZER.decode(ids)


def event(ids: list[int]) -> bytes:
    choice = {"index": 0, "text": TOKENIZER.decode(ids), "token_ids": ids, "finish_reason": None}
    body = {"id": "c", "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


def run_seam(per_event: int, measure: Any) -> dict[str, Any]:
    request = ClientRequest(
        path=COMPLETIONS, body={"prompt": "p", "stop": [STOP], "max_tokens": 30},
        request_id="r", stream=True, include_usage=True, prompt_chars=1,
    )  # fmt: skip
    before = Transcript(keep_ids=False, prompt_ids=[1, 2, 3], texts=True)
    before.head = {"id": "c", "object": "text_completion", "created": 1, "model": "m"}
    before.generated = IDS[: K + 1]
    before.text = ["".join(PIECES[: K + 1])[:-2]]  # the first engine held back 2 characters
    out = Collect()
    seam = Seam(out, request, before, held=PIECES[K][-2:], detokenize=measure)
    rest = IDS[K + 1 :]

    async def main() -> None:
        try:
            for i in range(0, len(rest), per_event):
                await seam.chunk(event(rest[i : i + per_event]))
        except SeamStopped:
            return
        raise AssertionError("the stop across the seam was not found")

    asyncio.run(main())
    events = [orjson.loads(e[6:]) for e in out.data.split(b"\n\n") if e.startswith(b"data: {")]
    usage: dict[str, Any] = events[-1]["usage"]
    return usage


def test_the_stop_is_counted_at_its_token_however_the_tokens_came() -> None:
    assert STOP not in "".join(PIECES[:K]) + PIECES[K][:-2]  # it first occurs across the seam
    one = run_seam(1, detokenize)
    assert one["completion_tokens"] == K + 2  # the moved tokens and the one completing the stop
    assert run_seam(4, detokenize) == one  # four tokens in the event that completes it


def test_without_detokenize_the_event_stays_counted_whole() -> None:
    async def unknown(ids: list[int]) -> str | None:
        return None

    assert run_seam(4, unknown)["completion_tokens"] == K + 5
