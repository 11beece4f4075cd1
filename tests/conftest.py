"""Real servers on real sockets: simulated engines and proxies run as processes on 127.0.0.1.

Each process is started in its own session and stopped by its PID (process group) at teardown.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from pdsim import launch
from pdsim.launch import Process, SimProcess, free_port
from tests.e2e.real_vllm_fixtures import second_decoder, tiny_model, topology, vllm_python

__all__ = ["free_port", "second_decoder", "tiny_model", "topology", "vllm_python"]

MODEL = "pdsim/llama-8b"


Service = Process


def wait_for(predicate: Callable[[], object], timeout: float = 30.0) -> None:
    """Poll `predicate` until it is true; fail the test after `timeout` seconds (generous: what
    takes milliseconds alone can take seconds on a small box that runs real engines beside)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def sse_events(raw: bytes) -> list[Any]:
    """The data of each SSE event: parsed JSON, or the string "[DONE]"."""
    events: list[Any] = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: "):
            payload = block[6:]
            events.append(payload.decode() if payload == b"[DONE]" else orjson.loads(payload))
    return events


class Metrics(dict[str, float]):
    """Prometheus samples keyed as exposed (`name{labels}`); `get` also sums by name + labels."""

    def total(self, name: str, **labels: str) -> float:
        wanted = [f'{k}="{v}"' for k, v in labels.items()]
        total = 0.0
        for key, value in self.items():
            base, _, rest = key.partition("{")
            if base == name and all(w in rest for w in wanted):
                total += value
        return total


def parse_metrics(text: str) -> Metrics:
    values = Metrics()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


@dataclass
class Sim(SimProcess):
    baseline: Metrics = field(default_factory=Metrics)

    def control(self, method: str, path: str, body: Any = None) -> Any:
        resp = httpx.request(method, self.url + "/_sim/" + path, json=body, timeout=5)
        resp.raise_for_status()
        return resp.json() if resp.content else None

    def records(self) -> list[dict[str, Any]]:
        data = self.control("GET", "requests")
        return list(data["requests"] if isinstance(data, dict) else data)

    def generation_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["path"].startswith("/v1/")]

    def faults(self, **faults: Any) -> None:
        self.control("POST", "faults", faults)

    def reset(self) -> None:
        """Clear records and faults; counters are measured from here on (`metric`)."""
        self.control("POST", "reset")
        self.baseline = self.metrics()

    def metrics(self) -> Metrics:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=5).text)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`, since the last reset."""
        return self.metrics().total(name, **labels) - self.baseline.total(name, **labels)


def start_sim(
    tmp: Path, name: str, *args: str, role: str = "both", besides: Collection[int] = ()
) -> Sim:
    s = launch.start_sim(role, "--model", MODEL, *args, log=tmp / f"{name}.log", besides=besides)
    return Sim(s.url, s.args, s.log, s.proc, s.side_channel_port)


def start_publishing_sim(tmp: Path, name: str, publisher: str, replay: str, blocks: int) -> Sim:
    """A simulated engine with prefix caching and `blocks` KV blocks that publishes its
    KV-cache events at `publisher` (bound for wildcard and ipc:// addresses, else connected, as
    vLLM does) and answers replays at `replay`."""
    config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": publisher,
        "replay_endpoint": replay,
    }
    return start_sim(
        tmp, name, "--enable-prefix-caching", "--num-gpu-blocks", str(blocks),
        "--kv-events-config", json.dumps(config),
        besides=[int(e.rsplit(":", 1)[1]) for e in (publisher, replay) if e.startswith("tcp://")],
    )  # fmt: skip


@dataclass
class Proxy(Service):
    prefill: list[Sim] = field(default_factory=list)
    decode: list[Sim] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.url + "/stats", timeout=5).json()
        return data

    def metrics(self) -> Metrics:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=5).text)


def start_proxy(
    tmp: Path,
    prefill: list[Sim],
    decode: list[Sim],
    *args: str,
    name: str = "proxy",
    workers: int = 1,
) -> Proxy:
    """A proxy over these engines; with `workers` > 1 `serve --workers N`, once every serving
    process takes requests (see `spawn_serving`)."""
    port = launch.free_port()
    cmd = ["serve", "--port", str(port), "--stats-interval", "0", *args]
    for role, sims in (("--prefill", prefill), ("--decode", decode)):
        for sim in sims:
            cmd += [role, sim.url]
    proxy = spawn_serving(cmd, port, tmp / f"{name}-{port}.log", workers)
    proxy.prefill, proxy.decode = prefill, decode
    return proxy


# -- the proxy as several serving processes (`serve --workers N`) ---------------------------

WORKERS_REFUSED = "set workers: 1"  # what the config says when it runs in one process only


def spawn_serving(cmd: list[str], port: int, log: Path, workers: int = 1) -> Proxy:
    """`python -m proxy CMD` listening on `port`; with `workers` > 1 with `--workers N`, ready
    once every serving process is connected (three processes start: a minute on a busy box).
    A proxy that refuses to run in several processes skips the test, quoting its refusal: what
    it refuses today runs once the refusal goes, with no change here."""
    if workers > 1:
        cmd = [*cmd, "--workers", str(workers)]
    url = f"http://127.0.0.1:{port}"
    try:
        s = launch.spawn(cmd, url, log, ready_path="/metrics", timeout=30 if workers == 1 else 120)
    except RuntimeError as error:
        refused = [line for line in str(error).splitlines() if WORKERS_REFUSED in line]
        if workers > 1 and refused:  # "config: connector X runs in one process (why): set ..."
            why = refused[0].split(" (")[0].split("config: ")[-1].strip()
            pytest.skip(f"the proxy refuses workers {workers}: {why}")
        raise
    proxy = Proxy(s.url, s.args, s.log, s.proc)
    if workers > 1:
        try:
            wait_for(lambda: serving(proxy) == workers, 90)
        except AssertionError:
            proxy.stop()
            raise
    return proxy


def serving(proxy: Proxy) -> int:
    """How many of the proxy's serving processes are up and connected to the control process."""
    processes = proxy.stats().get("processes", [])
    return sum(1 for p in processes if p["connected"] and p["pid"])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "workers2: runs also against `serve --workers 2` (see pytest_generate_tests)"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`serving_procs`: how many serving processes (`--workers`) the test's proxies run; 1 for
    every test that asks, and 2 too for one marked `workers2` (ids `w1`, `w2`). Session-scoped,
    so that each topology is started once per count and the tests of one count run together."""
    if "serving_procs" in metafunc.fixturenames:
        counts = [1, 2] if metafunc.definition.get_closest_marker("workers2") else [1]
        ids = [f"w{n}" for n in counts]
        metafunc.parametrize("serving_procs", counts, ids=ids, indirect=True, scope="session")


@pytest.fixture(scope="session")
def serving_procs(request: pytest.FixtureRequest) -> int:
    count: int = request.param
    return count


@contextmanager
def running(service: Service) -> Iterator[Service]:
    try:
        yield service
    finally:
        service.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Real-vLLM tests run after the simulated ones (the CPU engines keep both cores busy while
    they are up, which would slow every timing-sensitive sim test), the tests that stop the
    shared real-vLLM topology after every test that uses it, and those that start a topology
    of their own after that (two CPU topologies at once would starve both)."""
    items.sort(
        key=lambda item: (
            item.get_closest_marker("real_vllm") is not None,
            item.get_closest_marker("own_topology") is not None,
            item.get_closest_marker("stops_topology") is not None,
        )
    )


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def sims(logs: Path) -> Iterator[dict[str, Sim]]:
    started: dict[str, Sim] = {}
    try:
        for name, role in (
            ("p0", "prefill"),
            ("p1", "prefill"),
            ("d0", "decode"),
            ("d1", "decode"),
        ):
            started[name] = start_sim(logs, name, "--speed-factor", "0.05", role=role)
        yield started
    finally:
        for sim in started.values():
            sim.stop()


@pytest.fixture
def clean_sims(sims: dict[str, Sim]) -> dict[str, Sim]:
    for sim in sims.values():
        sim.reset()
    return sims


@pytest.fixture(scope="session")
def _proxy_1p1d(logs: Path, sims: dict[str, Sim]) -> Iterator[Proxy]:
    proxy = start_proxy(logs, [sims["p0"]], [sims["d0"]], name="1p1d")
    yield proxy
    proxy.stop()


@pytest.fixture
def proxy(_proxy_1p1d: Proxy, clean_sims: dict[str, Sim]) -> Proxy:
    """A 1p1d proxy over freshly reset simulated engines."""
    return _proxy_1p1d
