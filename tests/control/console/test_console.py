"""The console's files and its event stream, without a browser."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.control.console import static_files
from tests.conftest import Proxy, Sim, running, start_proxy
from tests.control.admin.helpers import config_file

REPO = Path(__file__).resolve().parents[3]


def test_the_page_and_its_files_are_served_from_the_package(proxy: Proxy) -> None:
    page = httpx.get(proxy.url + "/console", timeout=5)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/console/console.js" in page.text and "http" not in page.text.replace(
        "http://host:port", ""
    )  # nothing fetched from elsewhere
    script = httpx.get(proxy.url + "/console/console.js", timeout=5)
    assert script.headers["content-type"].startswith("text/javascript")
    assert "/console/events" in script.text and "import " not in script.text
    assert httpx.get(proxy.url + "/console/console.css").status_code == 200
    for bad in ("nope.js", "..%2Fapp.py", "%2e%2e/__init__.py"):
        assert httpx.get(proxy.url + "/console/" + bad).status_code == 404
    assert set(static_files()) == {"index.html", "console.js", "console.css"}


def test_the_event_stream_sends_snapshots(proxy: Proxy) -> None:
    body = {"model": "pdsim/llama-8b", "prompt": "feed me", "max_tokens": 4, "stream": True}
    httpx.post(proxy.url + "/v1/completions", json=body, timeout=10)
    snapshots = []
    with httpx.stream("GET", proxy.url + "/console/events", timeout=10) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                snapshots.append(json.loads(line[6:]))
            if len(snapshots) == 2:
                break
    first, second = snapshots
    assert [w["id"] for w in first["workers"]] == ["p0", "d0"]
    assert first["timelines"] and first["timelines"][-1]["kv"] == "handed_over"
    assert second["timelines"] == [] and second["seq"] == first["seq"]  # only what is new
    engine = first["engines"]["d0"]
    assert engine["nixl_pulls"] >= 1 and "prefix_queries" in engine and "running" in engine
    assert first["latency"]["ttft"]["p95"] >= first["latency"]["ttft"]["p50"]
    assert set(first["tick"]) >= {"requests", "errors", "ttft", "itl", "e2e", "kv"}
    assert first["counters"]["pdproxy_requests_total"]
    assert first["connector"] == "nixl" and first["admission"]["active"] >= 0


def first_snapshot(url: str, since: int = 0) -> dict[str, Any]:
    with httpx.stream("GET", f"{url}/console/events?since={since}", timeout=10) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                snapshot: dict[str, Any] = json.loads(line[6:])
                return snapshot
    raise AssertionError("no snapshot")


def test_the_first_tick_is_no_spike_of_the_history(proxy: Proxy) -> None:
    """A page that connects gets the history for its table, but its first tick counts only the
    requests of the last second: the history, counted as one second, drew a false spike."""
    body = {"model": "pdsim/llama-8b", "prompt": "history", "max_tokens": 2}
    for _ in range(5):
        assert httpx.post(proxy.url + "/v1/completions", json=body, timeout=10).is_success
    time.sleep(1.2)  # older than one tick
    first = first_snapshot(proxy.url)
    assert len(first["timelines"]) >= 5
    assert first["tick"]["requests"] == 0 and first["tick"]["ttft"] is None
    assert first["tick"]["seconds"] == 1.0
    assert httpx.post(proxy.url + "/v1/completions", json=body, timeout=10).is_success
    fresh = first_snapshot(proxy.url)
    assert fresh["tick"]["requests"] == 1  # a request of the last second is this tick's
    # a reconnecting page (since: what it saw) gets only what is new
    again = first_snapshot(proxy.url, since=fresh["seq"] - 1)
    assert len(again["timelines"]) == 1


def test_the_stream_needs_the_admin_key(
    tmp_path: Path, clean_sims: dict[str, Sim], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PDPROXY_TEST_CONSOLE_KEY", "k1")
    cfg = config_file(tmp_path, auth={"admin_keys_env": "PDPROXY_TEST_CONSOLE_KEY"})
    p0, d0 = clean_sims["p0"], clean_sims["d0"]
    with running(start_proxy(tmp_path, [p0], [d0], "--config", cfg)) as proxy:
        assert httpx.get(proxy.url + "/console").status_code == 200  # the page asks for the key
        assert httpx.get(proxy.url + "/console/events", timeout=5).status_code == 401
        with httpx.stream(
            "GET", proxy.url + "/console/events", headers={"Authorization": "Bearer k1"}
        ) as resp:
            assert resp.status_code == 200


def test_an_install_ships_the_console(tmp_path: Path) -> None:
    """The static files are package data: what setuptools copies into an installed package."""
    built = subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py",
         "--build-lib", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    shipped = {p.name for p in (tmp_path / "proxy/control/console/static").iterdir()}
    assert shipped == {"index.html", "console.js", "console.css"}
