"""The protocol checks a client makes of an engine's answers, made of the proxy's: the same
tests as test_protocol.py (imported, so collected here too), against a proxy in front of the
simulated engine pair, in one process and in two serving processes (`serve --workers 2`). The
`engines` here name the proxy as the engine a client talks to; its prefiller is the engine's.

Only the checks of what a client sees are here: the legs' own protocol (kv_transfer_params, the
engine's metrics) is the engine's, and a proxy deliberately differs in a few answers (it echoes
X-Request-Id, answers some malformed requests and unknown paths itself, and its /health says
more): test_error_shapes, test_unknown_path_is_fastapi_shaped and the /health of
test_models_tokenize_version_health are the engine's alone."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

if str(Path(__file__).parent) not in sys.path:  # pytest runs in importlib mode
    sys.path.insert(0, str(Path(__file__).parent))

from protocol_engines import Engines
from test_protocol import (
    test_chat_n_stream_opens_with_a_role_chunk_per_choice,
    test_chat_stream_shape,
    test_completion_stream_shape,
    test_echo_and_logprobs_shapes,
    test_max_tokens_over_context_is_clamped,
    test_n_with_a_seed_is_seed_plus_j_per_sample,
    test_output_cap_larger_than_the_context_is_refused,
    test_priority_and_best_of_are_accepted,
    test_prompt_list_numbers_choices_and_sums_usage,
    test_prompt_list_stream_interleaves_with_one_usage_chunk,
    test_token_id_prompts,
)

from tests.conftest import Proxy, Sim, start_proxy

pytestmark = pytest.mark.workers2

__all__ = [
    "test_chat_n_stream_opens_with_a_role_chunk_per_choice",
    "test_chat_stream_shape",
    "test_completion_stream_shape",
    "test_echo_and_logprobs_shapes",
    "test_max_tokens_over_context_is_clamped",
    "test_n_with_a_seed_is_seed_plus_j_per_sample",
    "test_output_cap_larger_than_the_context_is_refused",
    "test_priority_and_best_of_are_accepted",
    "test_prompt_list_numbers_choices_and_sums_usage",
    "test_prompt_list_stream_interleaves_with_one_usage_chunk",
    "test_token_id_prompts",
]


@pytest.fixture(scope="module")
def _proxy(
    sim_engines: Engines, serving_procs: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    logs = tmp_path_factory.mktemp("protocol-proxied")

    def engine(url: str) -> Sim:  # the session's engines, not started nor stopped here
        return Sim(url, [], None, None)  # type: ignore[arg-type]

    proxy = start_proxy(
        logs,
        [engine(sim_engines.prefill)],
        [engine(sim_engines.decode)],
        name="protocol",
        workers=serving_procs,
    )
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def engines(sim_engines: Engines, _proxy: Proxy) -> Engines:
    """The proxy as the engine a client talks to."""
    return Engines(f"proxy-{sim_engines.name}", sim_engines.prefill, _proxy.url)
