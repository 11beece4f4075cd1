"""What a pod says about the engine in it, read once per event: pure, no I/O.

A pod serves (may be probed, then routed) when it is Running, its Ready condition is True, it is
not terminating (no deletionTimestamp), it has an IP, and its engine's port is known: the
`port_annotation` when present, else the container port named `port_name`. A decode pod of
connector lmcache names its receiver's ports in `lmcache_annotation` (`7300/7400`, one
`INIT/ALLOC` pair per TP rank, comma-separated); the receiver's host is the pod's IP.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightkube.models.core_v1 import Pod

from proxy.control.workers import Role
from proxy.engines.connectors.lmcache_config import LMCacheReceiverConfig


@dataclass(frozen=True, slots=True)
class PodView:
    uid: str
    name: str  # namespace/name
    role: Role
    url: str | None  # the engine's base URL; None until the pod has an IP and a port
    ready: bool
    terminating: bool
    side_channel_port: int | None = None
    lmcache: LMCacheReceiverConfig | None = None
    problem: str | None = None  # what in its spec keeps it from being used

    @property
    def serves(self) -> bool:
        return self.ready and not self.terminating and self.url is not None and not self.problem

    @property
    def state(self) -> str:
        """Why it serves or not, for the log."""
        if self.terminating:
            return "terminating"
        if self.problem:
            return self.problem
        if not self.ready:
            return "not ready"
        return "ready" if self.url else "without an address"


def _port(text: str, what: str) -> int:
    if not text.strip().isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{what} {text!r} is not a port")
    return int(text)


def _lmcache(text: str, what: str) -> LMCacheReceiverConfig:
    init, alloc = [], []
    for pair in text.split(","):
        first, sep, second = pair.partition("/")
        if not sep:
            raise ValueError(f"{what} {text!r}: write INIT/ALLOC per TP rank, comma-separated")
        init.append(_port(first, what))
        alloc.append(_port(second, what))
    return LMCacheReceiverConfig(init_ports=tuple(init), alloc_ports=tuple(alloc))


def view(
    pod: Pod,
    role: Role,
    port_name: str,
    port_annotation: str,
    side_channel_annotation: str,
    lmcache_annotation: str,
) -> PodView:
    """The pod as discovery sees it."""
    meta, status = pod.metadata, pod.status
    assert meta is not None  # every object the API server sends has its metadata
    annotations = meta.annotations or {}
    name = f"{meta.namespace}/{meta.name}"
    ready = (
        status is not None
        and status.phase == "Running"
        and any(c.type == "Ready" and c.status == "True" for c in status.conditions or ())
    )
    port: int | None = None
    side: int | None = None
    receiver = None
    problem = None
    try:
        if port_annotation in annotations:
            port = _port(annotations[port_annotation], f"annotation {port_annotation}")
        else:
            port = _named_port(pod, port_name)
            if port is None:
                problem = f"no container port named {port_name!r} nor annotation {port_annotation}"
        if side_channel_annotation in annotations:
            what = f"annotation {side_channel_annotation}"
            side = _port(annotations[side_channel_annotation], what)
        if lmcache_annotation in annotations and role == "decode":
            receiver = _lmcache(annotations[lmcache_annotation], f"annotation {lmcache_annotation}")
    except ValueError as exc:
        problem = str(exc)
    ip = status.podIP if status is not None else None
    url = f"http://{_host(ip)}:{port}" if ip and port else None
    return PodView(
        uid=meta.uid or name,
        name=name,
        role=role,
        url=url,
        ready=ready,
        terminating=meta.deletionTimestamp is not None,
        side_channel_port=side,
        lmcache=receiver,
        problem=problem,
    )


def _named_port(pod: Pod, name: str) -> int | None:
    for container in pod.spec.containers if pod.spec is not None else ():
        for port in container.ports or ():
            if port.name == name:
                return port.containerPort
    return None


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip
