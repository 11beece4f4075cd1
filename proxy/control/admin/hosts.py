"""Which hosts a worker added at run time may live on, so that the admin API cannot be used to
make the proxy send requests to arbitrary hosts.

Entries are host names (matched exactly, case-insensitively, never resolved: a name matches only
a URL that uses that name) or IP networks in CIDR form (`10.0.0.0/8`; a bare address is a /32 or
/128), matched against URLs whose host is an IP literal.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK = ("localhost", "127.0.0.0/8", "::1/128")


def parse_entry(entry: str) -> str | Network:
    text = entry.strip()
    if not text:
        raise ValueError("an empty entry in admin.allowed_worker_hosts")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    if "/" in text or ":" in text or any(c.isspace() for c in text):
        raise ValueError(f"admin.allowed_worker_hosts: {entry!r} is neither a host name nor a CIDR")
    return text.lower().rstrip(".")


def is_loopback(host: str) -> bool:
    """Whether a listen address is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class HostAllowList:
    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = tuple(dict.fromkeys(e.strip() for e in entries))
        parsed = [parse_entry(e) for e in self.entries]
        self._names = {p for p in parsed if isinstance(p, str)}
        self._networks = [p for p in parsed if not isinstance(p, str)]

    @classmethod
    def default(cls, urls: Iterable[str]) -> HostAllowList:
        """The hosts of the configured workers, and loopback."""
        hosts = []
        for url in urls:
            host = urlsplit(url).hostname
            if host:
                hosts.append(host)
        return cls([*hosts, *LOOPBACK])

    def allows(self, url: str) -> bool:
        host = (urlsplit(url).hostname or "").lower().rstrip(".")
        if not host:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return host in self._names
        return host in self._names or any(address in net for net in self._networks)

    def __repr__(self) -> str:
        return f"<HostAllowList {', '.join(self.entries)}>"
