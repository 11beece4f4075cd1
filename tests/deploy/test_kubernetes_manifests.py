"""deploy/kubernetes rendered by kubectl's kustomize and validated against the Kubernetes API
schemas that kubernetes-validate bundles (offline), then read for what pdproxy relies on."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy.config import ProxyConfig
from proxy.control.membership.selectors import parse_selector
from tests.control.membership.kube import needs_kubectl

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
VERSION = "1.32.0"  # the oldest Kubernetes the manifests are checked against

pytestmark = needs_kubectl


def render(path: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("where", ["base", "overlays/vllm-1p1d"])
def test_rendered_manifests_are_valid_kubernetes_objects(where: str) -> None:
    docs = render(DEPLOY / where)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, VERSION, strict=True)  # raises naming the field


def test_a_manifest_with_a_wrong_field_is_refused() -> None:
    (deployment,) = [d for d in by_kind(render(DEPLOY / "base"), "Deployment")]
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSION, strict=True)


def test_two_replicas_read_pods_and_write_only_their_lease_and_decisions() -> None:
    docs = render(DEPLOY / "base")
    (role,) = by_kind(docs, "Role")
    (configmap,) = by_kind(docs, "ConfigMap")
    config = ProxyConfig.model_validate(yaml.safe_load(configmap["data"]["config.yaml"]))
    leader = config.discovery.leader
    assert leader is not None
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [leader.lease_name],
            "verbs": ["get", "update"],
        },
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [leader.configmap],
            "verbs": ["get", "update"],
        },
    ]
    (deployment,) = by_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (env,) = container["env"]
    assert env["name"] == "POD_NAME"  # the identity in the Lease
    assert env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    ready, alive = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert ready["path"] == "/health" and alive["path"] != ready["path"]
    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()


def test_the_engines_carry_the_labels_the_proxy_config_selects() -> None:
    docs = render(DEPLOY / "overlays/vllm-1p1d")
    (configmap,) = by_kind(docs, "ConfigMap")
    config = ProxyConfig.model_validate(yaml.safe_load(configmap["data"]["config.yaml"]))
    assert config.discovery.source == "kubernetes"
    engines = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    for role in ("prefill", "decode"):
        template = engines[f"vllm-{role}"]["spec"]["template"]
        labels = template["metadata"]["labels"]
        selector = parse_selector(getattr(config.discovery.selectors, role))
        assert all(op == "=" and labels.get(key) == value for key, (op, value) in selector.items())
        other = "decode" if role == "prefill" else "prefill"
        other_selector = parse_selector(getattr(config.discovery.selectors, other))
        assert not all(labels.get(k) == v for k, (_, v) in other_selector.items())
        (container,) = template["spec"]["containers"]
        assert {"name": "http", "containerPort": 8000} in container["ports"]
        annotation = template["metadata"]["annotations"][config.discovery.side_channel_annotation]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == annotation
        assert env["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] == "y"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        kv = next(a for a in container["args"] if a.startswith("--kv-transfer-config="))
        assert (
            '"NixlConnector"' in kv
            and ("kv_producer" if role == "prefill" else "kv_consumer") in kv
        )


def test_every_replica_can_connect_to_the_engines_kv_events() -> None:
    """The engines bind their event sockets where the proxy's rule looks (pod address, HTTP port
    + offsets), and the replicas connect (bind false): one process only could bind them."""
    docs = render(DEPLOY / "overlays/vllm-1p1d")
    (configmap,) = by_kind(docs, "ConfigMap")
    config = ProxyConfig.model_validate(yaml.safe_load(configmap["data"]["config.yaml"]))
    assert config.kv_events.enabled and not config.kv_events.bind
    rule = config.kv_events.endpoint_for("http://10.0.0.7:8000")
    for name in ("vllm-prefill", "vllm-decode"):
        (deployment,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == name]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        arg = next(a for a in container["args"] if a.startswith("--kv-events-config="))
        events = json.loads(arg.partition("=")[2])
        assert events["enable_kv_cache_events"] and events["publisher"] == "zmq"
        for key, wanted in (("endpoint", rule.publisher), ("replay_endpoint", rule.replay)):
            assert events[key].startswith("tcp://*:")  # vLLM binds a wildcard address
            port = int(events[key].rpartition(":")[2])
            assert wanted is not None and wanted == f"tcp://10.0.0.7:{port}"
            assert port in [p["containerPort"] for p in container["ports"]]
