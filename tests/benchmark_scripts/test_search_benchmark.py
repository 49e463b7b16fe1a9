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
