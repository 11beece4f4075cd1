"""`pdproxy workers list|add|remove`: the admin API from a shell.

    pdproxy workers list [--json]
    pdproxy workers add --role decode http://10.0.0.7:8200 [--force] [--lmcache-init-port P ...]
    pdproxy workers remove d1 [--wait] [--force]

`--proxy URL` names the proxy (default http://127.0.0.1:9100; `host:port` means http://); the
admin key is read from the variable `--admin-key-env` names (default PDPROXY_ADMIN_KEY), never
from the command line. A refusal exits 1 with the proxy's reason, in the CLI's words where the
proxy's are written for HTTP clients (a missing key names the variable, an unknown worker
`pdproxy workers list`); a proxy that cannot be reached, a `--proxy` that is not a URL and an
address where something other than a pdproxy answers (an engine) exit 2. Output cut short by its
reader (`| head`) ends quietly, exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_PROXY = "http://127.0.0.1:9100"


class Refused(Exception):
    """The proxy answered with an error; the message is its reason."""


class Unreachable(Exception):
    """No pdproxy to talk to: nothing answers, `--proxy` is not a URL, or what answers is not a
    pdproxy."""


def proxy_url(value: str) -> str:
    """The proxy's base URL from `--proxy`: `host:port` means http://host:port."""
    text = value.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    try:
        parts.port  # noqa: B018 - raises on an invalid port
    except ValueError:
        parts = parts._replace(netloc="")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Unreachable(
            f"--proxy {value!r} is not the proxy's address: give http://HOST:PORT (or HOST:PORT), "
            f"e.g. {DEFAULT_PROXY}"
        )
    return text.rstrip("/")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--proxy", default=DEFAULT_PROXY, help=f"default {DEFAULT_PROXY}")
    common.add_argument(
        "--admin-key-env",
        default="PDPROXY_ADMIN_KEY",
        metavar="VAR",
        help="environment variable holding the admin key (default PDPROXY_ADMIN_KEY)",
    )
    common.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", parents=[common], help="every worker and its state")
    listing.add_argument("--json", action="store_true", help="the API's JSON, not a table")
    add = actions.add_parser("add", parents=[common], help="probe a worker, then route to it")
    add.add_argument("url", help="the engine's base URL, e.g. http://10.0.0.7:8200")
    add.add_argument("--role", choices=("prefill", "decode", "pool"), required=True)
    add.add_argument("--force", action="store_true", help="skip the admission probes (logged)")
    add.add_argument("--lmcache-host", help="connector lmcache: the decoder's receiver host")
    add.add_argument(
        "--lmcache-init-port", type=int, action="append", help="one per decoder TP rank"
    )
    add.add_argument(
        "--lmcache-alloc-port", type=int, action="append", help="one per decoder TP rank"
    )
    remove = actions.add_parser("remove", parents=[common], help="drain a worker, then remove it")
    remove.add_argument("worker", metavar="ID_OR_URL")
    remove.add_argument("--force", action="store_true", help="even the last one of its role")
    remove.add_argument("--wait", action="store_true", help="return once it is removed")


def call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    headers = {"Accept": "application/json"}
    key = os.environ.get(args.admin_key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    base = proxy_url(args.proxy)
    request = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unreachable(f"cannot reach the proxy at {base}: {reason}") from None
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if status < 400 and isinstance(answer, dict):
        return answer
    error = answer.get("error") if isinstance(answer, dict) else None
    if not (isinstance(error, dict) and isinstance(error.get("message"), str)):
        # not the proxy's OpenAI-shaped error, nor its JSON: an engine, or another server
        shown = raw.decode("utf-8", "replace").strip()[:120] or "nothing"
        raise Unreachable(
            f"{base} is not a pdproxy: {method} {path} answered {status} {shown} (is --proxy "
            "the proxy's address, not an engine's?)"
        )
    raise Refused(_in_cli_words(args, status, error))


def _in_cli_words(args: argparse.Namespace, status: int, error: dict[str, Any]) -> str:
    """The proxy's reason, said for a shell user where the proxy says it for HTTP clients."""
    if status == 401:
        if not os.environ.get(args.admin_key_env):
            return (
                f"the proxy needs its admin key: set {args.admin_key_env} "
                f"(export {args.admin_key_env}=KEY, or name another variable with --admin-key-env)"
            )
        return f"the proxy refused the admin key in {args.admin_key_env} ({error['message']})"
    if error.get("code") == "worker_not_found":
        return f"{error['message'].split(';')[0]}; `pdproxy workers list` lists them"
    return f"{status}: {error['message']}"


def _load(worker: dict[str, Any]) -> tuple[str, str, str]:
    load = worker.get("engine_load")
    if not load:
        return "-", "-", "-"
    return f"{load['running']:g}", f"{load['waiting']:g}", f"{load['kv_usage'] * 100:.0f}%"


def _probe(worker: dict[str, Any]) -> str:
    probe = worker.get("last_probe")
    if not probe:
        return "-"
    if probe.get("passed"):
        return "passed"
    failed = [c for c in probe.get("checks", []) if not c.get("ok")]
    return f"failed {failed[0]['name']}" if failed else "running"


def table(workers: list[dict[str, Any]]) -> str:
    head = ("ID", "ROLE", "STATE", "HEALTH", "BREAKER", "INFLIGHT", "RUN", "WAIT", "KV", "PROBE")
    rows = [(*head, "MODEL", "URL")]
    for w in workers:
        running, waiting, kv = _load(w)
        rows.append(
            (
                w["id"],
                w["role"],
                w["state"],
                w["health"],
                w["breaker"],
                str(w["inflight"]),
                running,
                waiting,
                kv,
                _probe(w),
                w.get("model") or "-",
                w["url"],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _add(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"url": args.url, "role": args.role}
    if args.force:
        body["force"] = True
    lmcache = {
        "host": args.lmcache_host,
        "init_ports": args.lmcache_init_port,
        "alloc_ports": args.lmcache_alloc_port,
    }
    if any(v is not None for v in lmcache.values()):
        body["lmcache"] = {k: v for k, v in lmcache.items() if v is not None}
    worker = call(args, "POST", "/admin/workers", body)
    checks = (worker.get("last_probe") or {}).get("checks") or []
    for check in checks:
        print(f"  {check['name']:<10} {check['detail']} ({check['seconds'] * 1000:.0f} ms)")
    how = "without probes (force)" if args.force else "after its probes"
    print(f"{worker['id']} joined as a {worker['role']} worker {how}: {worker['url']}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    key = urllib.parse.quote(args.worker, safe="")
    query = "?force=true" if args.force else ""
    worker = call(args, "DELETE", f"/admin/workers/{key}{query}", None)
    print(f"{worker['id']} ({worker['url']}) is {worker['state']}: {worker['inflight']} in flight")
    if args.wait:
        deadline = time.monotonic() + args.timeout
        while worker["state"] != "removed":
            if time.monotonic() > deadline:
                raise Refused(f"{worker['id']} still {worker['state']} after {args.timeout:g} s")
            time.sleep(0.2)
            worker = call(args, "GET", f"/admin/workers/{worker['id']}")
        print(f"{worker['id']} removed")
    return 0


def _list(args: argparse.Namespace) -> int:
    answer = call(args, "GET", "/admin/workers")
    data = answer.get("data")
    if not isinstance(data, list):
        raise Unreachable(
            f"{proxy_url(args.proxy)} is not a pdproxy: GET /admin/workers answered without a "
            "list of workers (is --proxy the proxy's address, not an engine's?)"
        )
    print(json.dumps(data, indent=2) if args.json else table(data))
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "list":
            status = _list(args)
        elif args.action == "add":
            status = _add(args)
        else:
            status = _remove(args)
        sys.stdout.flush()  # here, where a reader that left (`| head`) can be caught
        return status
    except BrokenPipeError:
        # the reader has what it wanted; stdout is gone, so nothing more may be written to it
        # (Python's own flush at exit would fail again)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Refused as exc:
        print(f"pdproxy workers {args.action}: refused: {exc}", file=sys.stderr)
        return 1
    except Unreachable as exc:
        print(f"pdproxy workers {args.action}: {exc}", file=sys.stderr)
        return 2
