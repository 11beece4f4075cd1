"""The per-request plan of the pool: a table of snapshots and the choice each must give."""

from __future__ import annotations

import pytest

from proxy.place.pool import Choice, EngineView, Job, Rules, plan

P = EngineView("pool", "prefill")
D = EngineView("pool", "decode")
# one engine computes 10000 prompt tokens/s; a prompt may wait 0.8 s of them on a prefill engine
RULES = Rules(
    "adaptive",
    min_prefill_tokens=512,
    local_max_tokens=4,
    prefill_tokens_per_second=10000,
    max_prefill_wait=0.8,
)


def pool(*engines: EngineView) -> list[EngineView]:
    return list(engines)


def with_(e: EngineView, **changes: object) -> EngineView:
    values = {f: getattr(e, f) for f in EngineView.__dataclass_fields__}
    values.update(changes)
    return EngineView(**values)  # type: ignore[arg-type]


CASES = [
    # (snapshot, job, expected choice), each a rule of the plan
    (
        "short prompt: local on the least loaded decode-side engine",
        pool(P, with_(D, load=3), with_(D, load=1)),
        Job(100),
        Choice(2, None, "short"),
    ),
    (
        "short prompt never goes to the prefill side while a decode side exists",
        pool(with_(P, load=0), with_(D, load=9)),
        Job(100),
        Choice(1, None, "short"),
    ),
    (
        "long prompt: prefill on the prefill side, decode on the decode side",
        pool(P, D, D),
        Job(4000),
        Choice(1, 0, "long"),
    ),
    (
        "long prompt: the prefill engine with the least prompt work waiting",
        pool(with_(P, prefill_tokens=9000), with_(P, prefill_tokens=100), D),
        Job(4000),
        Choice(2, 1, "long"),
    ),
    (
        "ties on prompt work go to the prefill engine with fewer decode streams to stall",
        pool(with_(P, decode_streams=5), with_(P, decode_streams=1), D),
        Job(4000),
        Choice(2, 1, "long"),
    ),
    (
        "the decoder is the least loaded decode-side engine, a full KV cache last",
        pool(P, with_(D, load=1, kv_full=True), with_(D, load=4)),
        Job(4000),
        Choice(2, 0, "long"),
    ),
    ("exactly the threshold is long", pool(P, D), Job(512), Choice(1, 0, "long")),
    ("one below it is short", pool(P, D), Job(511), Choice(1, None, "short")),
    (
        "a prompt mostly cached on a decode-side engine is local there",
        pool(P, D, with_(D, cached_tokens=3800, load=5)),
        Job(4000),
        Choice(2, None, "cached"),
    ),
    (
        "cached on the prefill side only: still disaggregated",
        pool(with_(P, cached_tokens=3900), D),
        Job(4000),
        Choice(1, 0, "long"),
    ),
    (
        "no engine leans to prefill: local on the decode side",
        pool(D, with_(D, load=2)),
        Job(4000),
        Choice(0, None, "no_prefiller"),
    ),
    (
        "the prefill-side engine is down: as if there were none",
        pool(with_(P, available=False), D),
        Job(4000),
        Choice(1, None, "no_prefiller"),
    ),
    (
        "a long prompt for a token or two is answered where it is computed",
        pool(P, D),
        Job(4000, max_tokens=1),
        Choice(0, None, "short_output"),
    ),
    (
        "... but not on a dedicated prefiller, which does not answer",
        pool(EngineView("prefill", "prefill"), D),
        Job(4000, max_tokens=1),
        Choice(1, 0, "long"),
    ),
    (
        "more than local_max_tokens: disaggregated",
        pool(P, D),
        Job(4000, max_tokens=5),
        Choice(1, 0, "long"),
    ),
    (
        "the decoder's pulls are slow: local on it",
        pool(P, with_(D, slow_kv=True)),
        Job(4000),
        Choice(1, None, "slow_kv"),
    ),
    (
        "every engine leans to prefill: one prefills, another decodes",
        pool(P, with_(P, prefill_tokens=50)),
        Job(4000),
        Choice(1, 0, "long"),
    ),
    (
        "the prefill side is backed up beyond max_prefill_wait: computed on the decoder",
        pool(with_(P, prefill_tokens=5000), D),
        Job(4000),
        Choice(1, None, "prefill_busy"),
    ),
    (
        "... not when the wait stays within it",
        pool(with_(P, prefill_tokens=3000), D),
        Job(4000),
        Choice(1, 0, "long"),
    ),
    (
        "... nor when the decoder has as much queued itself",
        pool(with_(P, prefill_tokens=5000), with_(D, prefill_tokens=5000)),
        Job(4000),
        Choice(1, 0, "long"),
    ),
    ("a single engine: local", pool(P), Job(4000), Choice(0, None, "single_engine")),
    (
        "dedicated prefiller and decoder beside the pool are sides like any other",
        pool(
            EngineView("prefill", "prefill"),
            EngineView("decode", "decode", load=0),
            with_(D, load=2),
        ),
        Job(4000),
        Choice(1, 0, "long"),
    ),
    (
        "prompt logprobs: always whole on one engine, on the decode side",
        pool(P, D),
        Job(4000, local_reason="prompt_logprobs"),
        Choice(1, None, "prompt_logprobs"),
    ),
    (
        "no engine can answer: no plan",
        pool(EngineView("prefill", "prefill"), with_(D, available=False)),
        Job(100),
        None,
    ),
]


@pytest.mark.parametrize(("why", "engines", "job", "expected"), CASES, ids=[c[0] for c in CASES])
def test_adaptive_plan(
    why: str, engines: list[EngineView], job: Job, expected: Choice | None
) -> None:
    assert plan(engines, job, RULES) == expected


@pytest.mark.parametrize(
    ("engines", "job", "expected"),
    [
        (pool(with_(P, load=2), with_(D, load=1)), Job(8000), Choice(1, None, "colocated")),
        (
            pool(with_(D, load=1), with_(D, load=1, prefill_tokens=9)),
            Job(10),
            Choice(0, None, "colocated"),
        ),
        (
            pool(with_(D, load=0, kv_full=True), with_(D, load=5)),
            Job(10),
            Choice(1, None, "colocated"),
        ),
        (pool(EngineView("prefill", "prefill"), D), Job(8000), Choice(1, None, "colocated")),
    ],
)
def test_colocated_serves_every_request_whole_on_the_least_loaded(
    engines: list[EngineView], job: Job, expected: Choice
) -> None:
    assert plan(engines, job, Rules("colocated")) == expected


def test_a_disaggregated_plan_never_decodes_where_it_prefills() -> None:
    for n in range(1, 6):
        for lean in ("prefill", "decode"):
            engines = [EngineView("pool", lean, load=float(i)) for i in range(n)]  # type: ignore[arg-type]
            choice = plan(engines, Job(5000), RULES)
            assert choice is not None
            assert choice.prefill != choice.decode
