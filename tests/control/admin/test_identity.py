"""One engine, one worker: a URL that reaches a known worker's engine, however it is spelled or
routed, is refused naming that worker; refused adds leave no gap in the ids."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from pdsim import launch
from pdsim.launch import Process
from tests.conftest import Sim, running, start_proxy, wait_for
from tests.control.admin.helpers import config_file


def add(proxy: launch.Process, url: str, role: str = "decode") -> httpx.Response:
    return httpx.post(proxy.url + "/admin/workers", json={"url": url, "role": role}, timeout=30)


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


@pytest.fixture
def forward(sims: dict[str, Sim], tmp_path: Path) -> Iterator[str]:
    """A port forward to p0: the same engine at another address."""
    port = launch.free_port()
    cmd = [
        sys.executable,
        "-m",
        "tests.control.admin.forward",
        str(port),
        str(port_of(sims["p0"].url)),
    ]
    proc = subprocess.Popen(cmd, start_new_session=True)
    forwarder = Process(f"http://127.0.0.1:{port}", cmd, None, proc)
    try:
        wait_for(lambda: launch.http_status(forwarder.url + "/health") == 200, 10)
        yield forwarder.url
    finally:
        forwarder.stop()


def test_the_same_decoder_spelled_otherwise_is_refused_naming_the_worker(
    tmp_path: Path, clean_sims: dict[str, Sim]
) -> None:
    p0, d0 = clean_sims["p0"], clean_sims["d0"]
    with running(start_proxy(tmp_path, [p0], [d0], "--config", config_file(tmp_path))) as proxy:
        port = port_of(d0.url)
        for alias in (f"http://localhost:{port}", f"HTTP://127.0.0.1:{port}/"):
            resp = add(proxy, alias)
            assert resp.status_code == 409, resp.text
            error = resp.json()["error"]
            assert error["type"] == "Conflict" and error["param"] == "url"
            assert f"is already known as d0 (decode worker {d0.url}, active)" in error["message"]
        assert "this machine's port" in add(proxy, f"http://localhost:{port}").text
        assert d0.generation_records() == []  # refused before any probe reached it
        resp = add(proxy, f"http://localhost:{port_of(p0.url)}", role="pool")
        assert resp.status_code == 409 and "already known as p0" in resp.text
        resp = add(proxy, f"http://localhost:{port_of(p0.url)}", role="decode")
        assert resp.status_code != 409  # a prefiller may also be a decoder (kv_both)


def test_an_engine_behind_another_address_is_known_by_its_nixl_engine_id(
    tmp_path: Path, clean_sims: dict[str, Sim], forward: str
) -> None:
    p0, d0 = clean_sims["p0"], clean_sims["d0"]
    with running(start_proxy(tmp_path, [p0], [d0], "--config", config_file(tmp_path))) as proxy:
        resp = add(proxy, forward, role="prefill")  # passes every probe: it is a good prefiller
        assert resp.status_code == 409, resp.text
        message = resp.json()["error"]["message"]
        assert f"already known as p0 (prefill worker {p0.url}, active)" in message
        assert "both report NIXL engine id" in message
        listed = httpx.get(proxy.url + "/admin/workers", timeout=10).json()["data"]
        assert [w["id"] for w in listed] == ["p0", "d0"]
        assert listed[0]["engine_ids"] == [p0.control("GET", "info")["engine_id"]]


def test_refused_adds_leave_no_gap_in_the_ids(tmp_path: Path, clean_sims: dict[str, Sim]) -> None:
    p0, d0, d1 = clean_sims["p0"], clean_sims["d0"], clean_sims["d1"]
    with running(start_proxy(tmp_path, [p0], [d0], "--config", config_file(tmp_path))) as proxy:
        for _ in range(3):
            nothing = f"http://127.0.0.1:{launch.free_port()}"
            assert add(proxy, nothing).json()["error"]["code"] == "probe_reachable"
        assert add(proxy, f"http://localhost:{port_of(d0.url)}").status_code == 409
        resp = add(proxy, d1.url)
        assert resp.status_code == 201 and resp.json()["id"] == "d1"


def test_a_configured_engine_behind_two_addresses_is_held_at_start_up(
    tmp_path: Path, clean_sims: dict[str, Sim], forward: str
) -> None:
    p0, d0 = clean_sims["p0"], clean_sims["d0"]
    cfg = config_file(tmp_path, health={"probe_on_start": True}, prefill=[p0.url, forward])
    with running(start_proxy(tmp_path, [], [d0], "--config", cfg)) as proxy:
        listed = httpx.get(proxy.url + "/admin/workers", timeout=10).json()["data"]
        state = {w["id"]: w["state"] for w in listed}
        assert state == {"p0": "active", "p1": "probing", "d0": "active"}
        p1 = next(w for w in listed if w["id"] == "p1")
        failed = [c for c in p1["last_probe"]["checks"] if not c["ok"]]
        assert [c["name"] for c in failed] == ["identity"]
        assert f"is the engine of p0 (prefill worker {p0.url})" in failed[0]["detail"]
        assert "both report NIXL engine id" in failed[0]["detail"]
