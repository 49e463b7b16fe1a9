"""The folder layout is the architecture: a package imports only the packages below it.

Read from the source (every ``import slimformer.X`` / ``from slimformer.X import``, at module
level or inside a function), so a new upward import fails here instead of as an import circle
on some user's first call.
"""

from __future__ import annotations

import ast
from pathlib import Path

import slimformer

# Lowest first; a package may import its own modules and those of any lower layer.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "jsonfile", "timing", "dynamo"),
    ("data", "kernels"),
    ("models",),
    ("methods",),
    ("runtime",),
    ("io",),
    ("evaluate",),
    ("search", "recipe"),
    ("compress",),
    ("cli", "__init__"),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}

# Upward imports that are deliberate, each inside the one function that needs it.
ALLOWED_UPWARD = {
    # BitStack's ``target_megabytes`` is a size of the saved file, which only io/ defines
    # (tied tensors once, quantized modules' descriptions); measured lazily, at fit time.
    ("methods/quantization/bitstack.py", "slimformer.evaluate.cost"),
}

ROOT = Path(slimformer.__file__).resolve().parent


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "slimformer":
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "slimformer"]
    return found


def _package(relative: Path) -> str:
    return relative.parts[0].removesuffix(".py")


def test_every_package_has_a_layer():
    packages = {_package(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")}
    assert packages <= set(RANK), f"give these a layer in LAYERS: {sorted(packages - set(RANK))}"


def test_no_package_imports_a_higher_layer():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        own = _package(relative)
        for line, module in _imports(path):
            parts = module.split(".")
            if len(parts) < 2 or parts[1] == own:
                continue
            if RANK[parts[1]] >= RANK[own] and (relative.as_posix(), module) not in ALLOWED_UPWARD:
                upward.append(f"{relative}:{line} imports {module}")
    assert not upward, "imports against the layering (lower layers never import higher ones):\n" + "\n".join(upward)


def test_the_allowed_exceptions_still_exist_and_are_lazy():
    """An exception that no longer exists is removed from the list; one that moved to module
    level would run at import time and is no longer an exception."""
    for relative, module in ALLOWED_UPWARD:
        tree = ast.parse((ROOT / relative).read_text())
        top = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
        assert module in {m for _, m in _imports(ROOT / relative)}, f"{relative} no longer imports {module}: drop it from ALLOWED_UPWARD"
        assert module not in top, f"{relative} imports {module} at module level"
