"""The README's screenshot of the console under load.

    .venv/bin/python -m tests.control.console.screenshot docs/console.png

Simulated 2P2D engines (H100-like timing, prefix caching), a mixed streaming load, a third
decoder added from the page; after `--seconds` of traffic, a PNG of the whole page.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import threading
import time
from pathlib import Path

import httpx

from pdsim.launch import start_proxy, start_sim
from tests.control.console.browser import Browser

MODEL = "pdsim/llama-8b"
SYSTEM = "You are a support assistant for a travel company. Answer briefly and politely. " * 6


def load(url: str, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=60) as http:
        while not stop.is_set():
            question = f"question {rng.randrange(10_000)} about " + "bookings " * rng.randrange(60)
            body = {
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": question},
                ],
                "max_tokens": rng.randrange(16, 160),
                "stream": True,
            }
            try:
                with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
                    resp.read()
            except httpx.HTTPError:
                pass
            time.sleep(rng.random() * 0.2)


async def shoot(url: str, joining: str, seconds: float) -> bytes:
    async with Browser() as browser:
        page = await browser.page()
        await page.navigate(url + "/console")
        await page.wait_for("document.querySelector('#status').textContent === 'live'")
        await asyncio.sleep(seconds / 2)
        await page.evaluate(
            f"document.querySelector('#add-url').value = {joining!r};"
            "document.querySelector('#add-button').click()"
        )
        await page.wait_for("document.querySelector('#add-result').textContent.includes('joined')")
        await asyncio.sleep(seconds / 2)
        await page.evaluate(
            "document.querySelector('#prompt').value = 'What does disaggregated serving change?';"
            "document.querySelector('#send').click()"
        )
        await page.wait_for("document.querySelector('#answer').dataset.state === 'done'", 60)
        await asyncio.sleep(1.5)
        png: bytes = await page.screenshot(width=1280, height=900)
        await page.close()
        return png


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seconds", type=float, default=40.0, help="of load before the shot")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pdproxy-shot-") as tmp:
        logs = Path(tmp)
        engine = ("--model", MODEL, "--enable-prefix-caching")
        sims = [start_sim("prefill", *engine, log=logs / f"p{i}.log") for i in range(2)]
        sims += [start_sim("decode", *engine, log=logs / f"d{i}.log") for i in range(3)]
        proxy = start_proxy(
            [s.url for s in sims[:2]],
            [s.url for s in sims[2:4]],
            "--stats-interval",
            "0",
            "--decode-policy",
            "load_aware",
            log=logs / "proxy.log",
        )
        stop = threading.Event()
        threads = [threading.Thread(target=load, args=(proxy.url, stop, i)) for i in range(12)]
        try:
            for thread in threads:
                thread.start()
            args.out.write_bytes(asyncio.run(shoot(proxy.url, sims[4].url, args.seconds)))
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
            proxy.stop()
            for sim in sims:
                sim.stop()
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
