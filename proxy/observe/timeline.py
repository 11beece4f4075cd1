"""The timelines of recent requests: a bounded ring, kept for the console and /admin/requests.

The request path adds each finished request's `RequestTiming` (one deque append: the ring never
grows past `capacity`, the oldest falls out). Reading turns one into its hops, in milliseconds
from the request's arrival:

    admission   arrival -> a slot (waiting behind max_concurrent)
    prefill     the prefill leg, on `prefiller` (all attempts)
    handoff     prefill answered -> the decoder's first token (KV pull, decoder queue), on `decoder`
    decode      first token -> last token
    end         the last byte sent to the client

and where the planner put it (`plan`: prefill local or remote, on which workers, and why), and
where a stream moved to another decoder mid-answer (`seams`: from which decoder to which, why,
how many tokens moved, the gap the client saw between the last token before and the first after).
"""

from __future__ import annotations

from collections import deque
from time import perf_counter, time
from typing import Any

from proxy.observe.stats import RequestTiming


def _ms(later: float | None, earlier: float | None) -> float | None:
    if later is None or earlier is None:
        return None
    return round((later - earlier) * 1e3, 3)


def describe(t: RequestTiming, seq: int, now: float | None = None) -> dict[str, Any]:
    """One request's timeline as JSON: where it went and how long each hop took."""
    now = perf_counter() if now is None else now
    decode_start = t.prefill_end if t.prefill_end is not None else t.admitted
    decode = _ms(t.last_token, t.first_token)
    itl = decode / (t.token_events - 1) if decode is not None and t.token_events > 1 else None
    tpot = decode / (t.output_tokens - 1) if decode is not None and t.output_tokens > 1 else None
    return {
        "seq": seq,
        "request_id": t.request_id,
        "path": t.path,
        "stream": t.stream,
        "status": t.status,
        "error": t.error,
        "started_at": round(time() - (now - t.start), 3),  # wall clock, seconds
        "prefiller": t.prefiller,
        "decoder": t.decoder,
        "kv": t.kv,
        "plan": None if t.plan is None else t.plan.describe(),
        "retries": t.retries,
        "seams": t.seams,
        "output_tokens": t.output_tokens,
        "ms": {
            "admission": _ms(t.admitted, t.start),
            "prefill": _ms(t.prefill_end, t.prefill_start),
            "handoff": _ms(t.first_token, decode_start),
            "decode": decode,
            "ttft": _ms(t.first_token, t.start),
            "itl": None if itl is None else round(itl, 3),
            "tpot": None if tpot is None else round(tpot, 3),
            "total": _ms(t.end, t.start),
        },
        # offsets from arrival, to draw the hops on one axis
        "at_ms": {
            "admitted": _ms(t.admitted, t.start),
            "prefill_start": _ms(t.prefill_start, t.start),
            "prefill_end": _ms(t.prefill_end, t.start),
            "first_token": _ms(t.first_token, t.start),
            "last_token": _ms(t.last_token, t.start),
            "end": _ms(t.end, t.start),
        },
    }


class TimelineRing:
    """The last `capacity` finished requests; `seq` counts every one ever added."""

    __slots__ = ("_ring", "handed_over", "seq")

    def __init__(self, capacity: int = 1000) -> None:
        self._ring: deque[tuple[int, RequestTiming]] = deque(maxlen=capacity)
        self.seq = 0
        self.handed_over: dict[str, int] = {}  # decoder id -> requests whose KV it was handed

    def __len__(self) -> int:
        return len(self._ring)

    def add(self, timing: RequestTiming) -> None:
        self.seq += 1
        self._ring.append((self.seq, timing))
        if timing.kv == "handed_over" and timing.decoder is not None:
            self.handed_over[timing.decoder] = self.handed_over.get(timing.decoder, 0) + 1

    def since(self, seq: int, limit: int = 200) -> list[dict[str, Any]]:
        """Timelines added after `seq`, oldest first, at most the last `limit` of them."""
        now = perf_counter()
        newer = [(s, t) for s, t in self._ring if s > seq][-limit:]
        return [describe(t, s, now) for s, t in newer]

    def find(self, request_id: str) -> dict[str, Any] | None:
        """The newest timeline of that request id, if still in the ring."""
        for s, t in reversed(self._ring):
            if t.request_id == request_id:
                return describe(t, s)
        return None
