"""Per-block checkpoints of a compression job, so that a killed job resumes to the same bytes.

A job's work folder (the command line puts it beside the output, ``.NAME.work/``) holds:

- ``journal.json``: which job this is: the recipe (with its calibration seed), the model's
  identity (source, class, a hash of its config and a fingerprint of its weights) and the
  library versions. ``--resume`` refuses a folder whose journal names another job;
- ``step-SS/block-BBBBB.safetensors`` and ``step-SS/tail.safetensors``: the state of block B
  (or of the selected layers outside the blocks) right after step S finished compressing it:
  every tensor of the block, and in the file's metadata the descriptions and compute dtypes of
  its quantized modules and the method's per-layer record entries. Each file is written under
  a temporary name and renamed into place, so a file that exists is complete.

A resumed step restores its finished blocks (quantized modules are rebuilt from their
descriptions, as loading a saved folder does), recomputes the next block's calibration inputs by
running the restored blocks (one block forward per batch each: the cached activations are not
saved, so the folder stays the size of the compressed layers) and continues with the first
unfinished block. A step whose method does not checkpoint (``MethodConfig.resumable`` false)
runs again from its start; every step is deterministic, so a resumed job writes the bytes an
uninterrupted one writes. The folder is locked (``flock``) while a job runs in it; a killed job's
lock goes with its process.

Files are renamed into place but not fsync'ed: this survives a killed process, not a power loss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimformer.errors import ResumeError
from slimformer.jsonfile import write_json

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.json"
JOURNAL_FORMAT = "slimformer-job"
JOURNAL_VERSION = 1
_UNIT_KEY = "slimformer_unit"


def work_dir_for(out: str | os.PathLike) -> Path:
    """The work folder of a job writing ``out``: ``.NAME.work`` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.work"


def model_identity(loaded) -> dict[str, Any]:
    """What names the model a job started from: its source (resolved when it is a path), class,
    the sha256 of its config and a fingerprint of its weights (names, shapes, dtypes and the
    first 256 values of every tensor; tensors still on the meta device by name and shape)."""
    source = str(loaded.source)
    if source and Path(source).exists():
        source = str(Path(source).resolve())
    config = loaded.model.config.to_json_string(use_diff=False)
    config_sha = hashlib.sha256(json.dumps(json.loads(config), sort_keys=True).encode()).hexdigest()
    h = hashlib.sha256()
    for name, t in sorted(loaded.model.state_dict().items()):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.device.type != "meta" and t.numel():
            h.update(t.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    return {"source": source, "model_class": type(loaded.model).__name__, "config_sha256": config_sha, "weights_fingerprint": h.hexdigest()}


def job_identity(loaded, recipe) -> dict[str, Any]:
    """The journal's identity of a job: recipe, model and library versions."""
    import transformers

    from slimformer import __version__

    return {
        "recipe": json.loads(json.dumps(recipe.to_dict(), default=list)),
        "model": model_identity(loaded),
        "versions": {"slimformer": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }


def _lock(folder: Path) -> int:
    """An open descriptor of ``folder`` holding an exclusive ``flock`` (refused when held)."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ResumeError(f"another slimformer job is running in {folder}", "wait for it to finish or write to another --out") from None
    return fd


def _json_plain(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class JobCheckpoint:
    """The work folder of one compression job (see the module docstring).

    Open it with :meth:`open`; ``compress`` calls :meth:`begin_step` before each recipe step and
    :meth:`close` at the end; ``blockwise`` asks :meth:`has`, :meth:`save` and :meth:`restore`
    for units (``"block-00003"``, ``"tail"``) of the current step when it is :attr:`active`.
    """

    def __init__(self, folder: Path, fd: int, resumed: bool) -> None:
        self.folder = folder
        self._fd: int | None = fd
        self.resumed = resumed  # the folder held a journal of this job when opened
        self.step_index = -1
        self.active = False
        self.restored_units: list[str] = []
        self.saved_units: list[str] = []

    @classmethod
    def open(cls, folder: str | os.PathLike, identity: dict[str, Any], resume: bool) -> "JobCheckpoint":
        """Open (``resume``) or start afresh the work folder ``folder`` of the job ``identity``.

        Without ``resume`` a leftover folder is removed (logged). With ``resume`` a folder whose
        journal names another job is refused (``ResumeError``); a missing folder or one without
        a journal (killed before its first checkpoint) starts afresh."""
        folder = Path(folder)
        resumed = False
        if folder.is_dir():
            fd = _lock(folder)
            journal = folder / JOURNAL_NAME
            if resume and journal.is_file():
                try:
                    found = json.loads(journal.read_text())
                    ok = isinstance(found, dict) and found.get("format") == JOURNAL_FORMAT and found.get("version") == JOURNAL_VERSION
                except (OSError, ValueError):
                    ok = False
                if not ok:
                    os.close(fd)
                    raise ResumeError(f"the work folder {folder} has an unreadable journal", "run without --resume to start over")
                for key, what in (("recipe", "recipe"), ("model", "model"), ("versions", "library versions")):
                    if found.get(key) != identity[key]:
                        os.close(fd)
                        raise ResumeError(
                            f"the work folder {folder} belongs to another job (its {what} differs from this run's)",
                            "resume with the recipe and model it was started with, or run without --resume to start over",
                        )
                resumed = True
                log.info("resuming the job in %s", folder)
            else:
                if not resume:
                    log.warning("removing the work folder of an unfinished job, %s (pass resume to continue it instead)", folder)
                journal.unlink(missing_ok=True)  # first: a kill while clearing leaves no journal
                for child in folder.iterdir():  # keep the folder (and its lock) itself
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            if resume:
                log.info("nothing to resume in %s: starting the job", folder)
            folder.mkdir(parents=True, exist_ok=True)
            fd = _lock(folder)
        if not resumed:
            write_json(folder / JOURNAL_NAME, {"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, **identity}, sort_keys=True)
        return cls(folder, fd, resumed)

    # ----- steps and units -------------------------------------------------------------------
    def begin_step(self, index: int, step) -> None:
        """Checkpoint the units of step ``index`` when its method supports it."""
        self.step_index = index
        self.active = bool(getattr(step, "resumable", False))
        if self.active:
            (self.folder / f"step-{index:02d}").mkdir(exist_ok=True)

    def _path(self, unit: str) -> Path:
        return self.folder / f"step-{self.step_index:02d}" / f"{unit}.safetensors"

    def has(self, unit: str) -> bool:
        """Whether ``unit`` of the current step was finished by this job (before a kill)."""
        return self.active and self._path(unit).is_file()

    def save(self, unit: str, model: nn.Module, roots: list[str], names: list[str], layer_records: dict[str, dict]) -> None:
        """Write the state of the modules ``roots`` (qualified names; ``""`` is the model) with
        the descriptions of the quantized modules inside them and the ``layer_records`` entries
        of the layers ``names``, atomically, as ``unit`` of the current step."""
        from safetensors.torch import save_file

        from slimformer.methods.quantization.modules import QuantizedModule

        tensors: dict[str, torch.Tensor] = {}
        aliases: dict[str, str] = {}
        seen: dict[tuple, str] = {}
        storages: set[int] = set()
        modules: dict[str, dict] = {}
        dtypes: dict[str, str] = {}
        for root in roots:
            base = model.get_submodule(root) if root else model
            for key, t in base.state_dict().items():
                name = f"{root}.{key}" if root else key
                ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
                if t.numel() and ident in seen:
                    aliases[name] = seen[ident]
                    continue
                seen[ident] = name
                ptr = t.untyped_storage().data_ptr()
                t = t.detach()
                tensors[name] = t.clone().contiguous() if ptr in storages and t.numel() else t.contiguous()
                storages.add(ptr)
            for n, m in base.named_modules():
                full = f"{root}.{n}" if root and n else (root or n)
                if isinstance(m, QuantizedModule) and not any(full.startswith(p + ".") for p in modules):
                    modules[full] = m.describe()
                    dtypes[full] = str(m.compute_dtype).replace("torch.", "")
        wanted = set(names)
        records = {k: {n: v for n, v in d.items() if n in wanted} for k, d in layer_records.items()}
        info = {"roots": roots, "modules": modules, "dtypes": dtypes, "aliases": aliases, "records": records}
        path = self._path(unit)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={_UNIT_KEY: json.dumps(info, default=_json_plain)})
        os.replace(tmp, path)
        self.saved_units.append(unit)

    def restore(self, unit: str, model: nn.Module, layer_records: dict[str, dict]) -> None:
        """Put the saved state of ``unit`` of the current step back into ``model`` (its quantized
        modules rebuilt from their descriptions) and its per-layer records into ``layer_records``."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        from slimformer.methods.quantization.modules import QuantizedModule, module_from_description
        from slimformer.models.adapters import set_submodule

        path = self._path(unit)
        try:
            with safe_open(str(path), "pt") as f:
                info = json.loads((f.metadata() or {})[_UNIT_KEY])
            state = load_file(str(path))
            for name, desc in info["modules"].items():
                module = module_from_description(desc)
                module.set_compute_dtype(getattr(torch, info["dtypes"][name]))
                set_submodule(model, name, module)
            for alias, kept in info["aliases"].items():
                state[alias] = state[kept]
            for root in info["roots"]:
                base = model.get_submodule(root) if root else model
                prefix = root + "." if root else ""
                base.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
            for alias, kept in info["aliases"].items():  # buffers shared when saved are shared again
                a_mod, _, a_buf = alias.rpartition(".")
                k_mod, _, k_buf = kept.rpartition(".")
                dst, src = model.get_submodule(a_mod), model.get_submodule(k_mod)
                if isinstance(dst, QuantizedModule) and a_buf in dst._buffers and k_buf in src._buffers:
                    dst._buffers[a_buf] = src._buffers[k_buf]
        except (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError) as exc:
            raise ResumeError(f"the checkpoint {path} does not fit the model ({type(exc).__name__})", "run without --resume to start over") from exc
        for key, entries in info["records"].items():
            layer_records.setdefault(key, {}).update(entries)
        self.restored_units.append(unit)

    def close(self) -> None:
        """Release the folder's lock (the folder stays until the output is written)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def finished_units(folder: str | os.PathLike) -> int:
    """How many blocks (and tails) a job's work folder holds checkpoints of (0 if none)."""
    folder = Path(folder)
    return sum(1 for _ in folder.glob("step-*/*.safetensors")) if folder.is_dir() else 0


def remove_work_dir(folder: str | os.PathLike) -> None:
    """Delete a finished job's work folder (call after its output is in place)."""
    shutil.rmtree(folder, ignore_errors=True)
