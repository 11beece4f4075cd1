"""Operating a live topology: the admin API under /admin, admission probes, the allow-list of
worker hosts, the durable state file, and the `pdproxy workers` command line.

Beside the request path, never in it: the only things the request path sees of this package
are the registry's atomic membership changes (proxy.control.registry).
"""
