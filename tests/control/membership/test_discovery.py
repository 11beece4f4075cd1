"""The kubernetes membership source end to end: a proxy watching the fake API server, simulated
engines behind the fake pods, load through the proxy while pods come and go."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Proxy, Sim, parse_metrics, start_sim, wait_for
from tests.control.admin.helpers import Load
from tests.control.membership.fakeapi import FakeApi
from tests.control.membership.kube import kubeconfig, kubectl, needs_kubectl
from tests.flow.rig import start_proxy_config

pytestmark = needs_kubectl


def port(sim: Sim) -> int:
    return int(sim.url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def engines(logs: Path) -> Iterator[dict[str, Sim]]:
    """Engines behind the pods: two decoders slow enough that streams are in flight when one
    leaves, and a decoder that answers /health but recomputes instead of pulling KV."""
    specs = {
        "p0": ("prefill", "--speed-factor", "0.05"),
        "d0": ("decode", "--speed-factor", "0.3"),
        "d1": ("decode", "--speed-factor", "0.3"),
        "recompute": ("decode", "--speed-factor", "0.05", "--no-kv-transfer"),
    }
    started: dict[str, Sim] = {}
    try:
        for name, (role, *args) in specs.items():
            started[name] = start_sim(logs, f"k8s-{name}", *args, role=role)
        yield started
    finally:
        for sim in started.values():
            sim.stop()


def start(tmp: Path, api: FakeApi) -> Proxy:
    config = {
        "discovery": {
            "source": "kubernetes",
            "kubeconfig": str(kubeconfig(tmp, api)),
            "namespace": "default",
            "selectors": {"prefill": "app=vllm,role=prefill", "decode": "app=vllm,role=decode"},
            "probe_retry": 0.5,
            "probe_retry_max": 2,
            "api_retry": 0.2,
            "api_retry_max": 1,
        },
        "admin": {"probe_timeout": 10, "probe_pull_wait": 1},
    }
    path = tmp / "discovery.yaml"
    path.write_text(json.dumps(config))
    return start_proxy_config(tmp, path, "discovery")


def workers(proxy: Proxy) -> dict[str, dict[str, Any]]:
    listed = httpx.get(proxy.url + "/admin/workers", timeout=10).json()["data"]
    return {w["pod"]: w for w in listed if w["pod"]}


def serving(proxy: Proxy) -> set[str]:
    return {pod for pod, w in workers(proxy).items() if w["state"] == "active"}


def client_requests(sim: Sim) -> list[dict[str, Any]]:
    return [
        r
        for r in sim.generation_records()
        if not str(r.get("x_request_id") or "").startswith("pdproxy-probe-")
    ]


def complete(proxy: Proxy, n: int = 4) -> list[int]:
    body = {"model": "pdsim/llama-8b", "prompt": "hello", "max_tokens": 4}
    return [
        httpx.post(proxy.url + "/v1/completions", json=body, timeout=30).status_code
        for _ in range(n)
    ]


def metric(proxy: Proxy, name: str, **labels: str) -> float:
    return parse_metrics(httpx.get(proxy.url + "/metrics", timeout=5).text).total(name, **labels)


OUTAGE = 30.0  # seconds the API server is away, as the issue asks (start() sets short retries)
LABELS = {
    "prefill": {"app": "vllm", "role": "prefill"},
    "decode": {"app": "vllm", "role": "decode"},
}


@pytest.fixture
def api() -> Iterator[FakeApi]:
    server = FakeApi(grace=1.0)
    yield server
    server.close()


def test_a_ready_pod_is_probed_then_serves_and_a_deleted_one_drains_under_load(
    tmp_path: Path, engines: dict[str, Sim], api: FakeApi
) -> None:
    for sim in engines.values():
        sim.reset()
    api.put("p0", LABELS["prefill"], port(engines["p0"]))
    api.put("d0", LABELS["decode"], port(engines["d0"]))
    proxy = start(tmp_path, api)
    try:
        wait_for(lambda: serving(proxy) == {"default/p0", "default/d0"}, 30)
        with Load(proxy.url, clients=3, max_tokens=24) as load:
            wait_for(lambda: load.count() >= 3, 30)
            d1 = engines["d1"]
            api.put("d1", LABELS["decode"], port(d1), ready=False)
            time.sleep(0.5)
            assert "default/d1" not in serving(proxy) and not d1.generation_records()
            ready_at = time.monotonic()
            api.ready("d1", True)
            wait_for(lambda: client_requests(d1), 30)
            first = time.monotonic() - ready_at
            records = d1.generation_records()
            assert str(records[0]["x_request_id"]).startswith("pdproxy-probe-")
            print(f"Ready to first client request on the new pod: {first:.2f}s (polled)")
            logged = re.search(r"pod default/d1 serves .*, ([0-9.]+)s after", proxy.log_text())
            assert logged is not None
            print(f"Ready to joined, as the proxy logged it: {logged[1]}s")
            # streams in flight on it when its pod goes
            wait_for(lambda: workers(proxy)["default/d1"]["inflight"] > 0, 30)
            kubeconfig_path = tmp_path / f"kubeconfig-{api.port}.yaml"
            kubectl(kubeconfig_path, "delete", "pod", "d1", "--wait=false")
            wait_for(lambda: "default/d1" not in serving(proxy), 10)
            wait_for(lambda: "default/d1" not in workers(proxy), 60)
            served = load.count()
            wait_for(lambda: load.count() >= served + 3, 30)
        tally = load.tally()
        print(f"scale-down under streaming load: {tally}")
        assert tally["lost"] == 0 and tally["clear_error"] == 0, (tally, load.lost())
        assert tally["succeeded"] >= 6
        assert metric(proxy, "pdproxy_discovery_drained_total", role="decode") == 1
        assert metric(proxy, "pdproxy_discovery_pods", role="decode", state="serving") == 1
        seen = "pdproxy_discovery_pods"  # the pod is gone once its grace period is over
        wait_for(lambda: metric(proxy, seen, role="decode", state="seen") == 1, 10)
        assert metric(proxy, "pdproxy_worker_probes_total", role="decode", result="passed") == 2
    finally:
        proxy.stop()


def test_a_pod_that_fails_the_kv_probe_never_gets_a_request(
    tmp_path: Path, engines: dict[str, Sim], api: FakeApi
) -> None:
    for sim in engines.values():
        sim.reset()
    api.put("p0", LABELS["prefill"], port(engines["p0"]))
    api.put("d0", LABELS["decode"], port(engines["d0"]))
    bad = engines["recompute"]
    api.put("bad", LABELS["decode"], port(bad))
    proxy = start(tmp_path, api)
    try:
        wait_for(lambda: serving(proxy) == {"default/p0", "default/d0"}, 30)
        failures = "pdproxy_discovery_probe_failures_total"
        wait_for(lambda: metric(proxy, failures, role="decode", reason="kv") >= 2, 30)
        assert complete(proxy, 6) == [200] * 6
        assert httpx.get(bad.url + "/health", timeout=5).status_code == 200
        assert bad.generation_records() and not client_requests(bad)
        assert "default/bad" not in serving(proxy)
        assert metric(proxy, "pdproxy_discovery_pods", role="decode", state="probing") == 1
        kubectl(tmp_path / f"kubeconfig-{api.port}.yaml", "delete", "pod", "bad", "--wait=false")
        wait_for(
            lambda: metric(proxy, "pdproxy_discovery_pods", role="decode", state="probing") == 0, 10
        )
        assert not client_requests(bad)
    finally:
        proxy.stop()


def test_an_expired_watch_and_an_api_server_gone_and_back_keep_the_workers(
    tmp_path: Path, engines: dict[str, Sim], api: FakeApi
) -> None:
    for sim in engines.values():
        sim.reset()
    api.put("p0", LABELS["prefill"], port(engines["p0"]))
    api.put("d0", LABELS["decode"], port(engines["d0"]))
    proxy = start(tmp_path, api)
    try:
        wait_for(lambda: serving(proxy) == {"default/p0", "default/d0"}, 30)
        ids = {pod: w["id"] for pod, w in workers(proxy).items()}
        restarts = "pdproxy_discovery_watch_restarts_total"
        api.compact()
        wait_for(lambda: metric(proxy, restarts, role="decode", reason="expired") >= 1, 10)
        assert {pod: w["id"] for pod, w in workers(proxy).items()} == ids
        assert any("resourceVersion" in r and "watch=true" in r for r in api.requests)

        # the API server away for OUTAGE seconds: the known workers serve all along; a pod
        # added while it is away (d1) is found once it is back, and so are the changes after
        api.stop()
        gone = time.monotonic()
        wait_for(lambda: metric(proxy, "pdproxy_discovery_watching", role="decode") == 0, 10)
        assert re.search(r"cannot watch the decode pods .* keep serving", proxy.log_text())
        api.put("d1", LABELS["decode"], port(engines["d1"]))
        served = 0
        while time.monotonic() - gone < OUTAGE:
            assert complete(proxy, 1) == [200]
            served += 1
            assert metric(proxy, "pdproxy_discovery_watching", role="decode") == 0
            time.sleep(1.0)
        assert {pod: w["id"] for pod, w in workers(proxy).items()} == ids
        errors = metric(proxy, restarts, role="decode", reason="error")
        assert errors >= OUTAGE / 2  # asked again all along (api_retry_max 1 s)
        print(f"API server away {time.monotonic() - gone:.1f}s: {served} requests served "
              f"meanwhile, {errors:g} watch restarts (error)")  # fmt: skip
        api.start()
        back = time.monotonic()
        wait_for(lambda: "default/d1" in serving(proxy), 30)
        print(f"the pod added during the outage served {time.monotonic() - back:.2f}s after "
              f"the API server came back")  # fmt: skip
        assert metric(proxy, "pdproxy_discovery_watching", role="decode") == 1
        assert {pod: w["id"] for pod, w in workers(proxy).items() if pod in ids} == ids

        # Ready no longer: drained; Ready again: probed again, a new worker
        api.ready("d1", False)
        wait_for(lambda: "default/d1" not in workers(proxy), 30)
        api.ready("d1", True)
        wait_for(lambda: "default/d1" in serving(proxy), 30)

        # an annotation patched by kubectl: a port that is not one takes the pod out, a good
        # one brings it back (a new worker, probed again)
        config = tmp_path / f"kubeconfig-{api.port}.yaml"
        kubectl(config, "annotate", "pod", "d1", "pdproxy.io/port=eighty")
        wait_for(lambda: "default/d1" not in serving(proxy), 10)
        d1_port = str(port(engines["d1"]))
        kubectl(config, "annotate", "--overwrite", "pod", "d1", f"pdproxy.io/port={d1_port}")
        wait_for(lambda: "default/d1" in serving(proxy), 30)
        assert workers(proxy)["default/d1"]["last_probe"]["passed"]
    finally:
        proxy.stop()
