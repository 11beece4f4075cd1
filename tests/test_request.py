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
        (CHAT, b'{"messages":[{"role":"user","content":"x"}]}', "'model' is required"),
        (CHAT, b'{"model":"m","messages":[]}', "non-empty list"),
        (CHAT, b'{"model":"m","messages":["x"]}', "string 'role'"),
        (CHAT, b'{"model":"m","messages":[{"role":"user"}],"n":2}', "'n' other than 1"),
        (CHAT, b'{"model":"m","messages":[{"role":"user"}],"stream":"yes"}', "'stream'"),
        (COMPLETIONS, b'{"model":"m"}', "'prompt' must be"),
        (COMPLETIONS, b'{"model":"m","prompt":["a","b"]}', "list of 2 prompts"),
        (COMPLETIONS, b'{"model":"m","prompt":"a","stream_options":1}', "stream_options"),
    ],
)
def test_rejections_say_what_is_wrong(path: str, raw: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message) as info:
        parse_request(path, raw, "rid")
    assert info.value.status == 400


def test_request_id() -> None:
    assert check_request_id(b"abc-1") == "abc-1"
    generated = check_request_id(None)
    assert generated.startswith("pdp-") and generated != check_request_id(None)
    with pytest.raises(BadRequest):
        check_request_id(b"bad\nid")
    with pytest.raises(BadRequest):
        check_request_id(b"x" * 300)
