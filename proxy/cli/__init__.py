"""The `pdproxy` command: serve, demo, sim (the simulator, package pdsim) and workers."""
