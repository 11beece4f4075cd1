"""The proxy's error tree, rendered once as OpenAI-shaped JSON.

Engine-side failures are translated into these at the engine boundary
(`proxy.engines.client`); everything above it only raises and catches `ProxyError`.

The body's `type` is the one vLLM gives an error of the same status (`error_type`), so that a
client sees one vocabulary whether the proxy refused a request or passed an engine's refusal
through: vLLM's error classes where it has one for the status (400 `BadRequestError`, 404
`NotFoundError`, 422 `UnprocessableEntityError`, 500 `InternalServerError`, 501
`NotImplementedError`), else the status's HTTP phrase, as vLLM's handler of HTTP exceptions
writes it (401 `Unauthorized`, 403 `Forbidden`, 409 `Conflict`, 413 `Request Entity Too Large`,
429 `Too Many Requests`, 502 `Bad Gateway`, 503 `Service Unavailable`, 504 `Gateway Timeout`).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson

# vLLM's error classes, by status (its serving layer's create_error_response)
VLLM_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    422: "UnprocessableEntityError",
    500: "InternalServerError",
    501: "NotImplementedError",
}


def error_type(status: int) -> str:
    """The `type` vLLM puts in an error body of this status."""
    if status in VLLM_ERROR_TYPES:
        return VLLM_ERROR_TYPES[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return VLLM_ERROR_TYPES[500 if status >= 500 else 400]


class ProxyError(Exception):
    """A failure with the HTTP status the client should see. `type` names the kind of failure
    for the proxy's own counters (`pdproxy_upstream_failures_total{type}`); the body's `type`
    is vLLM's for the status (`error_type`)."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": error_type(self.status),
                    "param": self.param,
                    "code": self.code if self.code is not None else self.status,
                }
            }
        )


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(BadRequest):
    status = 413


class NotFound(ProxyError):
    status = 404
    type = "not_found_error"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"


class Unauthorized(ProxyError):
    status = 401
    type = "authentication_error"


class Forbidden(ProxyError):
    status = 403
    type = "permission_error"


class Conflict(ProxyError):
    """The request is valid but clashes with the current state (a worker already known, ...)."""

    status = 409
    type = "invalid_request_error"


class TooManyRequests(ProxyError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NoWorkerAvailable(ProxyError):
    status = 503
    type = "service_unavailable"


class NotImplementedByProxy(ProxyError):
    """An endpoint the engines serve but the proxy cannot serve through disaggregation."""

    status = 501
    type = "not_implemented_error"


class UpstreamError(ProxyError):
    """An engine failed (5xx, broken connection, garbage): the client sees 502."""

    status = 502
    type = "upstream_error"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "timeout"


class KVTransferTimeout(ProxyError):
    """The KV transfer was not confirmed in time (connector lmcache: no "transfer done"
    notification by the deadline). Not an engine failure: not retried on another prefiller and
    not held against the prefiller's health; the client gets a 504."""

    status = 504
    type = "timeout"


class UpstreamRejected(ProxyError):
    """An engine refused the request with a 4xx: the client gets that status and body."""

    type = "invalid_request_error"

    def __init__(self, status: int, body: bytes, message: str) -> None:
        super().__init__(message)
        self.status = status
        self._body = body

    def body(self) -> bytes:
        return self._body


def openai_error_body(status: int, raw: bytes) -> bytes:
    """Return `raw` when it is already `{"error": {...}}`, else wrap what it says into that shape.

    Older vLLM answers `{"object": "error", "message": ...}`; a proxy in front may answer
    plain text.
    """
    try:
        parsed: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        if isinstance(parsed.get("error"), dict):
            return raw
        if "message" in parsed:
            return orjson.dumps(
                {
                    "error": {
                        "message": str(parsed["message"]),
                        "type": parsed.get("type") or error_type(status),
                        "param": parsed.get("param"),
                        "code": parsed.get("code") or status,
                    }
                }
            )
    text = raw.decode("utf-8", "replace").strip()[:500] or f"HTTP {status}"
    return orjson.dumps(
        {"error": {"message": text, "type": error_type(status), "param": None, "code": status}}
    )


def error_message(body: bytes) -> str:
    """The human message inside an OpenAI-shaped error body."""
    try:
        return str(orjson.loads(body)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:200]
