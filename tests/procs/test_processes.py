"""`pdproxy serve --workers 2`: a control process and two serving processes, as real processes on
real sockets, in front of simulated engines. Each test names what it shows; deadlines are
generous (the box may be busy), and what is timed is printed, not asserted."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.faults import classify
from pdsim import launch
from tests.conftest import MODEL, Proxy, Sim, start_sim, wait_for
from tests.control.test_stall import WEDGED
from tests.control.test_stall import config as stall_config

BODY = {"model": MODEL, "prompt": "tell me a story", "max_tokens": 8}


def processes(proxy: Proxy) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = proxy.stats()["processes"]
    return found


def all_connected(proxy: Proxy) -> bool:
    return all(p["connected"] and p["pid"] for p in processes(proxy))


def start(tmp: Path, prefill: list[Sim], decode: list[Sim], *args: str, workers: int = 2) -> Proxy:
    """A proxy with two serving processes (`workers`), once all take requests (three processes
    start: minutes on a busy box)."""
    port = launch.free_port()
    cmd = ["serve", "--port", str(port), "--stats-interval", "0", "--workers", str(workers), *args]
    for role, sims in (("--prefill", prefill), ("--decode", decode)):
        for sim in sims:
            cmd += [role, sim.url]
    log = tmp / f"procs-{port}.log"
    s = launch.spawn(cmd, f"http://127.0.0.1:{port}", log, ready_path="/metrics", timeout=120)
    proxy = Proxy(s.url, s.args, s.log, s.proc, prefill, decode)
    try:
        wait_for(lambda: workers == 1 or all_connected(proxy), 60)
    except AssertionError:
        proxy.stop()
        raise
    return proxy


def process_of(request_id: str) -> str:
    """`w1` for `pdp-w1-...`: the serving process that made the id."""
    return request_id.split("-")[1]


def served_by(proxy: Proxy, count: int = 20, both: bool = True) -> list[str]:
    """The processes that answered `count` requests, each on a new connection, and more until
    both processes answered (`both`; at most 500: the kernel wakes every process waiting on the
    shared socket and the first to accept wins, which a busy box can skew)."""
    names = []
    while len(names) < count or (both and len(set(names)) < 2 and len(names) < 500):
        resp = httpx.post(proxy.url + "/v1/completions", json=BODY, timeout=60)
        assert resp.status_code == 200, resp.text
        names.append(process_of(resp.headers["x-request-id"]))
    return names


def status(url: str) -> int:
    """The status of a GET; 0 when nothing answered."""
    try:
        return httpx.get(url, timeout=10).status_code
    except httpx.TransportError:
        return 0


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def procs(tmp_path: Path, clean_sims: dict[str, Sim]) -> Iterator[Proxy]:
    proxy = start(tmp_path, [clean_sims["p0"]], [clean_sims["d0"], clean_sims["d1"]])
    try:
        yield proxy
    finally:
        proxy.stop()


def test_both_processes_serve_and_the_control_process_counts_every_request(
    procs: Proxy,
) -> None:
    sent = len(names := served_by(procs, 30))
    assert set(names) == {"w1", "w2"}
    wait_for(lambda: procs.stats()["requests"] == sent, 30)
    metrics = procs.metrics()
    assert metrics.total("pdproxy_requests_total", endpoint="/v1/completions", status="200") == sent
    assert metrics.total("pdproxy_e2e_seconds_count") == sent
    assert metrics.total("pdproxy_disagg_decisions_total") == sent
    timelines = httpx.get(procs.url + "/admin/requests", timeout=10).json()
    assert {process_of(t["request_id"]) for t in timelines["data"]} == {"w1", "w2"}
    log = procs.log_text()
    assert all(f"pdproxy[{name}]: " in log for name in ("ctl", "w1", "w2"))  # logs name them
    # forwarded paths answer as in one process
    assert httpx.get(procs.url + "/health", timeout=10).json()["status"] == "ok"
    assert httpx.get(procs.url + "/v1/models", timeout=10).json()["data"][0]["id"] == MODEL
    assert httpx.get(procs.url + "/nope", timeout=10).json()["error"]["type"]
    for _ in range(2):  # the console's event stream, relayed as it comes; leaving ends it
        with httpx.stream("GET", procs.url + "/console/events", timeout=30) as resp:
            events = resp.iter_lines()
            first = next(line for line in events if line.startswith("data: "))
            second = next(line for line in events if line.startswith("data: "))
        assert '"requests"' in first and second


def test_a_pool_is_placed_by_both_processes_and_its_controller_hears_of_every_prompt(
    tmp_path: Path, clean_sims: dict[str, Sim]
) -> None:
    engines = ("--pool", clean_sims["p1"].url, "--pool", clean_sims["d1"].url)
    proxy = start(tmp_path, [], [], *engines)
    try:
        sent = len(names := served_by(proxy, 20))
        assert set(names) == {"w1", "w2"}
        wait_for(lambda: proxy.metrics().total("pdproxy_disagg_decisions_total") == sent, 30)
        wait_for(lambda: proxy.metrics().total("pdproxy_pool_prompt_tokens_total") > 0, 30)
    finally:
        proxy.stop()


def test_a_removed_worker_gets_no_new_request_from_either_process(
    procs: Proxy, clean_sims: dict[str, Sim]
) -> None:
    d1 = clean_sims["d1"]
    sent: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            resp = httpx.post(procs.url + "/v1/completions", json=BODY, timeout=60)
            sent.append(resp.headers["x-request-id"])

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(sent) >= 10, 30)
    asked = time.time()
    resp = httpx.delete(procs.url + "/admin/workers/d1", timeout=10)
    assert resp.status_code == 202, resp.text
    # a generous deadline for every process to hear of it
    wait_for(lambda: all(p["routing_changed_at"] > asked for p in processes(procs)), 30)
    heard = max(p["routing_changed_at"] for p in processes(procs)) - asked
    print(f"every serving process routed without d1 {heard * 1e3:.1f} ms after the DELETE")
    stop.set()
    for thread in threads:
        thread.join(60)
    d1.reset()
    assert set(served_by(procs, 30)) == {"w1", "w2"}
    assert d1.generation_records() == []
    assert [w["id"] for w in httpx.get(procs.url + "/admin/workers").json()["data"]] == [
        "p0",
        "d0",
    ]


def stream_outcome(url: str) -> tuple[str, str]:
    body = {**BODY, "max_tokens": 40, "stream": True}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
            return classify(resp.status_code, resp.read(), True)
    except httpx.TimeoutException as exc:
        return "hung", repr(exc)
    except httpx.TransportError as exc:  # the connection died with its process
        return "reset", repr(exc)


def test_a_serving_process_killed_under_load_is_replaced_and_no_request_hangs(
    tmp_path: Path, clean_sims: dict[str, Sim]
) -> None:
    outcomes: list[tuple[str, str]] = []
    stop = threading.Event()
    proxy = start(tmp_path, [clean_sims["p0"]], [clean_sims["d0"]])
    try:

        def load() -> None:
            while not stop.is_set():
                outcomes.append(stream_outcome(proxy.url))

        threads = [threading.Thread(target=load) for _ in range(6)]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(outcomes) >= 20, 30)
        victim = processes(proxy)[0]
        os.kill(victim["pid"], signal.SIGKILL)
        wait_for(lambda: not alive(victim["pid"]), 30)
        before = len(outcomes)
        wait_for(lambda: len(outcomes) >= before + 20, 60)  # the proxy keeps serving
        wait_for(lambda: all_connected(proxy) and processes(proxy)[0]["restarts"] == 1, 60)
        stop.set()
        for thread in threads:
            thread.join(120)
        assert not any(t.is_alive() for t in threads), "a request hung"
        restarted = processes(proxy)[0]
        assert restarted["pid"] != victim["pid"] and "SIGKILL" in restarted["last_exit"]
        kinds = [kind for kind, _ in outcomes]
        assert "hung" not in kinds and "lost" not in kinds, outcomes
        assert kinds.count("reset") <= len(threads)  # at most the requests it held
        assert set(served_by(proxy)) == {"w1", "w2"}
        assert "serving process w1" in proxy.log_text() and "killed by SIGKILL" in proxy.log_text()
    finally:
        stop.set()
        proxy.stop()


def test_killing_the_control_process_leaves_no_serving_process(
    tmp_path: Path, clean_sims: dict[str, Sim]
) -> None:
    proxy = start(tmp_path, [clean_sims["p0"]], [clean_sims["d0"]])
    pids = [p["pid"] for p in processes(proxy)]
    try:
        assert all(alive(pid) for pid in pids)
        args = Path(f"/proc/{pids[0]}/cmdline").read_bytes().decode().split("\0")
        directory = Path(args[args.index("--dir") + 1])  # the control process's private one
        assert directory.is_dir()
        os.kill(proxy.pid, signal.SIGKILL)  # the control process alone, not its group
        wait_for(lambda: not any(alive(pid) for pid in pids), 60)
        wait_for(lambda: not directory.exists(), 10)  # the last serving process out removed it
    finally:
        proxy.stop()
        for pid in filter(alive, pids):  # orphans, if the test failed
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[tuple[Sim, Sim]]:
    """Engines that take seconds over an answer of 100 tokens."""
    slow = ("--decode-base-ms", "30", "--eos-probability", "0")
    prefill = start_sim(tmp_path, "slow-p", *slow, role="prefill")
    decode = start_sim(tmp_path, "slow-d", *slow, role="decode")
    try:
        yield prefill, decode
    finally:
        prefill.stop()
        decode.stop()


@contextmanager
def streaming(url: str, count: int) -> Iterator[list[tuple[str, str]]]:
    """`count` long streams in threads; their outcomes once they end."""
    outcomes: list[tuple[str, str]] = []

    def one() -> None:
        body = {**BODY, "max_tokens": 100, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
            outcomes.append(classify(resp.status_code, resp.read(), True))

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield outcomes
    finally:
        for thread in threads:
            thread.join(120)


def test_sigterm_drains_every_process_then_exits_143(tmp_path: Path, slow: tuple[Sim, Sim]) -> None:
    prefill, decode = slow
    proxy = start(tmp_path, [prefill], [decode])
    pids = [p["pid"] for p in processes(proxy)]
    try:
        with streaming(proxy.url, 6) as outcomes:
            wait_for(lambda: len(decode.records()) >= 6, 30)
            started = time.monotonic()
            os.kill(proxy.pid, signal.SIGTERM)  # the control process alone
            wait_for(lambda: status(proxy.url + "/health") != 200, 30)
        assert [kind for kind, _ in outcomes] == ["succeeded"] * 6, outcomes
        assert proxy.proc.wait(60) == 128 + signal.SIGTERM
        print(f"drained and exited {time.monotonic() - started:.1f} s after SIGTERM")
        assert not any(alive(pid) for pid in pids)
    finally:
        proxy.stop()
        for pid in filter(alive, pids):  # orphans, if the test failed
            os.kill(pid, signal.SIGKILL)


def test_a_wedged_prefiller_is_taken_out_by_the_serving_processes_stall_watches(
    tmp_path: Path, clean_sims: dict[str, Sim]
) -> None:
    p0, p1, d0 = clean_sims["p0"], clean_sims["p1"], clean_sims["d0"]
    proxy = start(tmp_path, [p0, p1], [d0], "--config", stall_config(tmp_path))
    try:
        wait_for(lambda: all(w["available"] for w in proxy.stats()["workers"]["prefill"]), 30)
        p0.faults(**WEDGED)
        started = time.monotonic()
        names = served_by(proxy, 8, both=False)  # each waits for its prefill up to 600 s, unless
        print(f"8 requests past a wedged prefiller in {time.monotonic() - started:.1f} s")
        stalled = next(w for w in proxy.stats()["workers"]["prefill"] if w["id"] == "p0")
        assert stalled["stalls_total"] >= 1 and stalled["breaker"] != "closed", (names, stalled)
        assert "stopped completing requests" in str(stalled["last_error"])
        assert "stopped completing requests" in proxy.log_text()
    finally:
        p0.faults()
        proxy.stop()


def test_admission_shows_the_global_numbers(tmp_path: Path, slow: tuple[Sim, Sim]) -> None:
    prefill, decode = slow
    config = tmp_path / "admission.yaml"
    config.write_text("admission: {max_concurrent: 1, max_queue: 0}\n")
    proxy = start(tmp_path, [prefill], [decode], "--config", str(config))
    try:
        with streaming(proxy.url, 8) as outcomes:
            pass
        refused = [why for kind, why in outcomes if kind == "clear_error"]
        assert refused and len(outcomes) == 8, outcomes  # one slot for both processes
        wait_for(lambda: proxy.stats()["admission"]["rejected"] == len(refused), 30)
        assert proxy.stats()["admission"]["active"] == 0
        metrics = proxy.metrics()
        assert metrics.total("pdproxy_requests_total", status="429") == len(refused)
        assert metrics.total("pdproxy_admission_rejected_total") == len(refused)
    finally:
        proxy.stop()


def test_every_process_s_failures_move_the_one_published_breaker(
    tmp_path: Path, clean_sims: dict[str, Sim]
) -> None:
    d0 = clean_sims["d0"]
    config = tmp_path / "breaker.yaml"
    config.write_text("health: {cooldown: 600}\n")  # no trial request while the test runs
    procs = start(tmp_path, [clean_sims["p0"]], [d0, clean_sims["d1"]], "--config", str(config))
    d0.faults(error_status=500)  # every request it gets fails; each is retried on d1
    try:
        names = served_by(procs, 20)
        assert set(names) == {"w1", "w2"}

        def breaker() -> str:
            found = next(w for w in procs.stats()["workers"]["decode"] if w["id"] == "d0")
            return str(found["breaker"])

        wait_for(lambda: breaker() == "open", 30)
        wait_for(lambda: procs.metrics().total("pdproxy_upstream_failures_total") >= 3, 30)
        d0.reset()
        assert set(served_by(procs, 10)) == {"w1", "w2"}
        assert d0.generation_records() == []  # out of rotation in both, until its cool-down
    finally:
        d0.faults()
        procs.stop()
