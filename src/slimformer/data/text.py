"""Offline text for calibration and evaluation.

Built-in sources exist on every machine with Python:

- ``stdlib-docs``: docstrings of the Python standard library (modules, classes, functions), read
  with ``ast`` from the source files (nothing is imported or executed);
- ``pydoc-topics``: ``pydoc_data.topics``, the language reference in prose;
- ``stdlib-source``: the standard library source files themselves, cut into chunks.

plus the user's own ``.txt`` files (paragraphs separated by blank lines) and ``.jsonl`` files
(a ``"text"`` field per line).

Every document is assigned to the ``calibration`` or the ``evaluation`` split by a hash of its
text, so the two splits never share a document, whatever the sample sizes; sampling inside a
split is seeded.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from slimformer.errors import ConfigError

BUILTIN_SOURCES = ("stdlib-docs", "pydoc-topics", "stdlib-source")
SPLITS = ("calibration", "evaluation")
EVAL_FRACTION = 0.2  # share of documents (by hash) that belong to the evaluation split


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    root = _stdlib_dir()
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "turtledemo"}
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(part in skip for part in rel):
            continue
        files.append(path)
    return files


def _clean(text: str) -> str:
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return "\n".join(lines).strip()


@functools.lru_cache(maxsize=None)
def _stdlib_docstrings() -> tuple[str, ...]:
    docs: list[str] = []
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        nodes = [tree] + [
            n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        ]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc:
                docs.append(_clean(doc))
    return tuple(docs)


@functools.lru_cache(maxsize=None)
def _pydoc_topics() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    out: list[str] = []
    for key in sorted(topics):
        # Topics are long; split them into paragraphs grouped to a few hundred words.
        paragraphs = [p.strip() for p in topics[key].split("\n\n") if p.strip()]
        chunk: list[str] = []
        for p in paragraphs:
            chunk.append(p)
            if sum(len(c) for c in chunk) > 1200:
                out.append(_clean("\n\n".join(chunk)))
                chunk = []
        if chunk:
            out.append(_clean("\n\n".join(chunk)))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _stdlib_source(chunk_lines: int = 40) -> tuple[str, ...]:
    out: list[str] = []
    for path in _stdlib_files():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue
        for start in range(0, len(lines), chunk_lines):
            chunk = "\n".join(lines[start : start + chunk_lines]).strip()
            if chunk:
                out.append(chunk)
    return tuple(out)


def _user_file(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise ConfigError(f"text file {path} does not exist", "pass an existing .txt or .jsonl file")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read text file {path} as UTF-8", "pass a UTF-8 .txt or .jsonl file") from exc
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"{path}:{i} is not valid JSON", "write one JSON object with a \"text\" field per line") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ConfigError(f"{path}:{i} has no \"text\" string field", "write one JSON object with a \"text\" field per line")
            out.append(_clean(record["text"]))
        return tuple(t for t in out if t)
    if path.suffix == ".txt":
        return tuple(_clean(p) for p in raw.split("\n\n") if p.strip())
    raise ConfigError(f"text file {path} has suffix {path.suffix!r}", "pass a .txt or .jsonl file")


def check_source(source, what: str = "text source") -> None:
    """Raise ``ConfigError`` unless ``source`` names a built-in source or an existing text file."""
    if not isinstance(source, str):
        raise ConfigError(f"{what} must be a string, got {source!r}", f"use one of {list(BUILTIN_SOURCES)} or a path to a .txt/.jsonl file")
    if source in BUILTIN_SOURCES:
        return
    if not source.endswith((".txt", ".jsonl")):
        raise ConfigError(f"unknown {what} {source!r}", f"use one of {list(BUILTIN_SOURCES)} or a path to a .txt/.jsonl file")
    if not Path(source).is_file():
        raise ConfigError(f"{what} file {source} does not exist", "pass an existing .txt or .jsonl file")


def documents(source: str) -> tuple[str, ...]:
    """All documents of a source, deduplicated, in a fixed order."""
    if source == "stdlib-docs":
        docs = _stdlib_docstrings()
    elif source == "pydoc-topics":
        docs = _pydoc_topics()
    elif source == "stdlib-source":
        docs = _stdlib_source()
    elif source.endswith((".txt", ".jsonl")):
        docs = _user_file(Path(source))
    else:
        raise ConfigError(
            f"unknown text source {source!r}", f"use one of {list(BUILTIN_SOURCES)} or a path to a .txt/.jsonl file"
        )
    seen: set[str] = set()
    unique = []
    for d in docs:
        if d not in seen:
            seen.add(d)
            unique.append(d)
    return tuple(unique)


def split_of(text: str) -> str:
    """The split a document belongs to, decided by a hash of its text alone."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:4], "little") / 2**32
    return "evaluation" if bucket < EVAL_FRACTION else "calibration"


@dataclass(frozen=True)
class TextSpec:
    """Which texts to draw: ``source``, ``split``, how many (``n``), minimum length in characters
    (``min_chars``; shorter documents are skipped), and the sampling ``seed``."""

    source: str = "stdlib-docs"
    split: str = "calibration"
    n: int = 128
    min_chars: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(f"unknown split {self.split!r}", f"use one of {list(SPLITS)}")
        if not isinstance(self.n, int) or self.n <= 0:
            raise ConfigError(f"number of texts must be a positive integer, got {self.n!r}", "pass e.g. n=128")
        if self.min_chars < 0:
            raise ConfigError(f"min_chars must be >= 0, got {self.min_chars}", "pass e.g. min_chars=200")


def load_texts(spec: TextSpec) -> list[str]:
    """Draw ``spec.n`` documents of ``spec.split`` from ``spec.source``, deterministically."""
    pool = [d for d in documents(spec.source) if len(d) >= spec.min_chars and split_of(d) == spec.split]
    if len(pool) < spec.n:
        if not pool:
            raise ConfigError(
                f"text source {spec.source!r} has no {spec.split} documents of at least {spec.min_chars} characters",
                "use a larger text file or lower min_chars",
            )
        # A small user file: use what there is rather than failing.
        return list(pool)
    rng = random.Random(f"{spec.source}|{spec.split}|{spec.seed}")
    return rng.sample(pool, spec.n)
