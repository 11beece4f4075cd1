"""The live web console at /console: a page shipped in this package (static/: HTML, CSS and
JavaScript, no build step, nothing fetched from elsewhere) and the event stream that feeds it.

    GET /console              the page (its data needs the admin key, which the page asks for)
    GET /console/{file}       its static files
    GET /console/events       server-sent events: one snapshot (proxy.control.console.feed) per tick

The page reads the stream with fetch() so that it can send `Authorization: Bearer <admin key>`
(an EventSource cannot), and calls the admin API and /v1/chat/completions like any client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from importlib import resources
from time import monotonic

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from proxy.control.console.feed import ConsoleFeed
from proxy.errors import NotFound

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}


def static_files() -> dict[str, tuple[bytes, str]]:
    """Every file shipped in static/, by name, read once (nothing else can be served)."""
    files = {}
    for entry in resources.files(__package__).joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in TYPES:
            files[entry.name] = (entry.read_bytes(), TYPES[suffix])
    return files


def add_console_routes(api: FastAPI, feed: ConsoleFeed, draining: Callable[[], bool]) -> None:
    files = static_files()
    admin = feed.admin
    headers = {"cache-control": "no-cache", "x-content-type-options": "nosniff"}

    def serve(name: str) -> Response:
        found = files.get(name)
        if found is None:
            raise NotFound(f"no console file {name!r}")
        body, media_type = found
        return Response(body, media_type=media_type, headers=headers)

    @api.get("/console")
    async def page() -> Response:
        admin.check_served()
        return serve("index.html")

    @api.get("/console/events")
    async def events(request: Request, since: int = 0) -> StreamingResponse:
        admin.guard(request.scope["headers"])

        async def stream() -> AsyncIterator[bytes]:
            seen, last = since, None
            feed.watchers += 1
            try:
                while not draining():
                    now = monotonic()
                    # the first tick has no last one: what it sends is history, not a tick
                    seen, snapshot = await feed.snapshot(seen, None if last is None else now - last)
                    last = now
                    yield b"data: " + orjson.dumps(snapshot) + b"\n\n"
                    await asyncio.sleep(feed.interval)
            finally:
                feed.watchers -= 1

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    @api.get("/console/{name}")
    async def asset(name: str) -> Response:
        admin.check_served()
        return serve(name)
