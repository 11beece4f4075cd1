"""API and admin keys: unit checks, then through the proxy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.auth import Authenticator, load_keys
from proxy.errors import Unauthorized
from tests.conftest import MODEL, Proxy, Sim, running, start_proxy

API_KEY = "sk-client-7f3a"
ADMIN_KEY = "sk-admin-91bd"


def test_load_keys_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDP_KEYS", " a , b ")
    path = tmp_path / "keys"
    path.write_text("# comment\nc\n\n")
    assert load_keys("PDP_KEYS", str(path)) == (b"a", b"b", b"c")
    assert load_keys(None, None) == ()
    with pytest.raises(ValueError, match="PDP_NOPE"):
        load_keys("PDP_NOPE", None)
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no keys"):
        load_keys(None, str(path))


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (b"Bearer k1", True),
        (b"bearer k2", True),
        (b"Bearer k3", False),
        (b"Basic k1", False),
        (None, False),
    ],
)
def test_authenticator(header: bytes | None, ok: bool) -> None:
    auth = Authenticator((b"k1", b"k2"), ())
    headers = [] if header is None else [(b"authorization", header)]
    if ok:
        auth.check_api(headers)
    else:
        with pytest.raises(Unauthorized):
            auth.check_api(headers)
    auth.check_admin(headers)  # no admin keys configured: open


@pytest.fixture(scope="module")
def locked_proxy(
    logs: Path, sims: dict[str, Sim], monkeypatch_module: pytest.MonkeyPatch
) -> Iterator[Proxy]:
    (logs / "admin.keys").write_text(ADMIN_KEY + "\n")
    monkeypatch_module.setenv("PDPROXY_TEST_API_KEYS", API_KEY)
    config = logs / "auth.yaml"
    config.write_text(
        "auth: {api_keys_env: PDPROXY_TEST_API_KEYS, "
        f"admin_keys_file: {logs / 'admin.keys'}}}\nlog_level: debug\n"
    )
    with running(
        start_proxy(logs, [sims["p0"]], [sims["d0"]], "--config", str(config), name="auth")
    ) as proxy:
        yield proxy  # type: ignore[misc]


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_keys_guard_api_and_admin(locked_proxy: Proxy, clean_sims: dict[str, Sim]) -> None:
    url = locked_proxy.url
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    resp = httpx.post(url + "/v1/completions", json=body)
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "Unauthorized"
    bad = {"Authorization": "Bearer wrong"}
    assert httpx.post(url + "/v1/completions", json=body, headers=bad).status_code == 401
    assert clean_sims["p0"].generation_records() == []
    good = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.post(url + "/v1/completions", json=body, headers=good).status_code == 200
    assert httpx.get(url + "/v1/models", headers=good).status_code == 200
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/stats", headers=good).status_code == 401  # API key is not admin
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.get(url + "/stats", headers=admin).status_code == 200
    assert httpx.get(url + "/health").status_code == 200  # probes stay open
    assert httpx.get(url + "/metrics").status_code == 200
    log = locked_proxy.log_text()
    assert API_KEY not in log and ADMIN_KEY not in log and "wrong" not in log


def test_unset_key_variable_fails_start_up(logs: Path, sims: dict[str, Sim]) -> None:
    config = logs / "auth-bad.yaml"
    config.write_text("auth: {api_keys_env: PDPROXY_SURELY_UNSET}\n")
    with pytest.raises(RuntimeError, match="PDPROXY_SURELY_UNSET"):
        start_proxy(logs, [sims["p0"]], [sims["d0"]], "--config", str(config), name="auth-bad")
