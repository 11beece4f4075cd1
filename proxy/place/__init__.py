"""Data plane, the decision: where a request goes, decided from a snapshot with no I/O. One
planner (planner.py) returns the whole plan (plan.py) for every topology: dedicated roles
(dedicated.py, with the policies and conditional disaggregation) or a pool beside them
(pooled.py over the pure pool plan, pool.py). One prefix index (prefix.py); one policy per file
under policies/, named in policies/registry.py."""
