import pytest

from proxy.place.prefix import PrefixIndex, prefix_blocks, prompt_prefix

CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    ("path", "body", "limit", "expected"),
    [
        ("/v1/completions", {"prompt": "hello world"}, 5, "hello"),
        ("/v1/completions", {"prompt": [1, 2, 3]}, 100, "1,2,3"),
        ("/v1/completions", {}, 100, ""),
        (CHAT, {"messages": [{"role": "system", "content": "be nice"}]}, 100, "system:be nice\n"),
        (
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
            100,
            "user:hi\n",
        ),
        (CHAT, {"messages": [{"role": "a", "content": "x" * 50}, {"role": "b"}]}, 10, "a:xxxxxxxx"),
    ],
)
def test_prompt_prefix(path: str, body: dict[str, object], limit: int, expected: str) -> None:
    assert prompt_prefix(path, body, limit) == expected


def test_blocks_chain_and_stop_at_full_blocks() -> None:
    a = prefix_blocks("x" * 100, 32)
    b = prefix_blocks("x" * 64 + "y" * 36, 32)
    assert len(a) == 3  # the last 4 characters do not fill a block
    assert a[:2] == b[:2] and a[2] != b[2]
    assert prefix_blocks("y" + "x" * 99, 32)[1] != a[1]  # a change early changes every later block
    assert prefix_blocks("x" * 100, 32) == a  # stable


def test_index_matched_and_capacity() -> None:
    index = PrefixIndex(capacity=4, owners=2)
    blocks = prefix_blocks("ab" * 64, 32)  # 4 blocks
    index.record(blocks[:2], "A")
    index.record(blocks, "B")
    assert index.matched(blocks) == {"B": 4, "A": 2}
    index.record(prefix_blocks("zz" * 32, 32), "C")  # 2 new blocks push out the 2 oldest
    assert len(index) == 4
    assert index.matched(blocks) == {}  # the first block was forgotten: no match at all
