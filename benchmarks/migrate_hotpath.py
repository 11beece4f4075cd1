"""CPU on the hot path of a stream that may migrate (proxy.flow.migrate): what the relay does
per batch of upstream bytes with migrations on (the default) against `failover.migrations: 0`.

With migrations on, the decode leg asks for `return_token_ids`, so each event carries its token
ids (and the first the prompt's), and `Transcript.feed` notes them and strips them with one
regex pass per batch (plus the error-event, finish and split-out searches). With migrations off
the events come without ids and only `SSEScanner.feed` runs. Both are timed on the same vLLM
0.32-shaped completion chunks (one token per event, as a fast engine sends them; and batches of
8 events, as a relay that fell behind reads them), without and with stop strings (the
transcript then also notes the text).

    python benchmarks/migrate_hotpath.py

Results: benchmarks/results/migrate_hotpath.md.
"""

from __future__ import annotations

import functools
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import RESULTS, provenance, provenance_lines
from proxy.flow.migrate import Transcript
from proxy.flow.relay import SSEScanner

PROMPT_IDS = list(range(1000, 1512))  # a 512-token prompt, in the first event only
TOKENS = 64  # events per stream
HEAD = b'data: {"id":"cmpl-4f2a9c","object":"text_completion","created":1764680000,'
HEAD += b'"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[{"index":0,"text":" word'


def event(i: int, ids: bool) -> bytes:
    tail = b'","logprobs":null,"finish_reason":null,"stop_reason":null'
    if ids:
        prompt = ",".join(map(str, PROMPT_IDS)).encode() if i == 0 else b""
        tail += b',"prompt_token_ids":' + (b"[" + prompt + b"]" if i == 0 else b"null")
        tail += b',"token_ids":[' + str(20000 + i).encode() + b"]"
    return HEAD + str(i).encode() + tail + b"}]}\n\n"


def batches(ids: bool, per_batch: int) -> list[bytes]:
    events = [event(i, ids) for i in range(TOKENS)]
    return [b"".join(events[i : i + per_batch]) for i in range(0, TOKENS, per_batch)]


def stream_off(data: list[bytes]) -> None:
    scanner = SSEScanner()
    for chunk in data:
        scanner.feed(chunk, 0.0)


def stream_on(data: list[bytes], texts: bool) -> None:
    scanner, transcript = SSEScanner(), Transcript(keep_ids=False, texts=texts)
    for chunk in data:
        transcript.feed(scanner.feed(chunk, 0.0))


def best_us(fn: Callable[[], None], runs: int = 7, number: int = 200) -> float:
    """The best of `runs` timings of `number` streams, in microseconds per stream."""
    return min(timeit.repeat(fn, number=number, repeat=runs)) / number * 1e6


def main() -> None:
    rows = []
    for per_batch in (1, 8):
        off_data, on_data = batches(False, per_batch), batches(True, per_batch)
        off = best_us(functools.partial(stream_off, off_data))
        on = best_us(functools.partial(stream_on, on_data, False))
        on_stop = best_us(functools.partial(stream_on, on_data, True))
        rows.append((per_batch, off, on, on_stop))
    lines = [
        "# Migration's hot path: relay CPU per stream, migrations on vs off",
        "",
        *provenance_lines(provenance(["python", "benchmarks/migrate_hotpath.py"])),
        f"- a stream of {TOKENS} completion events (vLLM 0.32 shape), a {len(PROMPT_IDS)}-token"
        " prompt's ids in the first when on; the best of 7 runs of 200 streams, one core",
        "- off: `SSEScanner.feed` on events without ids (`failover.migrations: 0`); on: the"
        " same plus `Transcript.feed` (note and strip the ids) on events with ids; on + stop:"
        " a request with stop strings (the transcript also notes the text)",
        "",
        "| events per batch | off, us/stream | on, us/stream | on/off | on + stop, us/stream |"
        " on + stop/off |",
        "|---|---|---|---|---|---|",
    ]
    for per_batch, off, on, on_stop in rows:
        lines.append(
            f"| {per_batch} | {off:.0f} | {on:.0f} | {on / off:.2f} | {on_stop:.0f} |"
            f" {on_stop / off:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    (RESULTS / "migrate_hotpath.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
