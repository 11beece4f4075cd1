"""LMCache's "transfer done" message, byte for byte as its PD backend sends it.

LMCache (`lmcache/v1/storage_backend/pd_backend.py`) declares `PDMsgBase(msgspec.Struct,
tag=True)` and `ProxyNotif(PDMsgBase)` with one field `req_id: str`; after a request's last KV
chunk is written, each prefiller TP rank sends `msgspec.msgpack.encode(ProxyNotif(req_id=...))`
over a ZMQ PUSH socket. With `tag=True` the tag is the class name under the key "type", so the
bytes are the msgpack map `{"type": "ProxyNotif", "req_id": <str>}`. Our struct has the same
class name and field, hence the same bytes; the simulated prefiller sends it with `encode`.
"""

from __future__ import annotations

import msgspec


class _PDMsg(msgspec.Struct, tag=True):
    """Base of LMCache's PD messages; `tag=True` tags each subclass with its class name."""


class ProxyNotif(_PDMsg):
    req_id: str


_TAG = "ProxyNotif"  # msgspec's tag for tag=True: the class name, under the key "type"
_DECODER = msgspec.msgpack.Decoder(dict[str, object])


class MalformedNotification(ValueError):
    """The bytes are not a msgpack-encoded ProxyNotif."""


def encode(req_id: str) -> bytes:
    return msgspec.msgpack.encode(ProxyNotif(req_id=req_id))


def decode(raw: bytes) -> str:
    """The `req_id` of a ProxyNotif message; raises MalformedNotification for anything else,
    including a map without the tag (which a plain struct decoder would accept)."""
    try:
        message = _DECODER.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedNotification(str(exc)) from None
    req_id = message.get("req_id")
    if message.get("type") != _TAG or not isinstance(req_id, str):
        raise MalformedNotification(f"expected a {_TAG} with a string req_id, got {message!r:.200}")
    return req_id
