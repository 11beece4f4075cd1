"""Which engine a URL names: two workers of clashing roles must never be one engine.

A URL is compared by what it reaches, not by how it is spelled, in three ways:

    spelling    scheme, host and port, normalized: `HTTP://Host.:80/` is `http://host`, an IPv6
                literal in its compressed form
    addresses   the (address, port) pairs its host resolves to; every address of this machine
                (loopback, 127.0.0.0/8, ::1, and the addresses of its interfaces) counts as one,
                "this machine": `localhost`, `127.0.0.1` and `[::1]` with the same port reach
                the same listener (a server bound to all addresses, vLLM's default), and two
                servers cannot both listen on one port of all addresses
    engine id   what the engine reports about itself: the NIXL engine id (vLLM's
                `kv_transfer_config.engine_id`, a fresh UUID per engine unless set, `_dp<rank>`
                appended per data-parallel rank) in the `remote_engine_id` of the
                `kv_transfer_params` its prefills return; this catches two URLs that reach one
                engine through different addresses (a port forward, a service name), once the
                admission probe has seen its prefill

Roles clash when they are the same, or one of them is the pool (an engine is either dedicated
or in the pool). A prefiller and a decoder may be the same engine (kv_both).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

LOCAL = "this machine"
DEFAULT_PORTS = {"http": 80, "https": 443}

Address = tuple[str, int]  # (an IP address or LOCAL, port)


def url_key(url: str) -> tuple[str, str, int]:
    """The URL's scheme, host and port, normalized (its spelling, not what it reaches)."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    with contextlib.suppress(ValueError):
        host = ipaddress.ip_address(host).compressed
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, host, port if port is not None else DEFAULT_PORTS.get(scheme, 0)


def roles_clash(a: str, b: str) -> bool:
    """Whether one engine may not serve both roles (as two workers)."""
    return a == b or "pool" in (a, b)


def _is_local(ip: str) -> bool:
    """Loopback, unspecified (which reaches this machine), or an address of one of its
    interfaces (one a socket can bind)."""
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if address.is_loopback or address.is_unspecified:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((ip, 0))
    except OSError:
        return False
    return True


def _addresses(infos: Iterable[tuple[object, ...]], port: int) -> frozenset[Address]:
    found = set()
    for info in infos:
        ip = str(info[4][0])  # type: ignore[index]
        found.add((LOCAL if _is_local(ip) else ipaddress.ip_address(ip).compressed, port))
    return frozenset(found)


async def resolve(url: str) -> frozenset[Address]:
    """What `url` reaches, resolved with the running loop's getaddrinfo; empty when its host
    cannot be resolved (the admission probe then says it is unreachable)."""
    _, host, port = url_key(url)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return frozenset()
    return _addresses(infos, port)


def resolve_now(url: str) -> frozenset[Address]:
    """`resolve`, blocking (for start-up checks)."""
    _, host, port = url_key(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return frozenset()
    return _addresses(infos, port)


def describe(addresses: Iterable[Address]) -> str:
    """`this machine's port 8100`, `10.0.0.7:8200`, ..."""
    out = []
    for ip, port in sorted(addresses):
        if ip == LOCAL:
            out.append(f"{LOCAL}'s port {port}")
        else:
            out.append(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    return ", ".join(out)


def same_engine(
    a_url: str,
    b_url: str,
    a_addresses: frozenset[Address] = frozenset(),
    b_addresses: frozenset[Address] = frozenset(),
    a_engine_ids: Iterable[str] = (),
    b_engine_ids: Iterable[str] = (),
) -> str | None:
    """Why the two URLs are one engine (for a message), or None when nothing says they are."""
    if url_key(a_url) == url_key(b_url):
        return "the same URL" if a_url.rstrip("/") == b_url.rstrip("/") else "the same address"
    shared_ids = set(a_engine_ids) & set(b_engine_ids)
    if shared_ids:
        return (
            f"both report NIXL engine id {sorted(shared_ids)[0]} (one engine behind two "
            "addresses; or two engines given one kv_transfer_config engine_id, which NIXL "
            "cannot tell apart)"
        )
    shared = a_addresses & b_addresses
    if shared:
        return f"both reach {describe(shared)}"
    return None


def duplicates(
    workers: Iterable[tuple[str, str]], resolve_hosts: bool = True
) -> list[tuple[int, int, str]]:
    """Pairs of (role, url) that are one engine in clashing roles: (i, j, why), i < j."""
    listed = list(workers)
    addresses = [resolve_now(url) if resolve_hosts else frozenset() for _, url in listed]
    found = []
    for j, (role_j, url_j) in enumerate(listed):
        for i in range(j):
            role_i, url_i = listed[i]
            if not roles_clash(role_i, role_j):
                continue
            why = same_engine(url_i, url_j, addresses[i], addresses[j])
            if why is not None:
                found.append((i, j, why))
                break
    return found
