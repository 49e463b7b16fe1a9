"""A search journal: one JSON record per finished generation, appended and fsync'ed, so a
killed search resumes from its last finished generation."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_records(path: Path) -> list[dict]:
    """The records of a JSONL journal, up to a line cut by a kill (the ones before it stand)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: everything before it stands
            break
    return records


def append_record(path: Path, record: dict) -> None:
    """Append one record and make it durable before returning."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
