"""Leases and ConfigMaps for the fake API server (tests.control.membership.fakeapi).

Create (POST: 409 AlreadyExists when the name is taken), get, list, and replace (PUT) with
optimistic concurrency: a replace whose metadata.resourceVersion is not the stored one is
answered 409 Conflict, as the API server does; each write gets a new resourceVersion.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

Obj = dict[str, Any]

# (API path prefix, plural, kind, apiVersion)
KINDS = (
    ("/apis/coordination.k8s.io/v1", "leases", "Lease", "coordination.k8s.io/v1"),
    ("/api/v1", "configmaps", "ConfigMap", "v1"),
)

COORDINATION = {
    "name": "coordination.k8s.io",
    "versions": [{"groupVersion": "coordination.k8s.io/v1", "version": "v1"}],
    "preferredVersion": {"groupVersion": "coordination.k8s.io/v1", "version": "v1"},
}


def resource(plural: str, kind: str) -> Obj:
    return {
        "name": plural,
        "singularName": kind.lower(),
        "namespaced": True,
        "kind": kind,
        "verbs": ["create", "get", "list", "update", "delete"],
    }


def error(status: Obj) -> web.Response:
    """A Status answer, typed as the API server types it (clients match the content type
    exactly: lightkube reads the Status only from `application/json`)."""
    body = json.dumps(status).encode()
    return web.Response(
        body=body, status=status["code"], headers={"Content-Type": "application/json"}
    )


class Objects:
    """Named objects by (plural, namespace, name), versions from `next_version`."""

    def __init__(self, status: Callable[[int, str, str], Obj], next_version: Callable[[], int]):
        self.items: dict[tuple[str, str, str], Obj] = {}
        self.status = status
        self.next_version = next_version
        self.conflicts = 0  # 409s answered, for the tests to read

    def routes(self, app: web.Application) -> None:
        app.router.add_get(
            "/apis/coordination.k8s.io/v1",
            self._answer(
                {
                    "kind": "APIResourceList",
                    "groupVersion": "coordination.k8s.io/v1",
                    "resources": [resource("leases", "Lease")],
                }
            ),
        )
        for prefix, plural, kind, version in KINDS:
            base = f"{prefix}/namespaces/{{ns}}/{plural}"
            app.router.add_get(base, self._list(plural, kind, version))
            app.router.add_post(base, self._create(plural, kind, version))
            app.router.add_get(base + "/{name}", self._get(plural))
            app.router.add_put(base + "/{name}", self._replace(plural, kind, version))

    @staticmethod
    def _answer(body: Obj) -> Any:
        async def answer(request: web.Request) -> web.Response:
            return web.json_response(body)

        return answer

    async def _body(self, request: web.Request) -> Obj | None:
        """A JSON body; None for another encoding (kubectl's generators send protobuf)."""
        if "json" not in request.headers.get("Content-Type", ""):
            return None
        body: Obj = await request.json()
        return body

    def _unreadable(self, request: web.Request) -> web.Response:
        kind = request.headers.get("Content-Type", "")
        return self._error(415, "UnsupportedMediaType", f"{kind} is not served here: send JSON")

    def _error(self, code: int, reason: str, message: str) -> web.Response:
        return error(self.status(code, reason, message))

    def _list(self, plural: str, kind: str, version: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            ns = request.match_info["ns"]
            items = [o for (p, n, _), o in self.items.items() if p == plural and n == ns]
            meta = {"resourceVersion": str(self.next_version())}
            body = {"kind": f"{kind}List", "apiVersion": version, "metadata": meta}
            return web.json_response({**body, "items": items})

        return handle

    def _get(self, plural: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            key = (plural, request.match_info["ns"], request.match_info["name"])
            found = self.items.get(key)
            if found is None:
                message = f'{plural} "{key[2]}" not found'
                return self._error(404, "NotFound", message)
            return web.json_response(found)

        return handle

    def _store(self, body: Obj, plural: str, kind: str, version: str, ns: str) -> Obj:
        obj = copy.deepcopy(body)
        obj["kind"], obj["apiVersion"] = kind, version
        meta = obj.setdefault("metadata", {})
        meta["namespace"] = ns
        meta["resourceVersion"] = str(self.next_version())
        meta.setdefault("uid", f"uid-{plural}-{meta['name']}")
        self.items[plural, ns, meta["name"]] = obj
        return obj

    def _create(self, plural: str, kind: str, version: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            ns = request.match_info["ns"]
            body = await self._body(request)
            if body is None:
                return self._unreadable(request)
            name = body.get("metadata", {}).get("name")
            if (plural, ns, name) in self.items:
                self.conflicts += 1
                message = f'{plural} "{name}" already exists'
                return self._error(409, "AlreadyExists", message)
            return web.json_response(self._store(body, plural, kind, version, ns), status=201)

        return handle

    def _replace(self, plural: str, kind: str, version: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            ns, name = request.match_info["ns"], request.match_info["name"]
            body = await self._body(request)
            if body is None:
                return self._unreadable(request)
            # looked up after the body is read, with no await until it is stored: the check and
            # the write are one step, as the API server's are
            found = self.items.get((plural, ns, name))
            if found is None:
                return self._error(404, "NotFound", f'{plural} "{name}" not found')
            wanted = body.get("metadata", {}).get("resourceVersion")
            if wanted and wanted != found["metadata"]["resourceVersion"]:
                self.conflicts += 1
                message = (
                    f'Operation cannot be fulfilled on {plural} "{name}": the object has been '
                    "modified; please apply your changes to the latest version and try again"
                )
                return self._error(409, "Conflict", message)
            return web.json_response(self._store(body, plural, kind, version, ns))

        return handle
