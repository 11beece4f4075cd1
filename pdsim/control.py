"""The test control plane under ``/_sim/``: request records, faults, reset and state.

``GET /_sim/requests`` -> ``{"requests": [record, ...]}`` (oldest first), each record::

    {"path", "x_request_id", "body", "status", "outcome", "kv", "kv_failure",
     "finish_reason", "kv_transfer_params_returned", "engine_request_id"}

``outcome``: ``completed``, ``aborted`` (client left), ``dropped`` (fault), ``rejected`` (4xx),
``fault`` (injected status), ``failed`` (KV load failed under policy ``fail``).
``kv``: ``local``, ``pulled`` or ``recomputed``.
``POST /_sim/faults`` replaces the fault set (``Faults`` keys; ``{}`` clears it) and answers it;
``GET /_sim/faults`` shows it. ``POST /_sim/reset`` clears records and faults.
``GET /_sim/info`` -> engine id, ports, running/waiting, held blocks and the leased request ids.
``POST /_sim/prefix-cache`` ``{"token_ids": [...]}`` -> ``{"cached_tokens": n}``: the leading
tokens of that prompt the prefix cache holds now, as the engine would count its hit (the truth
the exact prefix index is checked against; nothing is looked up as a request would).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pydantic
from aiohttp import web

from pdsim.errors import ApiError
from pdsim.faults import Faults, FaultState
from pdsim.records import Records
from pdsim.web import error_response, json_response


def add_control_routes(
    app: web.Application,
    records: Records,
    faults: FaultState,
    info: Callable[[], dict[str, Any]],
    cached_tokens: Callable[[list[int]], int],
) -> None:
    async def get_requests(_: web.Request) -> web.Response:
        return json_response({"requests": records.as_json()})

    async def reset(_: web.Request) -> web.Response:
        records.clear()
        faults.replace(Faults())
        return json_response({"ok": True})

    async def get_faults(_: web.Request) -> web.Response:
        return json_response(faults.current.model_dump())

    async def set_faults(request: web.Request) -> web.Response:
        try:
            new = Faults.model_validate(orjson.loads(await request.read() or b"{}"))
        except (orjson.JSONDecodeError, pydantic.ValidationError) as e:
            return error_response(ApiError(f"Invalid fault set: {e}"))
        faults.replace(new)
        return json_response(new.model_dump())

    async def get_info(_: web.Request) -> web.Response:
        return json_response(info())

    async def prefix_cache(request: web.Request) -> web.Response:
        try:
            ids = orjson.loads(await request.read())["token_ids"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            ids = None
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            return error_response(ApiError('expected {"token_ids": [int, ...]}'))
        return json_response({"cached_tokens": cached_tokens(ids)})

    app.router.add_get("/_sim/requests", get_requests)
    app.router.add_post("/_sim/reset", reset)
    app.router.add_get("/_sim/faults", get_faults)
    app.router.add_post("/_sim/faults", set_faults)
    app.router.add_get("/_sim/info", get_info)
    app.router.add_post("/_sim/prefix-cache", prefix_cache)
