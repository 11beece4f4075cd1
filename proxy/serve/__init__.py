"""Data plane, the edge: the ASGI endpoints a client talks to. Reading and checking a request,
admission at its priority, the completions endpoint (endpoint.py), vLLM's other paths passed
through, the responder, and the HTTP surface beside them (api.py: /health, /stats, /v1/models,
/metrics, and where the admin API and the console are mounted). plane.py builds the data plane
from the config."""
