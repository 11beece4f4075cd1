"""Debian's chromium, headless, driven over its DevTools protocol (a websocket: aiohttp's client).

Nothing downloads a browser: `chromium` must be installed (apt-get install chromium). The
browser runs as its own process group with a fresh profile, and is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

FLAGS = (
    "--headless",
    "--no-sandbox",  # root in a container
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class BrowserError(RuntimeError):
    pass


class Page:
    """One tab: `evaluate` JavaScript, `wait_for` a condition, `screenshot`."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.console: list[str] = []  # console messages and uncaught exceptions
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._ws:
            data = message.json()
            future = self._pending.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                if "error" in data:
                    future.set_exception(BrowserError(str(data["error"])))
                else:
                    future.set_result(data.get("result", {}))
            elif data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"].get("args", [])
                self.console.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in args)
                )
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console.append("exception: " + str(data["params"]["exceptionDetails"]))

    async def send(self, method: str, **params: Any) -> Any:
        call = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call] = future
        await self._ws.send_json({"id": call, "method": method, "params": params})
        return await asyncio.wait_for(future, 30)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not true after {timeout:g}s: {expression}\n{self.console}")
            await asyncio.sleep(0.05)

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'")

    async def screenshot(self, width: int = 1400, height: int = 1000) -> bytes:
        """A PNG of the whole page at this viewport size."""
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        await asyncio.sleep(1.2)  # a tick of the feed at the new size
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        return base64.b64decode(shot["data"])

    async def close(self) -> None:
        self._reader.cancel()
        await self._ws.close()


class Browser:
    """`async with Browser() as browser: page = await browser.page()`."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self._profile = tempfile.TemporaryDirectory(prefix="pdproxy-chromium-")
        self._session: aiohttp.ClientSession | None = None
        self.endpoint = ""

    async def __aenter__(self) -> Browser:
        exe = chromium()
        if exe is None:
            raise BrowserError("chromium is not installed (apt-get install chromium)")
        log = Path(self._profile.name) / "stderr.log"
        self.proc = _launch([exe, *FLAGS, f"--user-data-dir={self._profile.name}/profile"], log)
        deadline = time.monotonic() + 30
        while not self.endpoint:
            found = re.search(rb"DevTools listening on ws://([\d.]+:\d+)/", log.read_bytes())
            if found:
                self.endpoint = "http://" + found.group(1).decode()
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                self._stop()
                raise BrowserError(f"chromium did not start:\n{log.read_text(errors='replace')}")
            else:
                await asyncio.sleep(0.1)
        self._session = aiohttp.ClientSession()
        return self

    async def page(self) -> Page:
        assert self._session is not None
        async with self._session.get(self.endpoint + "/json/list") as resp:
            targets = await resp.json(content_type=None)
        target = next(t for t in targets if t["type"] == "page")
        ws = await self._session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        page = Page(ws)
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        return page

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        self._stop()
        self._profile.cleanup()


def _launch(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as err:
        return subprocess.Popen(
            [*argv, "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
