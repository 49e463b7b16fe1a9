"""QuantEase: coordinate descent never raises the layer objective of its GPTQ start, ends at a
coordinate-wise minimum, keeps the grid's conventions, and transfers to held-out inputs."""

import pytest
import torch

from slimformer.errors import ConfigError
from slimformer.methods.quantization import grid
from slimformer.methods.quantization.gptq import gptq_quantize, prepare_hessian
from slimformer.methods.quantization.quantease import (
    QuantEaseConfig,
    layer_objective,
    objective_hessian,
    quantease_quantize,
    quantease_refine,
)


def _inputs(n, d=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(99)) / d**0.5  # the same feature mix for every draw
    scales = torch.linspace(0.2, 3.0, d)
    return (torch.randn(n, d, generator=g) @ mix) * scales


def _start(W, H, bits, group, damp):
    codes, scale, zero = gptq_quantize(W, prepare_hessian(H, True, damp), bits, group, symmetric=False, clip_search=True)
    return codes, scale.to(torch.bfloat16).float(), zero


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 32), (3, None), (4, 48)])
def test_each_sweep_lowers_the_objective_of_the_gptq_start(bits, group):
    X = _inputs(4096)
    W = torch.randn(40, 96)
    H = X.t() @ X / X.shape[0]
    Ho = objective_hessian(H, 0.01)
    codes, scale, zero = _start(W, H, bits, group, 0.01)
    objectives = [layer_objective(W, grid.dequantize_codes(codes, scale, zero), Ho)]
    for passes in (1, 2, 4):
        c, s, z = quantease_refine(W, Ho, codes, scale, zero, bits, group, passes=passes)
        assert torch.equal(z, zero), "the integer zero points are kept"
        assert int(c.max()) <= 2**bits - 1 and c.dtype == torch.uint8
        assert torch.equal(s, s.to(torch.bfloat16).float()) and bool((s > 0).all()), "scales stay positive and bfloat16 as stored"
        objectives.append(layer_objective(W, grid.dequantize_codes(c, s, z), Ho))
    assert all(b <= a * (1 + 1e-5) for a, b in zip(objectives, objectives[1:])), objectives
    assert objectives[-1] < 0.97 * objectives[0], objectives


def test_converged_codes_are_a_coordinate_wise_minimum():
    """With scales fixed, no single code moved one step up or down lowers the objective."""
    X = _inputs(2048, d=64)
    W = torch.randn(16, 64)
    H = X.t() @ X / X.shape[0]
    Ho = objective_hessian(H, 0.01)
    codes, scale, zero = _start(W, H, 3, 32, 0.01)
    c, s, z = quantease_refine(W, Ho, codes, scale, zero, 3, 32, passes=30, refit_scales=False)
    assert torch.equal(s, scale)
    best = layer_objective(W, grid.dequantize_codes(c, s, z), Ho)
    g = torch.Generator().manual_seed(1)
    checked = 0
    for _ in range(200):
        r, j = int(torch.randint(16, (1,), generator=g)), int(torch.randint(64, (1,), generator=g))
        for step in (-1, 1):
            v = int(c[r, j]) + step
            if not 0 <= v <= 7:
                continue
            moved = c.clone()
            moved[r, j] = v
            assert layer_objective(W, grid.dequantize_codes(moved, s, z), Ho) >= best * (1 - 1e-6)
            checked += 1
    assert checked > 300


def test_the_gain_holds_on_held_out_inputs():
    """Fitted on 1024 tokens, QuantEase lowers the output error on 8192 fresh inputs from the same
    distribution against its GPTQ start (same damping)."""
    X, X_new = _inputs(1024, seed=0), _inputs(8192, seed=1)
    W = torch.randn(48, 96)
    H, H_new = X.t() @ X / X.shape[0], X_new.t() @ X_new / X_new.shape[0]
    codes, scale, zero = _start(W, H, 3, 32, 0.01)
    gptq = layer_objective(W, grid.dequantize_codes(codes, scale, zero), H_new)
    qe = layer_objective(W, grid.dequantize_codes(*quantease_quantize(W, H, 3, 32, False, damp=0.01)), H_new)
    assert qe < 0.93 * gptq, (qe, gptq)


def test_dead_inputs_and_zero_sweeps():
    X = _inputs(1024, d=64)
    X[:, 7] = 0  # a feature never active: its Hessian row is zero, its weights are zeroed as GPTQ does
    W = torch.randn(24, 64)
    H = X.t() @ X / X.shape[0]
    c, s, z = quantease_quantize(W, H, 3, 32, False, passes=3)
    deq = grid.dequantize_codes(c, s, z)
    assert torch.isfinite(deq).all()
    assert layer_objective(W, deq, H) < layer_objective(W, torch.zeros_like(W), H) * 0.2
    c0, s0, z0 = quantease_quantize(W, H, 3, 32, False, passes=0)
    ref = gptq_quantize(W, prepare_hessian(H, True, 0.05), 3, 32, False, clip_search=True)
    assert torch.equal(c0, ref[0]) and torch.equal(s0, ref[1]), "passes: 0 is GPTQ's solution"


def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="passes"):
        QuantEaseConfig(passes=-1)
    with pytest.raises(ConfigError, match="damp"):
        QuantEaseConfig(damp=1.5)
    with pytest.raises(ConfigError, match="embedding"):
        QuantEaseConfig(targets=["linear", "embedding"])
    with pytest.raises(ConfigError, match="weight-only"):
        QuantEaseConfig(bits=8, group_size=None, activations="int8")
