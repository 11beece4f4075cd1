"""The admin API against simulated engines on real sockets: workers join under load after their
probes, bad candidates are refused saying why, removal drains without losing a request, the
state file survives a restart, and the API refuses who and what it must."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdsim import launch
from tests.conftest import Proxy, Sim, running, start_proxy, start_sim, wait_for
from tests.control.admin.helpers import Load, config_file

PROBE = "pdproxy-probe-"
XFER = "vllm:nixl_xfer_time_seconds_count"


@pytest.fixture(scope="module")
def extra(logs: Path) -> Iterator[dict[str, Sim]]:
    """Engines for joining: a good decoder, one serving another model, one that recomputes
    instead of pulling, a prefiller without a KV producer; slower than the shared ones so that
    streams are in flight when a worker leaves."""
    specs = {
        "d2": ("decode", "--speed-factor", "0.3"),
        "d3": ("decode", "--speed-factor", "0.3"),
        "other_model": ("decode", "--speed-factor", "0.05", "--model", "other/model"),
        "recompute": ("decode", "--speed-factor", "0.05", "--no-kv-transfer"),
        "no_producer": ("prefill", "--speed-factor", "0.05", "--no-kv-transfer"),
    }
    started: dict[str, Sim] = {}
    try:
        for name, (role, *args) in specs.items():
            if "--model" in args:
                s = launch.start_sim(role, *args, log=logs / f"{name}.log")
                started[name] = Sim(s.url, s.args, s.log, s.proc, s.side_channel_port)
            else:
                started[name] = start_sim(logs, name, *args, role=role)
        yield started
    finally:
        for sim in started.values():
            sim.stop()


def workers(proxy: Proxy, **headers: str) -> list[dict[str, Any]]:
    resp = httpx.get(proxy.url + "/admin/workers", headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    data: list[dict[str, Any]] = resp.json()["data"]
    return data


def add(proxy: Proxy, url: str, role: str = "decode", **body: Any) -> httpx.Response:
    return httpx.post(
        proxy.url + "/admin/workers", json={"url": url, "role": role, **body}, timeout=30
    )


def client_records(sim: Sim) -> list[dict[str, Any]]:
    """Generation requests the engine got from clients (not from admission probes)."""
    return [r for r in sim.generation_records() if not (r["x_request_id"] or "").startswith(PROBE)]


@pytest.mark.workers2
def test_a_decoder_joins_under_streaming_load_and_gets_traffic(
    tmp_path: Path, clean_sims: dict[str, Sim], extra: dict[str, Sim], serving_procs: int
) -> None:
    p0, d0, d2 = clean_sims["p0"], clean_sims["d0"], extra["d2"]
    d2.reset()
    cfg = config_file(tmp_path)
    with running(
        start_proxy(tmp_path, [p0], [d0], "--config", cfg, workers=serving_procs)
    ) as proxy:
        with Load(proxy.url) as load:
            wait_for(lambda: load.count() >= 10, 20)
            resp = add(proxy, d2.url)
            assert resp.status_code == 201, resp.text
            joined = resp.json()
            assert (joined["id"], joined["state"], joined["role"]) == ("d1", "active", "decode")
            assert joined["model"] == "pdsim/llama-8b" and joined["last_probe"]["passed"]
            checks = [c["name"] for c in joined["last_probe"]["checks"]]
            assert checks == ["reachable", "health", "model", "kv"]
            assert d2.metric(XFER) >= 1  # the probe's own pull (clients may follow at once)
            probes = [r for r in d2.generation_records() if r["x_request_id"].startswith(PROBE)]
            assert [r["kv"] for r in probes] == ["pulled"]
            # its KV pulls rise with client traffic
            wait_for(lambda: d2.metric(XFER) >= 6, 20)
        assert load.lost() == [] and load.tally()["clear_error"] == 0
        assert client_records(d2) and all(r["kv"] == "pulled" for r in client_records(d2))
        # probes are not client statistics: the proxy counted only the load's requests (a
        # serving process's reach /stats with its next report)
        wait_for(lambda: proxy.stats()["requests"] == len(load.outcomes), 10)
        assert proxy.stats()["requests"] == len(load.outcomes)
        ids = {w["id"]: w["state"] for w in workers(proxy)}
        assert ids == {"p0": "active", "d0": "active", "d1": "active"}
        metrics = proxy.metrics()
        assert metrics.total("pdproxy_worker_probes_total", role="decode", result="passed") == 1
        health = httpx.get(proxy.url + "/health", timeout=10).json()
        assert [w["id"] for w in health["decode"]] == ["d0", "d1"]


def test_candidates_that_cannot_serve_are_refused_saying_why(
    tmp_path: Path, clean_sims: dict[str, Sim], extra: dict[str, Sim]
) -> None:
    p0, d0 = clean_sims["p0"], clean_sims["d0"]
    with running(start_proxy(tmp_path, [p0], [d0], "--config", config_file(tmp_path))) as proxy:
        resp = add(proxy, extra["other_model"].url)
        assert resp.status_code == 422
        error = resp.json()["error"]
        assert error["code"] == "probe_model" and error["param"] == "url"
        assert "'other/model'" in error["message"] and "'pdsim/llama-8b'" in error["message"]

        resp = add(proxy, extra["recompute"].url)
        assert resp.status_code == 422 and resp.json()["error"]["code"] == "probe_kv"
        message = resp.json()["error"]["message"]
        assert "did not pull" in message and XFER in message and "computed the prompt" in message

        resp = add(proxy, extra["no_producer"].url, role="prefill")
        assert resp.status_code == 422 and resp.json()["error"]["code"] == "probe_kv"
        assert "not a KV producer" in resp.json()["error"]["message"]

        resp = add(proxy, f"http://127.0.0.1:{launch.free_port()}")
        assert resp.status_code == 422 and resp.json()["error"]["code"] == "probe_reachable"
        assert "unreachable" in resp.json()["error"]["message"]

        d1 = clean_sims["d1"]
        d1.faults(unhealthy=True)
        resp = add(proxy, d1.url)
        assert resp.status_code == 422 and "/health answered 503" in resp.json()["error"]["message"]
        d1.reset()

        assert [w["id"] for w in workers(proxy)] == ["p0", "d0"]  # nobody joined
        metrics = proxy.metrics()
        assert metrics.total("pdproxy_worker_probes_total", result="kv") == 2
        assert metrics.total("pdproxy_worker_probes_total", result="model") == 1
        assert add(proxy, d0.url).status_code == 409  # already there
        resp = add(proxy, d1.url, force=True)  # force skips the probes
        assert resp.status_code == 201 and resp.json()["last_probe"] is None
        assert resp.json()["id"] == "d1"  # the five refused adds used up no id
        assert client_records(extra["recompute"]) == []


@pytest.mark.workers2
def test_removing_a_decoder_under_load_loses_nothing_and_it_gets_no_more_traffic(
    tmp_path: Path, clean_sims: dict[str, Sim], extra: dict[str, Sim], serving_procs: int
) -> None:
    p0, d2, d3 = clean_sims["p0"], extra["d2"], extra["d3"]
    for sim in (d2, d3):
        sim.reset()
    cfg = config_file(tmp_path)
    with running(
        start_proxy(tmp_path, [p0], [d2, d3], "--config", cfg, workers=serving_procs)
    ) as proxy:
        with Load(proxy.url, clients=6, max_tokens=64) as load:
            wait_for(lambda: load.count() >= 12, 30)
            wait_for(lambda: workers(proxy)[2]["inflight"] > 0, 10)
            resp = httpx.delete(proxy.url + "/admin/workers/d1", timeout=10)
            assert resp.status_code == 202, resp.text
            leaving = resp.json()
            assert leaving["state"] == "draining" and leaving["inflight"] > 0
            gone = proxy.url + "/admin/workers/d1"
            wait_for(lambda: httpx.get(gone).json()["state"] == "removed", 20)
            served = len(client_records(d3))
            done = load.count()
            wait_for(lambda: load.count() >= done + 12, 30)
        assert load.lost() == [] and load.tally()["clear_error"] == 0, load.lost()[:3]
        assert len(client_records(d3)) == served  # nothing after its removal
        assert all(r["outcome"] == "completed" for r in client_records(d3))  # in flight: finished
        assert [w["id"] for w in workers(proxy)] == ["p0", "d0"]
        text = httpx.get(proxy.url + "/metrics").text
        assert d3.url not in text and d2.url in text  # its labelled series went with it
        assert httpx.delete(proxy.url + "/admin/workers/d0").status_code == 409  # the last one
        assert httpx.delete(proxy.url + "/admin/workers/nope").status_code == 404


@pytest.mark.workers2
def test_requests_that_outlive_the_drain_end_with_a_clear_error(
    tmp_path: Path, clean_sims: dict[str, Sim], serving_procs: int
) -> None:
    p0, d0, d1 = clean_sims["p0"], clean_sims["d0"], clean_sims["d1"]
    cfg = config_file(tmp_path, drain_timeout=0.5)
    with running(
        start_proxy(tmp_path, [p0], [d0, d1], "--config", cfg, workers=serving_procs)
    ) as proxy:
        d1.faults(stall_seconds=30, stall_after_chunks=2)
        d0.faults(stall_seconds=30, stall_after_chunks=2)
        body = {"model": "pdsim/llama-8b", "prompt": "stall", "max_tokens": 50, "stream": True}
        with httpx.stream("POST", proxy.url + "/v1/completions", json=body, timeout=30) as resp:
            it = resp.iter_bytes()
            first = next(it)
            assert first.startswith(b"data: ")
            # (several processes: the control process reads the shared load every 50 ms)
            wait_for(lambda: any(w["role"] == "decode" and w["inflight"] for w in workers(proxy)))
            on = next(w for w in workers(proxy) if w["role"] == "decode" and w["inflight"])
            assert httpx.delete(proxy.url + f"/admin/workers/{on['id']}").status_code == 202
            rest = b"".join(it)
        assert b"was removed before the answer was complete" in rest
        assert rest.endswith(b"data: [DONE]\n\n")
        wait_for(lambda: len(workers(proxy)) == 2, 10)


def test_the_state_file_survives_a_restart(tmp_path: Path, clean_sims: dict[str, Sim]) -> None:
    p0, d0, d1 = clean_sims["p0"], clean_sims["d0"], clean_sims["d1"]
    state = tmp_path / "workers.json"
    cfg = config_file(tmp_path, workers_state_file=str(state))
    with running(start_proxy(tmp_path, [p0], [d0], "--config", cfg)) as proxy:
        assert [w["id"] for w in json.loads(state.read_text())["workers"]] == ["p0", "d0"]
        assert add(proxy, d1.url).status_code == 201
        assert httpx.delete(proxy.url + "/admin/workers/d0").status_code == 202
        saved = json.loads(state.read_text())
        assert saved["version"] == 1
        assert [(w["id"], w["url"]) for w in saved["workers"]] == [("p0", p0.url), ("d1", d1.url)]
        assert list(tmp_path.glob(".workers.json.*")) == []  # no temporary file left behind
    # the configured lists still name d0 only: the state file wins
    with running(start_proxy(tmp_path, [p0], [d0], "--config", cfg)) as proxy:
        assert [(w["id"], w["url"]) for w in workers(proxy)] == [("p0", p0.url), ("d1", d1.url)]
        resp = httpx.post(
            proxy.url + "/v1/completions",
            json={"model": "pdsim/llama-8b", "prompt": "after the restart", "max_tokens": 4},
            timeout=10,
        )
        assert resp.status_code == 200
        assert add(proxy, d0.url).json()["id"] == "d2"  # ids go on from the file's
    state.write_text('{"version": 1, "workers": [{"id": "p0", "role": "prefill"')  # cut short
    cmd = [sys.executable, "-m", "proxy", "serve", "--config", cfg, "--prefill", p0.url,
           "--decode", d0.url, "--port", str(launch.free_port())]  # fmt: skip
    failed = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert failed.returncode == 2
    assert f"workers state file {state} is corrupt" in failed.stderr


def test_the_admin_api_needs_the_admin_key(
    tmp_path: Path, clean_sims: dict[str, Sim], monkeypatch: pytest.MonkeyPatch
) -> None:
    p0, d0 = clean_sims["p0"], clean_sims["d0"]
    monkeypatch.setenv("PDPROXY_TEST_ADMIN_KEYS", "admin-secret")
    cfg = config_file(tmp_path, auth={"admin_keys_env": "PDPROXY_TEST_ADMIN_KEYS"})
    with running(start_proxy(tmp_path, [p0], [d0], "--config", cfg)) as proxy:
        base = proxy.url + "/admin/workers"
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            for method, path in (("GET", ""), ("POST", ""), ("DELETE", "/d0"), ("GET", "/d0")):
                resp = httpx.request(method, base + path, headers=headers, json={}, timeout=10)
                assert resp.status_code == 401, (method, path, headers)
                assert resp.json()["error"]["type"] == "Unauthorized"
        assert httpx.get(proxy.url + "/admin/requests").status_code == 401
        good = {"Authorization": "Bearer admin-secret"}
        assert [w["id"] for w in workers(proxy, **good)] == ["p0", "d0"]


def test_urls_outside_the_allow_list_are_refused(
    tmp_path: Path, clean_sims: dict[str, Sim]
) -> None:
    p0, d0 = clean_sims["p0"], clean_sims["d0"]
    with running(start_proxy(tmp_path, [p0], [d0], "--config", config_file(tmp_path))) as proxy:
        for url in ("http://10.0.0.9:8000", "http://engine.example:8000", "http://[fe80::1]:80"):
            resp = add(proxy, url)
            assert resp.status_code == 403, url
            assert "admin.allowed_worker_hosts" in resp.json()["error"]["message"]
        resp = add(proxy, "ftp://127.0.0.1:21")
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "url"
        resp = add(proxy, d0.url, role="both")
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "role"
        resp = httpx.post(proxy.url + "/admin/workers", content=b"{not json", timeout=10)
        assert resp.status_code == 400
        resp = add(proxy, d0.url, unknown=1)
        assert resp.status_code == 400 and "unknown" in resp.json()["error"]["message"]
    cfg = config_file(tmp_path, admin={"allowed_worker_hosts": ["127.0.0.2/32", "engine.test"]})
    with running(start_proxy(tmp_path, [p0], [d0], "--config", cfg)) as proxy:
        port = launch.free_port()
        resp = add(proxy, f"http://127.0.0.2:{port}")  # allowed; then it must pass its probes
        assert resp.status_code == 422 and resp.json()["error"]["code"] == "probe_reachable"
        assert add(proxy, f"http://127.0.0.3:{port}").status_code == 403
        assert add(proxy, "http://127.0.0.1:9").status_code == 403  # loopback is not listed
        assert add(proxy, "http://ENGINE.test:9").status_code == 422  # a listed name


def test_requests_keep_their_timelines(proxy: Proxy) -> None:
    body = {"model": "pdsim/llama-8b", "prompt": "timeline", "max_tokens": 6, "stream": True}
    headers = {"X-Request-Id": "timeline-1"}
    with httpx.stream(
        "POST", proxy.url + "/v1/completions", json=body, headers=headers, timeout=10
    ) as resp:
        resp.read()
    found = httpx.get(proxy.url + "/admin/requests/timeline-1", timeout=5).json()
    assert (found["prefiller"], found["decoder"], found["kv"], found["status"]) == (
        "p0",
        "d0",
        "handed_over",
        200,
    )
    hops = found["ms"]
    assert all(hops[k] is not None and hops[k] >= 0 for k in ("admission", "prefill", "handoff"))
    assert hops["total"] >= hops["ttft"] >= hops["prefill"]
    recent = httpx.get(proxy.url + "/admin/requests", params={"since": 0}, timeout=5).json()
    assert recent["data"][-1]["request_id"] == "timeline-1" and recent["seq"] >= 1
    assert httpx.get(proxy.url + "/admin/requests/nope").status_code == 404


def test_a_joining_worker_is_scraped_before_load_aware_routes_to_it(
    tmp_path: Path, clean_sims: dict[str, Sim]
) -> None:
    p0, d0, d1 = clean_sims["p0"], clean_sims["d0"], clean_sims["d1"]
    cfg = config_file(tmp_path, decode_policy="load_aware", routing={"scrape_interval": 60})
    with running(start_proxy(tmp_path, [p0], [d0], "--config", cfg)) as proxy:
        resp = add(proxy, d1.url)
        assert resp.status_code == 201, resp.text
        load = resp.json()["engine_load"]  # scraped once already, though the next is in 60 s
        assert load is not None and load["running"] == 0 and load["waiting"] == 0


def test_a_fanned_out_request_on_a_removed_decoder_ends_with_a_clear_error(
    tmp_path: Path, clean_sims: dict[str, Sim]
) -> None:
    """Its sub-requests run in tasks of their own; the drain ends the request they serve."""
    p0, d0, d1 = clean_sims["p0"], clean_sims["d0"], clean_sims["d1"]
    cfg = config_file(tmp_path, drain_timeout=0.5, decode_policy="round_robin")
    with running(start_proxy(tmp_path, [p0], [d0, d1], "--config", cfg)) as proxy:
        d1.faults(stall_seconds=30, stall_after_chunks=2)
        body = {
            "model": "pdsim/llama-8b",
            "prompt": "fan",
            "max_tokens": 50,
            "n": 2,
            "stream": True,
        }
        with httpx.stream("POST", proxy.url + "/v1/completions", json=body, timeout=30) as resp:
            it = resp.iter_bytes()
            assert next(it).startswith(b"data: ")
            wait_for(lambda: workers(proxy)[2]["inflight"] == 1, 5)  # one sub-request on d1
            assert httpx.delete(proxy.url + "/admin/workers/d1").status_code == 202
            rest = b"".join(it)
        assert b"was removed before the answer was complete" in rest
        assert rest.endswith(b"data: [DONE]\n\n")
        wait_for(lambda: len(workers(proxy)) == 2, 10)
        timeline = httpx.get(proxy.url + "/admin/requests").json()["data"][-1]
        assert timeline["decoder"] == "d0,d1" and "removed" in timeline["error"]
