import pytest

from proxy.control.workers import Breaker, Health, WorkerPool


def test_track_releases_on_success_and_error() -> None:
    pool = WorkerPool.from_urls("decode", ["http://a", "http://b"])
    worker = pool.workers[1]
    with pool.track(worker, 40):
        assert (worker.inflight, worker.inflight_chars) == (1, 40)
    with pytest.raises(RuntimeError), pool.track(worker, 7):
        raise RuntimeError
    assert (worker.inflight, worker.inflight_chars, worker.requests_total) == (0, 0, 2)
    assert "http://b:0" in repr(pool)


def test_a_decode_stream_counts_from_its_decode_leg_to_the_end() -> None:
    pool = WorkerPool.from_urls("pool", ["http://a"])
    worker = pool.workers[0]
    with pool.track(worker, 10, prefill_tokens=300) as lease:
        # waiting for its prompt (here or on another engine): in flight, not yet a stream
        assert (worker.inflight, worker.prefill_tokens, worker.decode_streams) == (1, 300, 0)
        lease.decoding()
        lease.decoding()
        assert worker.decode_streams == 1
        lease.prefilled()
        assert (worker.prefill_tokens, worker.decode_streams) == (0, 1)
    assert (worker.inflight, worker.prefill_tokens, worker.decode_streams) == (0, 0, 0)
    with pytest.raises(RuntimeError), pool.track(worker, 10, prefill_tokens=50) as lease:
        lease.decoding()
        raise RuntimeError
    assert (worker.inflight, worker.prefill_tokens, worker.decode_streams) == (0, 0, 0)


def test_breaker_opens_after_threshold_and_recovers_through_one_trial() -> None:
    pool = WorkerPool.from_urls("decode", ["http://a"], failure_threshold=2, cooldown=10.0)
    w = pool.workers[0]
    pool.record_failure(w, "boom", now=100.0)
    assert w.breaker is Breaker.CLOSED and w.available
    pool.record_failure(w, "boom", now=101.0)
    assert w.breaker is Breaker.OPEN and not w.available
    pool.refresh(now=105.0)
    assert w.breaker is Breaker.OPEN  # still cooling down
    pool.refresh(now=111.0)
    assert w.breaker is Breaker.HALF_OPEN and w.available
    with pool.track(w, 1):
        assert not w.available  # one trial at a time
    pool.record_failure(w, "still broken", now=112.0)
    assert w.breaker is Breaker.OPEN  # a failed trial opens it again at once
    pool.refresh(now=122.0)
    with pool.track(w, 1):
        pass
    pool.record_success(w)
    assert w.breaker is Breaker.CLOSED and w.consecutive_failures == 0 and w.available


def test_success_resets_consecutive_failures() -> None:
    pool = WorkerPool.from_urls("prefill", ["http://a"], failure_threshold=2)
    w = pool.workers[0]
    pool.record_failure(w, "x")
    pool.record_success(w)
    pool.record_failure(w, "x")
    assert w.breaker is Breaker.CLOSED and w.failures_total == 2


def test_failed_health_check_makes_unavailable() -> None:
    pool = WorkerPool.from_urls("prefill", ["http://a"])
    w = pool.workers[0]
    pool.record_check(w, False, "/health answered 503")
    assert not w.available and w.health is Health.UNHEALTHY
    assert w.describe()["last_error"] == "/health answered 503"
    pool.record_check(w, True)
    assert w.available


def test_panic_routing_when_every_worker_fails_its_check() -> None:
    pool = WorkerPool.from_urls("decode", ["http://a", "http://b"], failure_threshold=1)
    a, b = pool.workers
    pool.record_check(a, False, "timeout")
    pool.refresh()
    assert not a.available and b.available and not pool.panic
    pool.record_check(b, False, "timeout")
    pool.refresh()
    assert pool.panic and a.available and b.available  # checks ignored: try them anyway
    pool.record_failure(a, "connect refused")  # a real failure still counts
    pool.refresh()
    assert not a.available and b.available
    pool.record_check(b, True)
    pool.refresh()
    assert not pool.panic and b.available and not a.available
