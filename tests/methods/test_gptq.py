"""GPTQ compensates quantization error: lower layer-output error than round-to-nearest on the
same calibration data, with and without activation ordering."""

import pytest
import torch

from slimformer.methods.quantization import grid
from slimformer.methods.quantization.gptq import gptq_quantize


def _correlated_inputs(n=2048, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scales = torch.linspace(0.2, 3.0, d)
    return (torch.randn(n, d, generator=g) @ mix) * scales


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, None), (2, 64)])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_output_error_below_rtn(bits, group_size, act_order):
    torch.manual_seed(0)
    X = _correlated_inputs()
    W = torch.randn(64, 128)
    H = X.t() @ X / X.shape[0]
    codes, scale, zero = gptq_quantize(W, H, bits, group_size, symmetric=False, act_order=act_order)
    w_gptq = grid.dequantize_codes(codes, scale, zero)
    w_rtn = grid.fake_quantize(W, bits, group_size, symmetric=False)
    err_gptq = (X @ (W - w_gptq).t()).pow(2).mean()
    err_rtn = (X @ (W - w_rtn).t()).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn
    assert int(codes.max()) <= 2**bits - 1


def test_gptq_handles_dead_inputs():
    X = _correlated_inputs(d=64)
    X[:, 5] = 0  # a feature that is never active: its Hessian row is zero
    W = torch.randn(32, 64)
    codes, scale, zero = gptq_quantize(W, X.t() @ X, 4, 32, symmetric=True)
    deq = grid.dequantize_codes(codes, scale, zero)
    assert torch.isfinite(deq).all()
    assert torch.all(deq[:, 5] == 0)


def test_true_sequential_stages_follow_the_block_dataflow(tiny_factory, fast_calibration):
    from slimformer.methods.calibration import CompressionContext, stages_of_block

    for family, expected in {
        "bert": [["attention.self.query", "attention.self.key", "attention.self.value"], ["attention.output.dense"], ["intermediate.dense"], ["output.dense"]],
        "llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
    }.items():
        loaded = tiny_factory(family)
        adapter = loaded.adapter
        prefix = adapter.block_prefix(0) + "."
        names = [n for n in adapter.linear_layers() if n.startswith(prefix)]
        batch = CompressionContext(fast_calibration).batches(loaded.tokenizer)[0]
        stages = stages_of_block(loaded.model, adapter.blocks()[0], names, batch)
        assert [sorted(n[len(prefix):] for n in stage) for stage in stages] == [sorted(e) for e in expected], family


def test_clip_search_never_worse_than_min_max_per_group():
    """The searched per-group range has weighted rounding error <= min-max's in every group
    (min-max is one of the candidates), and strictly less somewhere on heavy-tailed weights."""
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    W = torch.distributions.StudentT(3.0).sample((32, 128))  # heavy tails: clipping pays
    imp = torch.rand(128, generator=g) + 0.1

    def group_err(shrink):
        s, z = grid.grid_params(W, 4, 32, False, shrink=shrink)
        dq = grid.dequantize_codes(grid.quantize_codes(W, s, z, 4), s, z)
        return (((dq - W) ** 2) * imp).reshape(32, 4, 32).sum(-1)

    shrink = grid.search_shrink(W, 4, 32, False, imp)
    assert shrink.shape == (32, 4) and float(shrink.min()) >= 0.75 and float(shrink.max()) <= 1.0
    searched, minmax = group_err(shrink), group_err(1.0)
    assert torch.all(searched <= minmax + 1e-6)
    assert float(searched.sum()) < 0.95 * float(minmax.sum())
    assert torch.equal(grid.search_shrink(W, 4, 32, False, imp, candidates=(1.0,)), torch.ones(32, 4))


def test_gptq_clip_search_lowers_output_error():
    torch.manual_seed(2)
    X = _correlated_inputs()
    W = torch.distributions.StudentT(3.0).sample((64, 128))
    H = X.t() @ X / X.shape[0]
    errs = {}
    for clip in (False, True):
        codes, scale, zero = gptq_quantize(W, H, 3, 32, symmetric=False, act_order=True, clip_search=clip)
        errs[clip] = float((X @ (W - grid.dequantize_codes(codes, scale, zero)).t()).pow(2).mean())
    assert errs[True] < errs[False]


def test_bias_correction_removes_the_mean_output_error_and_lowers_the_mse():
    from slimformer.methods.quantization.gptq import correct_bias, quantize_linear_gptq

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    X = torch.randn(2000, 64) * 0.5 + torch.linspace(-2, 2, 64)  # inputs with a strong mean
    H = X.t() @ X / X.shape[0]
    plain = quantize_linear_gptq(layer, H, 3, 16, symmetric=False)
    corrected = quantize_linear_gptq(layer, H, 3, 16, symmetric=False)
    correct_bias(corrected, layer.weight, X.mean(0))
    with torch.no_grad():
        ref = layer(X)
        err_plain, err_corr = plain(X) - ref, corrected(X) - ref
    assert err_corr.mean(0).abs().max() < 1e-4  # no mean shift left on the calibration inputs
    assert err_plain.mean(0).abs().max() > 10 * err_corr.mean(0).abs().max()
    # the MSE drops by exactly the squared mean shift (up to float rounding)
    drop = (err_plain.pow(2).mean(0) - err_corr.pow(2).mean(0)).sum()
    torch.testing.assert_close(drop, err_plain.mean(0).pow(2).sum(), rtol=1e-3, atol=1e-6)
    assert torch.equal(plain.qweight, corrected.qweight)  # the codes are untouched


def test_compression_holds_only_the_stored_form_until_the_first_forward(tiny_factory, fast_calibration):
    """GPTQ's layers build their kernel's run-time tensors (e.g. the int4 packed weight) at their
    first forward, not during the job: a job's memory holds the stored codes of the layers it
    finished, and the lazily prepared model computes what an eagerly prepared copy computes."""
    import copy

    from slimformer.compress import compress
    from slimformer.methods.quantization.modules import QuantizedLinear
    from slimformer.recipe import Recipe

    loaded = tiny_factory("llama")
    recipe = Recipe.from_dict({"slimformer_recipe": 1, "name": "g", "calibration": fast_calibration.__dict__,
                               "steps": [{"method": "gptq", "bits": 4, "group_size": 32}]})
    compress(loaded, recipe)
    layers = [m for m in loaded.model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(m.runtime_nbytes() == 0 for m in layers)
    assert any(m.kernel != "unpack" for m in layers)  # a kernel with a run-time form was chosen
    eager = copy.deepcopy(loaded.model)
    for m in eager.modules():
        if isinstance(m, QuantizedLinear):
            m.prepare()
    ids = torch.randint(0, loaded.model.config.vocab_size, (2, 12))
    with torch.no_grad():
        lazy_out, eager_out = loaded.model(ids).logits, eager(ids).logits
    assert torch.equal(lazy_out, eager_out)
    assert all(m.runtime_nbytes() > 0 for m in layers if m.kernel != "unpack")


def test_clip_search_without_activation_order_is_refused():
    """Without act_order the groups are found during the column loop and never searched: the
    option would do nothing, so the config says so instead."""
    from slimformer.errors import ConfigError
    from slimformer.methods.quantization.gptq import GPTQConfig

    with pytest.raises(ConfigError, match="needs act_order"):
        GPTQConfig(bits=3, group_size=64, act_order=False, clip_search=True)
    assert GPTQConfig(bits=3, group_size=64, clip_search=True).clip_search
