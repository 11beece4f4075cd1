"""Where a migrated stream's continuation joins the client's stream (proxy.flow.migrate).

`Seam` is the sink the continuation's legs write into: each continuation event is rewritten as
the first engine would have written it (its `id`, `created` and object; a chat chunk for each
completion chunk; `usage` of the whole answer) and goes on into the client's stream.

Stop strings: an engine checks them only against text it generated itself, and holds back the
end of its text that could begin one. At the seam the first engine's held-back text never
reached the client (`held`: the generated ids' text past what was sent, from the new
decoder's /detokenize), and a stop string that begins before the seam and ends after it is no
engine's to see. So the seam sends `held` first, and until the continuation has given enough
text to rule such a stop out, it holds the continuation's text back and looks for one across
the seam; found, it ends the answer there as vLLM would (`finish_reason` "stop", the stop
string as `stop_reason`, the text cut before it or after it with
`include_stop_str_in_output`), counts the tokens up to the chunk that completed it, and closes
the continuation (`SeamStopped`).

The continuation itself is asked to include its stop strings in its output: vLLM then holds
none of its text back, so the seam sees each token's text with that token (a stop across the
seam is found at the token that completed it, and counted so: held back by the engine, it
would be found a token or more late). The seam holds back, as the first engine did, the end of
the text that could begin a stop string, and cuts the stop string off the end of an answer
that the continuation's engine ended on one (unless the client asked to include it).
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.flow.migrate import ERROR_EVENT, Detokenize, Transcript
from proxy.flow.sink import Sink
from proxy.request import CHAT, ClientRequest

DONE = b"data: [DONE]\n\n"
CONTEXT = 8  # ids before the seam that a continuation token's text is measured after


class SeamStopped(Exception):
    """The seam found a stop string across it and ended the client's answer: the
    continuation is closed (its engine aborts it)."""


class _Stop(Exception):
    pass


def stop_strings(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if isinstance(stop, str):
        return [stop] if stop else []
    return [s for s in stop if isinstance(s, str) and s] if isinstance(stop, list) else []


class Seam:
    """The sink of a continuation: its events, rewritten, go on in the client's stream."""

    def __init__(
        self, out: Sink, request: ClientRequest, before: Transcript, held: str = "",
        detokenize: Detokenize | None = None,
    ) -> None:  # fmt: skip
        self._out = out
        self._detokenize = detokenize
        self._context = list(before.moved[-CONTEXT:])  # ids before the seam, for /detokenize
        self._ids: list[int] = []  # the continuation's ids before the current event
        self._split: tuple[list[int], list[int], int] | None = None  # see _count_to_stop
        self._chat = request.path == CHAT
        self._keep_ids = before.keep_ids
        self._head = before.head or {}
        self._prompt = len(before.prompt() or ())
        self._moved = len(before.moved)
        self._usage = request.include_usage
        self._stops = stop_strings(request.body)
        self._include = bool(request.body.get("include_stop_str_in_output"))
        reach = max(map(len, self._stops), default=1) - 1  # chars a stop reaches past the seam
        self._reach = reach
        self._hold = 0 if self._include else reach  # chars held back that could begin a stop
        self._tail = "".join(before.text)[-reach:] if reach else ""  # sent text before the seam
        self._held = held
        self._pending = held  # text for the client not sent yet
        self._checking = bool(self._stops)
        self._tokens = 0  # the continuation's tokens so far
        self.started = False

    async def whole(self, status: int, body: bytes) -> None:
        raise AssertionError("a continuation is always streamed")

    async def start_stream(self) -> None:
        self.started = True  # the client's stream started long ago

    async def chunk(self, data: bytes) -> None:
        events, stopped = self._rewrite(data)
        if stopped:
            await self._out.end(events + await self._last())
            raise SeamStopped
        if events:
            await self._out.chunk(events)

    async def end(self, data: bytes = b"") -> None:
        events, stopped = self._rewrite(data)
        if stopped:
            await self._out.end(events + await self._last())
            raise SeamStopped
        await self._out.end(events)

    async def _last(self) -> bytes:
        """What ends an answer that a stop across the seam ended: its usage, if asked for,
        counting the tokens up to the one that completed the stop, then [DONE]."""
        if not self._usage:
            return DONE
        await self._count_to_stop()
        return self._usage_event() + DONE

    async def _count_to_stop(self) -> None:
        """The stop completed inside an event of several tokens (an engine under load sends
        what it generated since the client last read in one event): count only the tokens up
        to the one whose text reaches the stop's end, measured by the engine's /detokenize
        after the ids before the seam (a token's text depends on the one before it)."""
        if self._split is None or self._detokenize is None:
            return
        before, ids, need = self._split
        base = await self._detokenize(self._context + before)
        if base is None:
            return  # the engine cannot say: every token of the event stays counted
        for j in range(1, len(ids)):
            text = await self._detokenize(self._context + before + ids[:j])
            if text is None:
                return
            if len(text) - len(base) >= need:
                self._tokens = len(before) + j
                return

    def _rewrite(self, data: bytes) -> tuple[bytes, bool]:
        """The events for the client; True when a stop across the seam ended the answer (the
        events then end with the usage, if asked for, and [DONE])."""
        out = []
        for event in data.split(b"\n\n"):
            if not event.startswith(b"data: {") or ERROR_EVENT.match(event):
                if event:
                    out.append(event + b"\n\n")
                continue
            parsed = orjson.loads(event[6:])
            try:
                rewritten = self._event(parsed)
            except _Stop:
                out.append(b"data: " + orjson.dumps(parsed) + b"\n\n")
                return b"".join(out), True  # the usage and [DONE] follow (_last)
            if rewritten is not None:
                out.append(b"data: " + orjson.dumps(rewritten) + b"\n\n")
        return b"".join(out), False

    def _usage_event(self) -> bytes:
        head = self._head
        body = {k: head.get(k) for k in ("id", "object", "created", "model")}
        completion = self._moved + self._tokens
        body["choices"] = []
        body["usage"] = {
            "prompt_tokens": self._prompt,
            "total_tokens": self._prompt + completion,
            "completion_tokens": completion,
        }
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def _event(self, event: dict[str, Any]) -> dict[str, Any]:
        """One continuation event as the first engine would have written it (a chat chunk per
        completion chunk: vLLM sends one for every token, with empty content for a token whose
        text is held back or not whole yet); _Stop (`event` then rewritten as the answer's last
        chunk) when a stop string across the seam ends it."""
        head = self._head
        event.update(id=head.get("id"), object=head.get("object"), created=head.get("created"))
        usage = event.get("usage")
        if isinstance(usage, dict):
            completion = self._moved + int(usage.get("completion_tokens") or 0)
            usage.update(
                prompt_tokens=self._prompt,
                completion_tokens=completion,
                total_tokens=self._prompt + completion,
            )
        choices = event.get("choices") or []
        for choice in choices:
            self._tokens += len(choice.get("token_ids") or ())
        try:
            if choices:
                self._text(choices[0])
        finally:
            event["choices"] = [self._choice(c) for c in choices]
            if self._checking and choices:
                self._ids += choices[0].get("token_ids") or ()
        return event

    def _text(self, choice: dict[str, Any]) -> None:
        """Set `choice`'s text to what the client gets now. The continuation's engine holds
        nothing back for stop strings (it was asked to include them in its output), so the
        seam holds back what could begin one, as the first engine did, and cuts the stop
        string off the end of an answer that ended on one; while a stop across the seam is
        still possible it holds back everything (`_across`)."""
        self._pending += choice.get("text") or ""
        if self._checking:
            self._across(choice)
        if choice.get("finish_reason") is not None:
            text, stop = self._pending, choice.get("stop_reason")
            if isinstance(stop, str) and stop and not self._include and text.endswith(stop):
                text = text[: -len(stop)]
            choice["text"], self._pending = text, ""
            return
        cut = 0 if self._checking else max(0, len(self._pending) - self._hold)
        choice["text"], self._pending = self._pending[:cut], self._pending[cut:]

    def _across(self, choice: dict[str, Any]) -> None:
        """Look for a stop string that begins before the seam and ends in the continuation's
        text; _Stop when one ends the answer (`choice` then says so), else clear `_checking`
        once the continuation's text reaches past where any could end."""
        window = self._tail + self._pending
        seam = len(self._tail) + len(self._held)
        found = [
            (pos, stop)
            for stop in self._stops
            if 0 <= (pos := window.find(stop, max(0, seam - len(stop) + 1))) < seam
        ]
        if found:
            pos, stop = min(found)
            ids, text = list(choice.get("token_ids") or ()), choice.get("text") or ""
            # the continuation's characters up to the stop's end, less those before this event
            need = pos + len(stop) - len(window) + len(text)
            if len(ids) > 1 and need < len(text):
                self._split = (list(self._ids), ids, need)
            end = pos + len(stop) if self._include else pos
            choice.update(finish_reason="stop", stop_reason=stop)
            choice["text"] = window[len(self._tail) : end]
            raise _Stop
        if len(self._pending) - len(self._held) >= self._reach:
            self._checking = False

    def _choice(self, choice: dict[str, Any]) -> dict[str, Any]:
        ids = choice.get("token_ids") if self._keep_ids else None
        if not self._chat:
            choice.update(prompt_token_ids=None, token_ids=ids)
            return choice
        out: dict[str, Any] = {
            "index": choice.get("index", 0),
            "delta": {"content": choice.get("text") or ""},
            "logprobs": None,
            "finish_reason": choice.get("finish_reason"),
        }
        if out["finish_reason"] is not None:
            out["stop_reason"] = choice.get("stop_reason")
        out["token_ids"] = ids
        return out
