"""A request for several completions, served as one disaggregated request per completion.

A list of prompts (completions) and `n > 1` (completions and chat) fan out: completion
(prompt i, sample j) becomes a sub-request of its own, with `prompt` = prompt i, `n: 1` and, when
the client gave a `seed`, `seed + j`, the seed vLLM itself gives the j-th of its n samples
(`ParentRequest`), so a seeded request is answered as vLLM answers it. Each sub-request runs the
single-request path (`RunOne`): admission (one slot each, at the request's priority), the
policies' own choice of prefiller and decoder, its own prefill leg and KV handoff, failover. No
two decodes ever read one prefill's blocks: the prefiller frees them after the first pull.

The answers are merged as vLLM merges its own (`serving.py` of completion and chat in
`vllm/entrypoints/openai/`): one `id` (`cmpl-`/`chatcmpl-` + the request id), one `created`,
choice (i, j) at index `i * n + j`, `usage` with the prompt tokens counted once per prompt and
the completion tokens of every choice, `metrics` null (vLLM keeps per-request metrics for
single completions). A stream interleaves the sub-streams' events as they come, each with its
choice index, `id` and `created` rewritten; their usage chunks are summed into one sent last
(with `stream_options.include_usage`), then exactly one `data: [DONE]`.

Failures: a sub-stream whose decoder fails mid-answer continues on another decoder on its own
(proxy.flow.migrate, in the single-request path). The first sub-request to fail for good fails
the request and the others are cancelled at once (their engine connections close, so vLLM
aborts them and frees their KV): before the response started, an ordinary error response;
after, an SSE error event and `[DONE]`. A client that
leaves cancels every sub-request (the request path's watcher cancels this task).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import orjson

from proxy.errors import BadRequest, ProxyError, UpstreamError
from proxy.flow.progress import Progress
from proxy.flow.sink import Sink
from proxy.observe.stats import RequestTiming
from proxy.request import ClientRequest, one_prompt_chars

log = logging.getLogger("pdproxy")

# one (sub-)request through the single-request path; the last argument is the client's
# request task, which a worker's drain ends
RunOne = Callable[
    [ClientRequest, Sink, RequestTiming, Progress, "asyncio.Task[Any] | None"], Awaitable[None]
]

DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Part:
    """Sub-request `position` (in choice order): completion `sample` of prompt `prompt`, whose
    choices are numbered from `index`."""

    position: int
    index: int
    prompt: int
    sample: int
    request: ClientRequest


class EngineErrorEvent(ProxyError):
    """A sub-stream carried an engine's error event: it is what the client's stream ends with."""

    status = 502
    type = "upstream_error"

    def __init__(self, body: bytes) -> None:
        super().__init__("an engine ended a sub-stream with an error event")
        self._body = body

    def body(self) -> bytes:
        return self._body


def split(request: ClientRequest, max_parts: int) -> list[Part]:
    """The sub-requests of `request`, in choice order; a 400 beyond `max_parts`."""
    count = request.fanout
    if count > max_parts:
        prompts = len(request.prompts or (None,))
        raise BadRequest(
            f"this request asks for {count} completions ({prompts} prompt(s) x n={request.n}); "
            f"the proxy serves at most {max_parts} per request (fanout.max_batch_prompts): "
            "send them in smaller requests",
            param="prompt" if request.prompts else "n",
        )
    body = request.body
    seed = body.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed == -1:  # vLLM: -1 is none
        seed = None
    n = request.samples
    parts = []
    for i, prompt in enumerate(request.prompts or (None,)):
        for j in range(n):
            sub = dict(body)
            if prompt is not None:
                sub["prompt"] = prompt
            if "n" in body and request.local_reason != "beam_search":
                sub["n"] = 1
            if seed is not None:
                sub["seed"] = seed + j
            k = i * n + j
            chars = request.prompt_chars if prompt is None else one_prompt_chars(prompt)
            part_request = ClientRequest(
                path=request.path,
                body=sub,
                request_id=f"{request.request_id}-{k}",
                stream=request.stream,
                include_usage=request.include_usage,
                prompt_chars=chars,
                priority=request.priority,
                n=request.n if request.local_reason == "beam_search" else 1,
                max_tokens=request.max_tokens,
                local_reason=request.local_reason,
            )
            parts.append(Part(k, i * request.n + j, i, j, part_request))
    return parts


def _count(usage: Any, key: str) -> int:
    value = usage.get(key) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def merge_usage(parts: Sequence[Part], usages: Sequence[Any]) -> dict[str, Any]:
    """vLLM's usage of a batch: prompt tokens once per prompt (its first sample's), completion
    tokens of every choice; `prompt_tokens_details` as the last prompt's (vLLM's completions take
    the last prompt's cached tokens); reasoning tokens summed. Keys in the engine's order."""
    template = next((u for u in usages if isinstance(u, dict)), {})
    prompt = sum(_count(u, "prompt_tokens") for p, u in zip(parts, usages, strict=True)
                 if p.sample == 0)  # fmt: skip
    completion = sum(_count(u, "completion_tokens") for u in usages)
    merged = dict(template)
    merged["prompt_tokens"] = prompt
    merged["completion_tokens"] = completion
    merged["total_tokens"] = prompt + completion
    if "prompt_tokens_details" in template:
        last = [u for p, u in zip(parts, usages, strict=True) if p.sample == 0][-1]
        merged["prompt_tokens_details"] = (last or {}).get("prompt_tokens_details")
    details = [u.get("completion_tokens_details") for u in usages if isinstance(u, dict)]
    reasoning = [d for d in details if isinstance(d, dict) and "reasoning_tokens" in d]
    if reasoning:
        merged["completion_tokens_details"] = {
            **reasoning[0],
            "reasoning_tokens": sum(_count(d, "reasoning_tokens") for d in reasoning),
        }
    return merged


class Merger:
    """Collects the sub-requests' answers, or relays their streams, as one answer to `out`."""

    def __init__(self, request: ClientRequest, parts: Sequence[Part], out: Sink) -> None:
        self.request = request
        self.parts = parts
        self.out = out
        self.created = int(time.time())
        self.answers: list[dict[str, Any] | None] = [None] * len(parts)
        self.usages: list[Any] = [None] * len(parts)
        # the last usage chunk and its part: the shape of the summed one
        self._usage_event: tuple[Part, dict[str, Any]] | None = None
        self._start = asyncio.Lock()

    def merged_id(self, part: Part, sub_id: Any) -> Any:
        """`cmpl-<id>` of a sub-request, as `cmpl-<the client's request id>`."""
        own = part.request.request_id
        if isinstance(sub_id, str) and sub_id.endswith(own):
            return sub_id[: -len(own)] + self.request.request_id
        return sub_id

    def _rewrite(self, part: Part, data: dict[str, Any]) -> None:
        data["id"] = self.merged_id(part, data.get("id"))
        data["created"] = self.created
        for choice in data.get("choices") or ():
            if isinstance(choice, dict):
                index = choice.get("index")
                choice["index"] = part.index + (index if isinstance(index, int) else 0)

    # -- whole answers ---------------------------------------------------------------------

    def answer(self, part: Part, raw: bytes) -> None:
        data = orjson.loads(raw)  # the request path checked it is JSON
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise UpstreamError(f"sub-request {part.request.request_id}: answer has no choices")
        self.answers[part.position] = data

    def merged_answer(self) -> bytes:
        answers = [a for a in self.answers if a is not None]
        assert len(answers) == len(self.parts), "merged before every sub-request answered"
        choices: list[Any] = []
        for part, answer in zip(self.parts, answers, strict=True):
            self._rewrite(part, answer)
            choices += answer["choices"]
        merged = {**answers[0], "choices": choices}  # the first one's other fields
        if "usage" in merged:
            merged["usage"] = merge_usage(self.parts, [a.get("usage") for a in answers])
        if merged.get("metrics") is not None:
            merged["metrics"] = None  # vLLM: per-request metrics describe one completion only
        return orjson.dumps(merged)

    # -- streams ---------------------------------------------------------------------------

    async def start(self) -> None:
        """A sub-stream has its first event: the client's stream starts now, if not yet."""
        async with self._start:
            if not self.out.started:
                await self.out.start_stream()

    async def relay(self, part: Part, data: bytes) -> None:
        """Forward a sub-stream's whole events, rewritten; keep its usage for the end."""
        forward: list[bytes] = []
        error: bytes | None = None
        for event in data.split(b"\n\n"):
            if not event or event.startswith(b"data: [DONE]"):
                continue
            if not event.startswith(b"data: {"):
                forward.append(event + b"\n\n")  # a comment (keep-alive): harmless
                continue
            try:
                parsed = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                parsed = None
            if not isinstance(parsed, dict):
                raise UpstreamError(
                    f"sub-request {part.request.request_id}: malformed stream event {event[:80]!r}"
                )
            if isinstance(parsed.get("error"), dict):
                error = event[6:]
                break
            if parsed.get("choices") == [] and isinstance(parsed.get("usage"), dict):
                self.usages[part.position] = parsed["usage"]
                self._usage_event = (part, parsed)
                continue
            self._rewrite(part, parsed)
            forward.append(b"data: " + orjson.dumps(parsed) + b"\n\n")
        if forward:
            await self.out.chunk(b"".join(forward))
        if error is not None:
            raise EngineErrorEvent(error)

    def usage_event(self) -> bytes:
        """The summed usage chunk, in the shape the engines sent theirs."""
        if not self.request.include_usage or self._usage_event is None:
            return b""
        part, event = self._usage_event
        event = dict(event)
        event["id"] = self.merged_id(part, event.get("id"))
        event["created"] = self.created
        event["usage"] = merge_usage(self.parts, self.usages)
        return b"data: " + orjson.dumps(event) + b"\n\n"

    async def finish(self) -> None:
        if self.request.stream:
            await self.out.end(self.usage_event() + DONE)
        else:
            await self.out.whole(200, self.merged_answer())


class PartSink:
    """What one sub-request's path writes into: the merger, on behalf of its part."""

    __slots__ = ("_merger", "part", "started")

    def __init__(self, merger: Merger, part: Part) -> None:
        self._merger = merger
        self.part = part
        self.started = False  # this part's bytes reached the client (no retry from here)

    async def whole(self, status: int, body: bytes) -> None:
        self._merger.answer(self.part, body)

    async def start_stream(self) -> None:
        await self._merger.start()
        self.started = True

    async def chunk(self, data: bytes) -> None:
        await self._merger.relay(self.part, data)

    async def end(self, data: bytes = b"") -> None:
        await self._merger.relay(self.part, data)


def combine_timings(timing: RequestTiming, parts: Sequence[RequestTiming], stream: bool) -> None:
    """The request's timing from its parts': the earliest prefill and first token (what the
    client waited for), the last token, every token event. (A whole answer's first token is
    when the merged answer goes out: `FanOut.serve` notes it.)"""

    def earliest(values: Iterator[float | None]) -> float | None:
        return min((v for v in values if v is not None), default=None)

    timing.prefill_start = earliest(t.prefill_start for t in parts)
    timing.prefill_end = earliest(t.prefill_end for t in parts)
    timing.admitted = earliest(t.admitted for t in parts)
    # for the timeline: the parts' workers and KV outcomes, each listed once ("d0,d1")
    for name in ("prefiller", "decoder", "kv"):
        values = {getattr(t, name) for t in parts} - {None}
        setattr(timing, name, ",".join(sorted(values)) if values else None)
    timing.retries = sum(t.retries for t in parts)
    timing.output_tokens = sum(t.output_tokens for t in parts)
    if stream:
        timing.first_token = earliest(t.first_token for t in parts)
        last = [t.last_token for t in parts if t.last_token is not None]
        timing.last_token = max(last, default=None)
        timing.token_events = sum(t.token_events for t in parts)


class FanOut:
    """Serves a request with `fanout > 1` through `run_one`, at most `max_parallel` sub-requests
    at a time."""

    def __init__(self, run_one: RunOne, max_batch_prompts: int, max_parallel: int) -> None:
        self.run_one = run_one
        self.max_batch_prompts = max_batch_prompts
        self.max_parallel = max_parallel

    async def serve(
        self,
        request: ClientRequest,
        out: Sink,
        timing: RequestTiming,
        progress: Progress,
        owner: asyncio.Task[Any] | None = None,
    ) -> None:
        """Raises the first sub-request's ProxyError (the others cancelled by then)."""
        parts = split(request, self.max_batch_prompts)
        merger = Merger(request, parts, out)
        timings = [RequestTiming(start=timing.start) for _ in parts]
        progress.parts = [Progress() for _ in parts]
        todo = iter(range(len(parts)))
        failures: list[ProxyError] = []

        async def worker() -> None:
            for k in todo:  # one iterator shared by the workers: each part is taken once
                part = parts[k]
                try:
                    await self.run_one(
                        part.request, PartSink(merger, part), timings[k], progress.parts[k], owner
                    )
                except ProxyError as exc:
                    if not failures:
                        log.warning(
                            "request %s: sub-request %s failed (%s); cancelling the others",
                            request.request_id,
                            part.request.request_id,
                            exc.message,
                        )
                    failures.append(exc)
                    raise

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(self.max_parallel, len(parts))):
                    group.create_task(worker())
        except BaseExceptionGroup:
            if not failures:
                raise
        finally:
            combine_timings(timing, timings, request.stream)
        if failures:
            raise failures[0]
        await merger.finish()
        if not request.stream:
            timing.first_token = timing.last_token = perf_counter()
