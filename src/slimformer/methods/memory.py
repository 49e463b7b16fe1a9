"""Memory this process may still allocate (cgroup limit, MemAvailable)."""

from __future__ import annotations

import os
from pathlib import Path


def _cgroup_limit() -> int | None:
    """The cgroup (v2 or v1) memory limit minus current usage of the cgroup, or None."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw == "max" or not raw.isdigit() or int(raw) >= 1 << 60:
            return None
        try:
            used = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            used = 0
        return max(int(raw) - used, 0)
    return None


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory_bytes() -> int:
    """Bytes this process can still allocate: the smaller of the cgroup's remaining limit and
    the kernel's ``MemAvailable`` (``SLIMFORMER_MEMORY_LIMIT`` bytes overrides both)."""
    override = os.environ.get("SLIMFORMER_MEMORY_LIMIT")
    if override and override.isdigit():
        return int(override)
    values = [v for v in (_cgroup_limit(), _mem_available()) if v is not None]
    return min(values) if values else 8 << 30
