"""A prompt's tokens from an engine's /tokenize (the chat template included), for the planner's
decisions that depend on their count (proxy.place.planner) and for the exact prefix index
(proxy.place.kvindex), which looks their blocks up."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson

from proxy.control.workers import Worker
from proxy.engines.client import EngineClient
from proxy.errors import ProxyError
from proxy.request import CHAT, ClientRequest

log = logging.getLogger("pdproxy")


def tokenize_body(request: ClientRequest) -> bytes:
    body = request.body
    if request.path == CHAT:
        wanted = {"model": body.get("model"), "messages": body.get("messages")}
        wanted["add_generation_prompt"] = body.get("add_generation_prompt", True)
        for key in ("chat_template", "chat_template_kwargs", "tools"):
            if key in body:
                wanted[key] = body[key]
        return orjson.dumps(wanted)
    return orjson.dumps({"model": body.get("model"), "prompt": body.get("prompt")})


@dataclass
class TokenCounter:
    """Counts prompts on the engine the planner names, within `timeout` seconds."""

    engine: EngineClient
    timeout: float

    async def __call__(self, request: ClientRequest, worker: Worker) -> list[int] | int | None:
        """The prompt's token ids (a prompt of token ids as it is), or only their count where
        the engine gives no ids; None when the engine cannot say."""
        prompt = request.body.get("prompt") if request.path != CHAT else None
        if isinstance(prompt, list) and all(type(t) is int for t in prompt):
            return prompt
        try:
            raw = await self.engine.call(
                worker, "/tokenize", tokenize_body(request), request.request_id, self.timeout,
                "tokenize",
            )  # fmt: skip
            answer = orjson.loads(raw)
            count, ids = answer.get("count"), answer.get("tokens")
        except (ProxyError, orjson.JSONDecodeError, AttributeError) as exc:
            log.info("request %s: /tokenize on %s failed: %s", request.request_id, worker.url, exc)
            return None
        if isinstance(ids, list) and all(type(t) is int for t in ids):
            return ids
        return count if type(count) is int else None
