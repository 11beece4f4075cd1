"""A stream whose decoder failed after the client's first byte, continued on another decoder.

The decode leg of a streamed request asks its decoder for token ids (vLLM's
`return_token_ids`: the prompt's ids in the first chunk, with the chat template applied for
chat, and each chunk's generated ids); `Transcript` notes them as the events go by and puts
back the `null`s the client would have seen, unless the client asked for the ids itself.

When the decoder fails (the connection breaks, the stream goes silent past
`timeouts.decode_idle`, or the engine sends an error event) the request path plans another
decoder and sends it the continuation (`continuation`): a completions request whose prompt is
the prompt's ids followed by the ids generated so far, `max_tokens` and `min_tokens` less what
was generated, the same sampling parameters. `proxy.flow.seam.Seam` writes the continuation's
events into the client's stream as if one engine had written them all: the first stream's `id`,
`created` and object (chat chunks stay chat chunks), no second prompt, `usage` as one request
(the original prompt's tokens, every completion token). A whole (non-streamed) answer that
could be continued is read as a stream (proxy.flow.gather) and migrates the same way; one that
cannot, of which nothing reached the client, is asked for again instead.

Exactness: greedy decoding continues token for token (a model's next token depends only on the
sequence so far, whichever engine computed it). A seeded sampled request continues, but not on
the same random stream (the seed starts again at the seam; the response headers went out before,
so only the README can say so). Penalties see the moved tokens as prompt tokens: vLLM's presence
and frequency penalties count output tokens only, so they restart at the seam; its repetition
penalty counts prompt and output alike, so it does not change.

Not migrated (`unmigratable`, the stream ends with the error as before): structured output
(guided decoding, `response_format` beyond text, tools), beam search, prompt logprobs, output
logprobs, `suffix`, and a chat answer whose engine split out reasoning or tool calls.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.control.workers import Worker
from proxy.engines.client import EngineClient
from proxy.errors import ProxyError, UpstreamError, UpstreamTimeout
from proxy.flow.relay import PROMPT_IDS, cut_prompt_ids
from proxy.request import COMPLETIONS, ClientRequest

# the token ids of one event: the prompt's (first chunk) and the chunk's generated ones
_TOKEN_IDS = re.compile(rb'"token_ids":\[([0-9, ]*)\]')  # a generated token's (not the prompt's)
_NO_TEXT = (b'"text":""', b'"content":""')  # an event whose token's text has not come out
_SPLIT_OUT = re.compile(rb'"(reasoning|reasoning_content|tool_calls)":[\["{]')
ERROR_EVENT = re.compile(rb'data: \{"error": ?\{')  # vLLM writes it with json.dumps, a space
# what a continuation keeps of the client's body: the sampling parameters and the request's
# own settings (chat-only fields, echo, n and the stream options stay behind)
_KEPT = (
    "model", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
    "ignore_eos", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
    "allowed_token_ids", "bad_words", "skip_special_tokens", "spaces_between_special_tokens",
    "include_stop_str_in_output", "priority", "user", "length_penalty", "vllm_xargs",
)  # fmt: skip
_GUIDED = (
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structural_tag",
    "structured_outputs", "guided_decoding_backend", "tools", "functions",
)  # fmt: skip


class ErrorEvent(UpstreamError):
    """The decoder ended its stream with an error event (an abort, its engine's failure); a
    stream not continued ends with the engine's own event, as it did before migration."""

    def __init__(self, event: bytes) -> None:
        super().__init__(
            "decode: the decode worker ended the stream with an error event: "
            + event[:200].decode(errors="replace")
        )
        self._event = event

    def body(self) -> bytes:
        return self._event


def reason_of(exc: Exception) -> str:
    """The `reason` label of pdproxy_migrations_total for a decode failure."""
    if isinstance(exc, ErrorEvent):
        return "error_event"
    return "timeout" if isinstance(exc, UpstreamTimeout) else "connection"


def unmigratable(request: ClientRequest) -> str | None:
    """Why this request's stream cannot be continued on another decoder (None: it can)."""
    body = request.body
    if not request.stream:
        return "not_streamed"  # read whole (proxy.flow.gather makes it a stream if it can be)
    if request.local_reason is not None:
        return request.local_reason
    if request.n > 1:
        return "n"
    if any(body.get(key) is not None for key in _GUIDED):
        return "structured_output"
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        return "structured_output"
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        return "logprobs"
    if request.path == COMPLETIONS and body.get("suffix"):
        return "suffix"
    return None


def cannot_migrate(
    request: ClientRequest, transcript: Transcript | None, migrations: int, whole: bool
) -> str | None:
    """Why this broken answer is not continued (the `why` of pdproxy_migrations_failed_total),
    or None. A `whole` (non-streamed) answer is asked for again."""
    if migrations <= 0:
        return "limit"
    if whole:
        return None
    if transcript is None:
        return unmigratable(request) or "limit"
    if transcript.split_out:
        return "reasoning_or_tools"
    if not transcript.has_prompt:
        return "no_token_ids"  # an engine that does not return them
    return None


def with_token_ids(request: ClientRequest) -> ClientRequest:
    """The request as the decode leg sends it: asking for the token ids."""
    if request.body.get("return_token_ids"):
        return request
    body = dict(request.body)
    body["return_token_ids"] = True
    return ClientRequest(
        request.path, body, request.request_id, request.stream, request.include_usage,
        request.prompt_chars, request.priority, request.prompts, request.n, request.max_tokens,
        request.local_reason,
    )  # fmt: skip


@dataclass
class Transcript:
    """What the client got of one streamed answer, noted event by event."""

    keep_ids: bool  # the client asked for token ids: they stay in its events
    prompt_ids: list[int] | None = None  # parsed: see `prompt`
    prompt_raw: bytes | None = None  # as the first event had them, until `prompt` parses them
    generated: list[int] = field(default_factory=list)
    head: dict[str, Any] | None = None  # the first event: id, object, created, model
    finished: bool = False  # a finish_reason went out: every token did
    texts: bool = False  # note the text sent (a request with stop strings: proxy.flow.seam)
    text: list[str] = field(default_factory=list)
    split_out: bool = False  # a chat engine split out reasoning or tool calls
    broken: ErrorEvent | None = None  # the engine's error event, held back from the client
    silent: int = 0  # the last generated ids whose text has not come out (see `moved`)

    def feed(self, events: bytes) -> bytes:
        """Note `events` (whole SSE events); return them as the client should see them. An
        error event after the first event is not passed on: what came before it is, and
        `broken` says the stream failed (it may be continued)."""
        # each pattern is looked for only where a plain substring search (much faster than the
        # regular expression's scan) found its fixed part: most batches have none of them
        error = ERROR_EVENT.search(events) if b'{"error"' in events else None
        if error is not None and (self.head is not None or error.start() > 0):
            self.broken = ErrorEvent(events[error.start() + 6 :].split(b"\n\n", 1)[0])
            events = events[: error.start()]
        # the first event: its prompt ids kept as they came, parsed only if needed (`prompt`)
        hidden, raw = cut_prompt_ids(events) if PROMPT_IDS in events else (events, None)
        if raw is not None:
            self.prompt_ids, self.prompt_raw = None, raw
        if self.head is None and hidden.startswith(b"data: {"):
            self.head = orjson.loads(hidden[6:].split(b"\n\n", 1)[0])
        if not self.keep_ids:
            events = hidden
        if b'"finish_reason":"' in events:
            self.finished = True
        if (b'"reasoning' in events or b'"tool_calls":' in events) and _SPLIT_OUT.search(events):
            self.split_out = True
        if self.texts:
            self._note_text(events)
        if b'token_ids":[' not in events:
            return events
        # one scan: the pieces between the generated tokens' id lists, and the lists' digits
        pieces = _TOKEN_IDS.split(events)
        self._note_ids(events, pieces[1::2])
        if self.keep_ids:
            return events
        return b'"token_ids":null'.join(pieces[::2])

    @property
    def has_prompt(self) -> bool:
        """The prompt's ids came (an engine that does not return them sends none)."""
        return self.prompt_ids is not None or self.prompt_raw is not None

    def prompt(self) -> list[int] | None:
        """The prompt's ids, parsed on first use: only a continuation or a usage chunk made
        here needs them, and a long prompt's ids are most of the first event, on the path to
        the client's first token."""
        if self.prompt_raw is not None:
            self.prompt_ids = orjson.loads(b"[" + self.prompt_raw + b"]")
            self.prompt_raw = None
        return self.prompt_ids

    def _note_ids(self, events: bytes, digits: list[bytes]) -> None:
        """Note the generated token ids in `events` (`digits`: each id list's inside), the
        whole batch at once, as this runs for every read of every streamed answer."""
        if not digits:
            return
        self.generated += orjson.loads(b"[" + b",".join(d for d in digits if d.strip()) + b"]")
        # the events after the last one whose text is empty (all of them if none is)
        empty = max(events.rfind(_NO_TEXT[0]), events.rfind(_NO_TEXT[1]))
        token = _TOKEN_IDS.search(events, events.find(b"\n\n", empty) if empty >= 0 else 0)
        while token is not None and not token[1].strip():
            token = _TOKEN_IDS.search(events, token.end())
        if token is not None:
            self.silent = 0  # a later token with an id has its text out
        elif empty >= 0:
            self.silent = self._silent_after(events, self.silent)

    @staticmethod
    def _silent_after(events: bytes, silent: int) -> int:
        """`silent` after `events`, whose last token with an id has empty text: the ids of the
        events with empty text after the last one whose is not (added to `silent` if none)."""
        count = 0
        for token in reversed(list(_TOKEN_IDS.finditer(events))):
            ids = token[1].count(b",") + 1 if token[1].strip() else 0
            if not ids:
                continue
            start = events.rfind(b"\n\n", 0, token.start()) + 1
            if events.find(_NO_TEXT[0], start, token.start()) < 0 and (
                events.find(_NO_TEXT[1], start, token.start()) < 0
            ):
                return count
            count += ids
        return silent + count

    def _note_text(self, events: bytes) -> None:
        for event in events.split(b"\n\n"):
            if event.startswith(b"data: {"):
                for choice in orjson.loads(event[6:]).get("choices") or ():
                    piece = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if piece:
                        self.text.append(piece)

    @property
    def moved(self) -> list[int]:
        """The generated ids a continuation starts from: all but the last ones whose text has
        not come out yet (a character cut between tokens). vLLM's detokenizer, given a prompt
        that ends inside a character, answers its first chunk with the whole prompt's text
        (seen on 0.32); the continuation generates those tokens again instead."""
        return self.generated[: len(self.generated) - self.silent]

    def usage_event(self, extra: int = 0) -> bytes:
        """The usage chunk of the whole answer (`extra`: completion tokens not noted here)."""
        head = self.head or {}
        prompt = len(self.prompt() or ())
        completion = len(self.generated) + extra
        body: dict[str, Any] = {
            **{k: head.get(k) for k in ("id", "object", "created", "model")},
            "choices": [],
            "usage": {
                "prompt_tokens": prompt,
                "total_tokens": prompt + completion,
                "completion_tokens": completion,
            },
        }
        return b"data: " + orjson.dumps(body) + b"\n\n"


def continuation(request: ClientRequest, transcript: Transcript, tag: str) -> ClientRequest:
    """The completions request that continues `request` after what `transcript` noted."""
    moved = len(transcript.moved)
    prompt = [*(transcript.prompt() or ()), *transcript.moved]
    body: dict[str, Any] = {k: request.body[k] for k in _KEPT if k in request.body}
    body.update(prompt=prompt, stream=True, return_token_ids=True)
    if body.get("stop"):
        # the engine then holds no text back for its stop strings: the seam sees each token's
        # text as it comes (a stop across the seam ends at the token that completed it) and
        # holds back, and cuts, itself
        body["include_stop_str_in_output"] = True
    if request.include_usage:
        body["stream_options"] = {"include_usage": True}
    max_tokens = None if request.max_tokens is None else request.max_tokens - moved
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    min_tokens = request.body.get("min_tokens")
    if isinstance(min_tokens, int) and min_tokens:
        body["min_tokens"] = max(0, min_tokens - moved)
    return ClientRequest(
        path=COMPLETIONS,
        body=body,
        request_id=f"{request.request_id}-{tag}",
        stream=True,
        include_usage=request.include_usage,
        prompt_chars=4 * len(prompt),
        priority=request.priority,
        max_tokens=max_tokens,
    )


Detokenize = Callable[[list[int]], Awaitable[str | None]]  # ids -> the engine's text, or None


async def detokenize(
    engine: EngineClient, decoder: Worker, request: ClientRequest, ids: list[int], timeout: float
) -> str | None:
    """`ids`' text from `decoder`'s /detokenize; None when it cannot say."""
    body: dict[str, Any] = {"tokens": ids}
    if request.body.get("model"):
        body["model"] = request.body["model"]
    try:
        raw = await engine.call(
            decoder, "/detokenize", orjson.dumps(body), request.request_id, timeout, "detokenize"
        )
        text = orjson.loads(raw).get("prompt")
    except (ProxyError, orjson.JSONDecodeError, AttributeError):
        return None
    return text if isinstance(text, str) else None


async def held_text(measure: Detokenize, transcript: Transcript) -> str:
    """The text of the generated ids that the client has not seen (held back by the failed
    engine for its stop strings), from the new decoder's /detokenize (`measure`); "" when it
    cannot say."""
    full = await measure(transcript.moved)
    sent = "".join(transcript.text)
    return full[len(sent) :] if full is not None and full.startswith(sent) else ""
