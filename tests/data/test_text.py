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
