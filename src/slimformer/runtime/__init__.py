"""Run-time side: generation loop, KV caches, execution planner."""
