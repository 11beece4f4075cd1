"""Fixtures the serving-process tests share with other suites."""

from tests.control.test_kvevents_replicas import engines  # noqa: F401 (a fixture: two publishing sims)
