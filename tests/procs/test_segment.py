"""The segment's lock between real processes: it excludes, including a forked child that
inherited the parent's segment object."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from multiprocessing.synchronize import Event

import pytest

from proxy.procs.segment import Segment
from tests.procs.agents import DEADLINE


@pytest.fixture
def segment() -> Iterator[Segment]:
    segment = Segment.create(None, 8)
    yield segment
    segment.close()
    segment.unlink()


def take(segment: Segment, taken: Event) -> None:
    with segment.locked():
        taken.set()


def test_a_forked_child_does_not_share_its_parents_lock(segment: Segment) -> None:
    fork = multiprocessing.get_context("fork")
    taken = fork.Event()
    child = fork.Process(target=take, args=(segment, taken))
    try:
        with segment.locked():
            child.start()
            # sharing the parent's open file, the child would take the lock at once
            assert not taken.wait(1.0)
        assert taken.wait(DEADLINE)  # once the parent lets go, the child gets it
    finally:
        if child.pid is not None:
            child.join(DEADLINE)
            if child.is_alive():
                child.kill()
                child.join()
