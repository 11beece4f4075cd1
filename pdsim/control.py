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
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import pydantic
from aiohttp import web

from pdsim.faults import Faults, FaultState
from pdsim.protocol import ApiError


@dataclass
class Record:
    """What one request looked like and how it ended."""

    path: str
    x_request_id: str | None
    body: Any = None
    status: int | None = None
    outcome: str = "in_progress"
    kv: str = "local"
    kv_failure: str | None = None
    finish_reason: str | None = None
    kv_transfer_params_returned: bool = False
    engine_request_id: str | None = None


class Records:
    """A bounded log of request records."""

    def __init__(self, maxlen: int) -> None:
        self._items: deque[Record] = deque(maxlen=maxlen)

    def add(self, record: Record) -> Record:
        self._items.append(record)
        return record

    def clear(self) -> None:
        self._items.clear()

    def as_json(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self._items]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def add_control_routes(
    app: web.Application,
    records: Records,
    faults: FaultState,
    info: Callable[[], dict[str, Any]],
) -> None:
    async def get_requests(_: web.Request) -> web.Response:
        return _json({"requests": records.as_json()})

    async def reset(_: web.Request) -> web.Response:
        records.clear()
        faults.replace(Faults())
        return _json({"ok": True})

    async def get_faults(_: web.Request) -> web.Response:
        return _json(faults.current.model_dump())

    async def set_faults(request: web.Request) -> web.Response:
        try:
            new = Faults.model_validate(orjson.loads(await request.read() or b"{}"))
        except (orjson.JSONDecodeError, pydantic.ValidationError) as e:
            err = ApiError(f"Invalid fault set: {e}")
            return web.Response(body=err.body(), status=400, content_type="application/json")
        faults.replace(new)
        return _json(new.model_dump())

    async def get_info(_: web.Request) -> web.Response:
        return _json(info())

    app.router.add_get("/_sim/requests", get_requests)
    app.router.add_post("/_sim/reset", reset)
    app.router.add_get("/_sim/faults", get_faults)
    app.router.add_post("/_sim/faults", set_faults)
    app.router.add_get("/_sim/info", get_info)
