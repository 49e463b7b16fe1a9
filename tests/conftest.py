"""Shared fixtures: tiny models of every architecture (built once per session, copied per test),
the real MiniLM, a tiny model saved as a Hugging Face folder, and a CLI runner."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# The execution planner times paths on the machine at load/evaluate: off in tests (outputs stay
# those of the capability-chosen kernels); tests/runtime/ turns it on explicitly.
os.environ.setdefault("SLIMFORMER_PLANNER", "0")

from slimformer.methods import CalibrationSettings  # noqa: E402
from slimformer.models.tiny import TINY_FAMILIES, tiny_model  # noqa: E402

FAST_CALIBRATION = {"n_samples": 16, "max_length": 48, "batch_size": 8}


@pytest.fixture(scope="session", autouse=True)
def _plan_cache(tmp_path_factory):
    """The planner's on-disk measurements go to a folder of this test session, never to the
    user's cache (``~/.cache/slimformer/plans``): no test reads what another run measured."""
    before = os.environ.get("SLIMFORMER_PLAN_CACHE")
    os.environ["SLIMFORMER_PLAN_CACHE"] = str(tmp_path_factory.mktemp("plans"))
    yield
    if before is None:
        os.environ.pop("SLIMFORMER_PLAN_CACHE", None)
    else:
        os.environ["SLIMFORMER_PLAN_CACHE"] = before


@pytest.fixture(scope="session")
def _tiny_models():
    torch.manual_seed(0)
    return {f: tiny_model(f) for f in TINY_FAMILIES}


@pytest.fixture(params=TINY_FAMILIES)
def tiny(request, _tiny_models):
    """A fresh copy of a tiny random model, once per supported family."""
    return copy.deepcopy(_tiny_models[request.param])


@pytest.fixture
def tiny_factory(_tiny_models):
    return lambda family: copy.deepcopy(_tiny_models[family])


@pytest.fixture(scope="session")
def fast_calibration():
    return CalibrationSettings(**FAST_CALIBRATION)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, _tiny_models):
    """A tiny BERT saved as an ordinary Hugging Face folder (config, safetensors, tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    loaded = _tiny_models["bert"]
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def minilm():
    from slimformer.models import load_model

    return load_model()


def bert_with_heads_of_32(dtype=torch.bfloat16, layers: int = 2):
    """A tiny random BERT (hidden 64, two heads of 32: a head size the AMX tile kernel takes),
    in ``dtype``, eval mode, seeded."""
    import transformers

    from slimformer.models.loading import from_module
    from slimformer.models.tiny import TINY_VOCAB, tiny_tokenizer

    config = transformers.BertConfig(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=128,
                                     max_position_embeddings=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    torch.manual_seed(0)
    loaded = from_module(transformers.BertModel(config), tiny_tokenizer(), source="tiny-bert-d32")
    loaded.model.to(dtype).eval()
    return loaded


def random_packed_linear(bits, group_size, symmetric, out=96, inp=192, bias=True, seed=0):
    """A ``QuantizedLinear`` with random codes, scales and zero points (seeded): for kernel tests."""
    from slimformer.methods.quantization import QuantizedLinear, grid

    g = torch.Generator().manual_seed(seed)
    groups = grid.num_groups(inp, group_size)
    codes = torch.randint(0, 2**bits, (out, inp), generator=g, dtype=torch.uint8)
    scale = torch.rand(out, groups, generator=g) * 0.02 + 1e-3
    zero = torch.randint(0, 2**bits, (out, groups), generator=g)
    b = torch.randn(out, generator=g) if bias else None
    return QuantizedLinear.from_codes(codes, scale, zero, bits, group_size, symmetric, b)


def random_gguf_linear(gguf_type, out, inp, g):
    """A ``GGUFBlockLinear`` of ``gguf_type`` with random codes, fp16 scales (and Q4_1's minima)
    and a bias, drawn from the generator ``g``: for kernel tests."""
    from slimformer.methods.quantization.gguf_blocks import BITS, GGUFBlockLinear

    codes = torch.randint(0, 2 ** BITS[gguf_type], (out, inp), generator=g, dtype=torch.uint8)
    scales = (torch.rand(out, inp // 32, generator=g) * 0.02).half()
    mins = (-torch.rand(out, inp // 32, generator=g) * 0.1).half() if gguf_type == "Q4_1" else None
    return GGUFBlockLinear.from_blocks(codes, scales, mins, gguf_type, bias=torch.randn(out, generator=g))


def sample_batch(loaded, texts=("def foo(x): return x + 1", "A short docstring.\n\nWith a second paragraph about nothing.")):
    batch = dict(loaded.tokenizer(list(texts), padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    return batch


def model_output(loaded, batch) -> torch.Tensor:
    with torch.no_grad():
        out = loaded.model(**batch)
    return out.last_hidden_state if loaded.kind == "encoder" else out.logits


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from slimformer.cli import main

    def run(*args: str):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def _load_benchmark(name: str):
    """``benchmarks/<name>.py`` imported as a module named ``name`` (benchmark scripts are not a
    package; dataclasses in them look their module up in ``sys.modules``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_benchmark():
    """A function: ``load_benchmark("exit_bound")`` -> the module of ``benchmarks/exit_bound.py``."""
    return _load_benchmark
