"""Nothing unsafe is loaded: no pickle is unpickled freely (a hostile one never runs), a model's
own code runs only when trusted, manifests name only allowed classes and dtypes, and no file or
link of a model folder leads outside it."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from conftest import sample_batch

import slimformer
from slimformer.errors import ModelLoadError, SlimformerError
from slimformer.models import load_model


class _Hostile:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears if it ever runs."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _without_weights(tiny_folder, dest):
    shutil.copytree(tiny_folder, dest)
    (dest / "model.safetensors").unlink()
    return dest


def _hostile_checkpoint(path, marker, zipped: bool) -> None:
    payload = {"embeddings.word_embeddings.weight": torch.zeros(2, 2), "evil": _Hostile(str(marker))}
    if zipped:
        torch.save(payload, path)  # the modern zip format; data.pkl holds the call to open()
    else:
        path.write_bytes(pickle.dumps(payload))  # a legacy raw pickle


@pytest.mark.parametrize("zipped", [True, False], ids=["torch-zip", "raw-pickle"])
def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, tiny_folder, run_cli, zipped):
    model = _without_weights(tiny_folder, tmp_path / "model")
    marker = tmp_path / "pwned"
    _hostile_checkpoint(model / "pytorch_model.bin", marker, zipped)
    # The file really is hostile: a free unpickler (in a throwaway copy) creates the marker.
    probe = tmp_path / "probe"
    _hostile_checkpoint(tmp_path / "probe.bin", probe, zipped)
    if zipped:
        torch.load(tmp_path / "probe.bin", weights_only=False)
    else:
        pickle.loads((tmp_path / "probe.bin").read_bytes())
    assert probe.exists()

    with pytest.raises(ModelLoadError, match="refused") as info:
        load_model(model)
    assert "\n" not in str(info.value) and "safetensors" in str(info.value)
    code, _, err = run_cli("compress", model, "--recipe", "recipes/int8.yaml", "--out", tmp_path / "out", "--no-eval", "--quiet")
    assert code == 2 and err.count("slimformer: error:") == 1 and "refused" in err
    assert not marker.exists(), "the hostile pickle ran"
    assert not (tmp_path / "out").exists()


def test_a_plain_pickle_checkpoint_is_converted_with_identical_outputs(tmp_path, tiny_folder, tiny_factory):
    reference = tiny_factory("bert")
    model = _without_weights(tiny_folder, tmp_path / "model")
    torch.save(reference.model.state_dict(), model / "pytorch_model.bin")
    loaded = load_model(model)
    batch = sample_batch(reference)
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).last_hidden_state, reference.model(**batch).last_hidden_state)
    assert sorted(p.name for p in model.iterdir()) == sorted([p.name for p in tiny_folder.iterdir() if p.name != "model.safetensors"] + ["pytorch_model.bin"])


def test_the_model_folders_own_code_runs_only_when_trusted(tmp_path, tiny_folder, run_cli, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tiny_folder, model)
    marker = tmp_path / "code-ran"
    (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="trust") as info:
        load_model(model)
    assert "auto_map" in str(info.value)
    code, _, err = run_cli("compress", model, "--recipe", "recipes/int8.yaml", "--out", tmp_path / "out", "--no-eval", "--quiet")
    assert code == 2 and "--trust-remote-code" in err
    assert not marker.exists()
    # The flag reaches the loader (and only the flag does).
    seen = []
    monkeypatch.setattr("slimformer.models.load_model", lambda src, **kw: seen.append(kw) or (_ for _ in ()).throw(SlimformerError("stop", "here")))
    run_cli("compress", model, "--recipe", "recipes/int8.yaml", "--out", tmp_path / "o2", "--trust-remote-code", "--quiet")
    run_cli("compress", model, "--recipe", "recipes/int8.yaml", "--out", tmp_path / "o3", "--quiet")
    assert seen == [{"trust_remote_code": True}, {"trust_remote_code": False}]


@pytest.fixture
def compressed(tmp_path, tiny_factory):
    model = slimformer.compress(tiny_factory("bert"), slimformer.Recipe.from_dict({"slimformer_recipe": 1, "steps": [{"method": "rtn", "bits": 8, "group_size": 32}]}))
    return slimformer.save(model, tmp_path / "c")


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("model_class", "BertForMaskedLM", "not one allowed"),
        ("model_class", "PreTrainedModel", "not one allowed"),
        ("model_class", "__import__", "not one allowed"),
        ("dtype", "int8", "unknown dtype"),
        ("attn_implementation", "flash_attention_2", "unknown attention"),
    ],
)
def test_manifest_names_only_allowed_classes_and_dtypes(compressed, field, value, match):
    manifest = json.loads((compressed / "manifest.json").read_text())
    assert slimformer.load(compressed).model.__class__.__name__ == manifest["model_class"]
    manifest[field] = value
    (compressed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=match):
        slimformer.load(compressed)


def test_manifest_module_types_come_from_the_registry(compressed):
    manifest = json.loads((compressed / "manifest.json").read_text())
    name = next(iter(manifest["modules"]))
    manifest["modules"][name]["type"] = "os.system"
    (compressed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="does not fit"):
        slimformer.load(compressed)


@pytest.mark.parametrize("which", ["weights-link", "tokenizer-link", "tokenizer-config-path", "shard-index", "compressed-weights-link"])
def test_no_file_of_a_model_folder_leads_outside_it(tmp_path, tiny_folder, compressed, which):
    outside = tmp_path / "outside"
    outside.mkdir()
    if which == "compressed-weights-link":
        model = compressed
        shutil.move(model / "model.safetensors", outside / "model.safetensors")
        os.symlink(outside / "model.safetensors", model / "model.safetensors")
    else:
        model = tmp_path / "model"
        shutil.copytree(tiny_folder, model)
        if which == "weights-link":
            shutil.move(model / "model.safetensors", outside / "model.safetensors")
            os.symlink("../outside/model.safetensors", model / "model.safetensors")
        elif which == "tokenizer-config-path":
            config = json.loads((model / "tokenizer_config.json").read_text())
            config["vocab_file"] = "../../../../etc/passwd"
            (model / "tokenizer_config.json").write_text(json.dumps(config))
        elif which == "tokenizer-link":
            shutil.move(model / "tokenizer.json", outside / "tokenizer.json")
            os.symlink(outside / "tokenizer.json", model / "tokenizer.json")
        else:
            shutil.copy(model / "model.safetensors", outside / "shard.safetensors")
            index = {"metadata": {}, "weight_map": {"embeddings.word_embeddings.weight": "../outside/shard.safetensors"}}
            (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="leads outside the model folder") as info:
        load_model(model)
    assert "\n" not in str(info.value)


def test_links_inside_a_hugging_face_cache_snapshot_are_allowed(tmp_path, tiny_folder, tiny_factory):
    repo = tmp_path / "models--someone--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in tiny_folder.iterdir():
        shutil.copy(path, repo / "blobs" / path.name)
        os.symlink(f"../../blobs/{path.name}", snapshot / path.name)
    loaded = load_model(snapshot)
    reference = tiny_factory("bert")
    batch = sample_batch(reference)
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).last_hidden_state, reference.model(**batch).last_hidden_state)
