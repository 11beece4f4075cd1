"""Where the single-request path writes an answer.

The client's own response (`handler.Responder`) is one sink; a sub-request of a fanned-out
request writes into the fan-out's merger instead (`fanout.PartSink`). The path calls `whole`
once for an answer read whole, or `start_stream`, any number of `chunk`s and one `end` for a
stream (whole SSE events each time, the last ones and `data: [DONE]` in `end`).
"""

from __future__ import annotations

from typing import Protocol


class Sink(Protocol):
    @property
    def started(self) -> bool:
        """Bytes of this answer went on to the client: nothing may be retried any more."""
        ...

    async def whole(self, status: int, body: bytes) -> None: ...

    async def start_stream(self) -> None: ...

    async def chunk(self, data: bytes) -> None: ...

    async def end(self, data: bytes = b"") -> None: ...
