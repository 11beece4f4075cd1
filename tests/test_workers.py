import pytest

from proxy.workers import WorkerPool


def test_track_releases_on_success_and_error() -> None:
    pool = WorkerPool.from_urls("decode", ["http://a", "http://b"])
    worker = pool.workers[1]
    with pool.track(worker, 40):
        assert (worker.inflight, worker.inflight_chars) == (1, 40)
    with pytest.raises(RuntimeError), pool.track(worker, 7):
        raise RuntimeError
    assert (worker.inflight, worker.inflight_chars, worker.requests_total) == (0, 0, 2)
    assert "http://b:0" in repr(pool)
