"""Relaying an engine's server-sent events to the client as bytes.

The relay forwards whole events exactly as the engine wrote them (never re-serialised) and notes
only what TTFT, inter-token latency and usage accounting need. It holds back an incomplete event at
the end of a read, so that an error event appended after a broken upstream is never glued onto half
an event.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

DONE = b"data: [DONE]"
# what makes an event more than a token chunk: usage, an error, or a usage-only chunk
_NOT_A_PLAIN_TOKEN = re.compile(rb'"usage":|"error":|"choices":\[\]')
_DONE_EVENT = DONE + b"\n\n"
_WITHOUT_DONE = -len(_DONE_EVENT)


PROMPT_IDS = b'"prompt_token_ids":['  # vLLM's first chunk, with return_token_ids


def cut_prompt_ids(event: bytes) -> tuple[bytes, bytes | None]:
    """`event` with its prompt token ids' lists written `null`, and the inside of the last of
    them (None: it has none). The first chunk of a long prompt is mostly these ids, and what
    reads the chunk rarely needs them: cut out with two finds, they are not parsed (an id list
    holds numbers only, so the first `]` after its key closes it)."""
    raw = None
    at = event.find(PROMPT_IDS)
    while at >= 0:
        start = at + len(PROMPT_IDS)
        end = event.find(b"]", start)
        if end < 0:
            break
        raw = event[start:end]
        event = event[:at] + b'"prompt_token_ids":null' + event[end + 1 :]
        at = event.find(PROMPT_IDS, at)
    return event, raw


def _has_token(event: dict[str, Any]) -> bool:
    """True when a completion or chat chunk carries generated output (not just a role header)."""
    for choice in event.get("choices") or ():
        if choice.get("text"):
            return True
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
            return True
    return False


def sse_error_event(body: bytes) -> bytes:
    """An error event followed by the end marker, as vLLM ends a failed stream."""
    return b"data: " + body + b"\n\n" + DONE + b"\n\n"


class SSEScanner:
    """Splits upstream bytes into complete events and watches them go by."""

    __slots__ = (
        "_tail",
        "done",
        "error",
        "first_token",
        "last_token",
        "malformed",
        "token_events",
        "usage",
    )

    def __init__(self) -> None:
        self._tail = b""
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.token_events = 0
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.done = False
        self.malformed: bytes | None = None  # the first event that was not JSON, if one was read

    def feed(self, data: bytes, now: float) -> bytes:
        """Take bytes read from the engine; return the complete events among them to forward."""
        out = self._tail + data if self._tail else data
        if out.endswith(b"\n\n"):  # the common case: reads end where events end
            self._tail = b""
        else:
            end = out.rfind(b"\n\n")
            if end < 0:
                self._tail = out
                return b""
            end += 2
            self._tail = out[end:]
            out = out[:end]
        rest = out
        while self.first_token is None and rest:  # event by event up to the first token
            event, _, rest = rest.partition(b"\n\n")
            if event:
                self._scan(event, now)
        # the common case once tokens flow: only token chunks (and the end marker), counted
        # without splitting
        tokens = rest[:_WITHOUT_DONE] if rest.endswith(_DONE_EVENT) else rest
        events = tokens.count(b"\n\n")
        if tokens.count(b"data: {") == events and _NOT_A_PLAIN_TOKEN.search(tokens) is None:
            if events:
                self.token_events += events
                self.last_token = now
            self.done = self.done or len(tokens) < len(rest)
            return out
        for event in rest.split(b"\n\n"):
            if event:
                self._scan(event, now)
        return out

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated."""
        return self._tail

    def _scan(self, event: bytes, now: float) -> None:
        if not event.startswith(b"data: {"):
            if event.startswith(DONE):
                self.done = True
            elif self.first_token is None and not event.startswith((b":", b"event:", b"id:")):
                self.malformed = self.malformed or event[:80]
            return
        if self.first_token is None or b'"usage":' in event or b'"error":' in event:
            try:
                parsed = orjson.loads(cut_prompt_ids(event[6:])[0])
            except orjson.JSONDecodeError:
                parsed = None
            if not isinstance(parsed, dict):
                if self.malformed is None:
                    self.malformed = event[:80]
                return
            if isinstance(parsed.get("error"), dict):
                self.error = parsed["error"]
                return
            if isinstance(parsed.get("usage"), dict):
                self.usage = parsed["usage"]
            if self.first_token is None:
                if _has_token(parsed):
                    self.first_token = self.last_token = now
                    self.token_events = 1
                return
        if b'"choices":[]' not in event:
            self.token_events += 1
            self.last_token = now
