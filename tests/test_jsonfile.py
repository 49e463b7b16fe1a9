import json

import pytest

from slimformer.jsonfile import write_json


def test_write_json_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    write_json(path, {"a": [1, 2], "b": "x"})
    write_json(path, {"b": 2, "a": 1}, sort_keys=True, indent=None)
    assert path.read_text() == '{"a": 1, "b": 2}'
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_write_json_that_fails_keeps_the_previous_file(tmp_path):
    path = tmp_path / "state.json"
    write_json(path, {"generation": 3})
    with pytest.raises(TypeError):
        write_json(path, {"generation": 4, "bad": object()})
    assert json.loads(path.read_text()) == {"generation": 3}
