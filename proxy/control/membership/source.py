"""The membership source interface, and the one `discovery.source` names."""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry

from proxy.control.admin.service import Admin
from proxy.control.membership.config import DiscoveryConfig


class MembershipSource(Protocol):
    async def start(self) -> None:
        """Begin watching; workers join as they prove themselves."""

    async def close(self) -> None:
        """Stop watching; the workers it brought stay as they are."""


def membership_source(
    config: DiscoveryConfig, admin: Admin, metrics: CollectorRegistry | None
) -> MembershipSource | None:
    """The source `config` names; None for `static` (nothing to watch)."""
    if config.source == "kubernetes":
        from proxy.control.membership.kubernetes import KubernetesSource

        return KubernetesSource(config, admin, metrics)
    return None
