"""`max_concurrent` holds for both serving processes together, through `serve --workers 2`:
requests that arrive at once on connections of both processes get one slot between them, and
the rest the 429 of a full queue (max_queue 0), as one process would give them. Counted, never
timed (tests/procs/test_admission.py holds the admission's own cases, process by process)."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import httpx

from tests.conftest import MODEL, Sim, running, start_proxy, start_sim, wait_for
from tests.procs.clients import pinned_clients, process_of, run_clients

PER_PROCESS = 2  # clients on each serving process


def test_one_slot_is_one_slot_across_both_serving_processes(
    tmp_path: Path, clean_sims: dict[str, Sim]
) -> None:
    config = tmp_path / "admission.yaml"
    config.write_text("admission: {max_concurrent: 1, max_queue: 0}\n")
    # a decoder slow enough (2 s an answer) that the one admitted request is still in flight
    # when the others arrive
    slow = start_sim(tmp_path, "slow-d", "--decode-base-ms", "40", "--eos-probability", "0",
                     role="decode")  # fmt: skip
    p0 = clean_sims["p0"]
    with (
        running(slow),
        running(start_proxy(tmp_path, [p0], [slow], "--config", str(config), workers=2)) as proxy,
    ):
        groups = pinned_clients(proxy, [PER_PROCESS, PER_PROCESS])
        clients = [c for group in groups for c in group]
        slow.reset()
        before = proxy.stats()["admission"]["rejected"]
        outcomes: list[tuple[int, str]] = []
        lock = threading.Lock()
        start = threading.Barrier(len(clients))

        def one(_: int, client: httpx.Client) -> None:
            body = {"model": MODEL, "prompt": "one at a time", "max_tokens": 50}
            start.wait(30)
            resp = client.post("/v1/completions", json=body)
            with lock:
                outcomes.append((resp.status_code, process_of(resp)))

        run_clients(clients, one, 60)
        print(f"outcomes: {outcomes}")
        assert Counter(process for _, process in outcomes) == {"w1": 2, "w2": 2}  # both asked
        assert sorted(status for status, _ in outcomes) == [200, 429, 429, 429], outcomes
        assert len(slow.generation_records()) == 1  # the refused never reached an engine
        wait_for(lambda: proxy.stats()["admission"]["rejected"] - before == 3, 30)
        assert proxy.metrics().total("pdproxy_requests_total", status="429") == 3
