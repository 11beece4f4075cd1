import pytest

from proxy.scrape import parse_load
from proxy.workers import EngineLoad

SIM = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (SIM, EngineLoad(5.0, 1.0, 0.5, 7)),  # summed over engines, KV usage the highest
        (b"vllm:num_requests_running 2\n", EngineLoad(2.0, 0.0, 0.0, 7)),
        (b"# nothing\nother_metric 1\n", None),
        (b'vllm:num_requests_running{a="b"} garbage\n', None),
        (b"", None),
    ],
)
def test_parse_load(text: bytes, expected: EngineLoad | None) -> None:
    assert parse_load(text, 7) == expected
