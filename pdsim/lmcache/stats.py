"""Metrics of the LMCache PD mode: its counters, and the occupancy of its buffers (the
receiver's receive buffer, the sender's staging buffer), per TP rank, as ``pdsim:lmcache_*``."""

from __future__ import annotations

from dataclasses import dataclass

from pdsim.lmcache.buffer import PageBuffer
from pdsim.metrics import exposition


@dataclass
class LMCacheStats:
    pushed_requests: int = 0
    unsaved_requests: int = 0
    push_failures: int = 0
    notifications_sent: int = 0
    notifications_dropped: int = 0
    received_chunks: int = 0
    hit_requests: int = 0
    loaded_tokens: int = 0
    missed_requests: int = 0
    retrieved_chunks: int = 0

    def render(self) -> str:
        out = []
        for name, doc in _STAT_DOCS.items():
            sample = ("_total", "", float(getattr(self, name)))
            out += exposition(f"pdsim:lmcache_{name}", "counter", doc, [sample])
        return "\n".join(out) + "\n"


def render_buffers(prefix: str, what: str, buffers: list[PageBuffer]) -> str:
    """Gauges of one kind of buffer, a sample per TP rank: ``{prefix}_chunks`` (pages),
    ``_used_chunks``, ``_reserved_chunks``, ``_waiting`` and ``_allocation_timeouts_total``."""
    out = []
    for suffix, kind, doc, key in _BUFFER_SERIES:
        samples = [
            ("_total" if kind == "counter" else "", f'rank="{r}"', float(b.state()[key]))
            for r, b in enumerate(buffers)
        ]
        out += exposition(f"{prefix}_{suffix}", kind, doc.format(what=what), samples)
    return "\n".join(out) + "\n"


_BUFFER_SERIES = (
    ("chunks", "gauge", "Pages of the {what}, one chunk each.", "total"),
    ("used_chunks", "gauge", "Pages of the {what} holding a chunk.", "used"),
    ("reserved_chunks", "gauge", "Pages of the {what} reserved by pushes in flight.", "reserved"),
    ("waiting", "gauge", "Pushes or saves waiting for room in the {what}.", "waiting"),
    ("allocation_timeouts", "counter", "Waits for the {what} that timed out.", "timeouts"),
)


_STAT_DOCS = {
    "pushed_requests": "Requests whose KV was pushed to a receiver.",
    "unsaved_requests": "Requests that saved no chunk: no push, no notification (LMCache #2510).",
    "push_failures": "KV pushes that failed (no notification).",
    "notifications_sent": "ProxyNotif messages sent.",
    "notifications_dropped": "ProxyNotif messages dropped by a switch or with no listener.",
    "received_chunks": "KV chunks received from senders.",
    "hit_requests": "Requests served from pushed KV.",
    "loaded_tokens": "Prompt tokens served from pushed KV.",
    "missed_requests": "Receiver requests that found no pushed KV (recomputed).",
    "retrieved_chunks": "Pushed chunks retrieved by requests, their pages freed.",
}
