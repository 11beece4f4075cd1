"""pdproxy with an oracle for its exact prefix index: the `combined-oracle` configuration of
benchmarks/goodput.py.

The proxy runs as `pdproxy serve` with KV events on, but every lookup of the exact index asks
each simulated engine what its prefix cache holds for the prompt at that moment
(`POST /_sim/prefix-cache`, the engine's own count, with no delay between a store and the
lookup) instead of the index built from the events. The subscribers still run: they say which
engines have events (only those are asked) and set `prefix_source`. The engines are asked
together, right after the planner has the prompt's token ids and before it looks them up (no
wait between the two), so this configuration's TTFT carries one more round trip to the engines
per request: its hit rate is the reference, not its latency. At every lookup it also asks the
index built from the events (this index is that one too) and tallies the two answers side by
side: `GET /oracle/tally`.

    python benchmarks/oracle_proxy.py serve --config FILE    # as `pdproxy serve`
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from fastapi.responses import JSONResponse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from proxy.app import ProxyApp, build_app
from proxy.cli import main as cli
from proxy.cli import serve
from proxy.config import ProxyConfig
from proxy.control.workers import Worker
from proxy.place.kvindex import KvIndex
from proxy.request import ClientRequest


@dataclass
class Tally:
    """The index from the events against the engines, at the same lookups."""

    lookups: int = 0  # (request, engine) pairs
    exact: int = 0  # where the index said what the engine held
    held_tokens: int = 0  # what the engines held, summed
    indexed_tokens: int = 0  # what the index said, summed
    over_tokens: int = 0  # tokens the index claimed beyond what was held


class OracleIndex(KvIndex):
    """Fed by the events like the index (it is that index too), answered by the engines."""

    def __init__(self) -> None:
        super().__init__()
        self.client = httpx.AsyncClient(timeout=10)
        self.tally = Tally()
        self.asked: dict[int, dict[str, int]] = {}  # id of the token ids -> what engines hold

    async def ask(self, tokens: Sequence[int]) -> None:
        """What every engine with events holds of `tokens`, asked at once; `cached` reads it."""
        urls = list(self.engines)
        body = {"token_ids": list(tokens)}
        answers = await asyncio.gather(
            *(self.client.post(url + "/_sim/prefix-cache", json=body) for url in urls)
        )
        held = {}
        for url, answer in zip(urls, answers, strict=True):
            answer.raise_for_status()
            held[url] = int(answer.json()["cached_tokens"])
        self.asked[id(tokens)] = held

    def cached(self, tokens: Sequence[int], urls: Iterable[str]) -> dict[str, int]:
        truth = self.asked.pop(id(tokens), {})
        wanted = [url for url in urls if url in self.engines and url in truth]
        indexed = super().cached(tokens, wanted)
        out: dict[str, int] = {}
        for url in wanted:
            held = out[url] = truth[url]
            said = indexed.get(url, 0)
            t = self.tally
            t.lookups += 1
            t.exact += said == held
            t.held_tokens += held
            t.indexed_tokens += said
            t.over_tokens += max(0, said - held)
        return out


BUILD = build_app


def build_oracle_app(config: ProxyConfig) -> ProxyApp:
    """The proxy `pdproxy serve` builds, its one exact index replaced by the oracle before the
    control plane starts its subscribers (they take the index from `kv_events`)."""
    app = BUILD(config)
    oracle = OracleIndex()
    app.plane.planner.kv_index = oracle
    app.control.kv_index = oracle
    if app.control.kv_events is not None:
        app.control.kv_events.index = oracle
    count = app.plane.planner.count

    async def count_and_ask(request: ClientRequest, worker: Worker) -> int | Sequence[int] | None:
        """The planner's count, then the engines asked about those token ids: the planner
        looks them up (`cached`) right after, with no wait between."""
        counted = await count(request, worker)
        if counted is not None and not isinstance(counted, int):
            await oracle.ask(counted)
        return counted

    app.plane.planner.count = count_and_ask

    async def tally() -> JSONResponse:
        return JSONResponse(dataclasses.asdict(oracle.tally))

    app.api.add_api_route("/oracle/tally", tally)
    return app


if __name__ == "__main__":
    serve.build_app = build_oracle_app
    sys.exit(cli.main(sys.argv[1:]))
