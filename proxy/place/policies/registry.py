"""The policies by config name: `make_policy` is the only place that maps a name to a class.
A new policy is one module beside this one and one line here."""

from __future__ import annotations

from collections.abc import Callable

from proxy.place.policies.base import Policy, PolicyOptions
from proxy.place.policies.least_loaded import LeastLoaded
from proxy.place.policies.load_aware import LoadAware
from proxy.place.policies.prefix_aware import PrefixAware
from proxy.place.policies.round_robin import RoundRobin
from proxy.place.prefix import PrefixIndex


def make_policy(
    name: str, options: PolicyOptions | None = None, index: PrefixIndex | None = None
) -> Policy:
    """The policy `name`; `index`: the proxy's one prefix index, which prefix_aware shares."""
    opts = options or PolicyOptions()
    policies: dict[str, Callable[[], Policy]] = {
        "round_robin": RoundRobin,
        "least_loaded": LeastLoaded,
        "load_aware": lambda: LoadAware(opts.waiting_weight, opts.kv_high),
        "prefix_aware": lambda: PrefixAware(
            opts.balance_abs, opts.balance_rel, opts.waiting_weight, index
        ),
    }
    try:
        return policies[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(policies)}") from None
