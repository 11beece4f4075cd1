"""The console in a real browser (Debian's chromium, headless): it loads, shows the workers,
adds a worker from the page, and streams an answer token by token with its timeline."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL, Proxy, Sim, running, start_proxy, start_sim
from tests.control.admin.helpers import Load, config_file
from tests.control.console.browser import Browser, chromium

pytestmark = pytest.mark.skipif(
    chromium() is None and not os.environ.get("PDPROXY_REQUIRE_BROWSER"),
    reason="needs Debian's chromium (apt-get install chromium)",
)

PROMPT = "Tell me about disaggregated prefill and decode."


@pytest.fixture(scope="module")
def slow(logs: Path) -> Iterator[dict[str, Sim]]:
    """A topology whose tokens come slowly enough to be seen arriving one by one."""
    started: dict[str, Sim] = {}
    try:
        for name, role in (("cp0", "prefill"), ("cd0", "decode"), ("cd1", "decode")):
            started[name] = start_sim(logs, name, "--speed-factor", "1", role=role)
        yield started
    finally:
        for sim in started.values():
            sim.stop()


def direct_answer(decoder: Sim, max_tokens: int) -> str:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
    }
    resp = httpx.post(decoder.url + "/v1/chat/completions", json=body, timeout=30)
    return str(resp.json()["choices"][0]["message"]["content"])


def test_console_shows_workers_adds_one_and_streams_an_answer(
    tmp_path: Path, slow: dict[str, Sim]
) -> None:
    p0, d0, d1 = slow["cp0"], slow["cd0"], slow["cd1"]
    for sim in slow.values():
        sim.reset()
    cfg = config_file(tmp_path)
    with running(start_proxy(tmp_path, [p0], [d0], "--config", cfg)) as proxy:
        assert isinstance(proxy, Proxy)
        with Load(proxy.url, clients=2, max_tokens=16):
            asyncio.run(drive(proxy.url, d1))
        expected = direct_answer(d0, 48)
        assert answer_seen["text"] == expected  # token for token what the decoder says
        assert len(set(answer_seen["lengths"])) >= 5  # the page grew as tokens came


answer_seen: dict[str, object] = {}


async def drive(url: str, joining: Sim) -> None:
    async with Browser() as browser:
        page = await browser.page()
        await page.navigate(url + "/console")
        await page.wait_for("document.querySelector('#status').textContent === 'live'")
        ids = await page.wait_for(
            "(() => { const w = [...document.querySelectorAll('.worker')].map(e => e.dataset.id);"
            " return w.length === 2 ? w : null })()"
        )
        assert ids == ["p0", "d0"]
        await page.wait_for("document.querySelectorAll('#requests tbody tr').length > 0")

        # add a worker from the page
        await page.evaluate(
            f"document.querySelector('#add-url').value = {joining.url!r};"
            "document.querySelector('#add-role').value = 'decode';"
            "document.querySelector('#add-button').click()"
        )
        result = await page.wait_for(
            "(t => t.includes('joined') || t.startsWith('admission') ? t : null)"
            "(document.querySelector('#add-result').textContent)",
            30,
        )
        assert "d1 joined as a decode worker" in result and "pulled the probe's KV" in result
        await page.wait_for(
            '!!document.querySelector(\'.worker[data-id="d1"][data-state="active"]\')'
        )

        # a streamed answer, watched as it grows
        await page.evaluate(
            "window.__lengths = [];"
            "new MutationObserver(() => __lengths.push(document.querySelector('#answer')"
            ".textContent.length)).observe(document.querySelector('#answer'),"
            " {childList: true, characterData: true, subtree: true});"
            f"document.querySelector('#prompt').value = {PROMPT!r};"
            "document.querySelector('#prompt-max').value = '48';"
            "document.querySelector('#send').click()"
        )
        await page.wait_for("document.querySelector('#answer').dataset.state === 'done'", 30)
        answer_seen["text"] = await page.evaluate("document.querySelector('#answer').textContent")
        answer_seen["lengths"] = await page.evaluate("window.__lengths")
        hops = await page.wait_for("document.querySelector('#answer-timeline pre')?.textContent")
        assert "prefill" in hops and "first token on d" in hops and "KV handoff" in hops
        await page.wait_for(
            "!!document.querySelector('#requests tbody tr[data-request-id^=\"console-\"]')"
        )
        await page.wait_for("document.querySelector('#counters').textContent.includes('KV pulled')")
        assert not [m for m in page.console if m.startswith("exception")], page.console
        await page.close()


POOL_PROMPT = " ".join(["the river turned toward the sea before the city knew its water"] * 50)


def test_console_shows_a_pool_its_leans_and_each_request_s_plan(
    tmp_path: Path, slow: dict[str, Sim], logs: Path
) -> None:
    engines = [start_sim(logs, f"cb{i}", "--speed-factor", "1") for i in range(2)]
    try:
        cfg = config_file(tmp_path, pool=[e.url for e in engines])
        with running(start_proxy(tmp_path, [], [], "--config", cfg)) as proxy:
            body = {"leans": {"b0": "prefill", "b1": "decode"}, "controller": "manual"}
            assert httpx.put(proxy.url + "/admin/pool", json=body).status_code == 200
            asyncio.run(watch_pool(proxy.url))
    finally:
        for sim in engines:
            sim.stop()


async def watch_pool(url: str) -> None:
    async with Browser() as browser:
        page = await browser.page()
        await page.navigate(url + "/console")
        await page.wait_for("document.querySelector('#status').textContent === 'live'")
        leans = await page.wait_for(
            "(() => { const w = [...document.querySelectorAll('#pool-workers .worker')]"
            ".map(e => e.dataset.id + ':' + e.dataset.lean); return w.length === 2 ? w : null })()"
        )
        assert leans == ["b0:prefill", "b1:decode"]
        assert await page.evaluate("document.querySelector('#pool-role').hidden") is False
        split = await page.evaluate("document.querySelector('#pool-split').textContent")
        assert "1 prefill : 1 decode" in split
        for prompt in ("hello", POOL_PROMPT):
            resp = await asyncio.to_thread(
                httpx.post,
                url + "/v1/completions",
                json={"model": MODEL, "prompt": prompt, "max_tokens": 8},
                timeout=30,
            )
            assert resp.status_code == 200
        plans = await page.wait_for(
            "(() => { const p = [...document.querySelectorAll('#requests tbody td.plan')]"
            ".map(e => e.textContent); return p.length >= 2 ? p : null })()"
        )
        assert plans[0].startswith("remote: long") and plans[1].startswith("local: short")
        assert not [m for m in page.console if m.startswith("exception")], page.console
        await page.close()
