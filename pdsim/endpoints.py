"""The engine's plain endpoints: ``/v1/models``, ``/tokenize``, ``/detokenize``, ``/health``,
``/version`` and ``/metrics``, as vLLM 0.32 answers them."""

from __future__ import annotations

import secrets
import time
from typing import Any

from aiohttp import web

from pdsim.errors import ApiError, field_error, schema_error
from pdsim.instance import SIM_VERSION, Instance
from pdsim.shape import BLOCK_SIZE
from pdsim.web import error_response, json_response, read_json


class Endpoints:
    """The plain endpoints of one instance."""

    def __init__(self, instance: Instance) -> None:
        self._i = instance

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/v1/models", self.models)
        r.add_post("/tokenize", self.tokenize)
        r.add_post("/detokenize", self.detokenize)
        r.add_get("/health", self.health)
        r.add_get("/version", self.version)
        r.add_get("/metrics", self.metrics)

    async def models(self, _: web.Request) -> web.Response:
        model = self._i.config.model
        card = {
            "id": model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": model,
            "parent": None,
            "max_model_len": self._i.config.max_model_len,
            "permission": [_permission()],
        }
        return json_response({"object": "list", "data": [card]})

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(status=503 if self._i.faults.current.unhealthy else 200)

    async def version(self, _: web.Request) -> web.Response:
        return json_response({"version": SIM_VERSION})

    async def metrics(self, _: web.Request) -> web.Response:
        i = self._i
        engine = i.engine
        i.metrics.kv_expired_reqs = engine.pool.expired_requests
        text = i.metrics.render(
            i.config.model,
            engine.num_running,
            engine.num_waiting,
            engine.pool.usage,
            engine.pool.held_blocks,
            engine.pulling,
            {
                "block_size": str(BLOCK_SIZE),
                "enable_prefix_caching": str(i.config.prefix_caching),
                "num_gpu_blocks": str(i.config.num_gpu_blocks),
            },
        )
        if i.lmcache is not None:
            text += i.lmcache.render()
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def tokenize(self, request: web.Request) -> web.Response:
        tok = self._i.tokenizer
        try:
            body = await read_json(request, self._i.config.model)
            if "messages" in body:
                text = tok.apply_chat_template(
                    body["messages"], bool(body.get("add_generation_prompt", True))
                )
                ids = tok.encode(text)
            elif isinstance(body.get("prompt"), str):
                ids = tok.encode(body["prompt"], bool(body.get("add_special_tokens", True)))
            else:
                raise schema_error(
                    [
                        field_error("missing", "prompt", "Field required", body),
                        field_error("missing", "messages", "Field required", body),
                    ]
                )
        except (ApiError, ValueError, TypeError) as e:
            return error_response(e if isinstance(e, ApiError) else ApiError(str(e)))
        out: dict[str, Any] = {
            "count": len(ids),
            "max_model_len": self._i.config.max_model_len,
            "tokens": ids,
            "token_strs": tok.token_strs(ids) if body.get("return_token_strs") else None,
        }
        return json_response(out)

    async def detokenize(self, request: web.Request) -> web.Response:
        try:
            body = await read_json(request, self._i.config.model)
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(
                isinstance(t, int) and t >= 0 for t in tokens
            ):
                raise ApiError("tokens must be a list of non-negative integers.", param="tokens")
        except ApiError as e:
            return error_response(e)
        return json_response({"prompt": self._i.tokenizer.decode(tokens)})


def _permission() -> dict[str, Any]:
    return {
        "id": f"modelperm-{secrets.token_hex(8)}",
        "object": "model_permission",
        "created": int(time.time()),
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
