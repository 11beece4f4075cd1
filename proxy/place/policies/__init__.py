"""Choosing a worker: pure functions of a snapshot of the workers and the request.

A policy never does I/O and never mutates a worker; it returns the index of its choice, or None when
no worker is available. Workers come and go between two choices (proxy.registry): a policy's own
state is keyed by what stays true of a worker (its URL), and `forget` drops it when one leaves.
One policy per module; the interface is in base.py, and `make_policy` (registry.py) is the only
place that maps a config name to a class.
"""

from proxy.place.policies.base import Policy, PolicyOptions, RequestInfo
from proxy.place.policies.registry import make_policy

__all__ = ["Policy", "PolicyOptions", "RequestInfo", "make_policy"]
