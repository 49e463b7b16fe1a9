"""Saving and loading compressed models.

A compressed model is a folder:

- ``model.safetensors``: every tensor of the model as stored — packed low-bit codes (a 4-bit
  weight takes half a byte), bfloat16 scales, uint8 zero points, and the float tensors left as
  they were. Tensors shared between modules (tied weights) are stored once;
- ``config.json`` (the transformers config, with the new depth if blocks were dropped) and the
  tokenizer files;
- ``manifest.json``: format version, model class, the recipe and what each step did, the layout
  and execution path (``kernel``) of every quantized module, the per-block structure where it
  differs from the config (removed attention/MLP sub-layers, slimmed head counts and MLP
  widths), library versions and the evaluation.

The folder is written under a temporary name beside the target and renamed at the end, so an
error never leaves a half-written output folder. Loading rebuilds the architecture from the
config, swaps in the quantized modules and loads the tensors; the loaded model's outputs equal,
bit for bit, those of the model that was saved.
"""

from __future__ import annotations

import datetime as _dt
import errno
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from slimformer.errors import ModelLoadError, OutputExistsError, OutputWriteError
from slimformer.jsonfile import write_json
from slimformer.methods.quantization.modules import QuantizedModule, module_from_description
from slimformer.models.adapters import ArchitectureAdapter, attention_implementation, conv1d_to_linear, set_submodule
from slimformer.models.loading import MANIFEST_NAME, LoadedModel, check_folder_contained, check_safetensors_file

FORMAT_NAME = "slimformer"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
SAFETENSORS_METADATA = {"format": "pt", "producer": FORMAT_NAME}


def library_versions() -> dict[str, str]:
    import safetensors
    import transformers

    from slimformer import __version__

    return {"slimformer": __version__, "torch": torch.__version__, "transformers": transformers.__version__, "safetensors": safetensors.__version__}


def canonical_safetensors_header(path: Path) -> None:
    """Rewrite, in place, the header of a safetensors file with its metadata keys sorted.

    The safetensors writer keeps the metadata in a hash map, so their order (and the file's
    bytes) changes from one write to the next; sorted, the same tensors always give the same
    file. Only applied when the header re-serialises to exactly the writer's bytes."""
    import struct

    with open(path, "r+b") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        raw = f.read(size)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or list(meta) == sorted(meta):
            return
        if json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode() != raw.rstrip(b" "):
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        f.seek(8)
        f.write(new.ljust(size, b" "))


def unique_state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without duplicates: ``(tensors, aliases)``, where ``aliases[name] = kept_name``
    for every tensor that shares its storage, shape and strides with one already kept."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, aliases


def quantized_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The outermost quantized modules by name: one nested inside another (e.g. the inner
    layer or quantized factors of a low-rank compensated layer) belongs to, is described by
    and is counted with its parent."""
    found: dict[str, torch.nn.Module] = {}
    for n, m in model.named_modules():
        if isinstance(m, QuantizedModule) and not any(n.startswith(p + ".") for p in found):
            found[n] = m
    return found


def kernel_summary(model: torch.nn.Module) -> dict[str, int]:
    """How many quantized modules run through each execution path (the planned path on this
    machine when the execution planner has run: ``decode|batch`` where the two differ)."""
    from slimformer.runtime.execution import planned_forward_of

    counts: dict[str, int] = {}
    for m in quantized_modules(model).values():
        planned = planned_forward_of(m)
        label = planned.label() if planned is not None else m.kernel
        counts[label] = counts.get(label, 0) + 1
    return counts


def stored_attention(model) -> str:
    """The attention implementation a saved model is rebuilt with: the model's own where it is
    one of ``ALLOWED_ATTENTION``; SDPA where it runs one of our run-time kernels (the AMX tile
    attention an execution plan installed, the few-token decode attention): those are a choice of
    this machine's plan, made again when the loaded model is planned, and they compute SDPA's
    function."""
    name = attention_implementation(model)
    return name if name in ALLOWED_ATTENTION else "sdpa"


def build_manifest(loaded: LoadedModel, aliases: dict[str, str], evaluation: dict | None) -> dict[str, Any]:
    model = loaded.model
    modules = {n: m.describe() for n, m in quantized_modules(model).items()}
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base_model": loaded.manifest["base_model"] if loaded.manifest else loaded.source,
        "kind": loaded.kind,
        "model_class": type(model).__name__,
        "attn_implementation": stored_attention(model),
        "pooling": loaded.pooling,
        "recipe": loaded.recipe,
        "applied": loaded.applied,
        "modules": modules,
        "structure": ArchitectureAdapter(model).structure_record(),
        "kernels": kernel_summary(model),
        "execution": loaded.execution.summary() if getattr(loaded, "execution", None) is not None else None,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "dynamic": list(loaded.dynamic.configs) if loaded.dynamic is not None else [],
        "tensor_aliases": aliases,
        "versions": library_versions(),
        "evaluation": evaluation,
    }


def canonical_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest without what differs between two runs of the same job: the creation time,
    each step's duration and the evaluation (its latencies are measured). Same recipe, seed and
    model give the same canonical manifest and the same weights file, byte for byte."""
    out = {k: v for k, v in manifest.items() if k not in ("created", "evaluation")}
    out["applied"] = [{k: v for k, v in step.items() if k != "seconds"} for step in manifest.get("applied") or []]
    return out


def prepare_output_dir(out_dir: str | os.PathLike, force: bool) -> Path:
    """Check that ``out_dir`` may be written (before any work is done)."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise OutputExistsError(f"output folder {out} already exists", "choose another --out or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} is a file", "choose a folder path for --out")
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputExistsError(f"cannot create {out}: {parent} is not a writable folder", "choose an --out inside a writable folder")
    return out


def output_write_error(out: Path, exc: OSError) -> OutputWriteError:
    """One-line error for an output that could not be written (the partial output is removed)."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputWriteError(f"no space left on the device while writing {out} (nothing was kept)", "free some space or choose an --out on another disk")
    return OutputWriteError(f"cannot write {out}: {reason} (nothing was kept)", "choose an --out in a writable folder")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


STALE_LEGACY_SECONDS = 24 * 3600


def clean_stale_temporaries(out: str | os.PathLike) -> list[Path]:
    """Remove what killed runs left beside ``out``: ``.NAME.partial-PID-*`` (an unfinished
    output) and ``.NAME.old-PID-*`` (a replaced output not yet deleted) whose process ``PID`` is
    gone; such folders without a process id (older versions) once a day old. Returns what was
    removed. A live run's temporaries are left alone."""
    import time

    out = Path(out)
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for kind in ("partial", "old"):
        prefix = f".{out.name}.{kind}-"
        for path in out.parent.glob(f"{glob.escape(prefix)}*"):
            head = path.name[len(prefix):].split("-", 1)[0]
            if head.isdigit() and "-" in path.name[len(prefix):]:
                stale = not _process_alive(int(head))
            else:
                try:
                    stale = time.time() - path.lstat().st_mtime > STALE_LEGACY_SECONDS
                except OSError:
                    continue
            if not stale:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system
    cannot, so the caller falls back to two renames."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def write_atomically(out: Path, force: bool, write) -> Path:
    """Call ``write(tmp_dir)`` on a temporary folder beside ``out``, then move it into place.

    On any error the temporary folder is removed and ``out`` is left as it was. A previous
    ``out`` is swapped for the new one in one step where the system allows it (Linux), so a
    killed process leaves either the previous complete folder or the new complete one (else
    there is an instant with neither). Temporaries of killed runs are removed first
    (:func:`clean_stale_temporaries`); the temporary names carry the process id for that.
    """
    prepare_output_dir(out, force)
    clean_stale_temporaries(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise output_write_error(out, exc) from exc
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        try:
            write(tmp)
        except OSError as exc:
            raise output_write_error(out, exc) from exc
        for path in tmp.rglob("*"):
            if path.is_file():
                os.chmod(path, 0o666 & ~umask)
        if out.is_dir() and not out.is_symlink() and _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # now the previous output
        elif out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_compressed(loaded: LoadedModel, out_dir: str | os.PathLike, evaluation: dict | None = None, force: bool = False) -> Path:
    """Write ``loaded`` as a slimformer folder at ``out_dir`` (see the module docstring)."""
    out = Path(out_dir)

    def write(tmp: Path) -> None:
        from slimformer.runtime.planner import stored_form

        with stored_form(loaded):  # the recipe's dtypes, whatever the planner runs it in here
            tensors, aliases = unique_state_dict(loaded.model)
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=SAFETENSORS_METADATA)
            canonical_safetensors_header(tmp / WEIGHTS_NAME)
            loaded.model.config.save_pretrained(tmp)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(tmp)
            manifest = build_manifest(loaded, aliases, evaluation)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=_json_default))

    return write_atomically(out, force, write)


def update_manifest(folder: str | os.PathLike, **fields: Any) -> None:
    """Rewrite fields of a folder's manifest (atomically, via a temporary file)."""
    path = Path(folder) / MANIFEST_NAME
    manifest = read_manifest(Path(folder))
    manifest.update(fields)
    write_json(path, manifest, default=_json_default, indent=2)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (Path,)):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is unreadable or not JSON", "re-create the folder with slimformer compress") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ModelLoadError(f"{path} is not a slimformer manifest", "re-create the folder with slimformer compress")
    missing = [k for k in ("kind", "model_class", "modules", "base_model") if k not in manifest]
    if missing:
        raise ModelLoadError(f"{path} lacks the field {missing[0]!r}", "re-create the folder with slimformer compress")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(
            f"{path} has format version {manifest.get('format_version')!r}, this slimformer reads {FORMAT_VERSION}",
            "use the slimformer version that wrote it, or re-compress",
        )
    return manifest


def _retie_packed_buffers(model: torch.nn.Module, aliases: dict[str, str]) -> None:
    """Packed buffers that were one tensor when saved become one tensor again after loading."""
    for alias, kept in aliases.items():
        alias_module, _, alias_buffer = alias.rpartition(".")
        kept_module, _, kept_buffer = kept.rpartition(".")
        dst, src = model.get_submodule(alias_module), model.get_submodule(kept_module)
        if isinstance(dst, QuantizedModule) and alias_buffer in dst._buffers and kept_buffer in src._buffers:
            dst._buffers[alias_buffer] = src._buffers[kept_buffer]


ALLOWED_DTYPES = ("float32", "bfloat16", "float16")
ALLOWED_ATTENTION = ("sdpa", "eager")


def allowed_model_class(folder: Path, manifest: dict, config: Any) -> type:
    """The manifest's model class, accepted only if it is the transformers class that the
    config's model type maps to (base model or causal LM): a manifest cannot name any other
    class or object to build."""
    from transformers.models.auto import modeling_auto

    name = manifest.get("model_class")
    model_type = getattr(config, "model_type", None)
    allowed = {
        mapping.get(model_type)
        for mapping in (modeling_auto.MODEL_MAPPING_NAMES, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    } - {None}
    if not isinstance(name, str) or name not in allowed:
        raise ModelLoadError(
            f"{folder}: model class {name!r} in the manifest is not one allowed for model type {model_type!r} ({sorted(allowed)})",
            "re-create the folder with slimformer compress",
        )
    import transformers

    return getattr(transformers, name)


def allowed_dtype(folder: Path, manifest: dict) -> torch.dtype:
    """The manifest's compute dtype, accepted only from ``ALLOWED_DTYPES``."""
    name = str(manifest.get("dtype") or "float32")
    if name not in ALLOWED_DTYPES:
        raise ModelLoadError(f"{folder}: unknown dtype {name!r} in the manifest", f"use one of {list(ALLOWED_DTYPES)} or re-compress")
    return getattr(torch, name)


def load_compressed(folder: str | os.PathLike, execution: Any = "auto") -> LoadedModel:
    """Load a folder written by :func:`save_compressed` (also reached through ``slimformer.load``).

    ``execution``: planner settings (see ``slimformer.load``); with anything but ``"off"`` (and
    unless ``SLIMFORMER_PLANNER=0``) every layer's path is chosen for this machine, from the
    on-disk plan cache when this machine has timed these formats before. The loaded outputs
    equal the saved model's bit for bit when both run the same paths (same machine and cache);
    across machines they agree within the chosen paths' documented rounding."""
    import transformers

    folder = Path(folder)
    manifest = read_manifest(folder)
    weights = folder / WEIGHTS_NAME
    check_folder_contained(folder)
    if not weights.is_file():
        raise ModelLoadError(f"{folder} has no {WEIGHTS_NAME}", "re-create the folder with slimformer compress")
    check_safetensors_file(weights)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {folder / 'config.json'}", "re-create the folder with slimformer compress") from exc
    cls = allowed_model_class(folder, manifest, config)
    dtype = allowed_dtype(folder, manifest)
    attn = manifest.get("attn_implementation") or "sdpa"
    if attn not in ALLOWED_ATTENTION:
        raise ModelLoadError(f"{folder}: unknown attention implementation {attn!r} in the manifest", f"use one of {list(ALLOWED_ATTENTION)}")
    model = cls._from_config(config, attn_implementation=attn, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    conv1d_to_linear(model)
    try:
        ArchitectureAdapter(model).apply_structure_record(manifest.get("structure") or {})
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ModelLoadError(f"{folder}: the manifest's structure record does not fit the model ({type(exc).__name__})", "re-create the folder with slimformer compress") from exc
    for name, desc in manifest["modules"].items():
        try:
            module = module_from_description(desc)
            module.set_compute_dtype(dtype)
            set_submodule(model, name, module)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelLoadError(f"{folder}: the manifest entry for {name!r} does not fit the model ({type(exc).__name__})", "re-create the folder with slimformer compress") from exc
    loaded = LoadedModel(model=model, tokenizer=None, kind=manifest["kind"], source=str(folder), pooling=manifest.get("pooling", "mean"), manifest=manifest)
    if manifest.get("dynamic"):
        from slimformer.methods.dynamic import reinstall

        reinstall(loaded, manifest["dynamic"])
        if getattr(model, "slimformer_exits", None) is not None:
            model.slimformer_exits.to(dtype)
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelLoadError(f"{weights} is corrupt ({type(exc).__name__})", "re-create the folder with slimformer compress") from exc
    for alias, kept in manifest.get("tensor_aliases", {}).items():
        if kept in state:
            state[alias] = state[kept]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelLoadError(f"{weights} does not match its manifest ({first})", "re-create the folder with slimformer compress") from exc
    _retie_packed_buffers(model, manifest.get("tensor_aliases", {}))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer saved in {folder}", "re-create the folder with slimformer compress") from exc
    tokenizer.padding_side = "right"
    loaded.tokenizer = tokenizer
    loaded.applied = list(manifest.get("applied") or [])
    loaded.recipe = manifest.get("recipe")
    from slimformer.runtime.planner import as_plan_settings, plan_execution, planner_enabled

    settings = as_plan_settings(execution)
    if settings is not None and planner_enabled():
        plan_execution(loaded, settings)
    return loaded
