"""What the proxy measures: latency statistics and RequestTiming (stats.py), the Prometheus
metrics (metrics.py) and the recent requests' timelines (timeline.py)."""
