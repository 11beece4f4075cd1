"""The durable set of workers (`workers_state_file`): written after every change, read at start.

The file is JSON: `{"version": 1, "workers": [{"id", "role", "url", "lmcache"?}, ...]}`, the
active workers in the order they joined. A write never leaves half a file: the new content goes
to a temporary file in the same directory, is flushed and fsynced, then renamed over the old one
(atomic on POSIX), and the directory is fsynced so that the rename survives a crash. A file that
cannot be read or parsed stops start-up with a message naming it: the proxy never guesses at a
topology.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from proxy.config import check_worker_url
from proxy.control.identity import duplicates
from proxy.control.workers import Worker
from proxy.engines.connectors.lmcache_config import Receiver

VERSION = 1


class StateError(ValueError):
    """The state file cannot be used; the message names it and says why."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReceiverRecord(_Model):
    host: str
    init_ports: tuple[int, ...]
    alloc_ports: tuple[int, ...]


class WorkerRecord(_Model):
    id: str
    role: Literal["prefill", "decode", "pool"]
    url: str
    lmcache: ReceiverRecord | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return check_worker_url(value)  # the same rules as configured workers

    @classmethod
    def of(cls, worker: Worker) -> WorkerRecord:
        rx = worker.lmcache
        receiver = None if rx is None else ReceiverRecord(**dataclasses.asdict(rx))
        return cls(id=worker.id, role=worker.role, url=worker.url, lmcache=receiver)

    def receiver(self) -> Receiver | None:
        rx = self.lmcache
        return None if rx is None else Receiver(rx.host, rx.init_ports, rx.alloc_ports)


class StateFileModel(_Model):
    version: Literal[1]
    workers: tuple[WorkerRecord, ...]


class StateFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"<StateFile {self.path}>"

    def read(self) -> list[WorkerRecord] | None:
        """The recorded workers, or None when there is no file yet."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(
                f"cannot read workers state file {self.path}: {exc.strerror}"
            ) from None
        try:
            model = StateFileModel.model_validate(orjson.loads(raw))
        except orjson.JSONDecodeError as exc:
            raise StateError(
                f"workers state file {self.path} is corrupt (not JSON: {exc}); "
                "restore it or delete it to start from the configured workers"
            ) from None
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in exc.errors()
            )
            raise StateError(
                f"workers state file {self.path} is corrupt ({problems}); "
                "restore it or delete it to start from the configured workers"
            ) from None
        seen: set[str] = set()
        for record in model.workers:
            if record.id in seen:
                raise StateError(
                    f"workers state file {self.path} is corrupt: {record.id} appears twice"
                )
            seen.add(record.id)
        records = list(model.workers)
        for i, j, why in duplicates((r.role, r.url) for r in records):
            first, second = records[i], records[j]
            raise StateError(
                f"workers state file {self.path} names one engine twice: {first.id} "
                f"({first.role} {first.url}) and {second.id} ({second.role} {second.url}), "
                f"{why}; remove one of them from the file"
            )
        return records

    def write(self, workers: Iterable[Worker]) -> None:
        """Replace the file with these workers, atomically."""
        records = [WorkerRecord.of(w).model_dump(exclude_none=True) for w in workers]
        data = orjson.dumps({"version": VERSION, "workers": records}, option=orjson.OPT_INDENT_2)
        directory = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data + b"\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
