import orjson

from proxy.flow.relay import SSEScanner, sse_error_event


def event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


ROLE = event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
TOKEN_A = event({"choices": [{"index": 0, "delta": {"content": "A"}}]})
TOKEN_B = event({"choices": [{"index": 0, "delta": {"content": "B"}, "finish_reason": "length"}]})
USAGE = event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
DONE = b"data: [DONE]\n\n"


def test_relays_whole_events_as_bytes_and_times_first_real_token() -> None:
    stream = ROLE + TOKEN_A + TOKEN_B + USAGE + DONE
    scanner = SSEScanner()
    out = b""
    # feed in awkward pieces: events split across reads are held back until complete
    for i, piece in enumerate(stream[j : j + 7] for j in range(0, len(stream), 7)):
        forwarded = scanner.feed(piece, float(i))
        assert forwarded == b"" or forwarded.endswith(b"\n\n")
        out += forwarded
    assert out == stream
    assert scanner.first_token is not None and scanner.first_token > 0  # not the role chunk
    assert scanner.token_events == 2
    assert scanner.usage == {"prompt_tokens": 3, "completion_tokens": 2}
    assert scanner.done and scanner.pending == b""


def test_completion_text_counts_and_error_event_is_noted() -> None:
    scanner = SSEScanner()
    scanner.feed(event({"choices": [{"text": "x"}]}), 1.0)
    scanner.feed(event({"error": {"message": "boom", "code": 500}}), 2.0)
    assert scanner.first_token == 1.0
    assert scanner.error == {"message": "boom", "code": 500}
    assert not scanner.done


def test_partial_event_is_pending() -> None:
    scanner = SSEScanner()
    assert scanner.feed(b'data: {"choi', 0.0) == b""
    assert scanner.pending == b'data: {"choi'


def test_error_event_shape() -> None:
    assert sse_error_event(b'{"error":{}}') == b'data: {"error":{}}\n\ndata: [DONE]\n\n'


def test_malformed_first_event_is_flagged() -> None:
    scanner = SSEScanner()
    assert scanner.feed(b"data: {not json\n\n", 0.0) == b"data: {not json\n\n"
    assert scanner.malformed == b"data: {not json"
    other = SSEScanner()
    other.feed(b"<html>oops</html>\n\n", 0.0)
    assert other.malformed is not None
    fine = SSEScanner()
    fine.feed(b": keep-alive comment\n\n" + TOKEN_A, 0.0)
    assert fine.malformed is None and fine.first_token == 0.0


def test_batched_reads_count_like_single_events() -> None:
    """Many token events in one read (the fast path) count as they would one by one."""
    tokens = [event({"choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}) for i in range(9)]
    stream = ROLE + b"".join(tokens) + USAGE + DONE
    for size in (len(stream), 50, 200, 1):
        scanner = SSEScanner()
        pieces = [stream[j : j + size] for j in range(0, len(stream), size)]
        out = b"".join(scanner.feed(p, float(i)) for i, p in enumerate(pieces))
        assert out == stream
        assert scanner.token_events == 9, size
        assert scanner.usage == {"prompt_tokens": 3, "completion_tokens": 2}
        assert scanner.done


def test_a_whole_answer_in_one_read_counts_like_single_events() -> None:
    """The role chunk, the tokens and the end marker in one read (a fast engine, a busy proxy):
    scanned up to the first token, the rest counted at once, the end marker noted."""
    tokens = [event({"choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}) for i in range(9)]
    for stream in (ROLE + b"".join(tokens) + DONE, b"".join(tokens) + b": ping\n\n" + DONE):
        whole, single = SSEScanner(), SSEScanner()
        assert whole.feed(stream, 1.0) == stream
        for i, piece in enumerate(stream.split(b"\n\n")[:-1]):
            single.feed(piece + b"\n\n", 1.0 + i)
        assert whole.token_events == single.token_events == 9
        assert whole.first_token == whole.last_token == 1.0 and single.first_token == 1.0 + (
            stream.startswith(ROLE)
        )
        assert whole.done and single.done and whole.usage is None and whole.error is None
