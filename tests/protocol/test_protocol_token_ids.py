"""What a proxy that continues a broken stream on another engine relies on (proxy.flow.migrate),
on the simulator and real vLLM alike: streams carry token ids when asked (`return_token_ids`),
and a greedy answer continued from its prompt's ids followed by its first k generated ids is
the rest of the uninterrupted answer."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from protocol_engines import Engines

Body = dict[str, Any]
PROMPT = "The quick brown fox jumps over the lazy dog"
MESSAGES = [{"role": "user", "content": "hello, how are you today?"}]
TIMEOUT = 120


def events(url: str, body: Body) -> list[Body]:
    resp = httpx.post(url, json={**body, "stream": True}, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    blocks = [b[6:] for b in resp.text.split("\n\n") if b.startswith("data: ")]
    assert blocks[-1] == "[DONE]"
    return [httpx.Response(200, content=b).json() for b in blocks[:-1]]


def whole(url: str, body: Body) -> Body:
    resp = httpx.post(url, json=body, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    data: Body = resp.json()
    return data


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streams_carry_token_ids(engines: Engines, path: str) -> None:
    url = engines.decode + path
    body: Body = {"model": engines.model, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    body.update({"prompt": PROMPT} if "chat" not in path else {"messages": MESSAGES})
    full = whole(url, {**body, "return_token_ids": True})
    chunks = events(url, {**body, "return_token_ids": True})
    if "chat" in path:  # the prompt's ids (the chat template applied) in the role chunk
        prompt_ids = chunks[0]["prompt_token_ids"]
        assert prompt_ids == full["prompt_token_ids"] and chunks[0]["choices"][0]["delta"] == {
            "role": "assistant", "content": ""}  # fmt: skip
        chunks = chunks[1:]
    else:  # in the first chunk's choice, null after it
        prompt_ids = chunks[0]["choices"][0]["prompt_token_ids"]
        assert prompt_ids == full["choices"][0]["prompt_token_ids"]
        assert all(c["choices"][0]["prompt_token_ids"] is None for c in chunks[1:])
    ids = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    assert ids == full["choices"][0]["token_ids"] and len(ids) == 12
    # without the flag the same fields are null, the text the same
    plain = events(url, body)
    assert all(c["choices"][0].get("token_ids") is None for c in plain if c["choices"])
    text = lambda cs: "".join(c.get("text") or c.get("delta", {}).get("content") or ""  # noqa: E731
                              for e in cs for c in e["choices"])  # fmt: skip
    assert text(plain) == text(chunks)


@pytest.mark.parametrize("k", [1, 7])
def test_a_greedy_continuation_is_the_rest_of_the_answer(engines: Engines, k: int) -> None:
    url = engines.decode + "/v1/completions"
    body = {"model": engines.model, "prompt": PROMPT, "max_tokens": 16, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    full = whole(url, body)["choices"][0]
    ids = full["token_ids"]
    rest = whole(url, {**body, "prompt": full["prompt_token_ids"] + ids[:k], "max_tokens": 16 - k})
    assert rest["choices"][0]["token_ids"] == ids[k:]
    assert rest["usage"]["prompt_tokens"] == len(full["prompt_token_ids"]) + k
    chat = {"model": engines.model, "messages": MESSAGES, "max_tokens": 16, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    answer = whole(engines.decode + "/v1/chat/completions", chat)
    generated = answer["choices"][0]["token_ids"]
    cont = whole(url, {**body, "prompt": answer["prompt_token_ids"] + generated[:k],
                       "max_tokens": 16 - k})  # fmt: skip
    assert cont["choices"][0]["token_ids"] == generated[k:]
