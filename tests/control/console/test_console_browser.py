"""The console in a real browser (Debian's chromium, headless): it loads, shows the workers,
adds a worker from the page, and streams an answer token by token with its timeline."""

from __future__ import annotations

import asyncio
import json
import os
import time
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
        await page.wait_for(
            "document.querySelector('#counters').textContent.includes('KV handed over')"
        )
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
        assert plans[0].startswith("remote on b0: long")
        assert plans[1].startswith("local: short")
        assert not [m for m in page.console if m.startswith("exception")], page.console
        await page.close()


def completion(url: str, max_tokens: int) -> None:
    body = {"model": MODEL, "prompt": "tell me a story", "max_tokens": max_tokens}
    assert httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 200


def test_console_tells_the_truth(tmp_path: Path, slow: dict[str, Sim]) -> None:
    """What a new operator read wrong (issue 22): a history spike on the first tick, bars of
    their own scale, rows in finish order behind a start-time column, hops only on hover, a
    plan of "-", probe pulls counted as requests' pulls, failed probes not called failed, and
    LMCache port fields on a NIXL topology."""
    p0, d0, d1 = slow["cp0"], slow["cd0"], slow["cd1"]
    for sim in slow.values():
        sim.reset()
    cfg = config_file(tmp_path)
    with running(start_proxy(tmp_path, [p0], [d0], "--config", cfg)) as proxy:
        for _ in range(6):  # history before the page opens: at least a second old
            completion(proxy.url, 2)
        time.sleep(1.5)
        asyncio.run(read_truth(proxy.url, d1))


async def read_truth(url: str, joining: Sim) -> None:
    async with Browser() as browser:
        page = await browser.page()
        await page.navigate(url + "/console")
        await page.wait_for("document.querySelector('#status').textContent === 'live'")
        await page.wait_for("document.querySelectorAll('#requests tbody tr').length === 6")
        # the history filled the table but is no one second's traffic
        first_rate = await page.evaluate("charts.rate.data[0][0]")
        assert first_rate == 0, first_rate
        # and a real outlier does not set the scale of the whole window: 60 points of 50 ms
        # after one of 3 s draw on a scale of about 50 ms (the outlier clipped, marked)
        scale = await page.evaluate(
            "(() => { const c = new Chart(document.createElement('canvas'),"
            " [{name: 'p99', color: '#000'}]);"
            " for (const v of [3000, ...Array(60).fill(50)]) c.push([v]); return c.max })()"
        )
        assert 50 < scale <= 100, scale

        # a short and a long request, and a short one started after the long one ended:
        # ordered by start, on one axis
        for max_tokens in (40, 2):
            await asyncio.to_thread(completion, url, max_tokens)
        await page.wait_for("document.querySelectorAll('#requests tbody tr').length === 8")
        rows = await page.evaluate(
            "[...document.querySelectorAll('#requests tbody tr')].map(r => ({"
            " started: Number(r.dataset.started), total: Number(r.dataset.total),"
            " whole: parseFloat(r.querySelector('.seg.whole').style.width),"
            " plan: r.querySelector('td.plan').textContent,"
            " hops: r.querySelector('.hops-inline').textContent,"
            " hopsShown: r.querySelector('.hops-inline').offsetHeight > 0 }))"
        )
        starts = [r["started"] for r in rows]
        assert starts == sorted(starts, reverse=True)
        scale = float(await page.evaluate("document.querySelector('#requests').dataset.scale"))
        assert scale >= max(r["total"] for r in rows)
        for r in rows:  # each bar as long as its request on the common axis
            assert abs(r["whole"] - 100 * r["total"] / scale) < 1.0, (r, scale)
        long_row, short_row = rows[1], rows[0]
        assert long_row["whole"] > 4 * short_row["whole"]
        axis = await page.evaluate("document.querySelector('#timeline-axis').textContent")
        assert axis.startswith("0") and ("ms" in axis or " s" in axis)
        for r in rows:
            assert r["hopsShown"] and "prefill" in r["hops"] and "decode" in r["hops"], r
            assert r["plan"].startswith("remote"), r  # every prompt went to the prefiller

        # NIXL: no LMCache port fields
        for field in ("#add-init-ports", "#add-alloc-ports"):
            assert await page.evaluate(f"document.querySelector('{field}').offsetParent") is None

        # a probe that fails (nothing listens there), then one that passes and pulls KV
        for target in ("http://127.0.0.1:9", joining.url):
            await page.evaluate(
                f"document.querySelector('#add-url').value = {target!r};"
                "document.querySelector('#add-button').click()"
            )
            await page.wait_for("!document.querySelector('#add-result').textContent"
                                ".startsWith('probing')", 30)  # fmt: skip
        joined = await page.wait_for(
            "(w => w && w.dataset.id)([...document.querySelectorAll('.worker')]"
            f".find(e => e.querySelector('.url').textContent.startsWith({joining.url!r})))"
        )  # (its id: d1, or the next one if a refused add used that up)

        def counter(name: str) -> str:
            """A JavaScript expression: the text of the counters' row named `name`."""
            return (
                "(r => r ? r.textContent : '')([...document.querySelectorAll('#counters tr')]"
                f".find(r => r.cells[0].textContent === {json.dumps(name)}))"
            )

        await page.wait_for(f"{counter('admission probes')}.includes('failed')")
        probes = await page.evaluate(counter("admission probes"))
        assert "passed 1; failed 1 (at reachable 1)" in probes, probes
        handed = await page.evaluate(counter("KV handed over (requests)"))
        assert f"{joined} 0" in handed and "d0 8" in handed, (
            handed
        )  # the probe's pull: no request's
        engines = counter("engines' NIXL pulls (with probes')")
        pulls = await page.wait_for(f"(t => t.includes('{joined} 1') && t)({engines})")
        assert f"{joined} 1" in pulls
        assert not [m for m in page.console if m.startswith("exception")], page.console
        await page.close()


def test_console_without_the_admin_key_asks_for_it_calmly(
    tmp_path: Path, slow: dict[str, Sim], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PDPROXY_TEST_CONSOLE_KEY", "k1")
    cfg = config_file(tmp_path, auth={"admin_keys_env": "PDPROXY_TEST_CONSOLE_KEY"})
    with running(start_proxy(tmp_path, [slow["cp0"]], [slow["cd0"]], "--config", cfg)) as proxy:
        asyncio.run(ask_for_key(proxy.url))


async def ask_for_key(url: str) -> None:
    async with Browser() as browser:
        page = await browser.page()
        await page.navigate(url + "/console")
        await page.wait_for("document.querySelector('#status').textContent === 'admin key needed'")
        note = await page.wait_for(
            "(n => n.offsetHeight > 0 && n.textContent)(document.querySelector('#feed-note'))"
        )
        assert "admin key" in note and "Bearer" not in note
        # nothing under "Add a worker", where a failed add is reported in red
        assert await page.evaluate("document.querySelector('#add-result').textContent") == ""
        await page.evaluate(
            "document.querySelector('#admin-key').value = 'k1';"
            "document.querySelector('#keys button').click()"
        )
        await page.wait_for("document.querySelector('#status').textContent === 'live'", 10)
        assert await page.evaluate("document.querySelector('#feed-note').offsetHeight") == 0
        await page.close()
