"""Prometheus metrics of one instance, rendered in the text format vLLM's server exposes.

Names follow vLLM 0.32 (``vllm/v1/metrics/loggers.py`` and the NIXL connector's ``stats.py``);
counters get the ``_total`` suffix as prometheus_client adds it. Sim-only metrics use ``pdsim:``.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

# vLLM's NIXL histogram buckets: transfer and post time (seconds), bytes, descriptors.
XFER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0)
POST_BUCKETS = (0.001, *XFER_BUCKETS)
BYTES_BUCKETS = tuple(float(2 ** (10 + i)) for i in range(1, 25, 2))
DESCRIPTOR_BUCKETS = (10, 20, 30, 50, 75, 100, 200, 400, 1000, 2000, 4000, 10000, 20000, 50000)
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
ABORT_PHASES = ("prefill", "decode")


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        i = bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.count += 1


@dataclass
class Metrics:
    """Counters of one instance; gauges are read from the engine when rendering."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tokens_by_source: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(PROMPT_SOURCES, 0)
    )
    request_success: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0)
    )
    xfer_time: Histogram = field(default_factory=lambda: Histogram(XFER_BUCKETS))
    post_time: Histogram = field(default_factory=lambda: Histogram(POST_BUCKETS))
    bytes_transferred: Histogram = field(default_factory=lambda: Histogram(BYTES_BUCKETS))
    num_descriptors: Histogram = field(default_factory=lambda: Histogram(DESCRIPTOR_BUCKETS))
    failed_transfers: int = 0
    failed_notifications: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the local prefix cache
    prefix_cache_hits: int = 0  # ... and found there
    external_prefix_cache_queries: int = 0  # prompt tokens looked up through the connector
    external_prefix_cache_hits: int = 0  # prompt tokens the connector loaded
    kv_expired_reqs: int = 0
    recomputed_requests: int = 0
    kv_pulled_requests: int = 0
    aborted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ABORT_PHASES, 0))
    steps: int = 0  # engine steps run (timed mode)
    step_model_seconds: float = 0.0  # their modelled time, speed factor included
    step_wall_seconds: float = 0.0  # the time they really took (more: short of CPU)

    def record_step(self, model_seconds: float, wall_seconds: float) -> None:
        self.steps += 1
        self.step_model_seconds += model_seconds
        self.step_wall_seconds += wall_seconds

    def render(
        self,
        model: str,
        running: int,
        waiting: int,
        kv_usage: float,
        held_blocks: int,
        deferred: int = 0,
        cache_config: dict[str, str] | None = None,
    ) -> str:
        """The text exposition; ``deferred`` of the ``waiting`` requests wait for a KV pull;
        ``cache_config`` the labels of ``vllm:cache_config_info`` (vLLM: every CacheConfig field
        as a string, and ``engine``, no ``model_name``)."""
        lbl = f'engine="0",model_name="{_escape(model)}"'
        out: list[str] = []
        if cache_config is not None:
            info = ",".join(
                f'{k}="{_escape(v)}"' for k, v in {**cache_config, "engine": "0"}.items()
            )
            out += [
                "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
                "# TYPE vllm:cache_config_info gauge",
                f"vllm:cache_config_info{{{info}}} 1.0",
            ]

        def metric(name: str, kind: str, doc: str, samples: list[tuple[str, str, float]]) -> None:
            labelled = [(sfx, lbl + ("," + extra if extra else ""), v) for sfx, extra, v in samples]
            out.extend(exposition(name, kind, doc, labelled))

        metric(
            "vllm:num_requests_running",
            "gauge",
            "Requests in execution batches.",
            [("", "", running)],
        )
        metric(
            "vllm:num_requests_waiting",
            "gauge",
            "Requests waiting to be processed.",
            [("", "", waiting)],
        )
        metric(
            "vllm:num_requests_waiting_by_reason",
            "gauge",
            "Number of waiting requests by reason.",
            [
                ("", 'reason="capacity"', waiting - deferred),
                ("", 'reason="deferred"', deferred),
            ],
        )
        metric(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            [("", "", kv_usage)],
        )
        metric(
            "vllm:prompt_tokens",
            "counter",
            "Prefill tokens processed.",
            [("_total", "", self.prompt_tokens)],
        )
        metric(
            "vllm:prompt_tokens_by_source",
            "counter",
            "Prompt tokens by source.",
            [("_total", f'source="{s}"', v) for s, v in self.prompt_tokens_by_source.items()],
        )
        metric(
            "vllm:prefix_cache_queries",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            [("_total", "", self.prefix_cache_queries)],
        )
        metric(
            "vllm:prefix_cache_hits",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            [("_total", "", self.prefix_cache_hits)],
        )
        metric(
            "vllm:external_prefix_cache_queries",
            "counter",
            "External prefix cache queries from KV connector cross-instance cache sharing, "
            "in terms of number of queried tokens.",
            [("_total", "", self.external_prefix_cache_queries)],
        )
        metric(
            "vllm:external_prefix_cache_hits",
            "counter",
            "External prefix cache hits from KV connector cross-instance cache sharing, "
            "in terms of number of cached tokens.",
            [("_total", "", self.external_prefix_cache_hits)],
        )
        metric(
            "vllm:generation_tokens",
            "counter",
            "Generation tokens processed.",
            [("_total", "", self.generation_tokens)],
        )
        metric(
            "vllm:request_success",
            "counter",
            "Successfully processed requests.",
            [("_total", f'finished_reason="{r}"', v) for r, v in self.request_success.items()],
        )
        for name, doc, h in (
            ("vllm:nixl_xfer_time_seconds", "NIXL KV transfer duration.", self.xfer_time),
            ("vllm:nixl_post_time_seconds", "NIXL KV transfer post time.", self.post_time),
            ("vllm:nixl_bytes_transferred", "Bytes per NIXL KV transfer.", self.bytes_transferred),
            (
                "vllm:nixl_num_descriptors",
                "Descriptors per NIXL KV transfer.",
                self.num_descriptors,
            ),
        ):
            metric(name, "histogram", doc, _histogram_samples(h))
        metric(
            "vllm:nixl_num_failed_transfers",
            "counter",
            "Failed NIXL KV transfers.",
            [("_total", "", self.failed_transfers)],
        )
        metric(
            "vllm:nixl_num_failed_notifications",
            "counter",
            "Failed NIXL notifications.",
            [("_total", "", self.failed_notifications)],
        )
        metric(
            "vllm:nixl_num_kv_expired_reqs",
            "counter",
            "Requests whose held KV expired.",
            [("_total", "", self.kv_expired_reqs)],
        )
        metric(
            "pdsim:recomputed_requests",
            "counter",
            "Remote-prefill requests recomputed.",
            [("_total", "", self.recomputed_requests)],
        )
        metric(
            "pdsim:kv_pulled_requests",
            "counter",
            "Requests whose KV was pulled.",
            [("_total", "", self.kv_pulled_requests)],
        )
        metric(
            "pdsim:held_kv_blocks",
            "gauge",
            "Producer KV blocks held under lease.",
            [("", "", held_blocks)],
        )
        metric(
            "pdsim:aborted_requests",
            "counter",
            "Requests aborted by client disconnect.",
            [("_total", f'phase="{p}"', v) for p, v in self.aborted.items()],
        )
        metric("pdsim:engine_steps", "counter", "Engine steps run.", [("_total", "", self.steps)])
        metric(
            "pdsim:engine_step_model_seconds",
            "counter",
            "Modelled time of the engine steps (speed factor included).",
            [("_total", "", self.step_model_seconds)],
        )
        metric(
            "pdsim:engine_step_wall_seconds",
            "counter",
            "Time the engine steps really took, from the end of the one before (above the "
            "modelled time: the process was short of CPU).",
            [("_total", "", self.step_wall_seconds)],
        )
        out.append("")
        return "\n".join(out)


def exposition(name: str, kind: str, doc: str, samples: list[tuple[str, str, float]]) -> list[str]:
    """One metric in the text format: HELP, TYPE, then a line per (suffix, labels, value)."""
    out = [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
    for suffix, labels, value in samples:
        selector = f"{{{labels}}}" if labels else ""
        out.append(f"{name}{suffix}{selector} {_num(value)}")
    return out


def _histogram_samples(h: Histogram) -> list[tuple[str, str, float]]:
    samples: list[tuple[str, str, float]] = []
    cumulative = 0
    for bound, n in zip(h.buckets, h.counts, strict=True):
        cumulative += n
        samples.append(("_bucket", f'le="{float(bound)}"', cumulative))
    return [
        *samples,
        ("_bucket", 'le="+Inf"', h.count),
        ("_count", "", h.count),
        ("_sum", "", h.total),
    ]


def _num(value: float) -> str:
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
