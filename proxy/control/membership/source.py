"""The membership source interface, and the one `discovery.source` names."""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry

from proxy.config import ConfigError
from proxy.control.admin.service import Admin
from proxy.control.membership.config import DiscoveryConfig
from proxy.control.pool import PoolController


class MembershipSource(Protocol):
    async def start(self) -> None:
        """Begin watching; workers join as they prove themselves."""

    async def close(self) -> None:
        """Stop watching; the workers it brought stay as they are."""


def membership_source(
    config: DiscoveryConfig,
    admin: Admin,
    metrics: CollectorRegistry | None,
    pool: PoolController | None = None,
) -> MembershipSource | None:
    """The source `config` names; None for `static` (nothing to watch)."""
    if config.source == "kubernetes":
        try:  # an optional dependency: only this source needs it
            from proxy.control.membership.kubernetes import KubernetesSource
        except ImportError as exc:
            raise ConfigError(
                f"discovery.source kubernetes needs the 'kubernetes' extra (pip install "
                f"'pdproxy[kubernetes]'): {exc}"
            ) from None
        return KubernetesSource(config, admin, metrics, pool)
    return None
