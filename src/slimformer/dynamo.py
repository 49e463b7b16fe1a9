"""Dynamo settings every layer may need. A leaf module (no slimformer imports).

Dynamo keeps a bounded number of compiled graphs per code object (``recompile_limit``, 8 by
default); a call needing one more runs eagerly, with one logged warning and no error. Functions
compiled once and called with many static variants (dtypes, flags, ``None`` or a tensor) reach
that bound quickly, so whoever compiles them raises it first.
"""

from __future__ import annotations


def allow_graphs(n: int) -> None:
    """Let Dynamo keep at least ``n`` compiled graphs per code object (``recompile_limit``;
    ``cache_size_limit`` in older torch): beyond the limit, later variants silently run eagerly.
    Only ever raises the limit."""
    import torch._dynamo

    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), n))
