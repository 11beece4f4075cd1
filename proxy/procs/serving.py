"""A serving process (`workers` > 1): the data plane on the shared listening socket.

Started by the control process (proxy.procs.supervisor) as

    python -m proxy.procs.serving --name w1 --dir DIR --parent PID --fd 5 [--fd 6 ...]
        --load-table NAME --admission NAME

with the listening sockets' descriptors inherited (`--fd`; bound once by the control process,
accepted from by every serving process: one accept queue, so a connection that a process that
died never accepted is accepted by another), and in DIR (the control process's private 0700
directory) the config it validated (`config.json`), the channel's socket and the API's socket;
`--load-table` and `--admission` name the shared tables it attaches to, with its index (`w1`: 0).

What it holds: the data plane as in one process (router, planner, legs), on pools that mirror the
control process's snapshots, whose workers count their requests in flight on the shared load table
(proxy.procs.snapshot.SharedWorker), with the global admission (proxy.procs.admission) in place of
one process's, with the two reporting hooks (proxy.procs.report), and a stall watch over its own
legs (the engines' progress comes from the control process's scrapes, in the snapshot; a trip goes
back as an outcome). What it serves: the generation paths and vLLM's other paths itself; every other
path is forwarded to the control process (proxy.procs.forward). Its name (`w1`) is in its log lines
and in the request ids it makes (`pdp-w1-...`, the X-Request-Id of every answer whose client sent
none).

It dies with the control process: PR_SET_PDEATHSIG (Linux) sends it SIGTERM when the control
process's thread ends, and the channel's EOF does the same anywhere; either way it drains (no new
connection; those in flight get `drain_timeout`) and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxy.app import authenticator
from proxy.cli.serve import Server, serve, uvicorn_config
from proxy.config import ProxyConfig
from proxy.control.registry import ROLES
from proxy.control.stall import StallWatch
from proxy.control.workers import Lifecycle, Worker
from proxy.engines.client import EngineClient
from proxy.engines.connectors.factory import make_connector
from proxy.observe.metrics import ProxyMetrics
from proxy.procs.admission import SharedAdmission
from proxy.procs.forward import forward
from proxy.procs.kvreplica import KV, Replica
from proxy.procs.link import Link
from proxy.procs.loadtable import LoadTable
from proxy.procs.notify import NOTES, serving_side
from proxy.procs.prefixes import RelayedIndex
from proxy.procs.report import ReportingPool, Reports
from proxy.procs.shared import index_of
from proxy.procs.snapshot import Mirror
from proxy.serve.busypoll import polling
from proxy.serve.plane import build_data_plane
from proxy.serve.responder import Receive, Scope, Send

log = logging.getLogger("pdproxy")

PR_SET_PDEATHSIG = 1
CONFIG = "config.json"
CHANNEL = "channel.sock"
API = "api.sock"


class ServingApp:
    """The ASGI app of a serving process, and its lifespan."""

    def __init__(
        self, config: ProxyConfig, name: str, directory: Path, load_table: str, admission: str
    ) -> None:
        self.config = config
        self.api = str(directory / API)
        self.engine = EngineClient(config.timeouts.connect, config.engine_api_key)
        self.reports = Reports()
        health = config.health
        self.pools = tuple(
            ReportingPool(role, (), health.failure_threshold, health.cooldown, reports=self.reports)
            for role in ROLES
        )
        self.metrics = ProxyMetrics(self.pools)
        self.connector = make_connector(config, self.engine, self.metrics.registry)
        prefill, decode, pooled = self.pools
        prefixes = RelayedIndex(self.reports)
        self.plane = build_data_plane(
            config, (prefill, decode, pooled), self.engine, self.connector, self.metrics,
            authenticator(config), self.reports if config.has_pool else None, prefixes,
        )  # fmt: skip
        self.services = self.plane.services
        self.services.request_id_prefix = f"pdp-{name}-"
        self.services.reporter = self.reports.timing  # the control process records them
        index = index_of(name)  # the shared tables, until the lifespan ends
        self.admission = SharedAdmission.attach(admission, index)
        self.services.admission = self.admission
        self.table = LoadTable.attach(load_table, index)
        mirror = Mirror(self.pools, self.table, self._forget, self._end_requests, self._draining)
        self.link = Link(str(directory / CHANNEL), name, mirror, self.reports, self.metrics,
                         self.pools)  # fmt: skip
        self.link.handlers["prefixes"] = lambda message: prefixes.learn(message["placements"])
        notes = serving_side(self.connector, name, self.reports)  # LMCache: relayed to it
        if notes is not None:
            self.link.handlers[NOTES] = notes
        if config.kv_events.enabled:  # the control process's index, copied
            self.link.handlers[KV] = Replica(self.plane.planner.kv_index).take
        stall = config.health.stall_timeout
        # its own legs' waits, with the engines' progress as the control process scrapes it
        self.stalls = StallWatch(lambda: self.pools, stall) if stall > 0 else None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def _forget(self, worker: Worker) -> None:
        self.plane.planner.forget(worker)
        self.engine.forget(worker.url)

    def _end_requests(self, worker: Worker) -> None:
        why = f"{worker.role} worker {worker.url} was removed before the answer was complete"
        self.services.end_requests(list(worker.tasks), why)

    def _draining(self, worker: Worker) -> None:
        """`worker` began its drain: what of this process still runs on it after
        `drain_timeout` ends with an error (proxy.control.registry.WorkerRegistry.retire)."""
        if self._loop is not None:
            self._loop.call_later(self.config.drain_timeout, self._drain_ended, worker)

    def _drain_ended(self, worker: Worker) -> None:
        if worker.state is Lifecycle.DRAINING and worker.tasks:  # this process's requests
            self._end_requests(worker)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            endpoint = self.plane.endpoints.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
            else:
                await forward(self.api, scope, receive, send, self.config.max_body_bytes)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        self._loop = asyncio.get_running_loop()  # (the first snapshot may start a drain's clock)
        try:
            await self.connector.start()
            await self.engine.start()
            await self.link.start()
        except Exception as exc:
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            return
        if self.stalls is not None:
            every = min(1.0, self.stalls.timeout / 4)
            self._tasks.append(asyncio.create_task(self.stalls.run(every)))
        gc.collect()
        gc.freeze()  # as in one process (proxy.app): keep what lives for good out of the GC's scans
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.link.close()
        await self.connector.close()
        await self.engine.close()
        self.admission.close()  # every request has ended
        self.table.close()
        await send({"type": "lifespan.shutdown.complete"})

    def begin_drain(self) -> None:
        """As proxy.app.ProxyApp.begin_drain: no new request; those in flight get
        drain_timeout. Safe to call from a signal handler."""
        if self.services.draining or self._loop is None:
            return
        self.services.draining = True
        self._loop.call_soon_threadsafe(
            self._loop.call_later, self.config.drain_timeout, self.services.end_inflight
        )


def die_with_parent(parent: int) -> None:
    """SIGTERM when the control process ends (Linux); exit now if it has already ended."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        sys.exit(f"pdproxy: the control process {parent} is gone")


def name_logs(name: str) -> None:
    """This process's log lines name it: `pdproxy[w2]: ...` (the control process's: `[ctl]`)."""
    formatter = logging.Formatter(f"%(asctime)s %(levelname)s %(name)s[{name}]: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pdproxy-serving")
    parser.add_argument("--name", required=True)
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--parent", required=True, type=int)
    parser.add_argument("--fd", action="append", type=int, required=True)
    parser.add_argument("--load-table", required=True)
    parser.add_argument("--admission", required=True)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    die_with_parent(args.parent)
    config = ProxyConfig.model_validate_json((args.dir / CONFIG).read_bytes())
    logging.basicConfig(level=config.log_level.upper())
    name_logs(args.name)
    app = ServingApp(config, args.name, args.dir, args.load_table, args.admission)
    server = Server(uvicorn_config(polling(app, config), config), app)
    app.link.lost = lambda: server.handle_exit(signal.SIGTERM, None)
    sockets = [socket.socket(fileno=fd) for fd in args.fd]
    log.info("serving process %s (pid %d) serving", args.name, os.getpid())
    try:
        return serve(server, sockets)
    finally:
        if os.getppid() != args.parent:  # the control process died without removing its directory
            shutil.rmtree(args.dir, ignore_errors=True)


def describe_args(
    name: str, directory: Path, fds: Sequence[int], shared: Sequence[str]
) -> list[str]:
    """The command line that starts serving process `name` (for the control process); `shared`:
    the shared tables' arguments (proxy.procs.shared.Shared.args)."""
    args: list[Any] = [sys.executable, "-m", "proxy.procs.serving", "--name", name]
    args += ["--dir", directory, "--parent", os.getpid()]
    for fd in fds:
        args += ["--fd", fd]
    args += shared
    return [str(a) for a in args]


if __name__ == "__main__":
    sys.exit(main())
