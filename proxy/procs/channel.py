"""The channel between the control process and one serving process: JSON messages (orjson),
each framed by its length (4 bytes, big-endian), both ways over one Unix stream socket.

Why frames and not HTTP over the socket: the channel is two streams that never wait for each
other (the control process pushes snapshots of the workers; a serving process pushes its reports
back), and the end of the connection is itself the message that matters: EOF on a serving process
means the control process is gone (drain and exit); EOF on the control process means the serving
process is gone (zero what it held). HTTP would need a long poll or a streamed response one way and
a request per batch the other, and would say neither. The forwarded HTTP paths (admin API,
console, /metrics, ...) do travel as HTTP, on a second socket (proxy.procs.forward).

Messages (`"t"` says which):

    hello     serving -> control, first: {"name": "w1", "pid": 123}
    snapshot  control -> serving: {"seq", "ack", "workers": [...]} (proxy.procs.snapshot)
    report    serving -> control: {"seq", "timings", "outcomes", "counters", "gauges", ...}
              (proxy.procs.report)
    notes     control -> serving: {"ids": [...]}: LMCache notifications for its transfers
              (proxy.procs.notify)
    kv        control -> serving: {"op", ...}: a change of the exact prefix index, or the whole
              index (proxy.procs.kvreplica)
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import orjson

HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024  # a frame larger than this is a broken peer, not a message
MAX_BUFFERED = 16 * 1024 * 1024  # a channel this far behind is sent no more until it drains


class ChannelClosed(Exception):
    """The other end closed the channel (or sent something that is not a frame)."""


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any]:
    """The next message; ChannelClosed at EOF or on a broken frame."""
    try:
        head = await reader.readexactly(HEADER.size)
        (size,) = HEADER.unpack(head)
        if size > MAX_FRAME:
            raise ChannelClosed(f"a frame of {size} bytes")
        data = orjson.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise ChannelClosed(str(exc) or "EOF") from None
    except orjson.JSONDecodeError as exc:
        raise ChannelClosed(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ChannelClosed("a message that is not an object")
    return data


def frame(message: dict[str, Any]) -> bytes:
    data = orjson.dumps(message)
    return HEADER.pack(len(data)) + data


async def send_message(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    """Write one message and wait while the peer's buffer is full; ChannelClosed if it is gone."""
    try:
        writer.write(frame(message))
        await writer.drain()
    except ConnectionError as exc:
        raise ChannelClosed(str(exc)) from None
