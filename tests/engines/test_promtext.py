"""The one parser of the engines' /metrics, over expositions as vLLM serves them: rendered by
prometheus_client (the library vLLM's server renders /metrics with) from vLLM 0.32's metric
families and labels, and by the simulator; then the corners of the text format."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pdsim.metrics import Metrics
from proxy.engines.promtext import parse

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
INFO = "vllm:cache_config_info"
XFER = "vllm:nixl_xfer_time_seconds"
PROMPT = "vllm:prompt_tokens"


def vllm_exposition() -> bytes:
    """Two data-parallel engines of one model, as vLLM's PrometheusStatLogger registers them:
    `engine` and `model_name` on every request-level family, counters with their `_total` and
    `_created` samples, the NIXL histograms with their buckets, and the cache config as an info
    gauge without `model_name`."""
    registry = CollectorRegistry()
    labels = ["model_name", "engine"]
    running = Gauge(RUNNING, "Number of requests in model execution batches.", labels,
                    registry=registry)  # fmt: skip
    waiting = Gauge(WAITING, "Number of requests waiting to be processed.", labels,
                    registry=registry)  # fmt: skip
    usage = Gauge(KV_USAGE, "KV-cache usage. 1 means 100 percent usage.", labels,
                  registry=registry)  # fmt: skip
    prompt = Counter(PROMPT, "Number of prefill tokens processed.", labels, registry=registry)
    xfer = Histogram(XFER, "Histogram of transfer duration for NIXL KV Cache transfers.", labels,
                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 1.0), registry=registry)  # fmt: skip
    info = Gauge(INFO, "Information of the LLMEngine CacheConfig",
                 ["block_size", "cache_dtype", "enable_prefix_caching", "engine"],
                 registry=registry)  # fmt: skip
    model = "meta-llama/Llama-3.1-8B-Instruct"
    for engine, (run, wait, kv, tokens) in enumerate(((3, 1, 0.25, 100), (2, 0, 0.5, 40))):
        running.labels(model, str(engine)).set(run)
        waiting.labels(model, str(engine)).set(wait)
        usage.labels(model, str(engine)).set(kv)
        prompt.labels(model, str(engine)).inc(tokens)
        xfer.labels(model, str(engine)).observe(0.007 * (engine + 1))
        info.labels("16", "auto", "True", str(engine)).set(1)
    return generate_latest(registry)


def test_vllm_exposition_sums_maxima_and_labels() -> None:
    names = (RUNNING, WAITING, KV_USAGE, INFO, f"{PROMPT}_total", f"{XFER}_count", f"{XFER}_sum")
    samples = parse(vllm_exposition(), names)
    assert samples.sum(RUNNING) == 5.0 and samples.sum(WAITING) == 1.0
    assert samples.max(KV_USAGE) == 0.5
    assert samples.sum(f"{PROMPT}_total") == 140.0
    assert samples.sum(f"{XFER}_count") == 2.0
    assert samples.sum(f"{XFER}_sum") == pytest.approx(0.021)
    assert samples.label(INFO, "enable_prefix_caching") == "True"
    assert samples.label(INFO, "block_size") == "16"


def test_names_match_whole_samples_only() -> None:
    text = vllm_exposition()
    samples = parse(text, (PROMPT, XFER, f"{XFER}_bucket", f"{PROMPT}_created"))
    assert PROMPT not in samples and XFER not in samples  # the family, not a sample name
    assert samples.sum(f"{XFER}_bucket") == 6.0 + 5.0  # cumulative: 0.007 s and 0.014 s
    assert f"{PROMPT}_created" in samples  # prometheus_client's creation-time gauge
    assert parse(text, ()).sums((RUNNING,)) == {}


def test_the_simulators_exposition_reads_the_same() -> None:
    rendered = Metrics(prompt_tokens=12).render(
        "pdsim/llama-8b", running=2, waiting=1, kv_usage=0.125, held_blocks=0,
        cache_config={"block_size": "16", "enable_prefix_caching": "False"},
    ).encode()  # fmt: skip
    samples = parse(rendered, (RUNNING, WAITING, KV_USAGE, INFO, f"{PROMPT}_total"))
    assert samples.sums((RUNNING, WAITING, KV_USAGE, f"{PROMPT}_total")) == {
        RUNNING: 2.0,
        WAITING: 1.0,
        KV_USAGE: 0.125,
        f"{PROMPT}_total": 12.0,
    }
    assert samples.label(INFO, "enable_prefix_caching") == "False"


@pytest.mark.parametrize(
    ("line", "value"),
    [
        (b"m 2", 2.0),
        (b"m 2.5e3 1700000000000", 2500.0),  # a timestamp after the value
        (b'm{a="b"} 3', 3.0),
        (b'm{a="x y"} 4', 4.0),  # a space in a label value
        (b'm{a="}{",b="\\"q\\""} 5', 5.0),  # braces and escaped quotes in label values
        (b"m +Inf", float("inf")),
        (b"m garbage", None),
        (b"m", None),
        (b"# TYPE m gauge", None),
        (b"mx 1", None),
    ],
)
def test_one_line(line: bytes, value: float | None) -> None:
    assert parse(line + b"\n", ["m"]).sum("m") == value


def test_label_values_are_unescaped() -> None:
    samples = parse(b'm{path="C:\\\\x",say="\\"hi\\"\\nthere"} 1\n', ["m"])
    assert samples.label("m", "path") == "C:\\x"
    assert samples.label("m", "say") == '"hi"\nthere'
    assert samples.label("m", "absent") is None and samples.label("other", "path") is None


def test_sums_by_a_labels_value() -> None:
    registry = CollectorRegistry()
    tokens = Counter("pdproxy_pool_prompt_tokens", "t", ["side", "engine"], registry=registry)
    tokens.labels("long", "a").inc(5)
    tokens.labels("long", "b").inc(2)
    tokens.labels("lo\\cal", "a").inc(3)
    samples = parse(generate_latest(registry), ["pdproxy_pool_prompt_tokens_total"])
    by_side = samples.by_label("pdproxy_pool_prompt_tokens_total", "side")
    assert by_side == {"long": 7.0, "lo\\cal": 3.0}
    assert samples.by_label("pdproxy_pool_prompt_tokens_total", "absent") == {}
    assert samples.by_label("other", "side") == {}
