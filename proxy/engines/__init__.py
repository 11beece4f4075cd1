"""Between the planes: the only code that speaks HTTP to engines (client.py over http1.py), the
KV-transfer protocols (connectors/: one module each, named in connectors/registry.py), the
prompt counter (tokenize.py), and the engines' /metrics read once per engine per tick
(scrape.py over the one Prometheus parser, promtext.py)."""
