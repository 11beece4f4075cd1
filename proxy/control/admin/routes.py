"""The admin API's routes (FastAPI), each guarded by `Admin.guard`.

GET    /admin/workers                  every worker: id, url, role, state, health, breaker,
                                       load, engine load, model, last probe
POST   /admin/workers                  {"url", "role", "lmcache"?, "force"?}: probe, add; 201
GET    /admin/workers/{id or url}      one worker (also shortly after its removal)
DELETE /admin/workers/{id or url}      drain, then remove; 202 (?force=true: even the last)
GET    /admin/requests?since=N         recent request timelines after seq N
GET    /admin/requests/{request id}    one request's timeline
GET    /admin/pool                     the pool: mode, each engine's lean, the controller's
                                       measured demand, split costs and recent changes
PUT    /admin/pool                     {"leans": {id: "prefill"|"decode"}?, "controller":
                                       "auto"|"manual"?}: set leans; manual pauses the
                                       controller until "auto"
GET    /admin/prefix-index             per engine with KV events: its index's source, blocks,
                                       a digest of them, and its subscriber's counts
POST   /admin/prefix-index             {"token_ids": [...]}: the leading tokens of that prompt
                                       each engine holds, by the exact index
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, ValidationError

from proxy.control.admin.service import AddWorker, Admin
from proxy.control.kvevents import KvEvents
from proxy.control.pool import PoolController
from proxy.control.workers import Lean
from proxy.errors import BadRequest, Conflict, NotFound
from proxy.observe.timeline import TimelineRing


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


class PoolUpdate(BaseModel):
    """The body of PUT /admin/pool."""

    model_config = ConfigDict(extra="forbid")

    leans: dict[str, Lean] = {}
    controller: Literal["auto", "manual"] | None = None


async def _body(request: Request) -> Any:
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None


def add_admin_routes(
    api: FastAPI,
    admin: Admin,
    timelines: TimelineRing,
    pool: PoolController | None = None,
    kv_events: KvEvents | None = None,
) -> None:
    _worker_routes(api, admin)
    _request_routes(api, admin, timelines)
    _pool_routes(api, admin, pool)
    _prefix_routes(api, admin, kv_events)


def _worker_routes(api: FastAPI, admin: Admin) -> None:
    @api.get("/admin/workers")
    async def list_workers(request: Request) -> Response:
        admin.guard(request.scope["headers"])
        return _json({"object": "list", "data": admin.list()})

    @api.post("/admin/workers")
    async def add_worker(request: Request) -> Response:
        admin.guard(request.scope["headers"])
        worker = await admin.add(AddWorker.parse(await _body(request)))
        return _json(admin.describe(worker), 201)

    @api.get("/admin/workers/{key:path}")
    async def get_worker(key: str, request: Request) -> Response:
        admin.guard(request.scope["headers"])
        return _json(admin.describe(admin.find(key)))

    @api.delete("/admin/workers/{key:path}")
    async def remove_worker(key: str, request: Request, force: bool = False) -> Response:
        admin.guard(request.scope["headers"])
        worker = admin.remove(key, force)
        for hook in admin.drain_hooks:
            hook(worker)
        return _json(admin.describe(worker), 202)


def _request_routes(api: FastAPI, admin: Admin, timelines: TimelineRing) -> None:
    @api.get("/admin/requests")
    async def recent_requests(request: Request, since: int = 0, limit: int = 100) -> Response:
        admin.guard(request.scope["headers"])
        limit = max(1, min(limit, 1000))
        return _json({"seq": timelines.seq, "data": timelines.since(since, limit)})

    @api.get("/admin/requests/{request_id}")
    async def one_request(request_id: str, request: Request) -> Response:
        admin.guard(request.scope["headers"])
        found = timelines.find(request_id)
        if found is None:
            raise NotFound(f"request {request_id!r} is not among the recent ones kept")
        return _json(found)


def _pool_routes(api: FastAPI, admin: Admin, pool: PoolController | None) -> None:
    def _pool() -> PoolController:
        if pool is None:
            raise NotFound("this proxy has no pool (configure 'pool: [urls]')")
        return pool

    @api.get("/admin/pool")
    async def get_pool(request: Request) -> Response:
        admin.guard(request.scope["headers"])
        return _json(_pool().describe())

    @api.put("/admin/pool")
    async def set_pool(request: Request) -> Response:
        admin.guard(request.scope["headers"])
        planner = _pool()
        try:
            update = PoolUpdate.model_validate(await _body(request))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "body"
            raise BadRequest(f"{where}: {err['msg']}", param=where) from None
        if planner.mode == "colocated" and (update.leans or update.controller):
            raise Conflict("a colocated pool has no leans: every engine serves whole requests")
        planner.update(update.leans, update.controller)
        return _json(planner.describe())


def _prefix_routes(api: FastAPI, admin: Admin, kv_events: KvEvents | None) -> None:
    def _events() -> KvEvents:
        if kv_events is None:
            raise NotFound("this proxy has no exact prefix index (configure kv_events.enabled)")
        return kv_events

    @api.get("/admin/prefix-index")
    async def get_index(request: Request) -> Response:
        admin.guard(request.scope["headers"])
        return _json({"engines": _events().describe()})

    @api.post("/admin/prefix-index")
    async def lookup(request: Request) -> Response:
        admin.guard(request.scope["headers"])
        events = _events()
        body = await _body(request)
        ids = body.get("token_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(type(t) is int for t in ids):
            raise BadRequest('expected {"token_ids": [int, ...]}', param="token_ids")
        cached = events.index.cached(ids, list(events.running))
        return _json({"cached_tokens": cached})
