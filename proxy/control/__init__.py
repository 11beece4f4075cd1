"""Control plane: who the workers are and how they are. The workers and their registry, the
active health checks, the stall watch, KV-transfer health, the pool's controller, one engine's
identity, the admin API and its probes (admin/), the console (console/); plane.py builds it and
runs its loops. The data plane only reads the workers' state and reports its legs to it."""
