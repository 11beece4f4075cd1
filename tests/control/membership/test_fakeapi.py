"""The fake API server against clients nobody here wrote: kubectl, and the watch protocol as
lightkube and the API documentation describe it (resourceVersion, bookmarks, 410 Gone)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from tests.control.membership.fakeapi import FakeApi
from tests.control.membership.kube import kubeconfig, kubectl, kubectl_json, needs_kubectl

pytestmark = needs_kubectl


@pytest.fixture
def api() -> Iterator[FakeApi]:
    # grace: long enough that kubectl, started as a new process, reads the pod while it is
    # terminating (0.2 s was shorter than its start-up on a loaded machine)
    server = FakeApi(grace=2.0, bookmark_every=0.2)
    server.put("p0", {"app": "vllm", "role": "prefill"}, 7100)
    server.put("d0", {"app": "vllm", "role": "decode"}, 7200)
    server.put("d1", {"app": "vllm", "role": "decode"}, 7201, ready=False)
    wait_for(lambda: len(server.pods) == 3)
    yield server
    server.close()


def test_kubectl_reads_selects_annotates_and_deletes(tmp_path: Path, api: FakeApi) -> None:
    config = kubeconfig(tmp_path, api)
    decode = kubectl_json(config, "get", "pods", "-l", "app=vllm,role=decode")
    assert sorted(p["metadata"]["name"] for p in decode["items"]) == ["d0", "d1"]
    assert (
        kubectl_json(config, "get", "pods", "-l", "role!=decode")["items"][0]["metadata"]["name"]
        == "p0"
    )
    ready = {p["metadata"]["name"]: p["status"]["conditions"][0]["status"] for p in decode["items"]}
    assert ready == {"d0": "True", "d1": "False"}

    kubectl(config, "annotate", "pod", "d0", "pdproxy.io/port=9000")
    got = kubectl_json(config, "get", "pod", "d0")
    assert got["metadata"]["annotations"] == {"pdproxy.io/port": "9000"}
    kubectl(config, "annotate", "pod", "d0", "pdproxy.io/port-")
    assert not kubectl_json(config, "get", "pod", "d0")["metadata"]["annotations"]

    kubectl(config, "delete", "pod", "d1", "--wait=false")
    terminating = kubectl_json(config, "get", "pod", "d1")
    assert terminating["metadata"]["deletionTimestamp"]
    wait_for(lambda: ("default", "d1") not in api.pods)
    names = [p["metadata"]["name"] for p in kubectl_json(config, "get", "pods")["items"]]
    assert sorted(names) == ["d0", "p0"]


def events(api: FakeApi, **params: str) -> list[dict[str, object]]:
    """A watch's events until the server closes it."""
    query = {"watch": "true", "timeoutSeconds": "1", **params}
    resp = httpx.get(api.url + "/api/v1/namespaces/default/pods", params=query, timeout=10)
    return [json.loads(line) for line in resp.text.splitlines()]


def test_watch_from_a_version_bookmarks_and_410_for_an_expired_one(api: FakeApi) -> None:
    listed = httpx.get(
        api.url + "/api/v1/namespaces/default/pods", params={"labelSelector": "role=decode"}
    ).json()
    version = listed["metadata"]["resourceVersion"]
    api.ready("d1", True)
    seen = events(
        api, resourceVersion=version, labelSelector="role=decode", allowWatchBookmarks="true"
    )
    assert seen[0]["type"] == "MODIFIED" and seen[0]["object"]["metadata"]["name"] == "d1"
    assert int(seen[0]["object"]["metadata"]["resourceVersion"]) > int(version)
    assert any(e["type"] == "BOOKMARK" for e in seen[1:])
    assert all(
        e["type"] != "BOOKMARK"
        for e in events(api, resourceVersion=version, labelSelector="role=prefill")
    )

    api.compact()
    wait_for(lambda: api.oldest > int(version))
    (gone,) = events(api, resourceVersion=version)
    assert gone["type"] == "ERROR" and gone["object"]["code"] == 410


LEASE = {
    "apiVersion": "coordination.k8s.io/v1",
    "kind": "Lease",
    "metadata": {"name": "pdproxy-leader"},
    "spec": {"holderIdentity": "proxy-a", "leaseDurationSeconds": 2},
}


def test_kubectl_creates_reads_and_replaces_a_lease_with_conflicts(
    tmp_path: Path, api: FakeApi
) -> None:
    config = kubeconfig(tmp_path, api)
    path = tmp_path / "lease.json"
    path.write_text(json.dumps(LEASE))
    # --validate=false: the fake serves no OpenAPI schema for kubectl to check the file against
    kubectl(config, "create", "--validate=false", "-f", str(path))
    got = kubectl_json(config, "get", "lease", "pdproxy-leader")
    assert got["spec"]["holderIdentity"] == "proxy-a"
    listed = kubectl_json(config, "get", "leases")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["pdproxy-leader"]

    # a replace at the version read is taken; one at an older version is refused with 409
    stale = dict(got, spec={**got["spec"], "holderIdentity": "proxy-c"})
    got["spec"]["holderIdentity"] = "proxy-b"
    path.write_text(json.dumps(got))
    kubectl(config, "replace", "--validate=false", "-f", str(path))
    assert kubectl_json(config, "get", "lease", "pdproxy-leader")["spec"]["holderIdentity"] == (
        "proxy-b"
    )
    path.write_text(json.dumps(stale))
    done = subprocess.run(
        ["kubectl", "--kubeconfig", str(config), "replace", "--validate=false", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0 and "the object has been modified" in done.stderr
    assert api.objects.conflicts == 1
    done = subprocess.run(
        ["kubectl", "--kubeconfig", str(config), "create", "--validate=false", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0 and "already exists" in done.stderr
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "decisions"}}
    path.write_text(json.dumps({**cm, "data": {"leans": "{}"}}))
    kubectl(config, "create", "--validate=false", "-f", str(path))
    assert kubectl_json(config, "get", "configmap", "decisions")["data"] == {"leans": "{}"}
