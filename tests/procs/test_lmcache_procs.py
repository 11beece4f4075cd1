"""LMCache with `workers: 2`: the control process binds the notification socket, and each
`ProxyNotif` reaches the serving process whose transfer it reports (proxy.procs.notify). Real
processes on real sockets: a proxy of three processes, simulated LMCache engines (tests/flow/rig:
the prefiller pushes the KV into the decoder, then sends the real notification over ZMQ)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from proxy.procs.notify import owner_of
from tests.conftest import MODEL, wait_for
from tests.flow.rig import DEADLINE, NOTIFICATIONS, RECOMPUTED, WIRES, Engines, Topology
from tests.flow.rig import start_topology as start_rig
from tests.flow.test_behaviour_lmcache import HITS, TIMEOUTS, WAITING, send_lmcache_notification

REMEMBERED = "pdproxy_lmcache_remembered_ids"


def process_of(request_id: str) -> str:
    return request_id.split("-")[1]


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    """1 prefiller, 2 decoders, two serving processes."""
    engines = Engines(tmp_path_factory.mktemp("lmcache-procs"), WIRES["lmcache"])
    topo = start_rig(engines, "procs", decoders=2, config="workers: 2\n")
    try:
        wait_for(lambda: all(p["connected"] for p in topo.proxy.stats()["processes"]), 120)
        yield topo
    finally:
        topo.stop()
        engines.stop()


@pytest.fixture
def lmc(topology: Topology) -> Topology:
    return topology.reset()


def post(topo: Topology, prompt: str, **body: object) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, **body}
    return httpx.post(topo.url + "/v1/completions", json=body, timeout=60)


def test_transfer_ids_name_their_process_and_no_other_is_relayed() -> None:
    assert owner_of("pdp-lmc-w2-0123abcd") == "w2"
    assert owner_of("pdp-lmc-w13-ff") == "w13"
    for other in ("pdp-lmc-0123abcd", "pdp-lmc-", "someone-else-w1-x", "pdp-lmc-abc-w1"):
        assert owner_of(other) is None


def test_requests_through_both_processes_all_complete_over_lmcache(lmc: Topology) -> None:
    before = lmc.proxy.metrics()
    answers: list[tuple[int, str]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(200):  # until both processes answered (at most)
            with lock:
                if len(answers) >= 24 and len({process_of(r) for _, r in answers}) == 2:
                    return
            resp = post(lmc, f"client {i} request {j} {time.monotonic()}")
            with lock:
                answers.append((resp.status_code, resp.headers["x-request-id"]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert [code for code, _ in answers] == [200] * len(answers)
    sent = len(answers)
    assert {process_of(r) for _, r in answers} == {"w1", "w2"}
    # each prefill named a transfer id of the process that held the request
    records = lmc.prefill[0].generation_records()
    owners = {
        r["x_request_id"]: owner_of(r["body"]["kv_transfer_params"]["disagg_spec"]["req_id"])
        for r in records
    }
    assert all(owners[r] == process_of(r) for _, r in answers), owners
    # every notification matched its waiter, in whichever process, and the control process's
    # /metrics counts them all
    wait_for(lambda: lmc.proxy.metrics().total(NOTIFICATIONS, result="matched") - before.total(
        NOTIFICATIONS, result="matched") == sent)  # fmt: skip
    assert lmc.sent() == sent
    assert sum(d.metric(HITS) for d in lmc.decode) == sent
    assert sum(d.metric(RECOMPUTED) for d in lmc.decode) == 0
    after = lmc.proxy.metrics()
    assert after.total(WAITING) == 0
    assert after.total(TIMEOUTS) == before.total(TIMEOUTS)
    assert after.total(NOTIFICATIONS, result="unknown") == before.total(
        NOTIFICATIONS, result="unknown"
    )


def test_a_client_s_own_request_id_does_not_matter(lmc: Topology) -> None:
    """The transfer id is the proxy's own, named after the process, whatever X-Request-Id the
    client sent."""
    before = lmc.proxy.metrics().total(NOTIFICATIONS, result="matched")
    for i in range(8):
        body = {"model": MODEL, "prompt": f"own id {i} {time.monotonic()}", "max_tokens": 2}
        headers = {"x-request-id": f"client-chosen-{i}"}
        resp = httpx.post(lmc.url + "/v1/completions", json=body, headers=headers, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-request-id"] == f"client-chosen-{i}"
    records = lmc.prefill[0].generation_records()
    owners = [owner_of(r["body"]["kv_transfer_params"]["disagg_spec"]["req_id"]) for r in records]
    assert len(owners) == 8 and set(owners) <= {"w1", "w2"}, owners
    wait_for(lambda: lmc.proxy.metrics().total(NOTIFICATIONS, result="matched") - before == 8)


def test_a_notification_goes_to_the_process_its_transfer_id_names(lmc: Topology) -> None:
    before = lmc.proxy.metrics().total(NOTIFICATIONS, result="unknown")
    ids = ["pdp-lmc-w1-0bad", "pdp-lmc-w2-0bad", "pdp-lmc-w9-0bad", "pdp-lmc-0bad"]
    for req_id in ids:
        send_lmcache_notification(lmc.notify_port, req_id)
    wait_for(lambda: lmc.proxy.metrics().total(NOTIFICATIONS, result="unknown") - before == 4)
    # each was dropped by the process it names: w1's by w1, w2's by w2, the rest by the control
    # process (no such serving process; an id of its own, as an admission probe's)
    log = lmc.proxy.log_text()
    for process, req_id in zip(("w1", "w2", "ctl", "ctl"), ids, strict=True):
        line = f"pdproxy[{process}]: LMCache notifications: dropped notification for unknown id "
        assert f"{line}{req_id}\n" in log, (process, req_id)


def test_a_late_notification_is_its_process_s_and_leaves_nothing_waiting(
    lmc: Topology,
) -> None:
    before = lmc.proxy.metrics()
    lmc.prefill[0].control("POST", "lmcache", {"delay_notifications": DEADLINE + 0.5})
    resp = post(lmc, f"too slow {time.monotonic()}")
    assert resp.status_code == 504
    assert f"tcp://127.0.0.1:{lmc.notify_port}" in resp.json()["error"]["message"]
    late = before.total(NOTIFICATIONS, result="late")
    wait_for(lambda: lmc.proxy.metrics().total(NOTIFICATIONS, result="late") > late)
    process = process_of(resp.headers["x-request-id"])
    assert f"pdproxy[{process}]: LMCache notifications: late notification" in lmc.proxy.log_text()
    after = lmc.proxy.metrics()
    assert after.total(TIMEOUTS, action="error") - before.total(TIMEOUTS, action="error") == 1
    assert after.total(WAITING) == 0
    assert after.total(REMEMBERED) >= 1  # the ended id, remembered by its process (bounded)
    lmc.prefill[0].control("POST", "lmcache", {})
    assert post(lmc, f"notified again {time.monotonic()}").status_code == 200
