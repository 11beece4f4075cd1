import pytest

from proxy.place.conditional import ConditionalDisagg, Decision


@pytest.mark.parametrize(
    ("tokens", "cached", "expected"),
    [
        (10, 0, Decision(False, "short")),
        (511, 0, Decision(False, "short")),
        (512, 0, Decision(True, "long")),
        (5000, 0, Decision(True, "long")),
        (5000, 4600, Decision(False, "cached")),  # 400 uncached < 512
        (5000, 4488, Decision(True, "long")),  # 512 uncached
        (600, 9000, Decision(False, "cached")),  # an over-estimate of the cache is capped
    ],
)
def test_decide(tokens: int, cached: int, expected: Decision) -> None:
    assert ConditionalDisagg(512).decide(tokens, cached) == expected


@pytest.mark.parametrize(("tokens", "cached"), [(10, 0), (5000, 0), (5000, 4600)])
def test_a_slow_kv_path_keeps_every_prompt_on_the_decoder(tokens: int, cached: int) -> None:
    assert ConditionalDisagg(512).decide(tokens, cached, slow_kv=True) == Decision(False, "slow_kv")


@pytest.mark.parametrize(
    ("chars", "cached_chars", "expected"),
    [(100, 0, True), (16 * 512 - 1, 0, True), (16 * 512, 0, False), (10**6, 256, True)],
)
def test_needs_tokens(chars: int, cached_chars: int, expected: bool) -> None:
    assert ConditionalDisagg(512).needs_tokens(chars, cached_chars) is expected
