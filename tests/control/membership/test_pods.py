"""What discovery reads from a pod and from its config: pure, no server."""

from __future__ import annotations

from typing import Any

import pytest
from lightkube.models.core_v1 import Pod

from proxy.config import ConfigError, load_config
from proxy.control.membership.pods import view
from proxy.control.membership.selectors import parse_selector

ANNOTATIONS = ("http", "pdproxy.io/port", "pdproxy.io/side", "pdproxy.io/lmcache")


def pod(ready: bool = True, phase: str = "Running", **meta: Any) -> Pod:
    return Pod.from_dict(
        {
            "metadata": {"name": "d0", "namespace": "ai", "uid": "u1", **meta},
            "spec": {
                "containers": [{"name": "vllm", "ports": [{"name": "http", "containerPort": 8000}]}]
            },
            "status": {
                "phase": phase,
                "podIP": "10.1.2.3",
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            },
        }
    )


def test_a_running_ready_pod_serves_on_its_named_port() -> None:
    seen = view(pod(), "decode", *ANNOTATIONS)
    assert (seen.url, seen.name, seen.serves, seen.state) == (
        "http://10.1.2.3:8000",
        "ai/d0",
        True,
        "ready",
    )


@pytest.mark.parametrize(
    ("made", "state"),
    [
        (pod(ready=False), "not ready"),
        (pod(phase="Pending"), "not ready"),
        (pod(deletionTimestamp="2026-01-01T00:00:00Z"), "terminating"),
    ],
)
def test_a_pod_not_ready_or_terminating_does_not_serve(made: Pod, state: str) -> None:
    seen = view(made, "decode", *ANNOTATIONS)
    assert not seen.serves and seen.state == state


def test_annotations_name_the_port_the_side_channel_and_the_lmcache_receiver() -> None:
    notes = {
        "pdproxy.io/port": "9000",
        "pdproxy.io/side": "5600",
        "pdproxy.io/lmcache": "7300/7400,7301/7401",
    }
    seen = view(pod(annotations=notes), "decode", *ANNOTATIONS)
    assert seen.url == "http://10.1.2.3:9000" and seen.side_channel_port == 5600
    assert seen.lmcache is not None
    assert (seen.lmcache.init_ports, seen.lmcache.alloc_ports) == ((7300, 7301), (7400, 7401))


def test_a_pod_whose_annotation_is_not_a_port_never_serves_and_says_why() -> None:
    seen = view(pod(annotations={"pdproxy.io/port": "http"}), "prefill", *ANNOTATIONS)
    assert not seen.serves and seen.state == "annotation pdproxy.io/port 'http' is not a port"
    seen = view(pod(), "prefill", "engine", *ANNOTATIONS[1:])
    assert not seen.serves and "no container port named 'engine'" in seen.state


def test_selectors_are_read_and_bad_ones_refused() -> None:
    assert parse_selector("app=vllm, role==decode,tier!=canary,gpu,!legacy") == {
        "app": ("=", "vllm"),
        "role": ("=", "decode"),
        "tier": ("!=", "canary"),
        "gpu": ("exists", ""),
        "legacy": ("!exists", ""),
    }
    for bad in ("", "app=vllm,,x", "app in (a,b)", "a=b,a=c", "!a=b"):
        with pytest.raises(ValueError):
            parse_selector(bad)


def test_the_discovery_config_is_checked_at_start_up() -> None:
    found = load_config(discovery={"source": "kubernetes", "selectors": {"decode": "role=decode"}})
    assert found.discovery.selectors.decode == "role=decode" and not found.prefill
    with pytest.raises(ConfigError, match="at least one of selectors"):
        load_config(discovery={"source": "kubernetes"})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(discovery={"source": "kubernetes", "selectors": {"decode": "role in (a)"}})
    with pytest.raises(ConfigError, match="drop workers_state_file"):
        load_config(
            discovery={"source": "kubernetes", "selectors": {"decode": "role=decode"}},
            workers_state_file="/tmp/w.json",
        )
    with pytest.raises(ConfigError, match="no prefill workers"):
        load_config(decode=["http://127.0.0.1:7200"])
