"""KV-transfer protocols, one module each: how the prefill leg is asked for and how its result
reaches the decoder (base.py: the interface and `make_connector`)."""
