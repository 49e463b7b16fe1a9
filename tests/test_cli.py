"""The command line: compress, eval, report and methods on a tiny model (the table of bad inputs
lives in test_bad_input.py)."""

import json

TINY_RECIPE = "slimformer_recipe: 1\nname: tiny\ncalibration: {n_samples: 8, max_length: 32}\nsteps:\n"


def _recipe(tmp_path, body: str, name="r.yaml"):
    path = tmp_path / name
    path.write_text(body)
    return path


GOOD_STEP = "  - {method: rtn, bits: 4, group_size: 32}\n"


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
    transfer = manifest["evaluation"]["transfer"]
    assert transfer["source"] == "package-docs" and json.loads(stdout)["transfer"]["quality"] == transfer["quality"]
    assert manifest["recipe"]["calibration"]["source"] == "mix"
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
