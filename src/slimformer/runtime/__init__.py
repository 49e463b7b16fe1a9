"""The run-time side: execution planner (per-machine choice of how each compressed layer computes), padding-free batching, machine description."""
