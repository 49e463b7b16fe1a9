"""Peer weight-quantization tools, run side by side with slimformer and measured by our metrics.

Each peer setting quantizes a copy of the fp32 model the way that tool's own documentation shows
(its own entry point, its own save method), and is then measured exactly like slimformer's
settings: quality by ``slimformer.evaluate.quality`` (encoders: mean-pooled cosine to the fp32
model and top-10 retrieval agreement; causal LMs: perplexity, KL, top-1 agreement) on held-out
text, latency as a ratio to the fp32 model timed interleaved on the same fixed batch, and size as
the bytes the tool's own save method writes to disk. Nothing is estimated: a setting a tool
cannot produce on this machine is recorded with the reason, never approximated.

Peers: optimum-quanto, hqq, NNCF, torchao, ONNX Runtime. They are optional dependencies:

    pip install -c constraints.txt -e '.[peers]'          # torch must stay the pinned CPU build

    python benchmarks/peers.py --quick                     # every peer on all-MiniLM-L6-v2, small eval
    python benchmarks/peers.py --model ref-small --quick   # every peer on the reference causal LM

Public API (for a combined benchmark script):

- ``PEERS``: list of :class:`PeerSetting` (``name``, ``tool``, ``bits``, ``build``).
- ``PeerSetting.build(model_fp32, kind, calib_batches) -> PeerModel``.
- :func:`calibration_batches` (tokenized calibration-split batches for data-aware tools).
- :func:`evaluate_peer` (quality, size, bits, latency ratio of one built peer) and
  :func:`run_peer` (build + evaluate, errors and skips recorded as a row, never raised).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from slimformer.data import TextSpec, load_texts
from slimformer.evaluate import EvalSettings
from slimformer.evaluate.cost import interleaved_latency, storage_bytes
from slimformer.evaluate.harness import inference, latency_batch
from slimformer.evaluate.quality import causal_quality, encoder_quality, encoder_reference
from slimformer.models.loading import LoadedModel

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GROUP = 64  # group size wherever the tool lets us choose it

Batch = dict  # {"input_ids": (batch, seq) int64, "attention_mask": (batch, seq) int64}


class PeerSkipped(RuntimeError):
    """A peer setting that cannot run here (not installed, mode unsupported on this CPU/torch)."""


# --------------------------------------------------------------------------------------------
# What a peer build returns
# --------------------------------------------------------------------------------------------


@dataclass
class PeerModel:
    """A model quantized by a peer tool.

    ``forward(batch)``: HF batch dict -> float32 (batch, seq, hidden) last hidden state (encoder)
    or (batch, seq, vocab) logits (causal LM). ``size_bytes``: bytes on disk as the tool saves
    it. ``linear_bits``: stored bits per weight of the quantized linear layers (codes + scales +
    zero points), or None where it cannot be counted. ``notes``: what was quantized and how it
    was saved. ``version``: the tool's package version.
    """

    forward: Callable[[Batch], torch.Tensor]
    size_bytes: int
    linear_bits: float | None
    notes: str
    version: str
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PeerSetting:
    """One peer setting: ``name`` (table label), ``tool`` (package), ``bits`` (nominal weight
    bits) and ``build(model_fp32, kind, calib_batches) -> PeerModel`` (``kind``: ``"encoder"``
    or ``"causal-lm"``; ``model_fp32`` is copied, never modified)."""

    name: str
    tool: str
    bits: int
    build: Callable[[nn.Module, str, list[Batch]], PeerModel]


# --------------------------------------------------------------------------------------------
# Helpers shared by the adapters
# --------------------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError as exc:
        raise PeerSkipped(f"{dist} is not installed (pip install -c constraints.txt '.[peers]')") from exc


def _import(module: str, dist: str):
    _version(dist)
    try:
        return __import__(module, fromlist=["_"])
    except Exception as exc:  # noqa: BLE001 - any import failure means: skip this peer
        raise PeerSkipped(f"{dist} does not import: {type(exc).__name__}: {exc}") from exc


def _inputs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["input_ids"], batch["attention_mask"]


def _torch_forward(model: nn.Module, kind: str) -> Callable[[Batch], torch.Tensor]:
    """Forward of a (quantized) HF torch model: batch -> float32 hidden states or logits."""

    @torch.no_grad()
    def run(batch: Batch) -> torch.Tensor:
        ids, mask = _inputs(batch)
        if kind == "causal-lm":
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        return model(input_ids=ids, attention_mask=mask).last_hidden_state.float()

    return run


def _linear_names(model: nn.Module, kind: str) -> dict[str, tuple[int, int]]:
    """Linear layers a weight-only quantizer targets here: every ``nn.Linear`` except a causal
    LM's output head (tied to the embedding table in our models) -> {name: (out, in)}."""
    return {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not (kind == "causal-lm" and name.endswith("lm_head"))
    }


def _nbytes(t) -> int:
    """Bytes of a tensor, looking through tensor subclasses (torchao) to their stored parts."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_nbytes(getattr(t, n)) for n in names if getattr(t, n) is not None)
    return t.numel() * t.element_size()


def _bits(state: dict, linears: dict[str, tuple[int, int]], key_of: Callable[[str], str | None]) -> float | None:
    """Stored bits per weight of the quantized linears: 8 * bytes of every tensor in ``state``
    that ``key_of`` maps to a linear in ``linears`` (biases excluded) / their logical weights."""
    total = 0
    found: set[str] = set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        owner = key_of(key)
        if owner in linears and not key.endswith("bias"):
            total += _nbytes(value)
            found.add(owner)
    weights = sum(o * i for n, (o, i) in linears.items() if n in found)
    return 8 * total / weights if weights else None


def _prefix_owner(linears: dict) -> Callable[[str], str | None]:
    """``a.b.weight._data`` -> ``a.b`` when ``a.b`` is a linear: the longest matching prefix."""

    def owner(key: str) -> str | None:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            name = ".".join(parts[:cut])
            if name in linears:
                return name
        return None

    return owner


def _drop_shared(state: dict) -> dict:
    """Keep one key per shared storage (a tied embedding/head), as ``save_pretrained`` does:
    safetensors refuses aliased tensors."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, value in state.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset()) if type(value) is torch.Tensor else (id(value), 0)
        if ident in seen:
            continue
        seen.add(ident)
        out[key] = value
    return out


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _torch_save_bytes(obj) -> int:
    with tempfile.TemporaryDirectory(prefix="peer-") as tmp:
        path = Path(tmp) / "model.pt"
        torch.save(obj, path)
        return path.stat().st_size


# --------------------------------------------------------------------------------------------
# optimum-quanto: quantize(model, weights=qintN) + freeze, saved with safe_save (safetensors)
# --------------------------------------------------------------------------------------------


def _quanto(qtype: str) -> Callable:
    def build(model_fp32: nn.Module, kind: str, calib_batches: list[Batch]) -> PeerModel:
        version = _version("optimum-quanto")
        quanto = _import("optimum.quanto", "optimum-quanto")
        from safetensors.torch import save_file
        model = copy.deepcopy(model_fp32)
        linears = _linear_names(model, kind)
        exclude = ["lm_head"] if kind == "causal-lm" else None
        quanto.quantize(model, weights=getattr(quanto, qtype), exclude=exclude)
        quanto.freeze(model)
        state = _drop_shared(model.state_dict())
        with tempfile.TemporaryDirectory(prefix="peer-quanto-") as tmp:
            save_file(state, os.path.join(tmp, "model.safetensors"))
            with open(os.path.join(tmp, "quantization_map.json"), "w") as fh:
                json.dump(quanto.quantization_map(model), fh)
            size = _dir_bytes(Path(tmp))
        owner = _prefix_owner(linears)
        bits = _bits({k: v for k, v in state.items() if not k.endswith(("input_scale", "output_scale"))}, linears, owner)
        groups = sorted({getattr(m, "weight_group_size", None) or 0 for m in model.modules() if hasattr(m, "weight_qtype")})
        return PeerModel(
            _torch_forward(model, kind), size, bits,
            f"quanto.quantize(weights={qtype}) + freeze on every nn.Linear"
            + (" but lm_head" if exclude else "") + f"; group sizes chosen by quanto {groups} (0 = per-channel); "
            "embeddings fp32; saved as its README shows: safetensors save_file(state_dict) + quantization_map.json",
            version, {"group_sizes": groups},
        )

    return build


# --------------------------------------------------------------------------------------------
# hqq: HQQLinear(BaseQuantizeConfig(nbits, group_size=64)) per linear, saved with save_quantized
# --------------------------------------------------------------------------------------------


def _hqq(nbits: int) -> Callable:
    def build(model_fp32: nn.Module, kind: str, calib_batches: list[Batch]) -> PeerModel:
        version = _version("hqq")
        hq = _import("hqq.core.quantize", "hqq")
        hf = _import("hqq.models.hf.base", "hqq")
        model = copy.deepcopy(model_fp32)
        linears = _linear_names(model, kind)
        config = hq.BaseQuantizeConfig(nbits=nbits, group_size=GROUP)
        for name in linears:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = hq.HQQLinear(getattr(parent, child), quant_config=config, compute_dtype=torch.float32, device="cpu")
            setattr(parent, child, layer)
        with tempfile.TemporaryDirectory(prefix="peer-hqq-") as tmp:
            hf.AutoHQQHFModel.save_quantized(model, tmp)
            size = (Path(tmp) / "qmodel.pt").stat().st_size
        state = {}
        for name in linears:
            layer = model.get_submodule(name)
            layer.encoded_state_dict = False
            state.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
        bits = _bits(state, linears, _prefix_owner(linears))
        return PeerModel(
            _torch_forward(model, kind), size, bits,
            f"HQQLinear(BaseQuantizeConfig(nbits={nbits}, group_size={GROUP})) on every nn.Linear"
            + (" but lm_head" if kind == "causal-lm" else "") + ", compute float32, backend PYTORCH (dequantize per call); "
            "embeddings fp32; saved with AutoHQQHFModel.save_quantized (qmodel.pt)",
            version,
        )

    return build


# --------------------------------------------------------------------------------------------
# NNCF: nncf.compress_weights(model, mode=..., dataset=nncf.Dataset(calibration batches))
# --------------------------------------------------------------------------------------------


def _nncf(mode: str, group_size: int | None = None, ratio: float | None = None, data_aware: dict | None = None) -> Callable:
    def build(model_fp32: nn.Module, kind: str, calib_batches: list[Batch]) -> PeerModel:
        version = _version("nncf")
        nncf = _import("nncf", "nncf")
        model = copy.deepcopy(model_fp32)
        linears = _linear_names(model, kind)

        def to_input(batch: Batch) -> dict:
            ids, mask = _inputs(batch)
            return {"input_ids": ids, "attention_mask": mask} if kind == "encoder" else {"input_ids": ids, "attention_mask": mask, "use_cache": False}

        # NNCF counts one dataset item as one sample: give it one unpadded text per item.
        items = [{"input_ids": b["input_ids"][r : r + 1, : int(b["attention_mask"][r].sum())],
                  "attention_mask": b["attention_mask"][r : r + 1, : int(b["attention_mask"][r].sum())]}
                 for b in calib_batches for r in range(b["input_ids"].shape[0])]
        dataset = nncf.Dataset(items, to_input)
        kwargs = dict(mode=getattr(nncf.CompressWeightsMode, mode), dataset=dataset, subset_size=len(items))
        if group_size is not None:
            kwargs["group_size"] = group_size
        if ratio is not None:
            kwargs["ratio"] = ratio
        for key, value in (data_aware or {}).items():
            kwargs[key] = getattr(nncf.SensitivityMetric, value) if key == "sensitivity_metric" else value
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = nncf.compress_weights(model, **kwargs)
        state = model.state_dict()
        size = _torch_save_bytes(state)
        owner = _nncf_owner(linears)
        bits = _bits(state, linears, owner)
        kinds = _nncf_precisions(state, linears, owner)
        return PeerModel(
            _torch_forward(model, kind), size, bits,
            f"nncf.compress_weights(mode={mode}" + (f", group_size={group_size}" if group_size else "")
            + (f", ratio={ratio}" if ratio is not None else "")
            + "".join(f", {k}={v}" for k, v in (data_aware or {}).items())
            + f", dataset of {len(items)} calibration texts); NNCF's defaults for the rest (embeddings and the last "
            f"linear to the INT8_ASYM backup); linear precisions {kinds}; saved with torch.save(state_dict)",
            version, {"linear_precisions": kinds},
        )

    return build


def _nncf_owner(linears: dict) -> Callable[[str], str | None]:
    """NNCF keeps a compressed weight under its module name and its scale/zero point in hook
    modules named after the module with ':' for '.'; map both to the linear."""
    plain = _prefix_owner(linears)
    by_colon = {n.replace(".", ":"): n for n in linears}

    def owner(key: str) -> str | None:
        hit = plain(key)
        if hit is not None:
            return hit
        for colon, name in by_colon.items():
            if f"{colon}:weight" in key or f"{colon}.weight" in key:
                return name
        return None

    return owner


def _nncf_precisions(state: dict, linears: dict, owner) -> dict[str, int]:
    """How many linears NNCF stored at each weight byte width (packed 4-bit shows as half)."""
    counts: dict[str, int] = {}
    for key, value in state.items():
        name = owner(key)
        if name is None or not key.endswith(name + ".weight") or not isinstance(value, torch.Tensor):
            continue
        o, i = linears[name]
        per = 8 * _nbytes(value) / (o * i)
        label = "int4" if per <= 4.01 else "int8" if per <= 8.01 else f"{value.dtype}"
        counts[label] = counts.get(label, 0) + 1
    return counts


# --------------------------------------------------------------------------------------------
# torchao: quantize_(model, Config), saved with torch.save(state_dict)
# --------------------------------------------------------------------------------------------


def _torchao(which: str) -> Callable:
    def build(model_fp32: nn.Module, kind: str, calib_batches: list[Batch]) -> PeerModel:
        version = _version("torchao")
        q = _import("torchao.quantization", "torchao")
        granularity = _import("torchao.quantization.granularity", "torchao")
        if which == "int8wo":
            config, desc = q.Int8WeightOnlyConfig(), "Int8WeightOnlyConfig() (per-channel symmetric)"
        elif which == "int8da":
            config, desc = q.Int8DynamicActivationInt8WeightConfig(), "Int8DynamicActivationInt8WeightConfig() (per-channel weights, per-token activations)"
        elif which == "int4wo":
            # Int4WeightOnlyConfig's packing formats run on CUDA/XPU/NPU only; torchao's CPU int4 path
            # (Int4OpaqueTensor, aten._weight_int4pack_mm_for_cpu) is its prototype config.
            proto = _import("torchao.prototype.quantization.int4", "torchao")
            config = proto.inference_workflow.PrototypeInt4WeightOnlyConfig(group_size=GROUP)
            desc = f"prototype PrototypeInt4WeightOnlyConfig(group_size={GROUP}) (CPU int4 layout, Int4OpaqueTensor)"
        elif which.startswith("int") and which.endswith("wo"):  # int2wo / int3wo
            b = int(which[3])
            config = q.IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{b}"), granularity=granularity.PerGroup(GROUP))
            desc = (f"IntxWeightOnlyConfig(weight_dtype=torch.int{b}, granularity=PerGroup({GROUP})), default packing "
                    "unpacked_to_int8 (one int8 per code)")
        else:  # pragma: no cover
            raise ValueError(f"unknown torchao setting {which!r}")
        model = copy.deepcopy(model_fp32)
        linears = _linear_names(model, kind)
        if which == "int4wo":
            model = model.to(torch.bfloat16)  # the CPU int4 kernel takes bfloat16 activations and weights
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q.quantize_(model, config, filter_fn=lambda m, fqn: fqn in linears)
        state = model.state_dict()
        size = _torch_save_bytes(state)
        bits = _bits(state, linears, _prefix_owner(linears))
        quantized = sum(1 for n in linears if type(model.get_submodule(n).weight.data) is not torch.Tensor)
        if quantized == 0:
            raise PeerSkipped(f"torchao {desc} left every linear in float on this model")
        return PeerModel(
            _torch_forward(model, kind), size, bits,
            f"quantize_({desc}) on {quantized}/{len(linears)} nn.Linear" + (" (lm_head excluded)" if kind == "causal-lm" else "")
            + ("; whole model cast to bfloat16" if which == "int4wo" else "; embeddings fp32")
            + "; saved with torch.save(state_dict)",
            version,
        )

    return build


# --------------------------------------------------------------------------------------------
# ONNX Runtime: torch.onnx.export, then quantize_dynamic (QInt8 per-channel) or MatMulNBits
# --------------------------------------------------------------------------------------------


class _OnnxWrapper(nn.Module):
    """(input_ids, attention_mask) -> last_hidden_state or logits, a plain tensor for export."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "causal-lm":
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export_onnx(model_fp32: nn.Module, kind: str, example: Batch, path: Path) -> None:
    """Export to ONNX with ``torch.onnx.export`` (dynamo exporter), batch and sequence dynamic."""
    wrapper = _OnnxWrapper(copy.deepcopy(model_fp32).eval(), kind)
    ids, mask = _inputs(example)
    batch_dim, seq_dim = torch.export.Dim("batch"), torch.export.Dim("seq")
    shapes = {"input_ids": {0: batch_dim, 1: seq_dim}, "attention_mask": {0: batch_dim, 1: seq_dim}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["output"], dynamic_shapes=shapes, dynamo=True, external_data=False)


def _onnx_linear_bits(path: Path) -> tuple[float | None, dict[str, int]]:
    """Stored bits per weight of the quantized MatMuls of an ONNX model (weight codes, scales,
    zero points), and a count of node types holding quantized weights."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}

    def nbytes(name: str) -> int:
        return numpy_helper.to_array(inits[name]).nbytes if name in inits else 0

    stored = weights = 0
    ops: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            stored += sum(nbytes(n) for n in node.input[1:4])
            weights += attrs["K"] * attrs["N"]
        elif node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") and node.input[1] in inits:
            # quantize_dynamic stores W as <name>_quantized with <name>_scale and <name>_zero_point.
            w = numpy_helper.to_array(inits[node.input[1]])
            base = node.input[1].removesuffix("_quantized")
            stored += w.nbytes + nbytes(base + "_scale") + nbytes(base + "_zero_point")
            weights += w.size
        else:
            continue
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    for node in model.graph.node:
        if node.op_type in ("Gather",) and any(n.endswith("_quantized") for n in node.input):
            ops["Gather(int8)"] = ops.get("Gather(int8)", 0) + 1
    return (8 * stored / weights if weights else None), ops


def _onnx(which: str) -> Callable:
    def build(model_fp32: nn.Module, kind: str, calib_batches: list[Batch]) -> PeerModel:
        version = _version("onnxruntime")
        ort = _import("onnxruntime", "onnxruntime")
        quant = _import("onnxruntime.quantization", "onnxruntime")
        _import("onnxscript", "onnxscript")
        tmp = tempfile.mkdtemp(prefix="peer-onnx-")
        fp32_path, q_path = Path(tmp) / "model.onnx", Path(tmp) / "model.quant.onnx"
        export_onnx(model_fp32, kind, calib_batches[0], fp32_path)
        if which == "fp32":
            q_path = fp32_path
            desc = "no quantization (reference: the runtime's own speed)"
        elif which == "qint8":
            quant.quantize_dynamic(str(fp32_path), str(q_path), weight_type=quant.QuantType.QInt8, per_channel=True)
            desc = "quantize_dynamic(weight_type=QInt8, per_channel=True) (int8 weights, int8 dynamic activations)"
        else:
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            bits = int(which[1:])
            quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32_path)), bits=bits, block_size=GROUP, is_symmetric=False)
            quantizer.process()
            quantizer.model.save_model_to_file(str(q_path), use_external_data_format=False)
            desc = f"MatMulNBitsQuantizer(bits={bits}, block_size={GROUP}, is_symmetric=False) (MatMulNBits, float activations)"
        size = q_path.stat().st_size
        bits_per_weight, ops = _onnx_linear_bits(q_path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(q_path.read_bytes(), options, providers=["CPUExecutionProvider"])
        shutil.rmtree(tmp, ignore_errors=True)
        embeddings = "embeddings int8 (Gather)" if "Gather(int8)" in ops else "embeddings fp32"

        def run(batch: Batch) -> torch.Tensor:
            ids, mask = _inputs(batch)
            out = session.run(["output"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
            return torch.from_numpy(out).float()

        return PeerModel(
            run, size, bits_per_weight,
            f"torch.onnx.export (dynamo) then {desc}; quantized nodes {ops}, {embeddings}"
            + ("; BERT pooler not exported (only last_hidden_state is an output)" if kind == "encoder" else "")
            + f"; run by an onnxruntime InferenceSession "
            f"(CPUExecutionProvider, {torch.get_num_threads()} intra-op threads); size = the quantized .onnx file",
            version, {"quantized_nodes": ops},
        )

    return build


# --------------------------------------------------------------------------------------------
# The settings
# --------------------------------------------------------------------------------------------

PEERS: list[PeerSetting] = [
    PeerSetting("quanto qint8", "optimum-quanto", 8, _quanto("qint8")),
    PeerSetting("quanto qint4 (g128 default)", "optimum-quanto", 4, _quanto("qint4")),
    PeerSetting("quanto qint2 (g128 default)", "optimum-quanto", 2, _quanto("qint2")),
    PeerSetting("hqq 8-bit g64", "hqq", 8, _hqq(8)),
    PeerSetting("hqq 4-bit g64", "hqq", 4, _hqq(4)),
    PeerSetting("hqq 3-bit g64", "hqq", 3, _hqq(3)),
    PeerSetting("hqq 2-bit g64", "hqq", 2, _hqq(2)),
    PeerSetting("nncf INT8_ASYM", "nncf", 8, _nncf("INT8_ASYM")),
    PeerSetting("nncf INT4_ASYM g64", "nncf", 4, _nncf("INT4_ASYM", GROUP)),
    PeerSetting("nncf INT4_ASYM g64 ratio 0.8 (data-aware mixed)", "nncf", 4,
                _nncf("INT4_ASYM", GROUP, 0.8, {"sensitivity_metric": "HESSIAN_INPUT_ACTIVATION"})),
    PeerSetting("nncf INT4_ASYM g64 + scale estimation (data-aware)", "nncf", 4,
                _nncf("INT4_ASYM", GROUP, None, {"scale_estimation": True})),
    PeerSetting("torchao int8 weight-only", "torchao", 8, _torchao("int8wo")),
    PeerSetting("torchao int8 dyn-act int8 weight", "torchao", 8, _torchao("int8da")),
    PeerSetting("torchao int4 weight-only g64", "torchao", 4, _torchao("int4wo")),
    PeerSetting("torchao int3 weight-only g64", "torchao", 3, _torchao("int3wo")),
    PeerSetting("torchao int2 weight-only g64", "torchao", 2, _torchao("int2wo")),
    PeerSetting("onnxruntime fp32 (no quantization, runtime reference)", "onnxruntime", 32, _onnx("fp32")),
    PeerSetting("onnxruntime dynamic QInt8 per-channel", "onnxruntime", 8, _onnx("qint8")),
    PeerSetting("onnxruntime MatMulNBits 8-bit g64", "onnxruntime", 8, _onnx("n8")),
    PeerSetting("onnxruntime MatMulNBits 4-bit g64", "onnxruntime", 4, _onnx("n4")),
    PeerSetting("onnxruntime MatMulNBits 2-bit g64", "onnxruntime", 2, _onnx("n2")),
]


# --------------------------------------------------------------------------------------------
# Measuring a peer with slimformer's metrics
# --------------------------------------------------------------------------------------------


class _PeerModule(nn.Module):
    """Looks like a HF model to ``slimformer.evaluate.quality``: ``module(**batch)`` returns an
    object with ``last_hidden_state`` / ``logits`` computed by the peer's forward."""

    def __init__(self, peer: PeerModel, config, kind: str):
        super().__init__()
        self.peer, self.config, self.kind = peer, config, kind

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_ignored) -> SimpleNamespace:
        out = self.peer.forward({"input_ids": input_ids, "attention_mask": attention_mask})
        return SimpleNamespace(last_hidden_state=out, logits=out)


def as_loaded(peer: PeerModel, original: LoadedModel) -> LoadedModel:
    """A ``LoadedModel`` view of ``peer`` (the original's tokenizer, kind and pooling), so that
    our own quality functions and timed inference run on it unchanged."""
    module = _PeerModule(peer, original.model.config, original.kind)
    return LoadedModel(model=module, tokenizer=original.tokenizer, kind=original.kind, source="peer", pooling=original.pooling)


def calibration_batches(original: LoadedModel, n: int = 32, batch_size: int = 8, max_length: int = 128) -> list[Batch]:
    """``n`` documents of the calibration split (never evaluated on), tokenized into batches of
    (batch_size, <= max_length) for the tools that take calibration data (NNCF)."""
    texts = load_texts(TextSpec(source="stdlib-docs", split="calibration", n=n, seed=0))
    out = []
    for i in range(0, len(texts), batch_size):
        b = dict(original.tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        b.pop("token_type_ids", None)
        out.append(b)
    return out


def evaluate_peer(original: LoadedModel, peer: PeerModel, settings: EvalSettings, cache: dict | None = None) -> dict:
    """Quality (our metrics, held-out texts), size fraction of the fp32 safetensors, linear
    bits/weight and latency ratio (fp32 / peer on the fixed latency batch, interleaved)."""
    cache = {} if cache is None else cache
    loaded = as_loaded(peer, original)
    texts = load_texts(TextSpec(source=settings.source, split="evaluation", n=settings.n_texts, seed=settings.seed))
    if original.kind == "encoder":
        key = ("reference", id(original.model), settings)
        if key not in cache:
            cache[key] = encoder_reference(original, texts, settings.n_queries, settings.max_length, settings.batch_size)
        quality = encoder_quality(original, loaded, texts, settings.n_queries, settings.max_length, settings.batch_size, reference=cache[key])
    else:
        quality = causal_quality(original, loaded, texts, settings.max_length, min(settings.batch_size, 8))
    if "fp32_bytes" not in cache:
        cache["fp32_bytes"] = storage_bytes(original.model)
    batch = latency_batch(original, settings)
    lat = interleaved_latency({"fp32": inference(original, batch), "peer": inference(loaded, batch)},
                              settings.latency_repeats, settings.latency_warmup)
    return {
        "quality": quality,
        "size_bytes": peer.size_bytes,
        "fp32_bytes": cache["fp32_bytes"],
        "size_fraction": peer.size_bytes / cache["fp32_bytes"],
        "linear_bits": peer.linear_bits,
        "latency_s": {"fp32": lat["fp32"], "peer": lat["peer"]},
        "speedup": lat["fp32"] / lat["peer"],
        "latency_batch": list(batch["input_ids"].shape),
    }


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, PeerSkipped) else str(exc)
    return " ".join(text.split())[:300].replace("|", "/")


def run_peer(setting: PeerSetting, original: LoadedModel, settings: EvalSettings, calib: list[Batch], cache: dict | None = None) -> dict:
    """Build and evaluate one peer setting. Returns a JSON-ready row: ``name``, ``tool``,
    ``bits``, ``version``, ``notes``, ``build_seconds`` and the :func:`evaluate_peer` figures,
    or ``skipped``/``error`` (one line) when the tool cannot run it here."""
    row: dict = {"name": setting.name, "tool": setting.tool, "bits": setting.bits}
    try:
        row["version"] = importlib.metadata.version(setting.tool)
    except importlib.metadata.PackageNotFoundError:
        row["version"] = None
    t0 = time.perf_counter()
    try:
        peer = setting.build(original.model, original.kind, calib)
    except PeerSkipped as exc:
        row["skipped"] = _one_line(exc)
        return row
    except Exception as exc:  # noqa: BLE001 - one broken peer must not lose the others
        traceback.print_exc()
        row["error"] = _one_line(exc)
        return row
    row["build_seconds"] = time.perf_counter() - t0
    row["version"], row["notes"], row["extra"] = peer.version, peer.notes, peer.extra
    try:
        row.update(evaluate_peer(original, peer, settings, cache))
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        row["error"] = "evaluation failed: " + _one_line(exc)
    return row


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _f(value, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(rows: list[dict], kind: str) -> str:
    """Markdown table of peer rows."""
    if kind == "encoder":
        head = "| setting | tool version | size fraction | linear bits/weight | cos mean | cos worst | top-10 agreement | speedup | build s | note / error |"
    else:
        head = "| setting | tool version | size fraction | linear bits/weight | perplexity (fp32) | KL | top-1 agreement | speedup | build s | note / error |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        reason = r.get("skipped") and f"skipped: {r['skipped']}" or r.get("error") and f"failed: {r['error']}"
        if reason and "quality" not in r:
            lines.append(f"| {r['name']} | {r['tool']} {r.get('version') or ''} | – | – | – | – | – | – | – | {reason} |")
            continue
        q = r["quality"]
        if kind == "encoder":
            qcells = [_f(q["embedding_cosine_mean"], ".4f"), _f(q["embedding_cosine_min"], ".4f"), _f(q["retrieval_agreement_at_10"], ".3f")]
        else:
            qcells = [f"{q['perplexity']:.2f} ({q['perplexity_original']:.2f})", _f(q["kl_divergence"], ".4f"), _f(q["top1_agreement"], ".3f")]
        cells = [r["name"], f"{r['tool']} {r['version']}", _f(r["size_fraction"], ".3f"), _f(r["linear_bits"], ".2f"), *qcells,
                 f"{r['speedup']:.2f}×", _f(r.get("build_seconds"), ".1f"), reason or ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default' (all-MiniLM-L6-v2) or a reference LM name such as ref-small")
    parser.add_argument("--quick", action="store_true", help="small evaluation (64 held-out texts, 3 timed runs)")
    parser.add_argument("--only", default=None, help="comma-separated substrings: run only settings whose name contains one")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where to write peers_<model>[_quick].{md,json}")
    args = parser.parse_args(argv)

    from slimformer.models import load_model

    if args.model == "default":
        original = load_model()
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import reference_models as rm

        folder = rm.model_dir(args.model)
        if not (folder / "config.json").is_file():
            print(f"error: {args.model} is not built; run 'python benchmarks/reference_models.py build {args.model}'", file=sys.stderr)
            return 2
        original = load_model(folder)
    if args.quick:
        settings = EvalSettings(n_texts=64, n_queries=16, latency_repeats=3, latency_warmup=1)
    else:
        settings = EvalSettings() if original.kind == "encoder" else EvalSettings(n_texts=320, latency_batch=16)
    chosen = [p for p in PEERS if not args.only or any(s.strip() in p.name for s in args.only.split(","))]
    calib = calibration_batches(original)
    _log(f"{args.model} ({original.kind}), torch {torch.__version__}, {torch.get_num_threads()} threads, {len(chosen)} peer settings")
    rows, cache = [], {}
    start = time.perf_counter()
    for i, setting in enumerate(chosen, 1):
        t0 = time.perf_counter()
        row = run_peer(setting, original, settings, calib, cache)
        rows.append(row)
        status = row.get("skipped") or row.get("error")
        if status:
            _log(f"[{i}/{len(chosen)}] {setting.name}: {'skipped' if 'skipped' in row else 'FAILED'}: {status}")
        else:
            _log(f"[{i}/{len(chosen)}] {setting.name}: size {row['size_fraction']:.3f}, bits {_f(row['linear_bits'], '.2f')}, "
                 f"speedup {row['speedup']:.2f}x, {time.perf_counter() - t0:.0f}s")
    meta = {
        "model": args.model, "kind": original.kind, "quick": args.quick, "eval_settings": dataclasses.asdict(settings),
        "calibration": {"split": "calibration", "n_texts": sum(len(b["input_ids"]) for b in calib), "max_length": 128},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "total_seconds": time.perf_counter() - start,
    }
    text = table(rows, original.kind)
    print(text)
    stem = f"peers_{args.model}" + ("_quick" if args.quick else "")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.md").write_text(f"# Peer tools on {args.model}\n\n" + text, encoding="utf-8")
    (args.out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2, default=str) + "\n", encoding="utf-8")
    _log(f"wrote {args.out_dir}/{stem}.{{md,json}} in {meta['total_seconds'] / 60:.1f} minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
