"""Every bad input, one clear line: the table of bad inputs to ``slimformer compress``.

Each case is run through the command line (exit status 2, exactly one line
``slimformer: error: <problem>; <fix>``, no output folder and no temporary leftovers) and, unless
it exists only on the command line, through the Python API, which raises ``SlimformerError``
with the very same message.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

import slimformer
from slimformer.errors import SlimformerError

HEAD = "slimformer_recipe: 1\nname: t\ncalibration: {n_samples: 8, max_length: 32, batch_size: 8}\n"
GOOD = HEAD + "steps:\n  - {method: rtn, bits: 4, group_size: 32}\n"


@dataclass
class Env:
    tmp: Path
    bert: Path  # a tiny BERT as a Hugging Face folder
    llama: Path  # a tiny Llama as a Hugging Face folder
    compressed: Path  # a folder written by slimformer (tiny BERT, 8-bit)

    def copy(self, which: str = "bert") -> Path:
        dest = self.tmp / f"model-{which}"
        shutil.copytree(getattr(self, which), dest)
        return dest

    def recipe(self, text: str, name: str = "r.yaml", raw: bytes | None = None) -> Path:
        path = self.tmp / name
        path.write_bytes(raw) if raw is not None else path.write_text(text)
        return path

    def text(self, name: str, data: bytes) -> str:
        path = self.tmp / name
        path.write_bytes(data)
        return str(path)


@dataclass
class Case:
    """``setup(env)`` damages something and returns the changes to the default run (``model``,
    ``recipe``, ``out``, CLI ``flags``, API ``eval`` settings, ``patch`` {target: value})."""

    id: str
    expect: str
    setup: Callable[[Env], dict]
    api: bool = True  # also reachable through the Python API
    check: Callable[[Env], None] | None = None


def _damaged_weights(data_fn):
    def setup(env):
        model = env.copy()
        weights = model / "model.safetensors"
        weights.write_bytes(data_fn(weights.read_bytes()))
        return {"model": model}

    return setup


def _no_weights(env):
    model = env.copy()
    (model / "model.safetensors").unlink()
    return model


def _pickle(env, payload_bytes: bytes | None = None):
    model = _no_weights(env)
    if payload_bytes is None:
        from test_bad_input_unsafe_files import _hostile_checkpoint

        _hostile_checkpoint(model / "pytorch_model.bin", env.tmp / "pwned", zipped=True)
    else:
        (model / "pytorch_model.bin").write_bytes(payload_bytes)
    return {"model": model}


def _truncated_checkpoint() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, buffer)
    return buffer.getvalue()[:9000]


def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _remote_code(env):
    model = env.copy()
    (model / "modeling_evil.py").write_text(f"open({str(env.tmp / 'pwned')!r}, 'w').close()\n")
    _edit_json(model / "config.json", auto_map={"AutoModel": "modeling_evil.EvilModel"})
    return {"model": model}


def _link_outside(env):
    model = env.copy()
    (env.tmp / "elsewhere").mkdir()
    shutil.move(model / "model.safetensors", env.tmp / "elsewhere" / "w.safetensors")
    os.symlink(env.tmp / "elsewhere" / "w.safetensors", model / "model.safetensors")
    return {"model": model}


def _compressed(edit=None):
    def setup(env):
        model = env.copy("compressed")
        if edit:
            edit(model / "manifest.json")
        return {"model": model}

    return setup


def _steps(*lines: str, head: str = HEAD) -> Callable[[Env], dict]:
    return lambda env: {"recipe": env.recipe(head + "steps:\n" + "".join(f"  - {line}\n" for line in lines))}


def _calibration(source_fn) -> Callable[[Env], dict]:
    def setup(env):
        source = source_fn(env)
        return {"recipe": env.recipe(f"slimformer_recipe: 1\ncalibration: {{source: {json.dumps(source)}, n_samples: 8}}\nsteps: [{{method: gptq, bits: 4, group_size: 32}}]\n")}

    return setup


def _full_disk(tensors, path, metadata=None):
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)  # the weights land in the temporary folder...
    with open("/dev/full", "wb") as fh:  # ...then the device is full: a real ENOSPC
        fh.write(b"\0" * 65536)


def _raise(exc):
    def fn(*args, **kwargs):
        raise exc

    return fn


def _existing_output(env):
    out = env.tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    return {}


def _keeps_existing(env):
    assert (env.tmp / "out" / "keep.txt").read_text() == "mine"


def _nothing_ran(env):
    assert not (env.tmp / "pwned").exists(), "code from the model folder ran"


CASES = [
    # --- the model: missing, damaged, hostile -----------------------------------------------
    Case("model-missing", "does not exist", lambda env: {"model": env.tmp / "nope"}),
    Case("model-is-a-file", "is a file", lambda env: {"model": Path(env.text("m.bin", b"x"))}),
    Case("model-folder-without-config", "no config.json", lambda env: {"model": (env.tmp / "empty").mkdir() or env.tmp / "empty"}),
    Case("config-not-json", "not valid JSON", lambda env: (lambda m: (m / "config.json").write_text("{oops") and {"model": m})(env.copy())),
    Case("weights-corrupt", "corrupt", _damaged_weights(lambda d: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")),
    Case("weights-truncated", "truncated", _damaged_weights(lambda d: d[: len(d) - 100])),
    Case("weights-empty-file", "truncated", _damaged_weights(lambda d: b"")),
    Case("weights-missing", "has no model.safetensors", lambda env: {"model": _no_weights(env)}),
    Case("pickle-truncated", "corrupt or not a PyTorch checkpoint", lambda env: _pickle(env, _truncated_checkpoint())),
    Case("pickle-empty-file", "corrupt or not a PyTorch checkpoint", lambda env: _pickle(env, b"")),
    Case("pickle-that-runs-code", "refused", _pickle, check=_nothing_ran),
    Case("remote-code-not-trusted", "--trust-remote-code", _remote_code, check=_nothing_ran),
    Case("link-leads-outside-folder", "leads outside the model folder", _link_outside),
    Case("already-compressed-input", "already a compressed folder", _compressed(), api=False),
    Case("manifest-not-json", "not JSON", _compressed(lambda p: p.write_text("{"))),
    Case("manifest-foreign-class", "not one allowed", _compressed(lambda p: _edit_json(p, model_class="BertForMaskedLM"))),
    # --- the recipe: missing, malformed, misspelled, impossible ---------------------------
    Case("recipe-missing", "does not exist", lambda env: {"recipe": env.tmp / "nope.yaml"}),
    Case("recipe-invalid-yaml", "malformed", lambda env: {"recipe": env.recipe("slimformer_recipe: 1\nsteps: [ {method: rtn\n")}),
    Case("recipe-invalid-json", "malformed", lambda env: {"recipe": env.recipe('{"slimformer_recipe": 1, "steps": [', name="r.json")}),
    Case("recipe-not-utf8", "malformed", lambda env: {"recipe": env.recipe("", raw=b"slimformer_recipe: 1\nname: \xff\xfe\n")}),
    Case("recipe-empty-file", "not a mapping", lambda env: {"recipe": env.recipe("")}),
    Case("recipe-with-python-yaml-tag", "malformed", lambda env: {"recipe": env.recipe(f"slimformer_recipe: 1\nname: !!python/object/apply:builtins.open [{str(env.tmp / 'pwned')!r}, w]\nsteps: []\n")}, check=_nothing_ran),
    Case("recipe-future-version", "version", lambda env: {"recipe": env.recipe(GOOD.replace("slimformer_recipe: 1", "slimformer_recipe: 7"))}),
    Case("misspelled-top-level-key", "did you mean 'steps'", lambda env: {"recipe": env.recipe(GOOD.replace("steps:", "step:"))}),
    Case("misspelled-method", "did you mean 'gptq'", _steps("{method: gptqq, bits: 4}")),
    Case("misspelled-setting", "did you mean 'group_size'", _steps("{method: rtn, bits: 4, group_sise: 32}")),
    Case("misspelled-calibration-key", "did you mean 'n_samples'", lambda env: {"recipe": env.recipe(GOOD.replace("n_samples", "n_sample"))}),
    Case("bits-out-of-range", "bits=5", _steps("{method: rtn, bits: 5}")),
    Case("bits-not-a-number", "integer", _steps("{method: rtn, bits: four}")),
    Case("damp-out-of-range", "damp", _steps("{method: gptq, damp: 2.0}")),
    Case("calibration-samples-negative", "n_samples", lambda env: {"recipe": env.recipe(GOOD.replace("n_samples: 8", "n_samples: -1"))}),
    Case("group-size-does-not-divide-width", "does not divide", _steps("{method: gptq, bits: 4, group_size: 48}")),
    Case("sparsity-out-of-range", "outside [0, 1)", _steps("{method: wanda, sparsity: 1.0}")),
    Case("too-many-layers-dropped", "cannot drop", _steps("{method: shortgpt, num_layers: 4}")),
    Case("encoder-method-on-causal-lm", "not on a causal-lm", lambda env: {"model": env.llama, **_steps("{method: tome, r: 2}")(env)}),
    # --- calibration text ---------------------------------------------------------------
    Case("calibration-file-missing", "does not exist", _calibration(lambda env: str(env.tmp / "nope.txt"))),
    Case("calibration-file-empty", "holds no text", _calibration(lambda env: env.text("empty.txt", b"\n\n  \n"))),
    Case("calibration-not-utf8", "UTF-8", _calibration(lambda env: env.text("latin1.txt", "caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1")))),
    Case("calibration-jsonl-malformed", "is not valid JSON", _calibration(lambda env: env.text("c.jsonl", b'{"text": "ok"}\n{"text": \n'))),
    Case("calibration-jsonl-without-text", 'no "text" string field', _calibration(lambda env: env.text("c.jsonl", b'{"body": "x"}\n'))),
    Case("calibration-source-misspelled", "did you mean 'stdlib-docs'", _calibration(lambda env: "stdlib-doc")),
    # --- evaluation settings ------------------------------------------------------------
    Case("eval-texts-zero", "n_texts=0", lambda env: {"flags": ["--eval-texts", "0"], "eval": {"n_texts": 0, "n_queries": 1}}),
    Case("eval-source-missing", "does not exist", lambda env: {"flags": ["--eval-source", str(env.tmp / "e.txt")], "eval": {"source": str(env.tmp / "e.txt")}}),
    Case("eval-too-few-held-out-texts", "too few", lambda env: {"flags": ["--eval-texts", "5"], "eval": {"n_texts": 5, "n_queries": 1}}),
    # --- the output: exists, not writable, full disk, interrupted -----------------------
    Case("output-exists", "already exists", _existing_output, check=_keeps_existing),
    Case("output-is-the-model-itself", "would replace the model", lambda env: {"out": env.bert, "flags": ["--force"]}, api=False),
    Case("output-parent-is-a-file", "not a writable folder", lambda env: {"out": Path(env.text("f.txt", b"x")) / "out"}),
    Case("output-disk-full", "no space left on the device", lambda env: {"patch": {"slimformer.io.serialization.save_file": _full_disk}}),
    Case("output-permission-denied", "Permission denied", lambda env: {"patch": {"slimformer.io.serialization.save_file": _raise(PermissionError(errno.EACCES, "Permission denied"))}}),
    Case("interrupted-while-compressing", "interrupted", lambda env: {"patch": {("slimformer.compress", "apply_method"): _raise(KeyboardInterrupt())}}, api=False),
    Case("interrupted-while-writing", "interrupted", lambda env: {"patch": {"slimformer.io.serialization.save_file": _raise(KeyboardInterrupt())}}, api=False),
]


def test_the_table_has_at_least_30_distinct_bad_inputs():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def env_sources(tmp_path_factory, _tiny_models):
    root = tmp_path_factory.mktemp("bad-input-sources")
    for family in ("bert", "llama"):
        loaded = _tiny_models[family]
        loaded.model.save_pretrained(root / family)
        loaded.tokenizer.save_pretrained(root / family)
    model = slimformer.compress(copy.deepcopy(_tiny_models["bert"]), slimformer.Recipe.from_dict({"slimformer_recipe": 1, "steps": [{"method": "rtn", "bits": 8, "group_size": 32}]}))
    slimformer.save(model, root / "compressed")
    return root


def _api_compress(model, recipe, out, eval_settings=None, no_eval=True):
    """The Python API route of ``slimformer compress`` (load, recipe, compress, evaluate, save)."""
    settings = slimformer.EvalSettings(**eval_settings) if eval_settings is not None else None
    original = slimformer.load(model)
    recipe = slimformer.Recipe.from_file(recipe)
    compressed = slimformer.compress(copy.deepcopy(original), recipe)
    evaluation = None if no_eval else slimformer.evaluate(original, compressed, settings)
    return slimformer.save(compressed, out, evaluation=evaluation)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, env_sources, run_cli, monkeypatch):
    env = Env(tmp_path, env_sources / "bert", env_sources / "llama", env_sources / "compressed")
    run = {"model": env.bert, "recipe": env.recipe(GOOD, name="good.yaml"), "out": tmp_path / "out", "flags": ["--no-eval"], "eval": None}
    run.update(case.setup(env))
    if run["eval"] is not None:
        run["flags"] = [f for f in run["flags"] if f != "--no-eval"]
    for target, value in run.get("patch", {}).items():
        if isinstance(target, tuple):  # (module, attribute): a module that a same-named function shadows
            monkeypatch.setattr(sys.modules[target[0]], target[1], value)
        else:
            monkeypatch.setattr(target, value)
    before = sorted(p.name for p in run["out"].parent.iterdir()) if run["out"].parent.is_dir() else None

    code, _, err = run_cli("compress", run["model"], "--recipe", run["recipe"], "--out", run["out"], "--quiet", *run["flags"])
    lines = err.strip().splitlines()
    assert code == 2, err
    errors = [line for line in lines if line.startswith("slimformer: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    message = errors[0].removeprefix("slimformer: error: ")
    problem, sep, fix = message.partition("; ")
    assert sep and problem and fix, f"not '<problem>; <fix>': {message}"
    assert case.expect in message
    after = sorted(p.name for p in run["out"].parent.iterdir()) if run["out"].parent.is_dir() else None
    assert after == before, "something was written (an output folder or a temporary leftover)"
    if case.check:
        case.check(env)

    if case.api:
        with pytest.raises(SlimformerError) as info:
            _api_compress(run["model"], run["recipe"], run["out"], run["eval"], no_eval=run["eval"] is None)
        assert str(info.value) == message, "the API and the CLI say different things"
        assert sorted(p.name for p in run["out"].parent.iterdir()) == before if before is not None else True
        if case.check:
            case.check(env)


def test_a_real_process_prints_one_line_and_exits_2(tmp_path):
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "slimformer.cli", "compress", str(tmp_path / "nope"), "--recipe", "x.yaml", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("slimformer: error:")
    assert not (tmp_path / "o").exists()


def test_interrupt_inside_the_api_propagates_and_leaves_nothing(tmp_path, env_sources, monkeypatch):
    monkeypatch.setattr("slimformer.io.serialization.save_file", _raise(KeyboardInterrupt()))
    model = slimformer.load(env_sources / "bert")
    with pytest.raises(KeyboardInterrupt):
        slimformer.save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    assert torch.is_tensor(next(model.model.parameters()))
