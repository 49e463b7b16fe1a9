"""Offline text sources: deterministic, seeded, calibration and evaluation never overlap."""

import json

import pytest

from slimformer.data import BUILTIN_SOURCES, TextSpec, documents, load_texts, split_of
from slimformer.errors import ConfigError


@pytest.mark.parametrize("source", BUILTIN_SOURCES)
def test_builtin_sources_exist_offline_and_are_real_text(source):
    docs = documents(source)
    assert len(docs) > 200
    assert len(set(docs)) == len(docs)
    assert sum(len(d) for d in docs) > 100_000


@pytest.mark.parametrize("source", BUILTIN_SOURCES)
def test_calibration_and_evaluation_never_overlap(source):
    calib = load_texts(TextSpec(source=source, split="calibration", n=150))
    evaluation = load_texts(TextSpec(source=source, split="evaluation", n=100))
    assert not set(calib) & set(evaluation)
    assert all(split_of(t) == "calibration" for t in calib)
    assert all(split_of(t) == "evaluation" for t in evaluation)


def test_sampling_is_deterministic_and_seeded():
    a = load_texts(TextSpec(n=50, seed=3))
    assert a == load_texts(TextSpec(n=50, seed=3))
    assert a != load_texts(TextSpec(n=50, seed=4))
    assert all(len(t) >= 200 for t in a)


def test_user_txt_and_jsonl_files(tmp_path):
    paragraphs = [f"Paragraph number {i} talks about compression of transformer weights." * 4 for i in range(60)]
    txt = tmp_path / "notes.txt"
    txt.write_text("\n\n".join(paragraphs))
    jsonl = tmp_path / "notes.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": p}) for p in paragraphs))
    assert set(documents(str(txt))) == set(paragraphs) == set(documents(str(jsonl)))
    calib = load_texts(TextSpec(source=str(txt), n=5))
    evaluation = load_texts(TextSpec(source=str(txt), split="evaluation", n=5))
    assert calib and evaluation and not set(calib) & set(evaluation)


@pytest.mark.parametrize(
    "content,suffix",
    [('{"text": "ok"}\nnot json\n', ".jsonl"), ('{"body": "no text field"}\n', ".jsonl"), ("x", ".csv")],
)
def test_bad_user_files_are_clear_errors(tmp_path, content, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        documents(str(path))
    assert "\n" not in str(info.value)


def test_unknown_source_lists_the_builtin_ones():
    with pytest.raises(ConfigError, match="stdlib-docs"):
        documents("wikipedia")


def test_default_calibration_mix_is_varied_and_never_holds_the_other_kind():
    from slimformer.data.text import CALIBRATION_MIX, SHORT_DOCUMENT_CHARS, TRANSFER_SOURCE
    from slimformer.methods import CalibrationSettings

    assert CalibrationSettings().source == "mix"
    texts = load_texts(TextSpec(source="mix", n=100))
    assert len(texts) == 100 and len(set(texts)) == 100
    assert texts == load_texts(TextSpec(source="mix", n=100))
    kinds = {name: set(documents(name)) for name, _ in CALIBRATION_MIX}
    for name, share in CALIBRATION_MIX:
        assert sum(t in kinds[name] for t in texts) == pytest.approx(100 * share, abs=1)
    assert TRANSFER_SOURCE not in dict(CALIBRATION_MIX)
    assert not set(texts) & set(documents(TRANSFER_SOURCE))
    assert sum(len(t) < SHORT_DOCUMENT_CHARS for t in texts) >= 30  # short documents
    assert sum(len(t) >= SHORT_DOCUMENT_CHARS for t in texts) >= 30  # and long ones
    assert all(split_of(t) == "calibration" for t in texts)
    assert not set(texts) & set(load_texts(TextSpec(source="mix", split="evaluation", n=100)))


def test_a_mix_larger_than_a_kind_is_made_up_by_the_other_kinds():
    """Asking the mix for more documents than its smallest kind's share holds still returns that
    many distinct calibration documents: the smaller kinds give all they have, the others the
    rest (before, the shortfall was silently dropped)."""
    from slimformer.data.text import CALIBRATION_MIX

    kinds = {name: {d for d in documents(name) if split_of(d) == "calibration"} for name, _ in CALIBRATION_MIX}
    smallest, share = min(((name, w) for name, w in CALIBRATION_MIX), key=lambda t: len(kinds[t[0]]) / t[1])
    n = int(len(kinds[smallest]) / share * 1.5)  # half again what the smallest kind can give its share of
    texts = load_texts(TextSpec(source="mix", n=n))
    assert len(texts) == n and len(set(texts)) == n
    assert all(split_of(t) == "calibration" for t in texts)
    assert sum(t in kinds[smallest] for t in texts) >= 0.9 * len([d for d in kinds[smallest] if len(d) >= 80])
    assert sum(len(set(texts) & kinds[name]) for name, _ in CALIBRATION_MIX) == n


def test_the_users_own_text_comes_first_and_is_topped_up_from_the_mix(tmp_path):
    paragraphs = [f"My own note {i}: quarterly figures for the bakery, flour prices and oven hours." * 3 for i in range(40)]
    path = tmp_path / "mine.txt"
    path.write_text("\n\n".join(paragraphs))
    texts = load_texts(TextSpec(source=str(path), n=64))
    mine = [t for t in paragraphs if split_of(t) == "calibration"]
    assert 0 < len(mine) < 64 and len(texts) == 64 and texts[: len(mine)] == mine
    assert set(texts[len(mine) :]) <= set(documents("mix"))
    evaluation = load_texts(TextSpec(source=str(path), split="evaluation", n=64))
    assert set(evaluation) <= set(paragraphs)  # evaluation never tops up: only the user's text


def test_other_kind_source_is_prose_about_packages_not_python_docstrings():
    docs = documents("package-docs")
    assert len(docs) > 100 and sum(len(d) for d in docs) > 100_000
    assert not set(docs) & set(documents("stdlib-docs"))
    assert sum("install" in d.lower() for d in docs) > 10
