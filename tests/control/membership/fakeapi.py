"""A Kubernetes API server for tests: pods in namespaces, on a real socket, in a thread.

It follows the parts of the API that the proxy's client and kubectl rely on: discovery (/api,
/api/v1, /apis, /version); list with `labelSelector` (equality, !=, exists, !exists) answering
the collection's resourceVersion; watch from a resourceVersion (events after it, then live
ones; `timeoutSeconds`; BOOKMARK events when `allowWatchBookmarks`), with an ERROR event of
status 410 Gone when that version is older than the history kept (`compact`); get, merge or
strategic-merge PATCH of labels and annotations, DELETE (deletionTimestamp first, the DELETED
event after `grace` seconds); Leases and ConfigMaps with optimistic concurrency
(tests.control.membership.fakeobjects). Tests change pods with `put`, `ready`, `compact`; `stop` and
`start` take the server away and bring it back on the same port.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from pdsim.launch import free_port
from tests.control.membership.fakeobjects import COORDINATION, Objects, error, resource

Obj = dict[str, Any]


def matches(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


FIXED: dict[str, Obj] = {
    "/version": {"major": "1", "minor": "32", "gitVersion": "v1.32.0"},
    "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [COORDINATION]},
}


def _fixed(body: Obj) -> Any:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response(body)

    return answer


class FakeApi:
    def __init__(self, grace: float = 0.3, bookmark_every: float = 1.0) -> None:
        self.grace = grace
        self.bookmark_every = bookmark_every
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.pods: dict[tuple[str, str], Obj] = {}
        self.rv = 100
        self.history: list[tuple[int, str, Obj]] = []
        self.oldest = 100  # a watch from before this version gets 410 Gone
        self.watches: set[asyncio.Queue[tuple[str, Obj] | None]] = set()
        self.requests: list[str] = []
        self.objects = Objects(status, self._next_version)  # Leases and ConfigMaps
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner: web.AppRunner | None = None
        self.start()

    # --- the thread ---

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self) -> None:
        self._call(self._start())

    def stop(self) -> None:
        """The API server is gone: its socket closes, every watch with it."""
        self._call(self._stop())

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()  # its self-pipe sockets too, rather than whenever the GC finds them

    async def _start(self) -> None:
        app = web.Application()
        for path, body in FIXED.items():
            app.router.add_get(path, _fixed(body))
        app.router.add_get("/api/v1", self._resources)
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._list)
        app.router.add_get("/api/v1/pods", self._list)
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}", self._get)
        app.router.add_patch("/api/v1/namespaces/{ns}/pods/{name}", self._patch)
        app.router.add_delete("/api/v1/namespaces/{ns}/pods/{name}", self._delete)
        self.objects.routes(app)
        app.middlewares.append(self._log)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        for queue in list(self.watches):
            queue.put_nowait(None)
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @web.middleware
    async def _log(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path_qs}")
        result: web.StreamResponse = await handler(request)
        return result

    def _next_version(self) -> int:
        self.rv += 1
        return self.rv

    # --- what tests do ---

    def put(
        self,
        name: str,
        labels: dict[str, str],
        port: int,
        ready: bool = True,
        annotations: dict[str, str] | None = None,
        namespace: str = "default",
        port_name: str = "http",
    ) -> None:
        pod: Obj = {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": f"uid-{name}-{self.rv}",
                "labels": labels,
                "annotations": annotations or {},
            },
            "spec": {
                "containers": [
                    {
                        "name": "engine",
                        "image": "vllm",
                        "ports": [{"name": port_name, "containerPort": port}],
                    }
                ]
            },
            "status": {"phase": "Running", "podIP": "127.0.0.1", "conditions": []},
        }
        self._set_ready(pod, ready)
        self.loop.call_soon_threadsafe(self._change, "ADDED", pod)

    def ready(self, name: str, ready: bool, namespace: str = "default") -> None:
        pod = copy.deepcopy(self.pods[namespace, name])
        self._set_ready(pod, ready)
        self.loop.call_soon_threadsafe(self._change, "MODIFIED", pod)

    def compact(self) -> None:
        """Forget the history: a watch resumed from any version seen so far gets 410 Gone; the
        open watches are closed (as an API server restarting its watch cache does)."""

        def forget() -> None:
            self.rv += 1
            self.oldest = self.rv
            self.history.clear()
            for queue in list(self.watches):
                queue.put_nowait(None)

        self.loop.call_soon_threadsafe(forget)

    @staticmethod
    def _set_ready(pod: Obj, ready: bool) -> None:
        pod["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]

    def _change(self, kind: str, pod: Obj) -> None:
        self.rv += 1
        pod = copy.deepcopy(pod)
        pod["metadata"]["resourceVersion"] = str(self.rv)
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        if kind == "DELETED":
            self.pods.pop(key, None)
        else:
            self.pods[key] = pod
        self.history.append((self.rv, kind, pod))
        for queue in list(self.watches):
            queue.put_nowait((kind, pod))

    # --- the API ---

    async def _resources(self, request: web.Request) -> web.Response:
        pods = {
            "name": "pods",
            "singularName": "pod",
            "namespaced": True,
            "kind": "Pod",
            "verbs": ["get", "list", "watch", "patch", "delete"],
            "shortNames": ["po"],
        }
        return web.json_response(
            {
                "kind": "APIResourceList",
                "groupVersion": "v1",
                "resources": [pods, resource("configmaps", "ConfigMap")],
            }
        )

    def _selected(self, request: web.Request, pod: Obj) -> bool:
        ns = request.match_info.get("ns")
        labels = pod["metadata"].get("labels") or {}
        selector = request.query.get("labelSelector", "")
        return (ns is None or pod["metadata"]["namespace"] == ns) and matches(selector, labels)

    async def _list(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") in ("true", "1"):
            return await self._watch(request)
        items = [p for p in self.pods.values() if self._selected(request, p)]
        return web.json_response(
            {
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.rv)},
                "items": items,
            }
        )

    async def _watch(self, request: web.Request) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or self.rv)
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        bookmarks = request.query.get("allowWatchBookmarks") == "true"
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)

        async def send(kind: str, obj: Obj) -> None:
            await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        if since < self.oldest:
            message = f"too old resource version: {since} ({self.oldest})"
            await send("ERROR", status(410, "Expired", message))
            return resp
        queue: asyncio.Queue[tuple[str, Obj] | None] = asyncio.Queue()
        for rv, kind, pod in self.history:
            if rv > since:
                queue.put_nowait((kind, pod))
        self.watches.add(queue)
        deadline = time.monotonic() + timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    item = await asyncio.wait_for(queue.get(), min(left, self.bookmark_every))
                except TimeoutError:
                    if bookmarks:
                        mark = {
                            "kind": "Pod",
                            "apiVersion": "v1",
                            "metadata": {"resourceVersion": str(self.rv)},
                        }
                        await send("BOOKMARK", mark)
                    continue
                if item is None:
                    break
                if self._selected(request, item[1]):
                    await send(*item)
        finally:
            self.watches.discard(queue)
        return resp

    def _find(self, request: web.Request) -> Obj | None:
        return self.pods.get((request.match_info["ns"], request.match_info["name"]))

    def _missing(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return error(status(404, "NotFound", f'pods "{name}" not found'))

    async def _get(self, request: web.Request) -> web.Response:
        pod = self._find(request)
        return self._missing(request) if pod is None else web.json_response(pod)

    async def _patch(self, request: web.Request) -> web.Response:
        pod = self._find(request)
        if pod is None:
            return self._missing(request)
        kind = request.headers.get("Content-Type", "")
        if "merge-patch" not in kind:
            message = f"patch type {kind} is not served here"
            return web.json_response(status(415, "UnsupportedMediaType", message), status=415)
        pod = copy.deepcopy(pod)
        meta = (await request.json()).get("metadata", {})
        for field in ("labels", "annotations"):
            for key, value in (meta.get(field) or {}).items():
                if value is None:
                    pod["metadata"].setdefault(field, {}).pop(key, None)
                else:
                    pod["metadata"].setdefault(field, {})[key] = value
        self._change("MODIFIED", pod)
        return web.json_response(self.pods[request.match_info["ns"], request.match_info["name"]])

    async def _delete(self, request: web.Request) -> web.Response:
        pod = self._find(request)
        if pod is None:
            return self._missing(request)
        pod = copy.deepcopy(pod)
        pod["metadata"]["deletionTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        pod["metadata"]["deletionGracePeriodSeconds"] = int(self.grace)
        self._change("MODIFIED", pod)
        self.loop.call_later(self.grace, self._change, "DELETED", pod)
        return web.json_response(pod)
