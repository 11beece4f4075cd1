"""Shared by the discovery tests: a kubeconfig for the fake API server, and kubectl."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.control.membership.fakeapi import FakeApi

# kubectl runs the checks (CI installs it and sets PDPROXY_REQUIRE_KUBECTL: never skipped there)
needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None and not os.environ.get("PDPROXY_REQUIRE_KUBECTL"),
    reason="needs kubectl (Debian: kubernetes-client)",
)


def kubeconfig(tmp: Path, api: FakeApi) -> Path:
    path = tmp / f"kubeconfig-{api.port}.yaml"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
        "users": [{"name": "tester", "user": {"token": "not-checked"}}],
        "contexts": [
            {
                "name": "fake",
                "context": {"cluster": "fake", "user": "tester", "namespace": "default"},
            }
        ],
        "current-context": "fake",
    }
    path.write_text(json.dumps(config))
    return path


def kubectl(config: Path, *args: str) -> str:
    done = subprocess.run(
        ["kubectl", "--kubeconfig", str(config), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def kubectl_json(config: Path, *args: str) -> Any:
    return json.loads(kubectl(config, *args, "-o", "json"))
