"""JSON files written whole or not at all: the text goes to ``NAME.tmp`` beside the target and is
moved into place with one ``os.replace``, so a reader (or a resumed run) never sees half a file.
The temporary name carries the process id, so two processes writing the same file do not mix."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def write_json(path: str | os.PathLike, data: Any, *, default: Callable[[Any], Any] | None = None, sort_keys: bool = False,
               indent: int | None = 1) -> None:
    """Write ``data`` as JSON to ``path`` atomically (``default``, ``sort_keys``, ``indent`` as for
    :func:`json.dumps`)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=indent, default=default, sort_keys=sort_keys), encoding="utf-8")
    os.replace(tmp, path)
