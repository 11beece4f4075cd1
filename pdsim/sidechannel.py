"""The KV side channel: where a consumer reads a producer's leased blocks.

Wire format (HTTP on the side-channel port, JSON bodies):
``POST /kv/read {"engine_id": str, "request_id": str, "block_ids": [int, ...]}`` answers
``200 {"contents": [int, ...]}`` and frees the blocks (NIXL's read-done notification), or
``4xx/5xx {"error": reason, "message": str}`` with reason one of ``wrong_engine``,
``unknown_request``, ``overwritten``, ``bad_blocks``, ``bad_request``, ``injected_fault``.
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import orjson
from aiohttp import web

from pdsim.kvcache import BlockPool, KvReadError

READ_PATH = "/kv/read"
RELEASE_PATH = "/kv/release"
_STATUS = {"wrong_engine": 409, "unknown_request": 404, "overwritten": 410, "bad_blocks": 409}


def _reply(status: int, reason: str, message: str) -> web.Response:
    body = orjson.dumps({"error": reason, "message": message})
    return web.Response(status=status, body=body, content_type="application/json")


def side_channel_app(
    engine_id: str, pool: BlockPool, failing: Callable[[], bool]
) -> web.Application:
    """The producer's side-channel server; ``failing()`` true makes every read fail."""

    async def read(request: web.Request) -> web.Response:
        if failing():
            return _reply(500, "injected_fault", "Injected side-channel failure")
        try:
            body = orjson.loads(await request.read())
            eid, rid, ids = body["engine_id"], body["request_id"], body["block_ids"]
            if not isinstance(rid, str) or not all(isinstance(b, int) for b in ids):
                raise TypeError("bad types")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _reply(400, "bad_request", "Expected engine_id, request_id, block_ids")
        if eid != engine_id:
            return _reply(409, "wrong_engine", f"This is engine {engine_id}, not {eid}")
        try:
            contents = pool.read(rid, ids)
        except KvReadError as e:
            return _reply(_STATUS.get(e.reason, 400), e.reason, str(e))
        return web.Response(
            body=orjson.dumps({"contents": contents}), content_type="application/json"
        )

    async def release(request: web.Request) -> web.Response:
        """Free a request's blocks without reading them: what a vLLM decoder notifies when its
        request carrying do_remote_prefill is aborted before the pull."""
        try:
            body = orjson.loads(await request.read())
            eid, rid = body["engine_id"], body["request_id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _reply(400, "bad_request", "Expected engine_id, request_id")
        if eid != engine_id:
            return _reply(409, "wrong_engine", f"This is engine {engine_id}, not {eid}")
        if not pool.release(str(rid)):
            return _reply(404, "unknown_request", f"No blocks held for {rid}")
        return web.Response(body=b"{}", content_type="application/json")

    app = web.Application()
    app.router.add_post(READ_PATH, read)
    app.router.add_post(RELEASE_PATH, release)
    return app


async def release_blocks(
    session: aiohttp.ClientSession, host: str, port: int, engine_id: str, request_id: str
) -> bool:
    """Ask a producer to free a request's blocks; True if it held them."""
    url = f"http://{host}:{port}{RELEASE_PATH}"
    payload = orjson.dumps({"engine_id": engine_id, "request_id": request_id})
    try:
        async with session.post(
            url, data=payload, headers={"Content-Type": "application/json"}
        ) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


class KvPullError(Exception):
    """A pull failed; ``reason`` is a side-channel reason or ``unreachable``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


async def pull_blocks(
    session: aiohttp.ClientSession,
    host: str,
    port: int,
    engine_id: str,
    request_id: str,
    block_ids: list[int],
) -> list[int]:
    """Read ``block_ids`` from a producer; raises ``KvPullError``."""
    url = f"http://{host}:{port}{READ_PATH}"
    payload = orjson.dumps(
        {"engine_id": engine_id, "request_id": request_id, "block_ids": block_ids}
    )
    try:
        async with session.post(
            url, data=payload, headers={"Content-Type": "application/json"}
        ) as resp:
            raw = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        raise KvPullError("unreachable", f"Side channel {host}:{port} unreachable: {e}") from e
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise KvPullError("bad_reply", f"Side channel sent a malformed reply ({status})") from e
    if status != 200:
        raise KvPullError(str(body.get("error", status)), str(body.get("message", "")))
    contents = body.get("contents")
    if not isinstance(contents, list):
        raise KvPullError("bad_reply", "Side channel reply lacks contents")
    return [int(c) for c in contents]
