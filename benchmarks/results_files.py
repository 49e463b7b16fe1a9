"""Writing a benchmark's table, JSON and plot into benchmarks/results/ all at once: the three
files are made in a temporary folder beside the results and moved into place at the end, so an
interrupted run leaves the previous results whole."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def publish(out: Path, name: str, markdown: str, result: dict, plot: Callable[[dict, Path], None]) -> None:
    """Write ``name``.md (``markdown``), ``name``.json (``result``) and ``name``.png (``plot(result,
    path)``) into ``out``, atomically per file, and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out))
    try:
        (tmp / f"{name}.md").write_text(markdown)
        (tmp / f"{name}.json").write_text(json.dumps(result, indent=2))
        plot(result, tmp / f"{name}.png")
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    print(markdown)


@contextmanager
def figure(path: Path, size: tuple[float, float], title: str | None = None, dpi: int = 110) -> Iterator:
    """A one-panel matplotlib figure (headless backend) for the ``with`` body to draw on; on
    leaving, titled ``title`` (small: a CPU name), laid out, written to ``path`` and closed.
    Yields the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        if title is not None:
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def compile_fallback_lines(rows: list[dict], name_key: str) -> list[str]:
    """The lines a table adds under itself from its rows' ``compile_fallbacks`` (see
    ``slimformer.runtime.compile.compile_fallbacks``, recorded after timing): none for results
    written before the check existed."""
    if not any("compile_fallbacks" in r for r in rows):
        return []
    fell = [f"{r[name_key]} ({'; '.join(sorted(set(r['compile_fallbacks'])))})" for r in rows if r.get("compile_fallbacks")]
    return ["", "Checked after timing: " + ("every compiled row ran compiled throughout." if not fell
                                          else "these 'compiled' rows met a compiler error on some batch and ran eagerly from there: " + ", ".join(fell) + ".")]


def cpu_info() -> dict:
    """The machine a benchmark's figures were measured on: CPU model and flags (the runtime's
    machine signature), threads, load average before the run, torch version."""
    from slimformer.runtime import machine

    sig = machine.signature()
    return {"model": sig["cpu"], "flags": sig["flags"], "threads": sig["threads"], "loadavg": os.getloadavg(), "torch": sig["torch"]}


def bootstrap_indices(n_documents: int, gen, resamples: int = 2000):
    """(resamples, n_documents) indices of documents drawn with replacement from ``gen``: one
    draw shared by every paired comparison it is passed to."""
    import torch

    return torch.randint(0, n_documents, (resamples, n_documents), generator=gen)


def paired_ratio(a, b, idx) -> dict:
    """sum(a) / sum(b) of per-document sums (KL, NLL) of two models on the same documents, with a
    95 % interval from the resamples ``idx`` (:func:`bootstrap_indices`)."""
    import torch

    ta, tb = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    r = ta[idx].sum(1) / tb[idx].sum(1)
    lo, hi = torch.quantile(r, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"ratio": float(ta.sum() / tb.sum()), "low": lo, "high": hi}
