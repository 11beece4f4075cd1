"""Counters of the LMCache PD mode, rendered as ``pdsim:lmcache_*`` metrics."""

from __future__ import annotations

from dataclasses import dataclass


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

    def render(self) -> str:
        out = []
        for name, doc in _STAT_DOCS.items():
            metric = f"pdsim:lmcache_{name}"
            out += [f"# HELP {metric} {doc}", f"# TYPE {metric} counter"]
            out.append(f"{metric}_total {float(getattr(self, name))!r}")
        return "\n".join(out) + "\n"


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
}
