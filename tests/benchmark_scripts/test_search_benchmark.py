"""The search benchmark's table: the issue line is judged against the uniform setting of the
searched levels and, when given, of a baseline space's levels at the same stored bytes."""


import pytest


@pytest.fixture(scope="module")
def sb(load_benchmark):
    return load_benchmark("search")


def _point(kl, stored_bytes, bits=3.0):
    return {"code_bits_per_weight": bits, "stored_bits_per_weight": 3.375, "stored_bytes": stored_bytes, "distortion": kl,
            "removed_sublayers": [], "quality": {"kl_divergence": kl, "perplexity": 30.0, "perplexity_original": 24.0, "top1_agreement": 0.7}}


def _front(searched, dp, uniform, baseline):
    space = {"space": {"quantizer": "quantease", "bits": [2, 3], "group_size": 64, "symmetric": False}, "calibration": {}, "search": {}}
    front = {"kind": "causal-lm", "space": space, "held_out": {"texts": 4, "source": "x", "max_length": 8}, "database_bytes": 1, "seconds": 1,
             "uniform": {"3": _point(uniform, 1000), "2": _point(3.0, 700, 2.0)},
             "budgets": {"bytes=1000": {"dp": _point(dp, 1000), "searched": _point(searched, 990), "history": [{"evaluations": 5}],
                                        "generations": 2, "searched_calibration_fitness": 0.1, "validation": {}}}}
    if baseline is not None:
        front["baseline"] = {"space": {**space, "space": {**space["space"], "quantizer": "gptq"}}, "uniform": {"3": _point(baseline, 1000)}}
    return front


def _info():
    return {"cpu": {"model": "cpu", "flags": [], "threads": 2, "loadavg": [0.0], "torch": "t"}}


def test_the_issue_line_names_both_uniform_settings_and_judges_each(sb):
    text = sb.markdown(_front(searched=0.23, dp=0.24, uniform=0.32, baseline=0.34), _info(), None, "m")
    assert "| uniform 3-bit GPTQ (baseline space) |" in text and "| uniform 3-bit QuantEase |" in text
    lines = [l for l in text.splitlines() if l.startswith("- issue line")]
    assert len(lines) == 2
    assert "0.72x that uniform QuantEase's 0.3200" in lines[0] and lines[0].endswith("**not met**")
    assert "0.68x that uniform GPTQ's 0.3400" in lines[1] and lines[1].endswith("**met**")


def test_not_below_the_dp_is_not_met_whatever_the_ratio(sb):
    text = sb.markdown(_front(searched=0.23, dp=0.22, uniform=0.32, baseline=0.40), _info(), None, "m")
    lines = [l for l in text.splitlines() if l.startswith("- issue line")]
    assert all("NOT below the DP" in l and l.endswith("**not met**") for l in lines)
    assert len([l for l in sb.markdown(_front(0.23, 0.24, 0.32, None), _info(), None, "m").splitlines() if l.startswith("- issue line")]) == 1


def test_transfer_check_measures_the_saved_choices_on_every_kind_of_text(sb, tiny_factory, tmp_path, monkeypatch):
    """``--transfer``: the DP allocation and the searched model rebuilt from the front are the
    ones the search measured (the same held-out KL), on each source the KL per token is the
    token-weighted mean of the documents' (what ``causal_quality`` computes for the whole
    batch), and a searched model equal to its DP start is 1.000x with a degenerate interval."""
    from slimformer.data import TextSpec, load_texts
    from slimformer.evaluate.quality import causal_quality
    from slimformer.methods import CalibrationSettings
    from slimformer.search import Budget, EvolutionSettings, QuantizationLevels, SearchSpace, search
    from slimformer.search.run import assemble

    loaded = tiny_factory("llama")
    space = SearchSpace(QuantizationLevels(bits=(2, 3, 4), group_size=32), EvolutionSettings(generations=0, offspring=4, stages=((2, 1), (1, 2))),
                        CalibrationSettings(n_samples=16, max_length=48, batch_size=8))
    out = search(loaded, space, [Budget("bits", 3.0)], tmp_path / "s", eval_texts=8, eval_max_length=48, save_models=False)
    monkeypatch.setattr(sb, "TRANSFER", {"sources": ["pydoc-topics", "notices"], "n": 8, "max_length": 32, "batch_size": 4})
    tr = sb.transfer_check(loaded, tmp_path / "s", out.front, space)
    db = sb.LevelDatabase(tmp_path / "s" / "levels", __import__("json").loads((tmp_path / "s" / "levels" / "index.json").read_text()))
    dp = assemble(loaded, db, out.front["budgets"]["bits=3"]["dp_bits"])
    for source in ("pydoc-topics", "notices"):
        texts = load_texts(TextSpec(source=source, split="evaluation", n=8, seed=0))
        q = causal_quality(loaded, dp, texts, 32, 4)
        r = tr["sources"][source]
        assert r["kl"]["bits=3 dp"] == pytest.approx(q["kl_divergence"], rel=1e-5) and r["tokens"] == q["n_tokens"]
        x = r["searched_over_dp"]["bits=3"]
        assert x["ratio"] == x["low"] == x["high"] == 1.0 and x["documents_better"] == 0, "no generations: the searched model is its DP start"
    text = "\n".join(sb.transfer_lines(tr))
    assert "| bits=3 searched | " in text and "(1.000x, 1.000-1.000; 0/8)" in text
