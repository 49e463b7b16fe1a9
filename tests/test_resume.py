"""Crash safety and resume: same recipe + seed give the same bytes; a job killed at random
moments leaves no output or a complete one, and ``--resume`` ends with the uninterrupted bytes;
a resume of another job is refused; temporaries of killed runs are cleaned."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slimformer.compress import compress
from slimformer.errors import ResumeError
from slimformer.io.serialization import WEIGHTS_NAME, canonical_manifest, read_manifest, save_compressed
from slimformer.methods.checkpoint import JobCheckpoint, work_dir_for
from slimformer.recipe import Recipe

CALIBRATION = {"n_samples": 16, "max_length": 32, "batch_size": 8}
WORDS = ("the", "block", "weights", "of", "a", "model", "are", "saved", "def", "return", "x", "+", "1", "(", ")", ":",
         "river", "stone", "quietly", "under", "when", "import", "os", "value", "\n", "note", "that", "is", "not")


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    """A small varied .txt calibration file (paragraphs of seeded random words): instant to read."""
    path = tmp_path_factory.mktemp("calibration") / "text.txt"
    rng = random.Random(7)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 60))) for _ in range(120)))
    return path
STEPS = {
    "gptq": [{"method": "gptq", "bits": 4, "group_size": 32, "targets": ["linear", "head"]}],
    "awq": [{"method": "awq", "bits": 4, "group_size": 32, "n_grid": 4}],
    "sparsegpt": [{"method": "sparsegpt", "sparsity": 0.5, "storage": "sparse"}],
    "adadim": [{"method": "adadim", "bits": 4, "group_size": 32}],
    "svd-llm": [{"method": "svd-llm", "rank": 8}],
    "asvd": [{"method": "asvd", "params_ratio": 0.8}],
    "rtn+eora": [{"method": "rtn", "bits": 3, "group_size": 32}, {"method": "eora", "rank": 4}],
    # two resumable steps and a plain one: a killed second step replays the first from its checkpoints
    "wanda+gptq+rtn": [
        {"method": "wanda", "sparsity": 0.25, "storage": "dense"},
        {"method": "gptq", "bits": 4, "group_size": 32},
        {"method": "rtn", "bits": 8, "group_size": None, "targets": ["embedding"]},
    ],
}


def _recipe(steps, source: Path, seed: int = 0) -> Recipe:
    calibration = {**CALIBRATION, "seed": seed, "source": str(source)}
    return Recipe.from_dict({"slimformer_recipe": 1, "name": "resume-test", "calibration": calibration, "steps": steps})


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Crash(RuntimeError):
    pass


def _compress_and_save(loaded, recipe, out: Path, work: Path | None = None, resume: bool = False, crash_after: int | None = None, monkeypatch=None):
    """Compress a copy of ``loaded`` (with a simulated crash right after ``crash_after`` block
    checkpoints were written) and save it; returns the output folder, or None when it crashed."""
    model = copy.deepcopy(loaded)
    if crash_after is not None:
        original = JobCheckpoint.save

        def save(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if len(self.saved_units) >= crash_after:
                raise _Crash("simulated crash")

        monkeypatch.setattr(JobCheckpoint, "save", save)
    try:
        compress(model, recipe, work_dir=work, resume=resume)
    except _Crash:
        return None
    finally:
        if crash_after is not None:
            monkeypatch.undo()
    return save_compressed(model, out)


def test_same_recipe_and_seed_give_the_same_bytes(tmp_path, calib, tiny_factory):
    llama = tiny_factory("llama")
    recipe = _recipe(STEPS["wanda+gptq+rtn"], calib)
    a = _compress_and_save(llama, recipe, tmp_path / "a")
    b = _compress_and_save(llama, recipe, tmp_path / "b")
    assert _sha(a / WEIGHTS_NAME) == _sha(b / WEIGHTS_NAME)
    assert canonical_manifest(read_manifest(a)) == canonical_manifest(read_manifest(b))
    # the comparison can fail: another calibration seed gives other bytes
    c = _compress_and_save(llama, _recipe(STEPS["wanda+gptq+rtn"], calib, seed=1), tmp_path / "c")
    assert _sha(c / WEIGHTS_NAME) != _sha(a / WEIGHTS_NAME)


@pytest.mark.parametrize("name", list(STEPS))
def test_a_crashed_job_resumes_to_the_uninterrupted_bytes(name, tmp_path, calib, tiny_factory, monkeypatch):
    llama = tiny_factory("llama")
    recipe = _recipe(STEPS[name], calib)
    reference = _compress_and_save(llama, recipe, tmp_path / "reference")
    work = tmp_path / "work"
    crash_after = 6 if name == "wanda+gptq+rtn" else 2  # the second step's second block / the second block
    assert _compress_and_save(llama, recipe, tmp_path / "out", work=work, crash_after=crash_after, monkeypatch=monkeypatch) is None
    saved = sorted(p.relative_to(work).as_posix() for p in work.rglob("*.safetensors"))
    assert len(saved) == crash_after and not (tmp_path / "out").exists()

    restored: list[str] = []
    original_restore = JobCheckpoint.restore
    monkeypatch.setattr(JobCheckpoint, "restore", lambda self, unit, *a: (restored.append(unit), original_restore(self, unit, *a))[1])
    out = _compress_and_save(llama, recipe, tmp_path / "out", work=work, resume=True)
    assert len(restored) == crash_after, "the resumed job must restore every finished block, not recompute it"
    assert _sha(out / WEIGHTS_NAME) == _sha(reference / WEIGHTS_NAME)
    assert canonical_manifest(read_manifest(out)) == canonical_manifest(read_manifest(reference))


def test_ctrl_c_keeps_finished_blocks_and_a_resume_of_another_job_is_refused(tmp_path, calib, tiny_factory, monkeypatch, run_cli):
    llama = tiny_factory("llama")
    model = tmp_path / "model"
    llama.model.save_pretrained(model)
    llama.tokenizer.save_pretrained(model)
    recipe_a = tmp_path / "a.json"
    recipe_a.write_text(json.dumps(_recipe(STEPS["gptq"], calib).to_dict()))
    recipe_b = tmp_path / "b.json"
    recipe_b.write_text(json.dumps(_recipe(STEPS["gptq"], calib, seed=5).to_dict()))
    out = tmp_path / "out"
    work = work_dir_for(out)

    original_save = JobCheckpoint.save

    def save_then_interrupt(self, *args, **kwargs):
        original_save(self, *args, **kwargs)
        if len(self.saved_units) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(JobCheckpoint, "save", save_then_interrupt)
    code, _, err = run_cli("compress", model, "--recipe", recipe_a, "--out", out, "--no-eval", "--quiet")
    monkeypatch.undo()
    assert code == 2 and "2 finished blocks are kept" in err and "--resume" in err, err
    assert not out.exists() and len(list(work.rglob("block-*.safetensors"))) == 2
    journal = (work / "journal.json").read_bytes()

    code, _, err = run_cli("compress", model, "--recipe", recipe_b, "--out", out, "--resume", "--no-eval", "--quiet")
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("slimformer: error:")]
    assert len(lines) == 1 and "belongs to another job (its recipe differs" in lines[0] and "; " in lines[0], err
    assert (work / "journal.json").read_bytes() == journal, "a refused resume must not touch the work folder"
    assert len(list(work.rglob("block-*.safetensors"))) == 2 and not out.exists()
    # the Python API raises the same error type (here: another model)
    with pytest.raises(ResumeError, match="its model differs"):
        compress(copy.deepcopy(llama), Recipe.from_file(recipe_a), work_dir=work, resume=True)

    restored: list[str] = []
    original_restore = JobCheckpoint.restore
    monkeypatch.setattr(JobCheckpoint, "restore", lambda self, unit, *a: (restored.append(unit), original_restore(self, unit, *a))[1])
    code, _, err = run_cli("compress", model, "--recipe", recipe_a, "--out", out, "--resume", "--no-eval", "--quiet")
    assert code == 0, err
    assert restored == ["block-00000", "block-00001"] and not work.exists()
    reference = _compress_and_save(llama, Recipe.from_file(recipe_a), tmp_path / "reference")
    assert _sha(out / WEIGHTS_NAME) == _sha(reference / WEIGHTS_NAME)


def test_stale_temporaries_and_work_folders_are_cleaned(tmp_path, calib, tiny_folder, run_cli):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(_recipe([{"method": "rtn", "bits": 4, "group_size": 32}], calib).to_dict()))
    out = tmp_path / "runs" / "m"
    out.parent.mkdir()
    dead = 2**22 + 12345  # above Linux's largest pid: no such process
    stale = [out.parent / f".m.partial-{dead}-abcd1234", out.parent / f".m.old-{dead}-efgh5678"]
    live = out.parent / f".m.partial-{os.getpid()}-live0000"
    for path in stale + [live]:
        (path / "x").mkdir(parents=True)
    leftover = work_dir_for(out)
    (leftover / "step-00").mkdir(parents=True)
    (leftover / "journal.json").write_text("{}")
    code, _, err = run_cli("compress", tiny_folder, "--recipe", recipe, "--out", out, "--no-eval", "--quiet")
    assert code == 0, err
    assert "warning: removing the work folder" in err
    assert not any(p.exists() for p in stale) and not leftover.exists()
    assert live.exists(), "a live process's temporary folder must be left alone"
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["m", live.name])


# ----- kill -9 at random moments ----------------------------------------------------------------


@pytest.fixture(scope="module")
def deep_llama_folder(tmp_path_factory):
    """A tiny Llama with 8 blocks, saved as a Hugging Face folder."""
    import transformers

    from slimformer.models.tiny import tiny_config, tiny_tokenizer

    config = tiny_config("llama")
    config.num_hidden_layers = 8
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(config)
    folder = tmp_path_factory.mktemp("deep-llama")
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


SLOW_SAVE = 0.5


class _Runner:
    """The fork runner (tests/fork_runner.py) as a subprocess."""

    def __init__(self, log: Path, warm_model: Path) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", SLIMFORMER_PLANNER="0")
        src = str(Path(__file__).resolve().parents[1] / "src")
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        self.log = log
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fork_runner.py")), str(warm_model)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        assert json.loads(self.proc.stdout.readline())["ready"]

    def run(self, argv: list[str], kill_after: float | None = None, slow_save: float = 0.0, kill_when: list[str] | None = None) -> dict:
        request = {"argv": [str(a) for a in argv], "kill_after": kill_after, "log": str(self.log), "slow_save": slow_save, "kill_when": kill_when}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _check_output(out: Path, expected_sha: str) -> None:
    """``out`` is a complete folder: it loads, and its weights are the expected bytes."""
    import slimformer

    assert _sha(out / WEIGHTS_NAME) == expected_sha
    loaded = slimformer.load(str(out), execution="off")
    assert sum(1 for _ in loaded.model.parameters()) > 0


def test_kill_at_random_moments_then_resume(tmp_path, calib, deep_llama_folder):
    kills_wanted = 20
    recipe = tmp_path / "gptq.json"
    recipe.write_text(json.dumps(_recipe(STEPS["gptq"], calib).to_dict()))
    runner = _Runner(tmp_path / "runs.log", deep_llama_folder)
    t_start = time.perf_counter()
    try:
        args = ["compress", deep_llama_folder, "--recipe", recipe, "--no-eval", "--quiet"]
        # each child waits SLOW_SAVE s after writing the output's weights file, before the rest of
        # the folder: a window that every fourth kill aims at (and random ones may hit)
        ref = runner.run(args + ["--out", tmp_path / "reference"], slow_save=SLOW_SAVE)
        assert ref["rc"] == 0, (tmp_path / "runs.log").read_text()[-3000:]
        expected = _sha(tmp_path / "reference" / WEIGHTS_NAME)
        duration = ref["seconds"]

        out = tmp_path / "runs" / "out"
        work = work_dir_for(out)
        rng = random.Random(20261130)
        kills = completions = resumed_completions = kills_while_writing = 0
        kills_with_blocks_done: list[int] = []
        while kills < kills_wanted:
            assert time.perf_counter() - t_start < 240, f"only {kills} kills in 240 s"
            blocks_before = len(list(work.rglob("block-*.safetensors"))) if work.is_dir() else 0
            if kills % 4 == 3:  # a random moment while the output folder is being written
                result = runner.run(args + ["--out", out, "--force", "--resume"], kill_after=rng.uniform(0.0, SLOW_SAVE), slow_save=SLOW_SAVE,
                                    kill_when=[str(out.parent / ".out.partial-*" / WEIGHTS_NAME), str(out / WEIGHTS_NAME)])
            else:  # a random moment of the whole run
                result = runner.run(args + ["--out", out, "--force", "--resume"], kill_after=rng.uniform(0.0, duration), slow_save=SLOW_SAVE)
            if result["killed"]:
                kills += 1
                kills_while_writing += result["triggered"]
                kills_with_blocks_done.append(len(list(work.rglob("block-*.safetensors"))) if work.is_dir() else 0)
                if completions:  # a previous complete output is replaced in one step: never absent
                    _check_output(out, expected)
                elif out.exists():  # the kill came after the rename
                    _check_output(out, expected)
            else:
                assert result["rc"] == 0, (tmp_path / "runs.log").read_text()[-3000:]
                completions += 1
                resumed_completions += blocks_before > 0
                _check_output(out, expected)
                assert not work.exists()
        final = runner.run(args + ["--out", out, "--force", "--resume"])
        assert final["rc"] == 0
        _check_output(out, expected)
        leftovers = sorted(p.name for p in out.parent.iterdir() if p.name != "out")
        assert leftovers == [], f"temporaries of killed runs were not cleaned: {leftovers}"
    finally:
        runner.close()
    assert kills == kills_wanted
    assert resumed_completions >= 1 or final_resumed(kills_with_blocks_done), "no run resumed from checkpointed blocks"
    assert any(0 < n < 9 for n in kills_with_blocks_done), f"no kill landed between block checkpoints: {kills_with_blocks_done}"
    assert kills_while_writing >= 3, f"only {kills_while_writing} kills landed while the output was written"
    print(f"\n{kills} kills ({kills_while_writing} while the output was written), {completions} completed runs ({resumed_completions} resumed from checkpoints), uninterrupted run {duration:.2f} s, "
          f"blocks checkpointed at each kill {kills_with_blocks_done}, total {time.perf_counter() - t_start:.1f} s")


def final_resumed(kills_with_blocks_done: list[int]) -> bool:
    """Whether the final run started from checkpointed blocks (the last kill left some)."""
    return bool(kills_with_blocks_done) and kills_with_blocks_done[-1] > 0
