"""The foundation's acceptance on the real all-MiniLM-L6-v2: the default 4-bit recipe (4-bit GPTQ
linears in groups of 32, 8-bit value projections and embedding table) is at most 25% of the
original's bytes, keeps mean embedding cosine >= 0.98 on held-out text, and beats
round-to-nearest at the same setting (the same recipe with its GPTQ step done by rtn)."""

import copy
from pathlib import Path

from slimformer.compress import compress
from slimformer.data import TextSpec, load_texts
from slimformer.evaluate.cost import storage_bytes
from slimformer.evaluate.quality import encoder_quality
from slimformer.io import load_compressed, save_compressed
from slimformer.recipe import Recipe

RECIPES = Path(__file__).parents[2] / "recipes"


def test_gptq_example_recipe_on_minilm(minilm, tmp_path):
    texts = load_texts(TextSpec(split="evaluation", n=160))
    original_bytes = storage_bytes(minilm.model)
    results = {}
    default = Recipe.from_file(RECIPES / "gptq-w4g32-v8-emb8.yaml").to_dict()
    rtn = copy.deepcopy(default)
    rtn["steps"] = [{**s, "method": "rtn"} if s["method"] == "gptq" else s for s in rtn["steps"]]
    for s in rtn["steps"]:
        for key in ("act_order", "damp", "block_size", "true_sequential", "clip_search", "bias_correction"):
            s.pop(key, None)
    for name, recipe in (("gptq", default), ("rtn", rtn)):
        model = compress(copy.deepcopy(minilm), Recipe.from_dict(recipe))
        folder = save_compressed(model, tmp_path / name)
        on_disk = sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")
        reloaded = load_compressed(folder)
        results[name] = (on_disk / original_bytes, encoder_quality(minilm, reloaded, texts, 32, 128, 32))
    size, gptq = results["gptq"]
    _, rtn = results["rtn"]
    assert size <= 0.25
    assert gptq["embedding_cosine_mean"] >= 0.98
    assert gptq["embedding_cosine_mean"] > rtn["embedding_cosine_mean"]
    assert gptq["retrieval_agreement_at_10"] >= rtn["retrieval_agreement_at_10"]
