"""`pdproxy workers list|add|remove` against a running proxy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Sim, running, start_proxy, wait_for
from tests.control.admin.helpers import config_file


def workers_cli(
    proxy_url: str, *args: str, key: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PDPROXY_ADMIN_KEY"}
    if key is not None:
        env["OPS_KEY"] = key
    cmd = [sys.executable, "-m", "proxy", "workers", *args, "--proxy", proxy_url,
           "--admin-key-env", "OPS_KEY"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def test_round_trip(
    tmp_path: Path, clean_sims: dict[str, Sim], monkeypatch: pytest.MonkeyPatch
) -> None:
    p0, d0, d1 = clean_sims["p0"], clean_sims["d0"], clean_sims["d1"]
    monkeypatch.setenv("PDPROXY_TEST_OPS", "ops-key")
    cfg = config_file(tmp_path, auth={"admin_keys_env": "PDPROXY_TEST_OPS"})
    with running(start_proxy(tmp_path, [p0], [d0], "--config", cfg)) as proxy:
        listed = workers_cli(proxy.url, "list", key="ops-key")
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert lines[0].split()[:5] == ["ID", "ROLE", "STATE", "HEALTH", "BREAKER"]
        assert [line.split()[0] for line in lines[1:]] == ["p0", "d0"]

        refused = workers_cli(proxy.url, "list")  # no key
        assert refused.returncode == 1 and "admin key: set OPS_KEY" in refused.stderr

        added = workers_cli(proxy.url, "add", "--role", "decode", d1.url, key="ops-key")
        assert added.returncode == 0, added.stderr
        assert f"d1 joined as a decode worker after its probes: {d1.url}" in added.stdout
        assert "kv" in added.stdout and "pulled the probe's KV" in added.stdout

        again = workers_cli(proxy.url, "add", "--role", "decode", d1.url, key="ops-key")
        assert again.returncode == 1 and "already known as d1" in again.stderr

        listed = workers_cli(proxy.url, "list", key="ops-key")
        row = next(line for line in listed.stdout.splitlines() if line.startswith("d1 "))
        assert "active" in row and "passed" in row and "pdsim/llama-8b" in row and d1.url in row

        removed = workers_cli(proxy.url, "remove", d1.url, "--wait", key="ops-key")
        assert removed.returncode == 0, removed.stderr
        assert "d1 removed" in removed.stdout
        last = workers_cli(proxy.url, "remove", "d0", key="ops-key")
        assert last.returncode == 1 and "last active decode worker" in last.stderr
        wait_for(lambda: "d1" not in workers_cli(proxy.url, "list", key="ops-key").stdout, 5)
    gone = workers_cli(proxy.url, "list", key="ops-key")
    assert gone.returncode == 2 and "cannot reach the proxy" in gone.stderr


def test_messages_speak_to_a_shell_user(
    tmp_path: Path, clean_sims: dict[str, Sim], monkeypatch: pytest.MonkeyPatch
) -> None:
    p0, d0 = clean_sims["p0"], clean_sims["d0"]
    monkeypatch.setenv("PDPROXY_TEST_OPS", "ops-key")
    cfg = config_file(tmp_path, auth={"admin_keys_env": "PDPROXY_TEST_OPS"})
    with running(start_proxy(tmp_path, [p0], [d0], "--config", cfg)) as proxy:
        no_key = workers_cli(proxy.url, "list")
        assert no_key.returncode == 1
        assert no_key.stderr == (
            "pdproxy workers list: refused: the proxy needs its admin key: set OPS_KEY (export "
            "OPS_KEY=KEY, or name another variable with --admin-key-env)\n"
        )
        wrong = workers_cli(proxy.url, "list", key="nope")
        assert wrong.returncode == 1 and "refused the admin key in OPS_KEY" in wrong.stderr

        bare = workers_cli(proxy.url.removeprefix("http://"), "list", key="ops-key")
        assert bare.returncode == 0 and bare.stdout.splitlines()[1].startswith("p0 ")

        engine = workers_cli(d0.url, "list", key="ops-key")  # an engine, not the proxy
        assert engine.returncode == 2
        assert f"{d0.url} is not a pdproxy: GET /admin/workers answered 404" in engine.stderr
        assert "not an engine's?" in engine.stderr
        nonsense = workers_cli("ftp://x", "list", key="ops-key")
        assert nonsense.returncode == 2 and "is not the proxy's address" in nonsense.stderr

        unknown = workers_cli(proxy.url, "remove", "d9", key="ops-key")
        assert unknown.returncode == 1
        assert unknown.stderr == (
            "pdproxy workers remove: refused: no worker with id or URL 'd9'; "
            "`pdproxy workers list` lists them\n"
        )

        # `list --json | head`: the reader leaves before the answer is written
        env = {**os.environ, "OPS_KEY": "ops-key"}
        cmd = [sys.executable, "-m", "proxy", "workers", "list", "--json", "--proxy", proxy.url,
               "--admin-key-env", "OPS_KEY"]  # fmt: skip
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as cut:
            assert cut.stdout is not None and cut.stderr is not None
            cut.stdout.close()
            assert cut.wait(60) == 0
            assert cut.stderr.read() == b""
