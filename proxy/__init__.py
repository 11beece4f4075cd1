"""pdproxy: an OpenAI-compatible proxy for disaggregated prefill/decode serving on vLLM."""

__version__ = "0.1.0"
