"""Measurements of this machine kept on disk: one JSON file per machine signature and kind
(``plan-<signature>.json``: the execution planner's path timings; ``widths-<signature>.json``:
the batch-width sweeps of :mod:`slimformer.runtime.alignment`).

A leaf of ``runtime/``: the planner and the width alignment both read and write through it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from slimformer.runtime.machine import signature_key

CACHE_VERSION = 4  # 2: decode timings stream over copies with cold caches; 3: W8A8 parity of input-scaled layers; 4: W8A8 float paths fused


def default_cache_dir() -> Path:
    if os.environ.get("SLIMFORMER_PLAN_CACHE"):
        return Path(os.environ["SLIMFORMER_PLAN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "slimformer" / "plans"


class PlanCache:
    """Measurements of this machine, one JSON file per machine signature. A file recorded on
    another signature (copied from another machine, another torch, other thread count) is
    ignored and replaced."""

    def __init__(self, directory: Path, sig: dict, prefix: str = "plan") -> None:
        self.sig = sig
        self.prefix = prefix
        self.path = Path(directory) / f"{prefix}-{signature_key(sig)}.json"
        self.entries: dict[str, dict] = {}
        self.ignored = False
        self.dirty = False
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(data, dict) and data.get("version") == CACHE_VERSION and data.get("signature") == sig:
            self.entries = dict(data.get("entries") or {})
        else:
            self.ignored = True

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, value: dict) -> None:
        self.entries[key] = value
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.prefix}-", dir=self.path.parent)
            with os.fdopen(fd, "w") as fh:
                json.dump({"version": CACHE_VERSION, "signature": self.sig, "entries": self.entries}, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError:  # a read-only home: plans still work, they are just not kept
            pass
