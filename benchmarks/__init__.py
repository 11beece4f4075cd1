"""Benchmarks: scripts that measure pdproxy, run from the README; results in benchmarks/results/."""
