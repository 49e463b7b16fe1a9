"""A KV cache as a compact bitstream for storage or transfer, after CacheGen (Liu et al. 2024,
"CacheGen: KV Cache Compression and Streaming for Fast Large Language Model Serving").

CacheGen's three observations, each used here:

- **token-wise locality**: neighbouring tokens' keys/values are close, so each chunk of ``chunk``
  tokens is stored as one *anchor* (its first token, ``anchor_bits`` per element, per-channel
  scale and zero) plus every token's *delta* to the reconstructed anchor, quantized
  symmetrically with one step per channel per ``step_tokens`` tokens (a step set by the whole
  sequence would let one outlier coarsen every token of its channel);
- **layer-wise sensitivity**: errors in shallow layers propagate through the rest, so the first
  ``early_fraction`` of the layers get ``early_extra_bits`` more bits for their deltas;
- **arithmetic coding with per-channel distributions**: the delta symbols of each (layer,
  key/value, channel) are entropy-coded with that channel's own symbol frequencies (stored in the
  header, 16-bit counts), the anchors with one frequency table per layer and tensor. The coder is
  ``constriction``'s asymmetric numeral system (ANS) coder.

Every element is reconstructed within half of its delta step (``max_abs_error`` says which), and
the stream's length is the measured size: header, scales, frequency tables and coded words.
Input and output are per-layer ``(keys, values)`` of shape ``(batch, kv_heads, tokens, head_dim)``
(``cache_layers`` reads them from any cache, compressed or not); a channel is one
(batch, head, dim) position, tokens run along the stream.
"""

from __future__ import annotations

import io
import json
import math
import struct
from dataclasses import asdict, dataclass

import numpy as np
import torch

from slimformer.errors import ConfigError, is_int_at_least

MAGIC = b"SFKV1"


@dataclass
class BitstreamConfig:
    """``bits``: delta bits (2-8); ``anchor_bits``: anchor bits (4-8); ``chunk``: tokens per anchor;
    ``step_tokens``: tokens sharing one delta step per channel; ``early_fraction``/
    ``early_extra_bits``: the first layers' extra delta bits."""

    bits: int = 4
    anchor_bits: int = 8
    chunk: int = 16
    step_tokens: int = 128
    early_fraction: float = 1 / 3
    early_extra_bits: int = 1

    def __post_init__(self) -> None:
        for key, lo, hi in (("bits", 2, 8), ("anchor_bits", 4, 8), ("early_extra_bits", 0, 4)):
            value = getattr(self, key)
            if not is_int_at_least(value, lo) or value > hi:
                raise ConfigError(f"bitstream: {key} must be an integer in [{lo}, {hi}], got {value!r}", f"write e.g. {key}: {lo + 2 if key != 'early_extra_bits' else 1}")
        if self.bits + self.early_extra_bits > 8:
            raise ConfigError(f"bitstream: bits + early_extra_bits = {self.bits + self.early_extra_bits} exceeds 8", "lower early_extra_bits")
        for key in ("chunk", "step_tokens"):
            if not is_int_at_least(getattr(self, key), 1):
                raise ConfigError(f"bitstream: {key} must be an integer >= 1, got {getattr(self, key)!r}", f"write e.g. {key}: {16 if key == 'chunk' else 128}")
        f = self.early_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
            raise ConfigError(f"bitstream: early_fraction must be in [0, 1], got {f!r}", "write e.g. early_fraction: 0.33")

    def delta_bits(self, layer: int, num_layers: int) -> int:
        return self.bits + (self.early_extra_bits if layer < math.ceil(self.early_fraction * num_layers) else 0)


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(keys, values)`` held by a ``runtime.kv.KVCache`` (dequantized) or any
    transformers cache whose layers have ``keys``/``values``."""
    out = []
    for layer in cache.layers:
        if hasattr(layer, "_dequantized"):
            out.append(layer._dequantized())
        else:
            out.append((layer.keys, layer.values))
    return out


def _fp16_at_least(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to float16 no lower than ``x`` (a step that is never smaller than needed)."""
    h = x.to(torch.float16)
    low = h.float() < x
    return torch.where(low, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def _counts(symbols: np.ndarray, levels: int, group: int = 1) -> np.ndarray:
    """Frequencies ``(ceil(channels / group), levels)`` uint16 of ``symbols`` ``(channels, n)``,
    one table per ``group`` consecutive channels (+1 smoothing)."""
    c = symbols.shape[0]
    counts = np.zeros((-(-c // group), levels), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(c) // group, symbols.shape[1]), symbols.reshape(-1)), 1)
    counts += 1
    top = counts.max(axis=1, keepdims=True)
    scale = np.maximum(top / 65535.0, 1.0)
    return np.maximum(np.floor(counts / scale), 1).astype(np.uint16)


def _probabilities(counts: np.ndarray) -> np.ndarray:
    c = counts.astype(np.float64)
    return (c / c.sum(axis=-1, keepdims=True)).astype(np.float32)


def _encode_rows(symbols: np.ndarray, counts: np.ndarray, group: int = 1) -> np.ndarray:
    """ANS-code each row of ``symbols`` ``(rows, n)`` with its group's frequency row; one word stream."""
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    probs = _probabilities(counts)
    for r in range(symbols.shape[0] - 1, -1, -1):  # a stack: encode in reverse, decode in order
        model = constriction.stream.model.Categorical(probs[r // group], perfect=False)
        coder.encode_reverse(symbols[r].astype(np.int32), model)
    return coder.get_compressed()


def _decode_rows(words: np.ndarray, counts: np.ndarray, rows: int, n: int, group: int = 1) -> np.ndarray:
    import constriction

    coder = constriction.stream.stack.AnsCoder(words)
    probs = _probabilities(counts)
    out = np.empty((rows, n), dtype=np.int64)
    for r in range(rows):
        model = constriction.stream.model.Categorical(probs[r // group], perfect=False)
        out[r] = coder.decode(model, n)
    return out


TABLE_SHARE = 0.05  # frequency tables may take about this share of the coded deltas


def _table_group(channels: int, tokens: int, levels: int, bits: int) -> int:
    """Channels sharing one frequency table: 1 (CacheGen's per-channel tables) when the tokens
    are many, more when a table (16 bits a level) would outweigh ``TABLE_SHARE`` of its data."""
    return max(1, min(channels, math.ceil(levels * 16 / (TABLE_SHARE * tokens * bits))))


def _encode_tensor(x: torch.Tensor, delta_bits: int, cfg: BitstreamConfig) -> tuple[dict, list[np.ndarray]]:
    """One ``(b, h, n, d)`` tensor -> its header entry and arrays (anchor scale/zero, delta step,
    frequency tables, coded words)."""
    b, h, n, d = x.shape
    xs = x.float().permute(0, 1, 3, 2).reshape(b * h * d, n)  # (channels, tokens)
    anchors = xs[:, :: cfg.chunk]  # (C, chunks)
    alevels = (1 << cfg.anchor_bits) - 1
    lo, hi = anchors.amin(1, keepdim=True), anchors.amax(1, keepdim=True)
    ascale = _fp16_at_least(((hi - lo) / alevels).clamp_min(1e-8))
    azero = lo.to(torch.float16)
    asym = torch.round((anchors - azero.float()) / ascale.float()).clamp_(0, alevels)
    anchor_hat = asym * ascale.float() + azero.float()
    delta = xs - anchor_hat.repeat_interleave(cfg.chunk, dim=1)[:, :n]
    qmax = (1 << (delta_bits - 1)) - 1
    blocks = -(-n // cfg.step_tokens)
    span = torch.nn.functional.pad(delta.abs(), (0, blocks * cfg.step_tokens - n)).reshape(-1, blocks, cfg.step_tokens).amax(-1)
    step = _fp16_at_least((span / qmax).clamp_min(1e-8))  # (C, blocks)
    per_token = step.float().repeat_interleave(cfg.step_tokens, dim=1)[:, :n]
    dsym = (torch.round(delta / per_token).clamp_(-qmax, qmax) + qmax).to(torch.int64).numpy()
    asym_np = asym.to(torch.int64).numpy()
    group = _table_group(b * h * d, n, 2 * qmax + 1, delta_bits)
    dcounts = _counts(dsym, 2 * qmax + 1, group)
    acounts = _counts(asym_np.reshape(1, -1), alevels + 1)
    dwords = _encode_rows(dsym, dcounts, group)
    awords = _encode_rows(asym_np.reshape(1, -1), acounts)
    arrays = [ascale.numpy().astype(np.float16), azero.numpy(), step.numpy().astype(np.float16), dcounts, acounts, dwords, awords]
    entry = {"shape": [b, h, n, d], "delta_bits": delta_bits, "table_group": group, "sizes": [a.nbytes for a in arrays]}
    return entry, arrays


def _decode_tensor(entry: dict, arrays: list[np.ndarray], cfg: BitstreamConfig) -> torch.Tensor:
    b, h, n, d = entry["shape"]
    ascale, azero, step, dcounts, acounts, dwords, awords = arrays
    chunks = -(-n // cfg.chunk)
    c = b * h * d
    asym = torch.from_numpy(_decode_rows(awords, acounts, 1, c * chunks).reshape(c, chunks)).float()
    anchor_hat = asym * torch.from_numpy(ascale).float() + torch.from_numpy(azero).float()
    qmax = (1 << (entry["delta_bits"] - 1)) - 1
    dsym = torch.from_numpy(_decode_rows(dwords, dcounts, c, n, entry["table_group"])).float() - qmax
    per_token = torch.from_numpy(step).float().repeat_interleave(cfg.step_tokens, dim=1)[:, :n]
    xs = anchor_hat.repeat_interleave(cfg.chunk, dim=1)[:, :n] + dsym * per_token
    return xs.reshape(b, h, d, n).permute(0, 1, 3, 2).contiguous()


_ARRAY_TYPES = (np.float16, np.float16, np.float16, np.uint16, np.uint16, np.uint32, np.uint32)


def encode_kv(layers: list[tuple[torch.Tensor, torch.Tensor]], config: BitstreamConfig | None = None) -> bytes:
    """The bitstream of per-layer ``(keys, values)`` ``(batch, kv_heads, tokens, head_dim)``."""
    cfg = config or BitstreamConfig()
    entries, blobs = [], []
    for i, (k, v) in enumerate(layers):
        bits = cfg.delta_bits(i, len(layers))
        for x in (k, v):
            entry, arrays = _encode_tensor(x, bits, cfg)
            entries.append(entry)
            blobs.extend(a.tobytes() for a in arrays)
    header = json.dumps({"config": asdict(cfg), "tensors": entries, "dtype": str(layers[0][0].dtype).removeprefix("torch.")}).encode()
    out = io.BytesIO()
    out.write(MAGIC + struct.pack("<I", len(header)) + header)
    for blob in blobs:
        out.write(blob)
    return out.getvalue()


def _read_header(data: bytes) -> tuple[dict, int]:
    """The stream's JSON header and the offset where its arrays begin."""
    if data[: len(MAGIC)] != MAGIC:
        raise ConfigError("not a slimformer KV bitstream (bad magic bytes)", "pass bytes written by encode_kv")
    (size,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    return json.loads(data[start : start + size]), start + size


def decode_kv(data: bytes) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(keys, values)`` from ``encode_kv``'s bytes, in the dtype they were encoded from."""
    header, pos = _read_header(data)
    cfg = BitstreamConfig(**header["config"])
    dtype = getattr(torch, header["dtype"])
    tensors = []
    for entry in header["tensors"]:
        arrays = []
        for nbytes, kind in zip(entry["sizes"], _ARRAY_TYPES):
            arrays.append(np.frombuffer(data[pos : pos + nbytes], dtype=kind).copy())
            pos += nbytes
        b, h, n, d = entry["shape"]
        c = b * h * d
        arrays[0], arrays[1], arrays[2] = arrays[0].reshape(c, 1), arrays[1].reshape(c, 1), arrays[2].reshape(c, -1)
        arrays[3] = arrays[3].reshape(-(-c // entry["table_group"]), -1)
        arrays[4] = arrays[4].reshape(1, -1)
        tensors.append(_decode_tensor(entry, arrays, cfg).to(dtype))
    return [(tensors[i], tensors[i + 1]) for i in range(0, len(tensors), 2)]


def max_abs_error(layers: list[tuple[torch.Tensor, torch.Tensor]], data: bytes) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The bound on ``|x - decoded|``: half of each element's delta step, shaped like the input
    ``(batch, kv_heads, tokens, head_dim)`` per layer and tensor (read back from the stream)."""
    header, pos = _read_header(data)
    step_tokens = header["config"]["step_tokens"]
    bounds = []
    for entry in header["tensors"]:
        sizes = entry["sizes"]
        step = np.frombuffer(data[pos + sizes[0] + sizes[1] : pos + sizes[0] + sizes[1] + sizes[2]], dtype=np.float16)
        pos += sum(sizes)
        b, h, n, d = entry["shape"]
        per_token = torch.from_numpy(step.astype(np.float32)).reshape(b * h * d, -1).repeat_interleave(step_tokens, dim=1)[:, :n]
        bounds.append(per_token.reshape(b, h, d, n).permute(0, 1, 3, 2) * 0.5)
    return [(bounds[i], bounds[i + 1]) for i in range(0, len(bounds), 2)]
