"""health.probe_on_start: configured workers are probed before traffic; one that fails is held
out of routing and joins once a later probe passes."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import MODEL, Sim, running, start_proxy, wait_for
from tests.control.admin.helpers import config_file


def test_a_configured_worker_that_fails_is_held_until_it_passes(
    tmp_path: Path, clean_sims: dict[str, Sim]
) -> None:
    p0, d0, d1 = clean_sims["p0"], clean_sims["d0"], clean_sims["d1"]
    d1.faults(unhealthy=True)
    cfg = config_file(tmp_path, health={"probe_on_start": True, "interval": 0.3})
    with running(start_proxy(tmp_path, [p0], [d0, d1], "--config", cfg)) as proxy:
        data = httpx.get(proxy.url + "/admin/workers", timeout=5).json()["data"]
        state = {w["id"]: (w["state"], (w["last_probe"] or {}).get("passed")) for w in data}
        assert state == {"p0": ("active", True), "d0": ("active", True), "d1": ("probing", False)}
        for _ in range(6):
            body = {"model": MODEL, "prompt": "only d0", "max_tokens": 2}
            assert httpx.post(proxy.url + "/v1/completions", json=body).status_code == 200
        assert not [r for r in d1.generation_records() if "probe" not in r["x_request_id"]]
        d1.reset()  # it heals: the next retried probe lets it in

        def joined() -> bool:
            data = httpx.get(proxy.url + "/admin/workers/d1", timeout=5).json()
            return bool(data["state"] == "active")

        wait_for(joined, 10)
