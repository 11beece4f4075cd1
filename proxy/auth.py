"""API keys: clients on /v1/*, a separate admin key for /stats.

Keys come from environment variables or files (one key per line), never from the YAML itself, and
are never logged. Comparison is constant-time (`hmac.compare_digest`) against every configured key.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from pathlib import Path

from proxy.errors import Unauthorized


def load_keys(env: str | None, file: str | None) -> tuple[bytes, ...]:
    """Keys from the variable named `env` (comma-separated) and from `file` (one per line)."""
    keys: list[str] = []
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ValueError(f"environment variable {env} (named in auth config) is not set")
        keys += value.split(",")
    if file:
        try:
            keys += Path(file).read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read key file {file}: {exc.strerror}") from None
    cleaned = tuple(k.strip().encode() for k in keys if k.strip() and not k.startswith("#"))
    if (env or file) and not cleaned:
        raise ValueError("auth config names a key source, but it holds no keys")
    return cleaned


def _matches(presented: bytes, keys: Iterable[bytes]) -> bool:
    found = False
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        found |= hmac.compare_digest(presented, key)
    return found


class Authenticator:
    def __init__(self, api_keys: tuple[bytes, ...], admin_keys: tuple[bytes, ...]) -> None:
        self.api_keys = api_keys
        self.admin_keys = admin_keys

    @staticmethod
    def _bearer(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = bytes(value).partition(b" ")
                return token.strip() if scheme.lower() == b"bearer" else None
        return None

    def check_api(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        if self.api_keys:
            self._check(headers, self.api_keys, "an API key")

    def check_admin(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        if self.admin_keys:
            self._check(headers, self.admin_keys, "the admin key")

    def _check(
        self, headers: Iterable[tuple[bytes, bytes]], keys: tuple[bytes, ...], what: str
    ) -> None:
        token = self._bearer(headers)
        if token is None:
            raise Unauthorized(f"this endpoint needs {what}: send 'Authorization: Bearer <key>'")
        if not _matches(token, keys):
            raise Unauthorized(f"the key given is not {what}")
