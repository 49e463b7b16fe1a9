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
