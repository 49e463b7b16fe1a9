"""Every method on every tiny architecture, from the one shared list: each run asserts the
method's behaviour (quantized layers and their error bound, measured sparsity and N:M masks,
dropped blocks gone) and a bit-exact save/load round trip."""

from __future__ import annotations

import pytest
import torch
from conftest import model_output, sample_batch
from methods_under_test import METHODS
from torch import nn

from slimformer.compress import compress
from slimformer.errors import ConfigError
from slimformer.io import load_compressed, save_compressed
from slimformer.methods import method_from_dict
from slimformer.methods.lowrank.base import LowRankLinear
from slimformer.methods.pruning.sparse_storage import SparseLinear
from slimformer.methods.quantization.eora import LowRankCompensated
from slimformer.methods.quantization.modules import PackedWeight, QuantizedModule
from slimformer.recipe import Recipe


def _weights(loaded) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in loaded.model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}


def _check_quantized(loaded, record, config, before):
    assert record["modules"], "a quantization step must quantize something"
    for name in record["modules"]:
        module = loaded.model.get_submodule(name)
        assert isinstance(module, QuantizedModule)
        w = before[name]
        deq = module.dequantized_weight()
        assert deq.shape == w.shape
        rows, cols = module.weight_shape
        bits = getattr(config, "bits", None)
        if isinstance(bits, (int, float)) and not isinstance(bits, bool):
            # Stored size of the weight: codes at `bits` bits plus modest metadata (scales,
            # zero points, codebooks, low-rank factors), never a float copy.
            assert module.stored_bits() <= rows * cols * (bits + 6) + 64 * 16 * (rows + cols), f"{name}: stores too much"
        if config.name == "mixed-precision":
            assert module.bits == record["bits"][name]
        elif isinstance(module, PackedWeight):
            assert module.bits == config.bits
            # Stored codes really take `bits` bits each (plus row padding to whole bytes).
            assert module.qweight.shape[1] == -(-cols * config.bits // 8)
        if config.name == "rtn":
            g = cols if config.group_size is None else config.group_size
            step = module.scales.float().repeat_interleave(g, dim=1)
            bound = step * (0.5 if config.symmetric else 1.0) * (1 + 1e-3) + 1e-7
            assert torch.all((w - deq).abs() <= bound), f"{name}: RTN error exceeds its step size"
        else:
            rel = ((w - deq).norm() / w.norm()).item()
            assert rel < 0.9, f"{name}: {config.name} relative weight error {rel:.2f}"


def _check_pruned(loaded, record, config):
    assert record["modules"]
    for name in record["modules"]:
        module = loaded.model.get_submodule(name)
        if config.storage == "sparse":
            # Stored sparse: the file holds the index and the kept values, not a dense copy.
            assert isinstance(module, SparseLinear)
            assert module.nnz == int(module.mask().sum())
            assert torch.all(module.weight[~module.mask()] == 0)
            w = torch.where(module.mask(), 1.0, 0.0)
        else:
            assert isinstance(module, nn.Linear)
            w = module.weight.detach()
        measured = (w == 0).float().mean().item()
        assert abs(measured - config.sparsity) <= 1.0 / w.shape[1] + 1e-6, f"{name}: sparsity {measured} != {config.sparsity}"
        if config.pattern is not None:
            n, m = config.nm
            nonzero = (w.reshape(w.shape[0], -1, m) != 0).sum(-1)
            assert torch.all(nonzero == n), f"{name}: not exactly {n}:{m}"


def _check_lowrank(loaded, record, config, before):
    assert record["modules"]
    for name in record["modules"]:
        module = loaded.model.get_submodule(name)
        w = before[name]
        rows, cols = w.shape
        rank = record["ranks"][name]
        if config.name == "lq-lora":
            # Quantized residual plus factors: closer to W than the residual grid alone allows.
            assert isinstance(module, LowRankCompensated) and module.rank == rank
            assert isinstance(module.inner, PackedWeight) and module.inner.bits == config.bits
            assert ((w - module.dequantized_weight()).norm() / w.norm()).item() < 0.5
            continue
        # Two smaller linears that physically hold rank * (in + out) weights.
        assert isinstance(module, LowRankLinear)
        assert module.down.weight.shape == (rank, cols) and module.up.weight.shape == (rows, rank)
        assert rank * (rows + cols) <= config.params_ratio * rows * cols or config.rank == rank
        held = sum(p.numel() for n, p in module.named_parameters() if n.endswith("weight"))
        assert held == rank * (rows + cols) < rows * cols
    if config.name != "lq-lora":
        assert record["params_after"] < record["params_before"]


def _check_structure(loaded, record, config, blocks_before, params_before):
    """Dropped blocks and removed sub-layers are gone from the tree, kept blocks are the
    original ones in order, KV-cache slots stay dense, slimmed widths are what the record says."""
    adapter = loaded.adapter
    blocks_after = list(adapter.blocks())
    dropped = record.get("dropped_layers", [])
    if config.name == "shortgpt":
        assert len(dropped) == config.num_layers
    assert len(blocks_after) == len(blocks_before) - len(dropped)
    kept = [b for i, b in enumerate(blocks_before) if i not in dropped]
    assert all(a is b for a, b in zip(blocks_after, kept)), "the kept blocks must be the original ones, in order"
    for i in dropped:
        assert all(blocks_before[i] is not m for m in loaded.model.modules()), "a dropped block is still in the tree"
    removed = record.get("removed_sublayers", [])
    for i, kind in removed:
        assert adapter.sublayer_removed(kept.index(blocks_before[i]), kind)
        assert not any(True for _ in blocks_before[i].get_submodule(adapter.spec.attention if kind == "attention" else adapter.spec.mlp[-1]).parameters())
    if config.name in ("sleb", "fusegpt", "sublayer-drop", "blockpruner"):
        assert dropped or removed, "a structure step must remove something"
    slot = 0
    for index, block in enumerate(blocks_after):
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                assert m.layer_idx == slot
        slot += int(not adapter.sublayer_removed(index, "attention"))
    if config.name == "width-slim":
        for i, (n_q, n_kv) in record["heads"].items():
            assert adapter.attention_heads(int(i)) == (n_q, n_kv)
            assert adapter.mlp_width(int(i)) == record["mlp_widths"][i]
    assert sum(p.numel() for p in loaded.model.parameters()) < params_before


@pytest.mark.parametrize("step", METHODS)
def test_every_method_on_every_architecture(tiny, step, fast_calibration, tmp_path):
    config = method_from_dict(step)
    if config.family == "dynamic" and tiny.kind != "encoder":
        with pytest.raises(ConfigError, match="encoder"):
            compress(tiny, Recipe(steps=[config], calibration=fast_calibration))
        return
    before = _weights(tiny)
    blocks_before = list(tiny.adapter.blocks())
    params_before = sum(p.numel() for p in tiny.model.parameters())
    batch = sample_batch(tiny)
    reference = model_output(tiny, batch)

    compress(tiny, Recipe(steps=[config], calibration=fast_calibration))
    record = tiny.applied[-1]

    if config.name == "cast":
        assert all(p.dtype == torch.bfloat16 for p in tiny.model.parameters())
        stored = tiny.model.state_dict()
        assert all(t.dtype == torch.bfloat16 for t in stored.values() if t.is_floating_point())
    elif config.family == "quantization":
        _check_quantized(tiny, record, config, before)
        if config.name == "mixed-precision":
            assert record["achieved_bits"] <= config.target_bits, "the allocation must fit the bit budget"
    elif config.family == "pruning":
        _check_pruned(tiny, record, config)
    elif config.family == "structure":
        _check_structure(tiny, record, config, blocks_before, params_before)
    elif config.family == "lowrank":
        _check_lowrank(tiny, record, config, before)
    elif config.family == "dynamic":
        assert tiny.dynamic is not None and tiny.dynamic.active()
        embedding, stats = tiny.embed(batch, return_stats=True)
        assert torch.isfinite(embedding).all() and embedding.shape == (batch["input_ids"].shape[0], tiny.model.config.hidden_size)
        if config.name == "early-exit":
            assert set(record["exit_fidelity"]) == set(record["layers"])
        elif config.name == "costeff":
            assert set(record["confidence"]) == set(record["exit_layers"]) and record["training"]["steps"] == config.steps
        else:
            assert stats.tokens_per_layer[-1] < stats.tokens_per_layer[0]
    else:  # pragma: no cover - a new family must add its check
        pytest.fail(f"no behaviour check for family {config.family}")

    output = model_output(tiny, batch)
    assert torch.isfinite(output).all()
    assert output.shape == reference.shape

    folder = save_compressed(tiny, tmp_path / "out")
    again = load_compressed(folder)
    assert torch.equal(model_output(again, batch), output), "save/load must be bit-exact"
    if tiny.kind == "encoder":
        assert torch.equal(again.embed(batch), tiny.embed(batch)), "dynamic settings must survive save/load"
    assert again.adapter.num_layers() == tiny.adapter.num_layers()
