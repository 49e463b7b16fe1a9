"""The one list of every method, with easy and hard settings, that drives the shared tests.

Adding a method: add its settings here (and a behaviour check in test_every_method.py if its
family is new)."""

import pytest

METHODS = [
    pytest.param({"method": "rtn", "bits": 8, "group_size": None, "symmetric": True}, id="rtn-w8-perchannel-sym"),
    pytest.param({"method": "rtn", "bits": 4, "group_size": 32}, id="rtn-w4-g32-asym"),
    pytest.param({"method": "rtn", "bits": 3, "group_size": 32, "targets": ["linear", "embedding", "head"]}, id="rtn-w3-g32-with-embedding-and-head"),
    pytest.param({"method": "rtn", "bits": 2, "group_size": None, "symmetric": True}, id="rtn-w2-perchannel-sym"),
    pytest.param({"method": "rtn", "bits": 8, "group_size": None, "symmetric": True, "targets": ["embedding", "head"]}, id="rtn-w8-embedding-head"),
    pytest.param({"method": "gptq", "bits": 4, "group_size": 32, "act_order": True}, id="gptq-w4-g32-actorder"),
    pytest.param({"method": "gptq", "bits": 3, "group_size": None, "act_order": False}, id="gptq-w3-perchannel"),
    pytest.param({"method": "gptq", "bits": 2, "group_size": 32, "act_order": False}, id="gptq-w2-g32"),
    pytest.param({"method": "magnitude", "sparsity": 0.5}, id="magnitude-50"),
    pytest.param({"method": "magnitude", "pattern": "2:4"}, id="magnitude-2of4"),
    pytest.param({"method": "wanda", "sparsity": 0.3}, id="wanda-30"),
    pytest.param({"method": "wanda", "pattern": "4:8"}, id="wanda-4of8"),
    pytest.param({"method": "shortgpt", "num_layers": 1}, id="shortgpt-drop1"),
    pytest.param({"method": "shortgpt", "layers": [0, 2]}, id="shortgpt-drop-0-2"),
    pytest.param({"method": "cast", "dtype": "bfloat16"}, id="cast-bf16"),
    pytest.param({"method": "early-exit", "threshold": 0.95, "train_steps": 20}, id="early-exit-similarity"),
    pytest.param({"method": "early-exit", "rule": "patience", "threshold": 0.9, "patience": 2, "layers": [0, 1, 2], "train_steps": 20}, id="early-exit-patience"),
    pytest.param({"method": "tome", "r": 3}, id="tome-r3"),
    pytest.param({"method": "token-pruning", "keep_ratio": 0.6, "layers": [1, 2], "score": "mean"}, id="token-pruning-mean"),
    pytest.param({"method": "nf4", "group_size": 32}, id="nf4-g32"),
    pytest.param({"method": "nf4", "group_size": None, "targets": ["linear", "embedding", "head"]}, id="nf4-perchannel-with-embedding-and-head"),
    pytest.param({"method": "fp4", "group_size": 32}, id="fp4-g32-format-search"),
    pytest.param({"method": "fp4", "group_size": None, "calibrated": True, "formats": ["e2m1"]}, id="fp4-e2m1-perchannel-calibrated"),
    pytest.param({"method": "vptq", "vector_dim": 4, "codebook_size": 16, "kmeans_iters": 3}, id="vptq-d4-k16"),
    pytest.param({"method": "vptq", "vector_dim": 8, "codebook_size": 64, "residual_codebook_size": 16, "kmeans_iters": 3}, id="vptq-d8-k64-residual16"),
    pytest.param({"method": "bitstack", "num_blocks": 4, "rank": 4, "target_bits": 6}, id="bitstack-r4-6bits-level"),
    pytest.param({"method": "bitstack", "num_blocks": 3, "rank": 2, "order": "greedy", "activation_scaling": False}, id="bitstack-r2-all-blocks-greedy-unscaled"),
    pytest.param({"method": "hqq", "bits": 4, "group_size": 32, "targets": ["linear", "embedding", "head"]}, id="hqq-w4-g32-fixedzero-with-embedding-and-head"),
    pytest.param({"method": "hqq", "bits": 3, "group_size": 32, "zero_format": "int", "optimize_scale": True}, id="hqq-w3-g32-intzero-scale"),
    pytest.param({"method": "awq", "bits": 4, "group_size": 32}, id="awq-w4-g32-scale+clip"),
    pytest.param({"method": "awq", "bits": 3, "group_size": None, "search": "clip", "symmetric": True}, id="awq-w3-perchannel-clip-sym"),
    pytest.param({"method": "adadim", "bits": 4, "group_size": 32}, id="adadim-w4-g32"),
    pytest.param({"method": "adadim", "bits": 2, "group_size": None}, id="adadim-w2-perchannel"),
    pytest.param({"method": "mixed-precision", "target_bits": 3.0, "group_size": 32, "sensitivity_samples": 4}, id="mixed-precision-3bits-gptq"),
    pytest.param({"method": "mixed-precision", "target_bits": 4.5, "bit_options": [2, 4, 8], "group_size": None, "symmetric": True, "quantizer": "rtn", "sensitivity_samples": 4}, id="mixed-precision-4.5bits-rtn-perchannel"),
    pytest.param({"method": "smoothquant", "n_grid": 4, "samples": 64}, id="smoothquant-w8a8-searched"),
    pytest.param({"method": "smoothquant", "alpha": 0.5, "activation_grid": "asymmetric"}, id="smoothquant-w8a8-alpha0.5-asym"),
]
