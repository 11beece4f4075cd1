"""LMCache's "transfer done" notifications with `workers` > 1: each reaches the process that waits.

Every LMCache prefiller sends its `ProxyNotif(req_id)` to the one address its YAML names
(`pd_proxy_host:pd_proxy_port`), so one process binds it: the control process, as in one process
(its own admission probes wait there too). The request that waits is a serving process's, so:

    a serving process   names itself in the transfer ids it makes (`pdp-lmc-w2-<hex>`; the id is
                        the proxy's own, never the client's X-Request-Id), binds nothing, and
                        takes the notifications the control process relays (`Notifications.note`)
    the control process reads the socket; a notification whose id names a serving process goes
                        to that one over its channel (`{"t": "notes", "ids": [...]}`), any other
                        is matched against its own waiters (a probe's), as in one process

The channel is ordered and the waiter is registered before the prefill is sent, so a relayed
notification never comes before its waiter: nothing is buffered anywhere. A notification whose
process is gone (it died with its requests) or that names no process is the control process's
`unknown`, counted and dropped there; what a serving process matches, finds late or unknown is
counted there and reported (proxy.procs.report: `extra`), as are its waiting requests and
remembered ids, which the control process's gauges sum.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from prometheus_client import Counter

from proxy.engines.connectors.base import Connector
from proxy.engines.connectors.lmcache import TRANSFER_PREFIX, LMCacheConnector
from proxy.engines.connectors.lmcache_notify import Notifications
from proxy.procs.report import Intake, Reports

NOTES = "notes"  # the channel message
WAITING = "lmcache_waiting"
REMEMBERED = "lmcache_remembered"


def owner_of(req_id: str) -> str | None:
    """The serving process named in a transfer id (`w2` for `pdp-lmc-w2-...`), or None."""
    if not req_id.startswith(TRANSFER_PREFIX):
        return None
    name, sep, _ = req_id[len(TRANSFER_PREFIX) :].partition("-")
    return name if sep and name.startswith("w") else None


def counters(notifications: Notifications) -> dict[str, Counter]:
    """The notifications' counters by the names the reports carry them under."""
    metrics = notifications.metrics
    return {"lmcache_notifications": metrics.received, "lmcache_timeouts": metrics.timeouts}


def serving_side(connector: Connector, name: str, reports: Reports) -> Callable[..., None] | None:
    """In serving process `name`: the LMCache connector names it in its transfer ids, binds
    nothing, reports its counters and gauges; returns what takes a relayed message (None for
    another connector)."""
    if not isinstance(connector, LMCacheConnector):
        return None
    connector.transfer_prefix = f"{TRANSFER_PREFIX}{name}-"
    notifications = connector.notifications
    notifications.listen = False
    reports.extra.update(counters(notifications))
    reports.gauges[WAITING] = lambda: notifications.waiting
    reports.gauges[REMEMBERED] = lambda: notifications.remembered

    def take(message: dict[str, Any]) -> None:
        for req_id in message.get("ids", ()):
            notifications.note(str(req_id))

    return take


def control_side(
    connector: Connector,
    processes: Collection[str],
    send: Callable[[str, dict[str, Any]], bool],
    intake: Intake,
) -> None:
    """In the control process: relay to each serving process (by name, through `send`, False
    when its channel is down) the notifications of the transfers it made; take in their counts."""
    if not isinstance(connector, LMCacheConnector):
        return
    notifications = connector.notifications

    def relay(req_id: str) -> bool:
        owner = owner_of(req_id)
        if owner is None or owner not in processes:
            return False
        return send(owner, {"t": NOTES, "ids": [req_id]})

    notifications.relay = relay
    intake.extra.update(counters(notifications))
    metrics = notifications.metrics
    metrics.waiting.set_function(lambda: notifications.waiting + intake.gauge(WAITING))
    metrics.remembered.set_function(lambda: notifications.remembered + intake.gauge(REMEMBERED))
