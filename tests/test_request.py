import orjson
import pytest

from proxy.errors import BadRequest
from proxy.request import CHAT, COMPLETIONS, check_request_id, parse_request


def parse(path: str, body: object) -> object:
    return parse_request(path, orjson.dumps(body), "rid")


def test_chat_request() -> None:
    req = parse_request(
        CHAT,
        b'{"model":"m","messages":[{"role":"user","content":"hello"}],"stream":true,'
        b'"stream_options":{"include_usage":true}}',
        "rid",
    )
    assert req.stream and req.include_usage and req.prompt_chars == 5  # type: ignore[union-attr]


def test_completion_prompt_forms() -> None:
    assert parse(COMPLETIONS, {"model": "m", "prompt": "abc"}).prompt_chars == 3  # type: ignore[attr-defined]
    assert parse(COMPLETIONS, {"model": "m", "prompt": [1, 2]}).prompt_chars == 8  # type: ignore[attr-defined]
    single = parse(COMPLETIONS, {"model": "m", "prompt": ["abcd"]})
    assert single.body["prompt"] == "abcd"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("path", "raw", "message"),
    [
        (CHAT, b"{not json", "not valid JSON"),
        (CHAT, b"[1]", "JSON object"),
        (CHAT, b'{"model":7,"messages":[{"role":"user","content":"x"}]}', "'model' must be"),
        (CHAT, b'{"model":"m","messages":[]}', "non-empty list"),
        (CHAT, b'{"model":"m","messages":["x"]}', "string 'role'"),
        (CHAT, b'{"model":"m","messages":[{"role":"user"}],"n":0}', "'n' must be"),
        (CHAT, b'{"model":"m","messages":[{"role":"user"}],"n":2,"temperature":0}', "greedy"),
        (CHAT, b'{"model":"m","messages":[{"role":"user"}],"priority":1.5}', "'priority'"),
        (CHAT, b'{"model":"m","messages":[{"role":"user"}],"stream":"yes"}', "'stream'"),
        (COMPLETIONS, b'{"model":"m"}', "'prompt' must be"),
        (COMPLETIONS, b'{"model":"m","prompt":["a",[1,2]]}', "not mixed"),
        (COMPLETIONS, b'{"model":"m","prompt":[]}', "'prompt' must be"),
        (COMPLETIONS, b'{"model":"m","prompt":[[1],[true]]}', "'prompt' must be"),
        (COMPLETIONS, b'{"model":"m","prompt":"a","stream_options":1}', "stream_options"),
    ],
)
def test_rejections_say_what_is_wrong(path: str, raw: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message) as info:
        parse_request(path, raw, "rid")
    assert info.value.status == 400


def test_batches_and_samples() -> None:
    batch = parse(COMPLETIONS, {"model": "m", "prompt": ["ab", "cde", [1, 2]][:2], "n": 3})
    assert batch.prompts == ["ab", "cde"] and batch.n == 3 and batch.fanout == 6  # type: ignore[attr-defined]
    assert batch.prompt_chars == 5  # type: ignore[attr-defined]
    tokens = parse(COMPLETIONS, {"model": "m", "prompt": [[1, 2], [3]]})
    assert tokens.prompts == [[1, 2], [3]] and tokens.fanout == 2  # type: ignore[attr-defined]
    chat = parse(CHAT, {"model": "m", "messages": [{"role": "u"}], "n": 2, "temperature": 0.7})
    assert chat.prompts is None and chat.fanout == 2  # type: ignore[attr-defined]
    one = parse(COMPLETIONS, {"model": "m", "prompt": [[5, 6]]})
    assert one.fanout == 1 and one.body["prompt"] == [5, 6]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("path", "extra", "reason", "fanout"),
    [
        (COMPLETIONS, {"echo": True, "logprobs": 2}, "prompt_logprobs", 1),
        (COMPLETIONS, {"echo": True}, None, 1),
        (COMPLETIONS, {"logprobs": 2}, None, 1),
        (COMPLETIONS, {"prompt_logprobs": 0}, "prompt_logprobs", 1),
        (CHAT, {"prompt_logprobs": 1}, "prompt_logprobs", 1),
        (CHAT, {"echo": True, "logprobs": True}, None, 1),
        (COMPLETIONS, {"use_beam_search": True, "n": 3, "temperature": 0}, "beam_search", 1),
    ],
)
def test_local_reasons(
    path: str, extra: dict[str, object], reason: str | None, fanout: int
) -> None:
    base = {"prompt": "p"} if path == COMPLETIONS else {"messages": [{"role": "user"}]}
    req = parse(path, {"model": "m", **base, **extra})
    assert req.local_reason == reason and req.fanout == fanout  # type: ignore[attr-defined]


def test_priority_from_body_or_header() -> None:
    body = orjson.dumps({"model": "m", "prompt": "p", "priority": 5})
    assert parse_request(COMPLETIONS, body, "r").priority == 5
    assert parse_request(COMPLETIONS, b'{"model":"m","prompt":"p"}', "r").priority == 0
    by_header = parse_request(COMPLETIONS, body, "r", b"-3")
    assert by_header.priority == -3 and by_header.body["priority"] == -3  # both legs carry it
    assert parse_request(COMPLETIONS, body, "r", b"soon").priority == 5  # unreadable: ignored


def test_request_id() -> None:
    assert check_request_id(b"abc-1") == "abc-1"
    generated = check_request_id(None)
    assert generated.startswith("pdp-") and generated != check_request_id(None)
    with pytest.raises(BadRequest):
        check_request_id(b"bad\nid")
    with pytest.raises(BadRequest):
        check_request_id(b"x" * 300)
