"""LMCache's "transfer done" message as a PD sender sends it, byte for byte.

LMCache's PD backend declares its messages as ``msgspec.Struct`` subclasses of a base with
``tag=True``; ``ProxyNotif`` has one field, ``req_id``. msgspec tags a struct with its class name
under the key ``"type"``, so the bytes are the msgpack map ``{"type": "ProxyNotif", "req_id":
...}``. The sim plays LMCache here, so it builds the message itself rather than share the
proxy's decoder: a test then checks one side's reading of the format against the other's.
"""

from __future__ import annotations

import msgspec


class _PDMsgBase(msgspec.Struct, tag=True):
    """Base of LMCache's PD messages; ``tag=True`` tags each subclass with its class name."""


class ProxyNotif(_PDMsgBase):
    req_id: str


def encode_proxy_notif(req_id: str) -> bytes:
    return msgspec.msgpack.encode(ProxyNotif(req_id=req_id))
