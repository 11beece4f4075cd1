import orjson
import pytest

from proxy.control.workers import Worker
from proxy.engines.connectors.base import Handoff
from proxy.engines.connectors.nixl import NixlConnector, handoff_from_response, prefill_body
from proxy.errors import UpstreamError
from proxy.request import CHAT, ClientRequest

EXPECTED_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def test_prefill_body_caps_and_cannot_stop_early() -> None:
    client = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 300,
        "stop": ["\n"],
        "stop_token_ids": [2],
        "min_tokens": 5,
        "n": 1,
        "temperature": 0.0,
    }
    leg = prefill_body(client)
    assert leg == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "max_tokens": 1,
        "max_completion_tokens": 1,
        "ignore_eos": True,
        "n": 1,
        "temperature": 0.0,
        "kv_transfer_params": EXPECTED_PARAMS,
    }
    assert client["stream"] is True and "stop" in client  # the client's body is untouched


def test_max_completion_tokens_only_when_present() -> None:
    leg = prefill_body({"model": "m", "prompt": "x", "max_tokens": 50})
    assert leg["max_tokens"] == 1 and "max_completion_tokens" not in leg


PREFILLER = Worker("prefill", "p0", "http://p")


def test_handoff_verbatim_and_recompute_reasons() -> None:
    params = {"do_remote_prefill": True, "remote_block_ids": [[1, 2]], "new_key": {"x": 1}}
    raw = orjson.dumps({"choices": [{"finish_reason": "length"}], "kv_transfer_params": params})
    assert handoff_from_response(raw, PREFILLER) == Handoff(params)
    null = handoff_from_response(
        b'{"choices":[{"finish_reason":"stop"}],"kv_transfer_params":null}', PREFILLER
    )
    assert null.kv_transfer_params is None and null.recompute_kind == "null_params"
    assert "finish_reason=stop" in (null.recompute_reason or "")
    missing = handoff_from_response(b'{"choices":[]}', PREFILLER)
    assert missing.recompute_kind == "missing_params"
    with pytest.raises(UpstreamError, match="not JSON"):
        handoff_from_response(b"<html>", PREFILLER)


def test_decode_body_is_client_body_plus_params() -> None:
    connector = NixlConnector(engine=None, prefill_timeout=1)  # type: ignore[arg-type]
    body = {"model": "m", "messages": [], "stream": True, "kv_transfer_params": {"evil": 1}}
    req = ClientRequest(CHAT, body, "rid", True, False, 0)
    params = {"remote_engine_id": "e"}
    assert orjson.loads(connector.decode_body(req, Handoff(params))) == {
        **body,
        "kv_transfer_params": params,
    }
    without = orjson.loads(connector.decode_body(req, Handoff(None, "x")))
    assert "kv_transfer_params" not in without
