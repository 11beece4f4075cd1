"""The pool: engines that prefill for others and decode (vLLM NixlConnector, kv_role kv_both),
placed per request by the proxy, beside any dedicated prefillers and decoders.

    plan.py        the per-request decision, a pure function of a snapshot: local (one engine
                   computes the prompt and answers, no KV moves) or disaggregated (prefill on
                   engine A, decode on engine B != A), and why
    controller.py  how many pool engines lean to prefill and how many to decode, from the load
                   measured over a sliding window against the engines' capacity, with
                   hysteresis; a pure cost function and a small state machine
    planner.py     the glue the request path calls (proxy.placement.Planner): exact token
                   counts from /tokenize, the snapshot, the decision's metrics, and the
                   controller's loop, its gauges and its log

A lean change only steers new requests: a request keeps the engines its plan named to its end.
"""
