"""Where a request is, for the disconnect watcher and its metric."""

from __future__ import annotations

from dataclasses import dataclass, field

_ORDER = {"prefill": 0, "handoff": 1, "decode": 2}


@dataclass(slots=True)
class Progress:
    """Phase of one request: prefill, handoff (prefill done, no decoded byte yet: the KV waits on
    the prefiller), or decode. A fanned-out request's phase is its most advanced part's."""

    phase: str = "prefill"
    parts: list[Progress] = field(default_factory=list)

    def current(self) -> str:
        if not self.parts:
            return self.phase
        return max((p.current() for p in self.parts), key=_ORDER.__getitem__)
