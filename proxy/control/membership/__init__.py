"""Where the workers come from, besides the configured lists, the workers state file and the
admin API (proxy.control.plane.initial_workers, proxy.control.admin): sources that watch
something outside the proxy and add and remove workers through the admin service, so that every
worker they bring passes the same admission probes and leaves by the same drain.

A source is chosen by `discovery.source`; `kubernetes` watches pods by label
(proxy.control.membership.kubernetes).
"""
