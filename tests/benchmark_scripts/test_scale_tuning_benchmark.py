"""The scale-tuning benchmark: its paired ratio intervals, and its refusals of a folder that holds
no search or a budget the search does not have."""

import json

import pytest
import torch


@pytest.fixture(scope="module")
def st(load_benchmark):
    return load_benchmark("scale_tuning")


def test_ratio_interval_is_the_token_weighted_ratio_and_covers_it(st):
    gen = torch.Generator().manual_seed(0)
    a, b, counts = [1.0, 2.0, 3.0, 4.0] * 8, [2.0, 2.0, 2.0, 2.0] * 8, [10] * 32
    r = st.ratio_interval(a, b, counts, gen)
    assert r["ratio"] == pytest.approx(sum(a) / sum(b))
    assert r["low"] < r["ratio"] < r["high"]
    same = st.ratio_interval(b, b, counts, gen)
    assert same["ratio"] == same["low"] == same["high"] == 1.0


def test_refuses_a_folder_without_a_search_and_an_unknown_budget(st, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["scale_tuning.py", "--run", str(tmp_path), "--budget", "bytes=1"])
    assert st.main() == 2 and "holds no front.json" in capsys.readouterr().err
    (tmp_path / "front.json").write_text(json.dumps({"budgets": {"bytes=5": {}}}))
    assert st.main() == 2 and "no budget 'bytes=1'; choose one of ['bytes=5']" in capsys.readouterr().err


def test_recipe_mode_takes_the_one_shot_steps_and_refuses_bad_input(st, tmp_path, monkeypatch, capsys):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "recipes"
    recipes = st.one_shot_recipes([str(root / "gptq-w3g64-scale-tuning.yaml"), str(root / "awq-w3g64-scale-tuning.yaml"), str(root / "hqq-w3g64-scale-tuning.yaml")])
    assert {n: [s.name for s in r.steps] for n, r in recipes.items()} == {"gptq-w3g64": ["gptq"], "awq-w3g64": ["awq"], "hqq-w3g64": ["hqq"]}
    tuning_only = tmp_path / "t.yaml"
    tuning_only.write_text("slimformer_recipe: 1\nname: t\nsteps: [{method: scale-tuning}]\n")
    for argv, message in [([], "either --run"), (["--run", str(tmp_path), "--recipe", str(tuning_only)], "not both"),
                          (["--run", str(tmp_path)], "--run needs --budget"),
                          (["--recipe", str(tuning_only)], "no one-shot step before its tuning"),
                          (["--recipe", str(root / "gptq-w3g64-scale-tuning.yaml")] * 2, "a second recipe named"),
                          (["--recipe", str(tmp_path / "missing.yaml")], "missing.yaml")]:
        monkeypatch.setattr("sys.argv", ["scale_tuning.py", *argv])
        assert st.main() == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
