"""Configuration of the LMCache PD connector (`connector: lmcache`).

Two parts: where the proxy listens for LMCache's "transfer done" notifications, with the deadline
of that wait, and, per decoder, the host and ports its LMCache receiver listens on. Decoder ports
default to LMCache's convention: the i-th decoder (0-based, TP 1) uses init port 7300+i and alloc
port 7400+i. A decoder with TP > 1 lists one port per TP rank.

Kept apart from `proxy.config` so that the shared config module only names these types.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_INIT_PORT = 7300  # LMCache pd_peer_init_port of the first decoder
DEFAULT_ALLOC_PORT = 7400  # LMCache pd_peer_alloc_port of the first decoder
DEFAULT_NOTIFY_PORT = 7500  # LMCache pd_proxy_port

OnTimeout = Literal["error", "fallback"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LMCacheReceiverConfig(_Model):
    """One decoder's LMCache receiver (its `pd_peer_host`, `pd_peer_init_port`,
    `pd_peer_alloc_port`). Omitted fields take the defaults described in the module."""

    host: str | None = Field(None, description="receiver_host; default: the decoder URL's host")
    init_ports: tuple[int, ...] | None = Field(None, description="one per decoder TP rank")
    alloc_ports: tuple[int, ...] | None = Field(None, description="one per decoder TP rank")

    @model_validator(mode="after")
    def _check_ports(self) -> LMCacheReceiverConfig:
        for name in ("init_ports", "alloc_ports"):
            ports: tuple[int, ...] | None = getattr(self, name)
            if ports is not None:
                if not ports:
                    raise ValueError(f"{name} must list one port per decoder TP rank")
                bad = [p for p in ports if not 0 < p < 65536]
                if bad:
                    raise ValueError(f"{name} has invalid port(s) {bad}")
        if (self.init_ports is None) != (self.alloc_ports is None):
            raise ValueError("give both init_ports and alloc_ports, or neither")
        init, alloc = self.init_ports, self.alloc_ports
        if init is not None and alloc is not None and len(init) != len(alloc):
            raise ValueError(
                f"init_ports has {len(init)} entries and alloc_ports {len(alloc)}: "
                "both need one port per decoder TP rank"
            )
        return self


class LMCacheConfig(_Model):
    """The proxy's side of LMCache PD: the PULL socket the prefillers' `pd_proxy_host:port`
    name, and what happens when their notifications do not come."""

    notify_host: str = Field(
        "127.0.0.1",
        description="address the PULL socket binds (0.0.0.0 when prefillers run on other hosts)",
    )
    notify_port: int = Field(DEFAULT_NOTIFY_PORT, ge=0, le=65535, description="pd_proxy_port")
    notify_timeout: float = Field(
        30.0, gt=0, description="seconds to wait for the notifications after the prefill answered"
    )
    on_timeout: OnTimeout = Field(
        "error", description="error: the client gets a 504; fallback: the decoder recomputes"
    )
    late_memory: int = Field(
        4096, ge=1, le=1_000_000, description="finished request ids remembered to drop late notes"
    )


@dataclass(frozen=True, slots=True)
class Receiver:
    """Where one decoder's LMCache receiver listens: one init and one alloc port per TP rank."""

    host: str
    init_ports: tuple[int, ...]
    alloc_ports: tuple[int, ...]

    @property
    def tp(self) -> int:
        return len(self.init_ports)


def resolve_receivers(
    decoders: Sequence[tuple[str, LMCacheReceiverConfig | None]],
) -> list[Receiver]:
    """The receiver of each decoder, in order, with defaults filled in.

    Raises ValueError when two decoders on one host would share a port.
    """
    receivers = []
    for i, (url, given) in enumerate(decoders):
        given = given or LMCacheReceiverConfig()
        host = given.host or urlsplit(url).hostname or "127.0.0.1"
        init = given.init_ports or (DEFAULT_INIT_PORT + i,)
        alloc = given.alloc_ports or (DEFAULT_ALLOC_PORT + i,)
        receivers.append(Receiver(host, tuple(init), tuple(alloc)))
    owner: dict[tuple[str, int], str] = {}
    for (url, _), rx in zip(decoders, receivers, strict=True):
        for port in (*rx.init_ports, *rx.alloc_ports):
            other = owner.setdefault((rx.host, port), url)
            if other != url or (rx.init_ports + rx.alloc_ports).count(port) > 1:
                raise ValueError(
                    f"LMCache port {rx.host}:{port} is used twice (decoders {other} and {url}); "
                    "give each decoder its own lmcache init_ports/alloc_ports"
                )
    return receivers


def receiver_for(
    url: str, given: LMCacheReceiverConfig | None, taken: Sequence[Receiver]
) -> Receiver:
    """The receiver of a decoder joining at run time: what is given, with LMCache's convention
    for what is not (the lowest i whose init port 7300+i and alloc port 7400+i no decoder on that
    host uses). Raises ValueError when a given port is already used by another decoder."""
    given = given or LMCacheReceiverConfig()
    host = given.host or urlsplit(url).hostname or "127.0.0.1"
    used = {port for rx in taken if rx.host == host for port in (*rx.init_ports, *rx.alloc_ports)}
    if given.init_ports is not None and given.alloc_ports is not None:
        init, alloc = tuple(given.init_ports), tuple(given.alloc_ports)
    else:
        i = 0
        while DEFAULT_INIT_PORT + i in used or DEFAULT_ALLOC_PORT + i in used:
            i += 1
        init, alloc = (DEFAULT_INIT_PORT + i,), (DEFAULT_ALLOC_PORT + i,)
    clash = sorted(used & {*init, *alloc})
    if clash:
        raise ValueError(
            f"LMCache port(s) {', '.join(map(str, clash))} on {host} are used by another decoder; "
            "give this decoder its own lmcache init_ports/alloc_ports"
        )
    return Receiver(host, init, alloc)
