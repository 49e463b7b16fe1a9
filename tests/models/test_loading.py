"""Loading: local folders, the embedded default, clear errors for everything else."""

import pytest
import torch
from conftest import sample_batch

from slimformer.errors import ModelLoadError, UnsupportedArchitectureError
from slimformer.models import SUPPORTED_MODEL_TYPES, ArchitectureAdapter, load_model
from slimformer.models.tiny import TINY_FAMILIES


def test_embedded_default_is_the_real_minilm(minilm):
    assert minilm.kind == "encoder"
    assert minilm.model.config.model_type == "bert"
    assert minilm.adapter.num_layers() == 6
    n_params = sum(p.numel() for p in minilm.model.parameters())
    assert 22_000_000 < n_params < 23_000_000
    emb_name, emb = minilm.adapter.embedding()
    assert emb.weight.numel() / n_params > 0.5  # the embedding table is half the model


def test_local_hf_folder_loads_with_identical_outputs(tiny_folder, tiny_factory):
    loaded = load_model(tiny_folder)
    reference = tiny_factory("bert")
    batch = sample_batch(reference)
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).last_hidden_state, reference.model(**batch).last_hidden_state)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_adapter_finds_blocks_attention_mlp_and_linears(family, tiny_factory):
    loaded = tiny_factory(family)
    adapter = loaded.adapter
    assert adapter.num_layers() == 4
    linears = adapter.linear_layers()
    assert len(linears) == 4 * {"bert": 6, "llama": 7, "qwen2": 7, "gpt2": 4}[family]
    assert all(isinstance(m, torch.nn.Linear) for m in linears.values())  # GPT-2 Conv1D normalised
    for i in range(4):
        assert adapter.attention(i) is not None and adapter.mlp(i)
        assert set(adapter.linear_layers(i)) <= set(linears)


def test_unsupported_architecture_lists_the_supported_ones():
    import transformers

    config = transformers.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=50)
    with pytest.raises(UnsupportedArchitectureError) as info:
        ArchitectureAdapter(transformers.T5Model(config))
    assert all(t in str(info.value) for t in SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("source", ["/nonexistent/model/dir", "./not-here"])
def test_missing_paths_are_clear_errors(source):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(source)


def test_hub_ids_fail_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="Hub"):
        load_model("nobody-here/no-such-model-xyz")


def test_attention_switch_reports_and_changes_only_what_it_can(tiny_factory):
    from slimformer.models import attention_implementation, set_attention

    loaded = tiny_factory("llama")
    model, batch = loaded.model, sample_batch(loaded)
    start = attention_implementation(model)
    assert start in ("sdpa", "eager")
    with torch.no_grad():
        before = model(**batch).logits
    other = "eager" if start == "sdpa" else "sdpa"
    assert set_attention(model, other) and attention_implementation(model) == other
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, atol=1e-5, rtol=1e-5)
    assert not set_attention(model, "no-such-attention") and attention_implementation(model) == other
    plain = torch.nn.Linear(2, 2)
    assert attention_implementation(plain) is None and not set_attention(plain, "eager")
