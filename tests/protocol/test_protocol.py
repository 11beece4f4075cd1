"""What a PD proxy may rely on from an ENGINE, asserted against the simulator and real vLLM.

Every test runs on both (`engines` fixture); an assertion that holds for only one of them is a
bug in the simulator, not a reason to branch. Assertions are tokenizer-agnostic: counts come
from the engine's own `usage` and `/tokenize`. Facts behind them: tests/e2e/REAL_VLLM_FACTS.md.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from protocol_engines import Engines

from pdsim.launch import free_port
from tests.e2e.vllm_helpers import metric, metrics, wait_metric

Body = dict[str, Any]

XFER = "vllm:nixl_xfer_time_seconds_count"
FAILED = "vllm:nixl_num_failed_transfers_total"
HITS = "vllm:external_prefix_cache_hits_total"
PROMPT = "The quick brown fox jumps over the lazy dog"
LONG = "Disaggregated prefill and decode split one request across two engines. " * 4
MESSAGES = [{"role": "user", "content": "hello, how are you today?"}]
KV0 = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
TIMEOUT = 120


def _rid() -> str:
    return f"proto-{uuid.uuid4().hex[:12]}"


def wait_until(check: Callable[[], bool], timeout: float, why: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, why
        time.sleep(0.1)


def post(url: str, body: Body, rid: str | None = None, status: int = 200) -> Body:
    headers = {"X-Request-Id": rid} if rid else {}
    resp = httpx.post(url, json=body, headers=headers, timeout=TIMEOUT)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    data: Body = resp.json()
    return data


def stream(url: str, body: Body) -> list[Body]:
    """The parsed `data:` events of one stream; checks the SSE framing and the [DONE] end."""
    with httpx.stream("POST", url, json=body, timeout=TIMEOUT) as resp:
        assert resp.status_code == 200, resp.read().decode()
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", raw[-200:]
    assert all(e.startswith("data: ") for e in events[:-1])
    return [json.loads(e.removeprefix("data: ")) for e in events[:-2]]


def completion(e: Engines, prompt: str, **extra: Any) -> Body:
    return {"model": e.model, "prompt": prompt, "temperature": 0, **extra}


def prefill(e: Engines, prompt: str, rid: str, **extra: Any) -> Body:
    body = completion(e, prompt, max_tokens=1, ignore_eos=True, kv_transfer_params=KV0, **extra)
    return post(e.prefill + "/v1/completions", body, rid)


def assert_error(resp: httpx.Response, status: int, err_type: str, param: str | None) -> Body:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    data: Body = resp.json()
    assert set(data) == {"error"}, data
    err: Body = data["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert (err["type"], err["param"], err["code"]) == (err_type, param, status), err
    assert isinstance(err["message"], str) and err["message"]
    return err


# -- prefill leg ---------------------------------------------------------------------------


def check_params(kv: Body, rid_prefix: str, prompt_tokens: int) -> None:
    """The producer's params; never an exact key set (it varies between responses)."""
    assert kv["do_remote_prefill"] is True and kv["do_remote_decode"] is False
    blocks = kv["remote_block_ids"]
    assert isinstance(blocks, list) and blocks and all(isinstance(g, list) for g in blocks)
    assert all(isinstance(b, int) for g in blocks for b in g) and blocks[0]
    assert isinstance(kv["remote_engine_id"], str) and kv["remote_engine_id"]
    assert kv["remote_request_id"].startswith(rid_prefix)
    assert isinstance(kv["remote_host"], str) and isinstance(kv["remote_port"], int)
    assert kv["remote_num_tokens"] == prompt_tokens
    assert kv["transfer_mode"] == "pull" and kv["tp_size"] == 1


def test_prefill_leg_completion(engines: Engines) -> None:
    rid = _rid()
    r = prefill(engines, PROMPT, rid)
    assert r["id"] == f"cmpl-{rid}" and r["object"] == "text_completion"
    choice = r["choices"][0]
    assert choice["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 1
    check_params(r["kv_transfer_params"], f"cmpl-{rid}-0-", r["usage"]["prompt_tokens"])
    again = prefill(engines, PROMPT, _rid())["kv_transfer_params"]
    assert again["remote_engine_id"] == r["kv_transfer_params"]["remote_engine_id"]
    assert metric(engines.prefill, "vllm:kv_cache_usage_perc") > 0  # blocks pinned for D
    assert metric(engines.prefill, "vllm:num_requests_running") == 0


def test_prefill_leg_chat(engines: Engines) -> None:
    rid = _rid()
    body = {"model": engines.model, "messages": MESSAGES, "max_tokens": 1, "temperature": 0,
            "ignore_eos": True, "kv_transfer_params": KV0}  # fmt: skip
    r = post(engines.prefill + "/v1/chat/completions", body, rid)
    assert r["id"] == f"chatcmpl-{rid}" and r["object"] == "chat.completion"
    check_params(r["kv_transfer_params"], f"chatcmpl-{rid}-", r["usage"]["prompt_tokens"])


def test_no_params_asked_none_returned(engines: Engines) -> None:
    r = post(engines.prefill + "/v1/completions", completion(engines, PROMPT, max_tokens=1))
    assert "kv_transfer_params" in r and r["kv_transfer_params"] is None


def test_params_on_stop_token_but_null_on_stop_string(engines: Engines) -> None:
    """vLLM 0.32 offers the KV when the prefill stops on a stop token id (FINISHED_STOPPED),
    not when a stop string cut it (the frontend aborts the request)."""
    url = engines.prefill + "/v1/completions"
    first = post(url, completion(engines, PROMPT, max_tokens=3, ignore_eos=True,
                                 return_token_ids=True))["choices"][0]  # fmt: skip
    token = first["token_ids"][0]
    r = post(url, completion(engines, PROMPT, max_tokens=4, stop_token_ids=[token],
                             kv_transfer_params=KV0))  # fmt: skip
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["stop_reason"] == token
    check_params(r["kv_transfer_params"], "cmpl-", r["usage"]["prompt_tokens"])
    stop = next(c for c in first["text"] if c.strip() and c != "\ufffd")
    r = post(url, completion(engines, PROMPT, max_tokens=3, ignore_eos=True, stop=[stop],
                             kv_transfer_params=KV0))  # fmt: skip
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["stop_reason"] == stop
    assert r["kv_transfer_params"] is None


# -- decode leg ----------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [PROMPT, LONG], ids=["short", "multi-block"])
def test_decode_with_params_pulls_once(engines: Engines, prompt: str) -> None:
    """Short prompts pull too: vLLM's kv_recompute_threshold (64 tokens) applies only to
    bidirectional transfers. The pull's bytes and descriptors are counted (kv_health reads them)."""
    url = engines.decode + "/v1/completions"
    body = completion(engines, prompt, max_tokens=8, ignore_eos=True)
    direct = post(url, body)
    xfer, hits = metric(engines.decode, XFER), metric(engines.decode, HITS)
    nbytes = metric(engines.decode, "vllm:nixl_bytes_transferred_sum")
    descriptors = metric(engines.decode, "vllm:nixl_num_descriptors_sum")
    rid = _rid()
    kv = prefill(engines, prompt, rid)["kv_transfer_params"]
    r = post(url, {**body, "kv_transfer_params": kv}, rid)
    assert r["kv_transfer_params"] is None
    assert r["choices"][0]["text"] == direct["choices"][0]["text"]
    assert wait_metric(engines.decode, XFER, xfer + 1) == xfer + 1
    assert metric(engines.decode, HITS) - hits == r["usage"]["prompt_tokens"]
    assert metric(engines.decode, "vllm:nixl_bytes_transferred_sum") > nbytes
    assert metric(engines.decode, "vllm:nixl_num_descriptors_sum") > descriptors


def test_direct_request_moves_no_nixl_counter(engines: Engines) -> None:
    before = metric(engines.decode, XFER)
    post(engines.decode + "/v1/completions", completion(engines, PROMPT, max_tokens=2))
    assert metric(engines.decode, XFER) == before


def test_reused_params_read_again_without_error(engines: Engines) -> None:
    """A second pull with the same params reads the freed blocks: 200, counted as a pull."""
    url = engines.decode + "/v1/completions"
    kv = prefill(engines, PROMPT, _rid())["kv_transfer_params"]
    body = completion(engines, PROMPT, max_tokens=2, kv_transfer_params=kv)
    post(url, body)
    xfer = metric(engines.decode, XFER)
    post(url, {**body, "kv_transfer_params": kv})
    assert wait_metric(engines.decode, XFER, xfer + 1) == xfer + 1


def test_unreachable_prefiller_fails_the_request(engines: Engines) -> None:
    """kv_load_failure_policy "fail" (the default): 500, a failed transfer, no fallback."""
    kv = prefill(engines, PROMPT, _rid())["kv_transfer_params"]
    kv = {**kv, "remote_port": free_port(), "remote_engine_id": str(uuid.uuid4())}
    xfer, failed = metric(engines.decode, XFER), metric(engines.decode, FAILED)
    resp = httpx.post(
        engines.decode + "/v1/completions",
        json=completion(engines, PROMPT, max_tokens=2, kv_transfer_params=kv),
        timeout=TIMEOUT,
    )
    assert_error(resp, 500, "InternalServerError", None)
    # counted at least once: real vLLM 0.32 counted 1 in some runs and 2 in another
    assert wait_metric(engines.decode, FAILED, failed + 1) >= failed + 1
    assert metric(engines.decode, XFER) == xfer
    assert httpx.get(engines.decode + "/health", timeout=10).status_code == 200
    post(engines.decode + "/v1/completions", completion(engines, PROMPT, max_tokens=2))


def test_incomplete_params_are_a_500(engines: Engines) -> None:
    """`{"do_remote_prefill": true}` alone: real vLLM 0.32 answers 500 and then its API server
    exits (REAL_VLLM_FACTS.md §2), so this runs on the simulator only, which answers the 500
    and stays up."""
    if engines.name == "vllm":
        pytest.skip("kills the real decoder; the session's topology is shared")
    resp = httpx.post(
        engines.decode + "/v1/completions",
        json=completion(
            engines, PROMPT, max_tokens=2, kv_transfer_params={"do_remote_prefill": True}
        ),
        timeout=TIMEOUT,
    )
    assert_error(resp, 500, "InternalServerError", None)


# -- errors --------------------------------------------------------------------------------

JSON = {"content-type": "application/json"}
ERRORS: list[tuple[str, str, Any, dict[str, str], int, str, str | None]] = [
    # (id, path, body (bytes = raw), headers, status, type, param)
    ("invalid-json", "/v1/completions", b'{"model": "tiny", "prompt": ', JSON, 400,
     "Bad Request", "body.28"),
    ("not-json", "/v1/completions", b'{"prompt": "hi"}', {"content-type": "text/plain"}, 400,
     "Bad Request", None),
    ("unknown-model", "/v1/completions", {"model": "nope", "prompt": "hi"}, {}, 404,
     "NotFoundError", "model"),
    ("max-tokens-0", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, {}, 400,
     "BadRequestError", "max_tokens"),
    ("max-completion-tokens-0", "/v1/chat/completions",
     {"messages": MESSAGES, "max_completion_tokens": 0}, {}, 400, "BadRequestError",
     "max_tokens"),
    ("no-prompt", "/v1/completions", {"max_tokens": 2}, {}, 400, "BadRequestError", "prompt"),
    ("no-messages", "/v1/chat/completions", {"max_tokens": 2}, {}, 400, "Bad Request",
     "body.messages"),
    ("wrong-type", "/v1/completions", {"prompt": "hi", "max_tokens": "x"}, {}, 400,
     "Bad Request", "body.max_tokens"),
    ("params-not-object", "/v1/completions", {"prompt": "hi", "kv_transfer_params": "x"}, {},
     400, "Bad Request", "body.kv_transfer_params"),
    ("stream-options-without-stream", "/v1/completions",
     {"prompt": "hi", "stream_options": {"include_usage": True}}, {}, 400, "BadRequestError",
     "stream_options"),
    ("prompt-over-context", "/v1/completions", {"prompt": "hello " * 1100}, {}, 400,
     "BadRequestError", "input_tokens"),
    ("prompt-list-mixed", "/v1/completions", {"prompt": ["hi", [5, 6]]}, {}, 400,
     "Bad Request", "body.prompt.0"),
    ("prompt-list-empty", "/v1/completions", {"prompt": []}, {}, 400, "BadRequestError", None),
    ("prompt-empty-in-list", "/v1/completions", {"prompt": ["hi", ""]}, {}, 400,
     "BadRequestError", None),
    ("n-0", "/v1/completions", {"prompt": "hi", "n": 0}, {}, 400, "BadRequestError", None),
    ("n-greedy", "/v1/completions", {"prompt": "hi", "n": 2, "temperature": 0}, {}, 400,
     "BadRequestError", None),
    ("chat-n-greedy", "/v1/chat/completions",
     {"messages": MESSAGES, "n": 2, "temperature": 0}, {}, 400, "BadRequestError", None),
    ("priority-not-int", "/v1/completions", {"prompt": "hi", "priority": "high"}, {}, 400,
     "Bad Request", "body.priority"),
    ("stream-prompt-logprobs", "/v1/completions",
     {"prompt": "hi", "stream": True, "prompt_logprobs": 1}, {}, 400, "BadRequestError",
     "prompt_logprobs"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "err_type", "param"),
    [case[1:] for case in ERRORS],
    ids=[case[0] for case in ERRORS],
)
def test_error_shapes(
    engines: Engines,
    path: str,
    body: Any,
    headers: dict[str, str],
    status: int,
    err_type: str,
    param: str | None,
) -> None:
    url = engines.decode + path
    if isinstance(body, bytes):
        resp = httpx.post(url, content=body, headers=headers, timeout=TIMEOUT)
    else:
        resp = httpx.post(url, json=body, headers={"X-Request-Id": _rid()}, timeout=TIMEOUT)
    err = assert_error(resp, status, err_type, param)
    if param == "input_tokens":
        assert f"maximum context length is {engines.max_model_len} tokens" in err["message"]
    assert "x-request-id" not in resp.headers


def test_unknown_path_is_fastapi_shaped(engines: Engines) -> None:
    resp = httpx.get(engines.decode + "/v1/nope", timeout=10)
    assert resp.status_code == 404 and resp.json() == {"detail": "Not Found"}
    resp = httpx.get(engines.decode + f"/v1/models/{engines.model}", timeout=10)
    assert resp.status_code == 404 and resp.json() == {"detail": "Not Found"}
    # a generative model: vLLM mounts no pooling routes
    for path in ("/v1/embeddings", "/pooling", "/score", "/rerank", "/classify"):
        resp = httpx.post(engines.decode + path, json={"model": engines.model, "input": "hi"})
        assert resp.status_code == 404 and resp.json() == {"detail": "Not Found"}, path


@pytest.mark.parametrize(
    ("path", "field", "body"),
    [
        ("/v1/completions", "max_tokens", {"prompt": "hi"}),
        ("/v1/chat/completions", "max_tokens", {"messages": MESSAGES}),
        ("/v1/chat/completions", "max_completion_tokens", {"messages": MESSAGES}),
    ],
)
def test_output_cap_larger_than_the_context_is_refused(
    engines: Engines, path: str, field: str, body: Body
) -> None:
    """Unlike a cap that only overruns the room the prompt leaves (clamped, below), a cap larger
    than the whole context is a 400 naming the field, the cap and the context length."""
    cap = 100_000_000
    resp = httpx.post(
        engines.decode + path, json={"model": engines.model, **body, field: cap}, timeout=TIMEOUT
    )
    err = assert_error(resp, 400, "BadRequestError", field)
    # later vLLM dropped a stray "max_total_tokens=" from this message; either reads the same
    pattern = (
        rf"{field}={cap} ?cannot be greater than max_model_len=(max_total_tokens=)?"
        rf"{engines.max_model_len}\b"
    )
    assert re.search(pattern, err["message"]), err["message"]


def test_max_tokens_over_context_is_clamped(engines: Engines) -> None:
    url = engines.decode
    per_word = post(url + "/tokenize", {"model": engines.model, "prompt": "hello " * 100})
    words = int((engines.max_model_len - 24) / (per_word["count"] / 100))
    prompt = "hello " * words
    count = post(url + "/tokenize", {"model": engines.model, "prompt": prompt})["count"]
    assert count + 100 > engines.max_model_len > count
    r = post(url + "/v1/completions", completion(engines, prompt, max_tokens=100, ignore_eos=True))
    assert r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["prompt_tokens"] == count
    assert r["usage"]["total_tokens"] == engines.max_model_len


# -- streams -------------------------------------------------------------------------------


def test_chat_stream_shape(engines: Engines) -> None:
    body = {"model": engines.model, "messages": MESSAGES, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    full = post(engines.decode + "/v1/chat/completions", body)
    chunks = stream(
        engines.decode + "/v1/chat/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    first = chunks[0]["choices"][0]
    assert first["delta"] == {"role": "assistant", "content": ""} and "token_ids" not in first
    *content, last = chunks[1:]
    assert last["choices"] == [] and "prompt_tokens_details" not in last["usage"]
    assert last["usage"] == {k: full["usage"][k] for k in last["usage"]}
    assert set(last["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    reasons = [c["choices"][0]["finish_reason"] for c in content]
    assert reasons[-1] == "length" and not any(reasons[:-1])
    assert 1 <= len(content) <= 8  # a chunk may carry several tokens, or none
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in content)
    assert text == full["choices"][0]["message"]["content"]
    assert "prompt_tokens_details" in full["usage"]


def test_completion_stream_shape(engines: Engines) -> None:
    body = completion(engines, PROMPT, max_tokens=6, ignore_eos=True)
    full = post(engines.decode + "/v1/completions", body)
    chunks = stream(engines.decode + "/v1/completions", {**body, "stream": True})
    assert all(c["object"] == "text_completion" and c["choices"] for c in chunks)
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[-1] == "length" and not any(reasons[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    with_usage = stream(
        engines.decode + "/v1/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["completion_tokens"] == 6


def test_decode_stream_after_pull_has_the_direct_shape(engines: Engines) -> None:
    body = {"model": engines.model, "messages": MESSAGES, "max_tokens": 4, "temperature": 0,
            "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    rid = _rid()
    leg = {**body, "stream": False, "max_tokens": 1, "kv_transfer_params": KV0}
    leg.pop("stream_options")
    kv = post(engines.prefill + "/v1/chat/completions", leg, rid)["kv_transfer_params"]
    chunks = stream(engines.decode + "/v1/chat/completions", {**body, "kv_transfer_params": kv})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


# -- headers and the rest of the HTTP surface ----------------------------------------------


def test_request_id_not_echoed_but_names_the_body(engines: Engines) -> None:
    rid = _rid()
    resp = httpx.post(
        engines.decode + "/v1/completions",
        json=completion(engines, PROMPT, max_tokens=1),
        headers={"X-Request-Id": rid},
        timeout=TIMEOUT,
    )
    assert resp.status_code == 200 and "x-request-id" not in resp.headers
    assert resp.json()["id"] == f"cmpl-{rid}"
    anon = post(engines.decode + "/v1/completions", completion(engines, PROMPT, max_tokens=1))
    assert re.fullmatch(r"cmpl-[0-9a-f]{16}", anon["id"]), anon["id"]


def test_models_tokenize_version_health(engines: Engines) -> None:
    url = engines.decode
    models = httpx.get(url + "/v1/models", timeout=10).json()
    card = models["data"][0]
    assert models["object"] == "list" and card["id"] == engines.model
    assert card["object"] == "model" and card["owned_by"] == "vllm"
    assert card["max_model_len"] == engines.max_model_len
    tok = post(url + "/tokenize", {"model": engines.model, "prompt": "hello"})
    assert set(tok) == {"count", "max_model_len", "tokens", "token_strs"}
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == engines.max_model_len
    chat_tok = post(url + "/tokenize", {"model": engines.model, "messages": MESSAGES})
    chat = post(url + "/v1/chat/completions",
                {"model": engines.model, "messages": MESSAGES, "max_tokens": 1})  # fmt: skip
    assert chat_tok["count"] == chat["usage"]["prompt_tokens"]
    assert httpx.get(url + "/version", timeout=10).json()["version"].startswith("0.32.0")
    health = httpx.get(url + "/health", timeout=10)
    assert health.status_code == 200 and health.content == b""


METRICS = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:num_requests_waiting_by_reason",
    "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:external_prefix_cache_queries_total",
    "vllm:external_prefix_cache_hits_total",
    "vllm:nixl_xfer_time_seconds_count",
    "vllm:nixl_xfer_time_seconds_sum",
    "vllm:nixl_bytes_transferred_sum",
    "vllm:nixl_num_descriptors_sum",
    "vllm:nixl_post_time_seconds_sum",
    "vllm:nixl_num_failed_transfers_total",
    "vllm:nixl_num_failed_notifications_total",
    "vllm:nixl_num_kv_expired_reqs_total",
]


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_cache_config_info_says_whether_the_engine_caches_prefixes(
    engines: Engines, role: str
) -> None:
    """The proxy's prefix estimates (conditional disaggregation, the pool) count cached
    tokens only on engines whose vllm:cache_config_info says enable_prefix_caching="True"."""
    info = [ln for ln in metrics(getattr(engines, role)).splitlines()
            if ln.startswith("vllm:cache_config_info{")]  # fmt: skip
    assert len(info) == 1 and info[0].endswith(" 1.0")
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info[0].split("{", 1)[1].rsplit("}", 1)[0]))
    assert labels["enable_prefix_caching"] in ("True", "False")
    assert labels["engine"] == "0" and labels["block_size"].isdigit()
    assert "model_name" not in labels


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_metric_names_and_labels(engines: Engines, role: str) -> None:
    text = metrics(getattr(engines, role))
    samples = [line for line in text.splitlines() if line.startswith("vllm:")]
    names = {line.split("{")[0].split(" ")[0] for line in samples}
    assert not [m for m in METRICS if m not in names]
    labels = f'model_name="{engines.model}"'
    ours = [line for line in samples if line.split("{")[0].split(" ")[0] in METRICS]
    assert all('engine="0"' in line and labels in line for line in ours)
    reasons = set(re.findall(r'vllm:request_success_total\{[^}]*finished_reason="(\w+)"', text))
    assert {"stop", "length", "abort", "error"} <= reasons
    waiting = set(re.findall(r'vllm:num_requests_waiting_by_reason\{[^}]*reason="(\w+)"', text))
    assert waiting == {"capacity", "deferred"}


# -- several completions, logprobs, priority ------------------------------------------------

PROMPTS = [PROMPT, "A proxy forwards the prompt", "hello, how are you"]


def texts(r: Body) -> list[str]:
    return [c["text"] if "text" in c else c["message"]["content"] for c in r["choices"]]


def test_prompt_list_numbers_choices_and_sums_usage(engines: Engines) -> None:
    url = engines.decode + "/v1/completions"
    rid = _rid()
    batch = post(url, completion(engines, PROMPTS, max_tokens=5, ignore_eos=True), rid)
    singles = [post(url, completion(engines, p, max_tokens=5, ignore_eos=True)) for p in PROMPTS]
    assert batch["id"] == f"cmpl-{rid}"
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2]
    assert texts(batch) == [texts(r)[0] for r in singles]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert batch["usage"][key] == sum(r["usage"][key] for r in singles)
    assert batch["kv_transfer_params"] is None and batch["metrics"] is None


def test_prompt_list_stream_interleaves_with_one_usage_chunk(engines: Engines) -> None:
    url = engines.decode + "/v1/completions"
    body = completion(engines, PROMPTS[:2], max_tokens=5, ignore_eos=True)
    whole = post(url, body)
    chunks = stream(url, {**body, "stream": True, "stream_options": {"include_usage": True}})
    *content, last = chunks
    assert last["choices"] == [] and last["usage"] == {
        k: whole["usage"][k] for k in ("prompt_tokens", "total_tokens", "completion_tokens")
    }
    assert all(len(c["choices"]) == 1 for c in content)
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    got: dict[int, str] = {}
    for c in content:
        choice = c["choices"][0]
        got[choice["index"]] = got.get(choice["index"], "") + choice["text"]
    assert got == dict(enumerate(texts(whole)))
    finished = [c for c in content if c["choices"][0]["finish_reason"]]
    assert len(finished) == 2 and all("system_fingerprint" not in c for c in finished)
    plain = stream(url, {**body, "stream": True})  # no usage chunk: the fingerprint on the ends
    ends = [c for c in plain if c["choices"][0]["finish_reason"]]
    assert len(ends) == 2 and all(c["system_fingerprint"].startswith("vllm-0.32.0") for c in ends)


def test_token_id_prompts(engines: Engines) -> None:
    url = engines.decode + "/v1/completions"
    ids = post(engines.decode + "/tokenize", {"model": engines.model, "prompt": PROMPT})["tokens"]
    text = post(url, completion(engines, PROMPT, max_tokens=4, return_token_ids=True))
    one = post(url, completion(engines, ids, max_tokens=4, return_token_ids=True))
    assert one["choices"][0]["token_ids"] == text["choices"][0]["token_ids"]
    assert one["choices"][0]["prompt_token_ids"] == ids
    two = post(url, completion(engines, [ids, ids[:3]], max_tokens=4, return_token_ids=True))
    assert [c["prompt_token_ids"] for c in two["choices"]] == [ids, ids[:3]]
    assert two["usage"]["prompt_tokens"] == len(ids) + 3


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_n_with_a_seed_is_seed_plus_j_per_sample(engines: Engines, path: str) -> None:
    """vLLM samples the j-th of n choices with seed + j: what a proxy that fans n out into
    n requests must send to get the same answer."""
    url = engines.decode + path
    base: Body = {"model": engines.model, "max_tokens": 6, "temperature": 1.0,
                  "return_token_ids": True}  # fmt: skip
    base.update({"prompt": PROMPT} if "chat" not in path else {"messages": MESSAGES})
    both = post(url, {**base, "n": 2, "seed": 7})
    first, second = (post(url, {**base, "seed": seed}) for seed in (7, 8))
    tokens = [c["token_ids"] for c in both["choices"]]
    assert tokens == [first["choices"][0]["token_ids"], second["choices"][0]["token_ids"]]
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert both["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"]  # counted once
    assert both["usage"]["completion_tokens"] == 12


def test_chat_n_stream_opens_with_a_role_chunk_per_choice(engines: Engines) -> None:
    body = {"model": engines.model, "messages": MESSAGES, "max_tokens": 3, "n": 2, "seed": 1,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    chunks = stream(engines.decode + "/v1/chat/completions", body)
    roles = [c["choices"][0]["index"] for c in chunks[:2]]
    assert roles == [0, 1] and all(c["choices"][0]["delta"]["role"] for c in chunks[:2])
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    single = post(engines.decode + "/v1/chat/completions",
                  {"model": engines.model, "messages": MESSAGES, "max_tokens": 1})  # fmt: skip
    assert chunks[-1]["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]


def test_echo_and_logprobs_shapes(engines: Engines) -> None:
    url = engines.decode + "/v1/completions"
    echo = post(url, completion(engines, PROMPT, max_tokens=3, echo=True))
    assert texts(echo)[0].startswith(PROMPT)
    r = post(url, completion(engines, PROMPT, max_tokens=3, echo=True, logprobs=2))
    lp = r["choices"][0]["logprobs"]
    assert set(lp) == {"text_offset", "token_logprobs", "tokens", "top_logprobs"}
    n = r["usage"]["prompt_tokens"] + 3
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(1 <= len(t) <= 3 for t in lp["top_logprobs"][1:])
    assert all(isinstance(v, float) and v <= 0 for v in lp["token_logprobs"][1:])
    plp = r["choices"][0]["prompt_logprobs"]
    assert len(plp) == r["usage"]["prompt_tokens"] and plp[0] is None
    for entry in plp[1:]:
        assert 1 <= len(entry) <= 3
        assert all(set(v) == {"logprob", "rank", "decoded_token"} for v in entry.values())
    chat = post(engines.decode + "/v1/chat/completions",
                {"model": engines.model, "messages": MESSAGES, "max_tokens": 2, "logprobs": True,
                 "top_logprobs": 2, "prompt_logprobs": 1})  # fmt: skip
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 2 and all(len(c["top_logprobs"]) == 2 for c in content)
    assert set(content[0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_logprobs_after_a_prefill_load_no_kv(engines: Engines, path: str) -> None:
    """A decoder asked for prompt logprobs loads nothing from the prefiller (vLLM sets
    skip_reading_prefix_cache for them): it recomputes the prompt, answers as if called
    directly, and the prefiller's blocks are freed."""
    chat = "chat" in path
    body: Body = {"model": engines.model, "max_tokens": 3, "temperature": 0, "prompt_logprobs": 1}
    body.update({"messages": MESSAGES} if chat else {"prompt": PROMPT, "echo": True,
                                                     "logprobs": 1})  # fmt: skip
    direct = post(engines.decode + path, body)
    # Blocks that earlier tests' legs left unpulled are freed when their lease (30 s) runs out:
    # wait until the prefiller holds none, so that what it holds next is this leg's alone.

    def held() -> float:
        return metric(engines.prefill, "vllm:kv_cache_usage_perc")

    leg = {k: v for k, v in body.items() if k not in ("prompt_logprobs", "echo", "logprobs")}
    leg.update(max_tokens=1, ignore_eos=True, kv_transfer_params=KV0)
    # The engine publishes its KV usage a moment later: seconds, when CPU engines share a small box,
    # where a /metrics read can take as long as the blocks' lease and so miss them all: the leg is
    # tried again then (three times at most).
    for _ in range(3):
        wait_until(
            lambda: held() == 0, 90, "the prefiller kept earlier legs' blocks past their lease"
        )
        kv = post(engines.prefill + path, leg, _rid())["kv_transfer_params"]
        seen = time.monotonic() + 25
        while time.monotonic() < seen and not held() > 0:
            time.sleep(0.2)
        if time.monotonic() < seen:
            break
    else:
        raise AssertionError("the prefiller holds no blocks for the decoder")
    xfer = metric(engines.decode, XFER)
    got = post(engines.decode + path, {**body, "kv_transfer_params": kv})
    assert got["choices"] == direct["choices"] and got["usage"] == direct["usage"]
    assert got.get("prompt_logprobs") == direct.get("prompt_logprobs")
    wait_until(lambda: held() == 0, 20, "the prefiller kept the blocks (its lease is 30 s)")
    assert metric(engines.decode, XFER) == xfer


def test_priority_and_best_of_are_accepted(engines: Engines) -> None:
    """vLLM 0.32 takes `priority` whatever its scheduling policy, and ignores `best_of`."""
    url = engines.decode + "/v1/completions"
    r = post(url, completion(engines, PROMPT, max_tokens=2, priority=10))
    assert len(r["choices"]) == 1
    r = post(url, completion(engines, PROMPT, max_tokens=2, best_of=2))
    assert len(r["choices"]) == 1
    resp = httpx.post(url, json=completion(engines, PROMPT, max_tokens=2),
                      headers={"X-Vllm-Priority": "3"}, timeout=TIMEOUT)  # fmt: skip
    assert resp.status_code == 200
