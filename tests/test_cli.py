"""The command line: every bad input is a one-line error, exit status 2, and no output folder."""

import json
import subprocess
import sys

import pytest

TINY_RECIPE = "slimformer_recipe: 1\nname: tiny\ncalibration: {n_samples: 8, max_length: 32}\nsteps:\n"


def _recipe(tmp_path, body: str, name="r.yaml"):
    path = tmp_path / name
    path.write_text(body)
    return path


def _assert_clean_failure(code, err, out_dir, expect):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("slimformer: error:")]
    assert len(lines) == 1, err
    assert expect in lines[0]
    assert not out_dir.exists()
    assert not list(out_dir.parent.glob(f".{out_dir.name}*")), "no temporary leftovers"


GOOD_STEP = "  - {method: rtn, bits: 4, group_size: 32}\n"


@pytest.mark.parametrize(
    "case,expect",
    [
        ("missing-model", "does not exist"),
        ("model-is-file", "is a file"),
        ("folder-without-config", "no config.json"),
        ("corrupt-safetensors", "corrupt"),
        ("truncated-safetensors", "truncated"),
        ("unknown-method", "unknown method"),
        ("bits-5", "bits=5"),
        ("group-size-not-dividing", "does not divide"),
        ("sparsity-out-of-range", "outside [0, 1)"),
        ("too-many-layers-dropped", "cannot drop"),
        ("malformed-recipe", "malformed"),
        ("missing-recipe", "does not exist"),
        ("output-exists", "already exists"),
    ],
)
def test_bad_input_is_a_one_line_error_and_leaves_no_output(case, expect, tmp_path, tiny_folder, run_cli):
    import shutil

    model = tiny_folder
    recipe = _recipe(tmp_path, TINY_RECIPE + GOOD_STEP)
    out = tmp_path / "out"
    if case == "missing-model":
        model = tmp_path / "nope"
    elif case == "model-is-file":
        model = tmp_path / "file.bin"
        model.write_bytes(b"x")
    elif case == "folder-without-config":
        model = tmp_path / "empty"
        model.mkdir()
    elif case in ("corrupt-safetensors", "truncated-safetensors"):
        model = tmp_path / "damaged"
        shutil.copytree(tiny_folder, model)
        weights = model / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" if case == "corrupt-safetensors" else data[: len(data) - 100])
    elif case == "unknown-method":
        recipe = _recipe(tmp_path, TINY_RECIPE + "  - {method: quantize-harder}\n")
    elif case == "bits-5":
        recipe = _recipe(tmp_path, TINY_RECIPE + "  - {method: rtn, bits: 5}\n")
    elif case == "group-size-not-dividing":
        recipe = _recipe(tmp_path, TINY_RECIPE + "  - {method: gptq, bits: 4, group_size: 48}\n")
    elif case == "sparsity-out-of-range":
        recipe = _recipe(tmp_path, TINY_RECIPE + "  - {method: wanda, sparsity: 1.0}\n")
    elif case == "too-many-layers-dropped":
        recipe = _recipe(tmp_path, TINY_RECIPE + "  - {method: shortgpt, num_layers: 4}\n")
    elif case == "malformed-recipe":
        recipe = _recipe(tmp_path, "slimformer_recipe: 1\nsteps: [ {method: rtn\n")
    elif case == "missing-recipe":
        recipe = tmp_path / "nope.yaml"
    elif case == "output-exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    code, _, err = run_cli("compress", model, "--recipe", recipe, "--out", out, "--no-eval", "--quiet")
    if case == "output-exists":
        assert code == 2 and expect in err and (out / "keep.txt").read_text() == "mine"
        return
    _assert_clean_failure(code, err, out, expect)


def test_real_process_exit_status_is_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "slimformer.cli", "compress", str(tmp_path / "nope"), "--recipe", "x.yaml", "--out", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "error:" in result.stderr


def test_compress_eval_report_on_a_tiny_model(tmp_path, tiny_folder, run_cli):
    recipe = _recipe(tmp_path, TINY_RECIPE + GOOD_STEP + "  - {method: rtn, bits: 8, group_size: null, symmetric: true, targets: [embedding]}\n")
    out = tmp_path / "runs" / "tiny-w4"
    code, stdout, err = run_cli("compress", tiny_folder, "--recipe", recipe, "--out", out, "--eval-texts", "40", "--quiet")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    recorded = manifest["evaluation"]["quality"]
    assert "| tiny-w4 |" in stdout
    code, stdout, err = run_cli("eval", out, "--json", "--quiet")
    assert code == 0, err
    again = json.loads(stdout)["quality"]
    for key in ("embedding_cosine_mean", "embedding_cosine_min", "retrieval_agreement_at_10"):
        assert again[key] == recorded[key], "eval must reproduce the manifest's quality numbers"
    code, stdout, err = run_cli("report", tmp_path / "runs")
    assert code == 0, err
    assert (tmp_path / "runs" / "report" / "report.md").read_text().count("| tiny-w4 |") == 1
    assert (tmp_path / "runs" / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_methods_lists_every_method_with_its_paper(run_cli):
    from slimformer.methods import registered_methods

    code, stdout, _ = run_cli("methods")
    assert code == 0
    for name, m in registered_methods().items():
        assert name in stdout and m.config_type.paper in stdout


def test_report_never_replaces_a_folder_that_is_not_a_report(tmp_path, tiny_folder, run_cli):
    recipe = _recipe(tmp_path, TINY_RECIPE + GOOD_STEP)
    out = tmp_path / "runs" / "a"
    assert run_cli("compress", tiny_folder, "--recipe", recipe, "--out", out, "--no-eval", "--quiet")[0] == 0
    code, _, err = run_cli("report", tmp_path / "runs", "--out", tmp_path / "runs")
    assert code == 2 and "holds more than a previous report" in err
    assert (out / "manifest.json").is_file()


def test_compress_refuses_to_overwrite_its_own_source(tmp_path, tiny_folder, run_cli):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_folder, model)
    recipe = _recipe(tmp_path, TINY_RECIPE + GOOD_STEP)
    code, _, err = run_cli("compress", model, "--recipe", recipe, "--out", model, "--force", "--no-eval", "--quiet")
    assert code == 2 and "would replace the model" in err
    assert (model / "config.json").is_file()


def test_eval_refuses_models_that_cannot_be_compared(tmp_path, tiny_folder, tiny_factory, run_cli):
    other = tmp_path / "llama"
    llama = tiny_factory("llama")
    llama.model.save_pretrained(other)
    llama.tokenizer.save_pretrained(other)
    code, _, err = run_cli("eval", tiny_folder, "--against", other, "--quiet")
    assert code == 2 and "cannot compare" in err
