"""Request records: what each generation request looked like and how it ended (``/_sim/requests``
serves them; the outcome and kv fields are listed in ``pdsim.control``)."""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Record:
    """What one request looked like and how it ended."""

    path: str
    x_request_id: str | None
    body: Any = None
    status: int | None = None
    outcome: str = "in_progress"
    kv: str = "local"
    kv_failure: str | None = None
    finish_reason: str | None = None
    kv_transfer_params_returned: bool = False
    engine_request_id: str | None = None


class Records:
    """A bounded log of request records."""

    def __init__(self, maxlen: int) -> None:
        self._items: deque[Record] = deque(maxlen=maxlen)

    def add(self, record: Record) -> Record:
        self._items.append(record)
        return record

    def clear(self) -> None:
        self._items.clear()

    def as_json(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self._items]
