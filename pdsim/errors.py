"""vLLM's error bodies: ``ApiError`` and the constructors of the shapes vLLM 0.32 answers with.

Two flavours: a body that does not fit the request schema (invalid JSON, a wrong type, a missing
required field) is FastAPI's ``"type": "Bad Request"`` with pydantic's message and ``param`` =
``body.<field>``; a value vLLM itself rejects (``max_tokens: 0``, no prompt, a prompt over the
context) is ``"BadRequestError"`` with `` (parameter=..., value=...)`` appended to the message.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


class ApiError(Exception):
    """An error rendered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        err_type: str = "BadRequestError",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.param = param

    def body(self) -> bytes:
        return error_body(str(self), self.err_type, self.status, self.param)


def schema_error(errors: list[dict[str, Any]]) -> ApiError:
    """A body that does not fit the request schema, as FastAPI reports it through vLLM."""
    label = "error" if len(errors) == 1 else "errors"
    lines = "".join(f"\n  {e!r}" for e in errors)
    return ApiError(
        f"{len(errors)} validation {label}:{lines}", 400, "Bad Request", errors[0]["loc"]
    )


def field_error(kind: str, field: str, msg: str, value: Any) -> dict[str, Any]:
    """One pydantic error entry about ``body.<field>``."""
    return {"type": kind, "loc": f"body.{field}" if field else "body", "msg": msg,
            "input": input_summary(value)}  # fmt: skip


def input_summary(value: Any) -> str:
    """How vLLM shows a rejected input: containers by size, anything else as text."""
    if isinstance(value, dict):
        return f"<dict of {len(value)} items>"
    if isinstance(value, list):
        return f"<list of {len(value)} items>"
    return str(value)


def vllm_error(message: str, param: str | None, value: Any = None) -> ApiError:
    """A value vLLM rejects (its ``VLLMValidationError``): type ``BadRequestError``."""
    extras = [f"{k}={v}" for k, v in (("parameter", param), ("value", value)) if v is not None]
    text = f"{message} ({', '.join(extras)})" if extras else message
    return ApiError(text, 400, "BadRequestError", param)


def model_not_found(requested: Any, served: str) -> ApiError:
    return ApiError(
        f"The model `{requested}` does not exist. Valid aliases: {served}.",
        404,
        "NotFoundError",
        param="model",
    )


def not_an_object(body: Any) -> ApiError:
    msg = "Input should be a valid dictionary or object to extract fields from"
    return schema_error([field_error("model_attributes_type", "", msg, body)])


def error_body(message: str, err_type: str, code: int, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    )


def json_error(raw: bytes) -> ApiError:
    """Invalid JSON as vLLM reports it: pydantic's json_invalid at the byte offset."""
    try:
        json.loads(raw)
        reason, pos = "Invalid JSON", 0
    except json.JSONDecodeError as e:
        reason, pos = e.msg, e.pos
    except UnicodeDecodeError as e:
        reason, pos = str(e.reason), e.start
    err = field_error("json_invalid", str(pos), "JSON decode error", {})
    err["ctx"] = {"error": reason}
    return schema_error([err])
