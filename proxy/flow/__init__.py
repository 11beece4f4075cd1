"""Data plane, the legs: one request's plan carried out (legs.py: prefill with failover, the
hand-off, decode), the decode leg and its stream relay (decode.py, relay.py), fan-out of a
request for several completions into sub-requests, the sinks answers are written into, and the
request's phase (progress.py)."""
