"""The control process (`workers` > 1): the control plane, and the serving processes' keeper.

    pdproxy serve --workers N
      control process   ProxyApp as in one process (the registry, health checks, scrapes, KV
                        health, the pool's controller, admin API, console, state file), served by
                        uvicorn on a private Unix socket (DIR/api.sock) instead of the port;
                        the `Supervisor` (a companion of the app's lifespan, proxy.app)
      serving process   x N (proxy.procs.serving): the data plane on the port

DIR is a temporary directory made 0700 at start-up, removed at exit (by the last serving process
out when this process was killed); it holds the validated config (config.json, which the serving
processes read), the channel's socket (channel.sock) and the API's.

What is shared, and how:

    the port            bound once here (proxy.cli.serve.listen: a port in use is one clear line,
                        exit 2), inherited by every serving process (one accept queue)
    the workers         published from here on every change (looked for every `tick` s) and every
                        `heartbeat` s: a snapshot (proxy.procs.snapshot) over the channel
                        (proxy.procs.channel); a drain or removal reaches every process with it
    the engines' load   one table in shared memory (proxy.procs.loadtable, created here: see
                        proxy.procs.shared): every process counts its requests in flight on each
                        engine in its own column, every policy reads the sums at once
    admission           one global admission in shared memory (proxy.procs.admission, created
                        here): max_concurrent and the queue hold for all processes together
    what was served     reported back in batches (proxy.procs.report): timings, breaker outcomes,
                        counter gains, prefill tokens and decode streams, taken into this
                        process's one /metrics, /stats, timelines and breakers
    LMCache's notes     this process binds the notification socket and relays each notification
                        to the serving process that made its transfer id (proxy.procs.notify)
    the KV index        this process subscribes to the engines' KV-cache events; every change of
                        its index goes to every serving process's copy (proxy.procs.kvreplica)
    the other paths     forwarded by the serving processes to DIR/api.sock (proxy.procs.forward)

Lifecycle: a serving process that exits is started again (after 0.5 s, doubling while they keep
dying young, at most 10 s; logged with the process's name and how it ended); what it held goes
before the replacement starts (its column of the load table, its admission slots and waiters). Its
clients' connections die with it; a connection it had not accepted yet is accepted by another.
SIGTERM/SIGINT here (proxy.cli.serve.Server -> ProxyApp.begin_drain -> `begin_drain`) sends SIGTERM
to every serving process: they stop accepting and give their requests `drain_timeout`; this process
waits for them (`drain_timeout` + a margin, then SIGKILL) and exits with the status one process
would. The serving processes die with this one (see proxy.procs.serving).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.app import ProxyApp
from proxy.cli.serve import Server, build_and_bind, log_start, serve, uvicorn_config
from proxy.config import ProxyConfig
from proxy.procs.channel import MAX_BUFFERED, ChannelClosed, frame, read_message
from proxy.procs.kvreplica import IndexPublisher
from proxy.procs.notify import control_side
from proxy.procs.report import Intake
from proxy.procs.serving import API, CHANNEL, CONFIG, describe_args, name_logs
from proxy.procs.shared import AdmissionView, Shared
from proxy.procs.snapshot import describe

log = logging.getLogger("pdproxy")

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 10.0
YOUNG = 30.0  # a process that lived less than this and died counts towards a longer backoff


@dataclass
class ServingProcess:
    """One serving process (`w1` ...): the OS process running it now, and how earlier ones ended."""

    name: str
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    young_deaths: int = 0
    next_start: float = 0.0  # monotonic(): when to start it again
    last_exit: str | None = None
    writer: asyncio.StreamWriter | None = None  # its channel, once it said hello
    acked: int = 0  # the last report taken from it
    routing_changed_at: float = 0.0  # time(): when a snapshot last changed who it routes to
    prefixes_dropped: int = 0  # new prefix placements it left out of its reports (over a limit)
    prefixes_learned: int = 0  # the other processes' placements it took in

    def describe(self) -> dict[str, Any]:
        alive = self.proc is not None and self.proc.poll() is None
        return {
            "name": self.name,
            "pid": self.proc.pid if alive and self.proc is not None else None,
            "connected": self.writer is not None,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "routing_changed_at": self.routing_changed_at,
            "prefixes_dropped": self.prefixes_dropped,
            "prefixes_learned": self.prefixes_learned,
        }


def how_it_ended(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


class Supervisor:
    """Starts, feeds, watches and stops the serving processes (a companion of ProxyApp)."""

    def __init__(
        self,
        app: ProxyApp,
        count: int,
        sockets: list[socket.socket],
        directory: Path,
        tick: float = 0.05,
        heartbeat: float = 1.0,
    ) -> None:
        self.app = app
        self.sockets = sockets
        self.directory = directory
        self.tick = tick
        self.heartbeat = heartbeat
        services = app.services
        self.intake = Intake(app.pools, services.stats, services.timelines, app.metrics, app.pool)
        self.shared: Shared | None = None  # at start
        self.processes = {f"w{i}": ServingProcess(f"w{i}") for i in range(1, count + 1)}
        self.draining = False
        self.seq = 0  # snapshots published
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        control_side(app.connector, self.processes, self._send_message, self.intake)
        self.kv: IndexPublisher | None = None
        if app.control.kv_events is not None:  # (no subscriber has started yet)
            self.kv = IndexPublisher(self._writers)
            index = self.kv.index
            app.control.kv_events.index = app.control.kv_index = app.plane.planner.kv_index = index

    # --- the companion's side (proxy.serve.api.Companion) ---

    async def start(self) -> None:
        (self.directory / CONFIG).write_text(self._config().model_dump_json())
        self.shared = Shared(len(self.processes), self.app.config.admission)
        self.app.services.admission = AdmissionView(self.shared.admission)
        self._server = await asyncio.start_unix_server(
            self._connected, path=str(self.directory / CHANNEL)
        )
        for process in self.processes.values():
            self._spawn(process)
        self._tasks = [
            asyncio.create_task(self._publish()),
            asyncio.create_task(self._watch()),
        ]

    def begin_drain(self) -> None:
        """Every serving process drains; none is started again. Safe in a signal handler."""
        self.draining = True
        for sock in self.sockets:
            sock.close()  # once the serving processes close theirs, new connections are refused
        for process in self.processes.values():
            if process.proc is not None and process.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.proc.send_signal(signal.SIGTERM)

    async def close(self) -> None:
        """Drain the serving processes (if no signal did), wait for them, then stop."""
        self.begin_drain()
        deadline = time.monotonic() + self.app.config.drain_timeout + 10
        while time.monotonic() < deadline:
            if not self._alive():
                break
            await asyncio.sleep(0.05)
        for process in self._alive():
            log.warning("serving process %s did not stop: killing it", process.name)
            assert process.proc is not None
            process.proc.kill()
            process.proc.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
        if self.shared is not None:
            self.shared.close()

    def describe(self) -> dict[str, Any]:
        processes = [process.describe() for process in self.processes.values()]
        if self.kv is not None:  # its copy of the KV index misses changes until it is sent whole
            for process in processes:
                process["kv_index_behind"] = process["name"] in self.kv.behind
        return {"processes": processes}

    def _config(self) -> ProxyConfig:
        """The config the serving processes read: LMCache's notification port as bound here
        (port 0 picks one), which their messages name."""
        config = self.app.config
        notifications = getattr(self.app.connector, "notifications", None)
        if notifications is None:
            return config
        lmcache = config.lmcache.model_copy(update={"notify_port": notifications.port})
        return config.model_copy(update={"lmcache": lmcache})

    # --- the processes ---

    def _alive(self) -> list[ServingProcess]:
        return [s for s in self.processes.values() if s.proc is not None and s.proc.poll() is None]

    def _spawn(self, process: ServingProcess) -> None:
        assert self.shared is not None
        fds = [sock.fileno() for sock in self.sockets]
        args = describe_args(process.name, self.directory, fds, self.shared.args())
        process.proc = subprocess.Popen(args, pass_fds=fds)
        process.started = time.monotonic()
        log.info("serving process %s started (pid %d)", process.name, process.proc.pid)

    async def _watch(self, every: float = 0.1) -> None:
        """Notice a serving process that ended, and start it again after its backoff."""
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            for process in self.processes.values():
                if process.proc is not None and process.proc.poll() is not None:
                    self._ended(process, now)
                elif process.proc is None and not self.draining and now >= process.next_start:
                    process.restarts += 1
                    self._spawn(process)

    def _ended(self, process: ServingProcess, now: float) -> None:
        assert process.proc is not None
        process.last_exit = how_it_ended(process.proc.returncode)
        pid, process.proc = process.proc.pid, None
        self._disconnect(process)
        assert self.shared is not None
        self.shared.reset(process.name)  # what it held, before its replacement starts
        if self.draining:
            log.info("serving process %s (pid %d) %s", process.name, pid, process.last_exit)
            return
        process.young_deaths = process.young_deaths + 1 if now - process.started < YOUNG else 1
        backoff = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (process.young_deaths - 1))
        process.next_start = now + backoff
        log.warning(
            "serving process %s (pid %d) %s: starting it again in %gs",
            process.name, pid, process.last_exit, backoff,
        )  # fmt: skip

    def _disconnect(self, process: ServingProcess) -> None:
        if process.writer is not None:
            process.writer.close()
            process.writer = None
        self.intake.forget(process.name)

    # --- the channel ---

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        process = None
        try:
            hello = await read_message(reader)
            process = self.processes.get(str(hello.get("name")))
            if process is None or hello.get("t") != "hello":
                log.warning("the channel refused a peer that said %r", hello)
                return
            process.writer, process.acked = writer, 0
            if self.kv is not None:  # the whole index first: it serves from the snapshot on
                self.kv.joined(process.name, writer)
            self._send(process, self._describe())
            while True:
                report = await read_message(reader)
                self.intake.take(process.name, report)
                if "prefixes" in report:
                    self._relay(process, report["prefixes"])
                    process.prefixes_dropped = int(report.get("prefixes_dropped", 0))
                process.prefixes_learned = int(report.get("prefixes_learned", 0))
                process.acked = int(report.get("seq", process.acked))
                process.routing_changed_at = float(report.get("routing_changed_at", 0.0))
        except ChannelClosed:
            pass
        except Exception:  # a report it cannot take: hang up (the process drains, then restarts)
            log.exception(
                "serving process %s: a report could not be taken", process and process.name
            )
        finally:
            if process is not None and process.writer is writer:
                self._disconnect(process)
            writer.close()

    def _describe(self) -> list[dict[str, Any]]:
        """The snapshot's workers, each with its slot of the load table."""
        assert self.shared is not None
        return describe(self.app.pools, self.shared.assign(self.app.pools))

    async def _publish(self) -> None:
        """The workers to every serving process: when they changed, and every `heartbeat` s;
        every `tick`, the load table's sums onto this process's workers."""
        assert self.shared is not None
        last: list[dict[str, Any]] = []
        sent = 0.0
        while True:
            await asyncio.sleep(self.tick)
            workers = self._describe()
            self.shared.show()
            if self.kv is not None:
                self.kv.catch_up()
            if workers != last or time.monotonic() - sent >= self.heartbeat:
                for process in self.processes.values():
                    self._send(process, workers)
                last, sent = workers, time.monotonic()

    def _relay(self, source: ServingProcess, placements: list[Any]) -> None:
        """One process's new prefix placements, to every other (proxy.procs.prefixes)."""
        message = frame({"t": "prefixes", "placements": placements})
        for process in self.processes.values():
            writer = process.writer
            if process is source or writer is None:
                continue
            if writer.transport.get_write_buffer_size() <= MAX_BUFFERED:
                writer.write(message)

    def _writers(self) -> dict[str, asyncio.StreamWriter]:
        return {s.name: s.writer for s in self.processes.values() if s.writer is not None}

    def _send_message(self, name: str, message: dict[str, Any]) -> bool:
        """One message to serving process `name`; False when its channel is down."""
        writer = self.processes[name].writer
        if writer is None:
            return False
        writer.write(frame(message))
        return True

    def _send(self, process: ServingProcess, workers: list[dict[str, Any]]) -> None:
        writer = process.writer
        if writer is None or writer.transport.get_write_buffer_size() > MAX_BUFFERED:
            return
        self.seq += 1
        writer.write(frame({"t": "snapshot", "seq": self.seq, "ack": process.acked,
                            "workers": workers}))  # fmt: skip


def run_supervised(config: ProxyConfig) -> int:
    """`pdproxy serve` with `workers` > 1: this process is the control process."""
    built = build_and_bind(config)
    if built is None:
        return 2
    app, sockets = built
    directory = Path(tempfile.mkdtemp(prefix="pdproxy-"))  # 0700
    try:
        api = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            api.bind(str(directory / API))
        except OSError as exc:  # a Unix socket's path is at most ~100 bytes
            print(f"pdproxy: cannot bind {directory / API}: {exc}; set TMPDIR to a short path",
                  file=sys.stderr)  # fmt: skip
            return 2
        app.companions.append(Supervisor(app, config.serving_processes, sockets, directory))
        name_logs("ctl")
        log_start(config)
        log.info("control process (pid %d): %d serving processes", os.getpid(),
                 config.serving_processes)  # fmt: skip
        return serve(Server(uvicorn_config(app, config), app), [api])
    finally:
        shutil.rmtree(directory, ignore_errors=True)
