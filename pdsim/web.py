"""HTTP plumbing shared by the sim's routes: JSON replies, vLLM's error replies, body reading
(the content-type and JSON checks vLLM's FastAPI layer makes), FastAPI's 404/405 shape."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from pdsim.errors import ApiError, json_error, model_not_found, not_an_object
from pdsim.records import Record

MAX_BODY = 64 * 1024 * 1024


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(err: ApiError) -> web.Response:
    return web.Response(body=err.body(), status=err.status, content_type="application/json")


@web.middleware
async def fastapi_http_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Unknown paths and methods answer like FastAPI: ``{"detail": "Not Found"}``."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as e:
        return json_response({"detail": e.reason}, e.status)


async def read_json(request: web.Request, model: str, record: Record | None = None) -> Any:
    """The request's JSON object, checked as vLLM checks it before validating the fields;
    ``record`` (if any) keeps the body, or its text when it is not JSON."""
    raw = await request.read()
    if request.content_type != "application/json":
        if record is not None:
            record.body = raw.decode("utf-8", "replace")
        raise ApiError(
            "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
            400,
            "Bad Request",
        )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        if record is not None:
            record.body = raw.decode("utf-8", "replace")
        raise json_error(raw) from e
    if record is not None:
        record.body = body
    if not isinstance(body, dict):
        raise not_an_object(body)
    requested = body.get("model")
    if requested is not None and requested != model:
        raise model_not_found(requested, model)
    return body


def drop(request: web.Request) -> None:
    """Cut the connection under a response (a fault)."""
    transport = request.transport
    if transport is not None:
        transport.abort()
