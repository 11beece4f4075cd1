import pytest

from proxy.control.workers import EngineLoad, Worker
from proxy.engines.scrape import observe_load, parse_load

SIM = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
"""
# vLLM's info gauge: every CacheConfig field as a label, and the engine
INFO = (
    b'vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="%s",'
    b'engine="0",gpu_memory_utilization="0.9"} 1.0\n'
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (SIM, EngineLoad(5.0, 1.0, 0.5, 7)),  # summed over engines, KV usage the highest
        (b"vllm:num_requests_running 2\n", EngineLoad(2.0, 0.0, 0.0, 7)),
        (b"# nothing\nother_metric 1\n", None),
        (b'vllm:num_requests_running{a="b"} garbage\n', None),
        (b"", None),
        (SIM + INFO % b"False", EngineLoad(5.0, 1.0, 0.5, 7, prefix_caching=False)),
        (SIM + INFO % b"True", EngineLoad(5.0, 1.0, 0.5, 7, prefix_caching=True)),
        (SIM + b'vllm:cache_config_info{engine="0"} 1.0\n', EngineLoad(5.0, 1.0, 0.5, 7)),
    ],
)
def test_parse_load(text: bytes, expected: EngineLoad | None) -> None:
    assert parse_load(text, 7) == expected


def test_what_an_engine_says_of_its_prefix_cache_outlives_a_failed_scrape() -> None:
    worker = Worker("decode", "d0", "http://127.0.0.1:1")
    assert worker.caches_prefixes  # vLLM's default until the engine says otherwise
    observe_load(worker, SIM + INFO % b"False")
    assert worker.prefix_caching is False and not worker.caches_prefixes
    observe_load(worker, None)  # unreadable: the load goes, the engine's configuration stays
    assert worker.engine_load is None and not worker.caches_prefixes
    observe_load(worker, SIM)  # a scrape that does not say keeps what was said
    assert worker.prefix_caching is False
