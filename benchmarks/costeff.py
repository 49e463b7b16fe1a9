"""COST-EFF on all-MiniLM-L6-v2: learned-confidence exits, joint training of a width-slimmed
multi-exit model, length-aware token pruning; quality on two held-out sources of kinds never
used for training, against speed measured on their whole mixed-length corpus.

Training text: the calibration split of ``stdlib-docs``, ``pydoc-topics`` and ``stdlib-source``
only (docstrings, reference prose, code). Held out entirely, as kinds: ``package-docs``
(READMEs: Markdown/reST prose for people) and ``notices`` (licences, credits, release notes);
their evaluation splits are what is measured.

    python benchmarks/costeff.py train   # trains and saves the variants (skips those already saved)
    python benchmarks/costeff.py eval    # writes results/costeff.{md,json,png}
    python benchmarks/costeff.py eval --quick   # smoke test, results/costeff_quick.*
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from slimformer.compress import compress  # noqa: E402
from slimformer.data import TextSpec, load_texts  # noqa: E402
from slimformer.io import load_compressed, save_compressed  # noqa: E402
from slimformer.methods import CalibrationSettings, CostEffConfig, EarlyExitConfig, TokenPruningConfig  # noqa: E402
from slimformer.methods.dynamic.token_pruning import describe_rates  # noqa: E402
from slimformer.models import load_model  # noqa: E402
from slimformer.recipe import Recipe  # noqa: E402
from results_files import compile_fallback_lines  # noqa: E402

TRAIN_SOURCES = ("stdlib-docs", "pydoc-topics", "stdlib-source")
HELD_OUT = ("package-docs", "notices")
N_CAL_PER_SOURCE = 86
WORK = Path(os.environ.get("COSTEFF_WORK", "/tmp/slimformer-costeff"))
RESULTS = Path(__file__).resolve().parent / "results"

# name -> recipe steps (trained on the calibration text above)
VARIANTS = {
    "exit-frozen": [EarlyExitConfig(rule="predicted", threshold=0.97, train_steps=300)],
    "costeff-w100": [CostEffConfig(flops_ratio=1.0, steps=150, lr=1e-4, exit_lr=1e-3, checkpoint=str(WORK / "w100.ckpt"))],
    "slim75-frozen": [CostEffConfig(flops_ratio=0.75, backbone="frozen", steps=0, exit_warmup_steps=300)],
    "costeff-w75": [CostEffConfig(flops_ratio=0.75, steps=80, lr=2e-4, exit_lr=1e-3, exit_warmup_steps=300, checkpoint=str(WORK / "w75.ckpt"))],
}


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def calibration_file() -> Path:
    path = WORK / "calibration.jsonl"
    if not path.is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        rows = []
        for source in TRAIN_SOURCES:
            rows += load_texts(TextSpec(source=source, split="calibration", n=N_CAL_PER_SOURCE, seed=0))
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return path


def calibration(n_samples: int = len(TRAIN_SOURCES) * N_CAL_PER_SOURCE) -> CalibrationSettings:
    return CalibrationSettings(source=str(calibration_file()), n_samples=n_samples, max_length=128, batch_size=16)


def train(names) -> None:
    cal = calibration()
    for name in names:
        folder = WORK / name
        if (folder / "slimformer.json").exists() or folder.is_dir() and any(folder.iterdir()):
            log(f"{name}: already trained")
            continue
        t0 = time.perf_counter()
        model = load_model()
        compress(model, Recipe(steps=VARIANTS[name], calibration=cal), progress=True)
        record = model.applied[-1]
        record["train_seconds"] = time.perf_counter() - t0
        tmp = WORK / f".{name}.tmp"
        save_compressed(model, tmp, force=True)
        (tmp / "costeff_record.json").write_text(json.dumps(record, indent=1, default=str))
        tmp.rename(folder)
        log(f"{name}: trained in {record['train_seconds'] / 60:.1f} min; {json.dumps(record.get('training', {}).get('loss_after', record.get('exit_fidelity')), default=str)}")


# ---------------------------------------------------------------- evaluation

EXIT_RULES = {  # model -> list of (rule, threshold) evaluated
    "exit-frozen": [("similarity", 0.95), ("predicted", 0.95), ("predicted", 0.9), ("predicted", 0.85)],
    "costeff-w100": [("predicted", 0.95)],
    "slim75-frozen": [("none", 2.0)],
    "costeff-w75": [("none", 2.0), ("predicted", 0.97), ("predicted", 0.95)],
}
PRUNE = {"keep_ratio": 0.6, "layers": (1, 3), "score": "cls"}  # applied at run time (not trained with)
PRUNED = {  # (base model, schedule[, keep ratio[, layers]]) -> rules
    ("original", "constant"): [("none", 2.0)],
    ("original", "length"): [("none", 2.0)],
    ("costeff-w75", "length"): [("none", 2.0)],
    # static + dynamic: the original cast to bf16 (no training), pruned at run time
    ("bf16", "constant"): [("none", 2.0)],
    ("bf16", "length"): [("none", 2.0)],
    ("bf16", "length", 0.4): [("none", 2.0)],
    ("bf16", "length", 0.5, (2,)): [("none", 2.0)],
    # EViT fusion: the dropped tokens of a row fused into one token (their size-weighted mean),
    # pruned after blocks 1 and 3 as above, and gradually after every block but the last
    ("bf16", "length", 0.6, (1, 3), True): [("none", 2.0)],
    ("bf16", "length", 0.7, (0, 1, 2, 3, 4), True): [("none", 2.0)],
    ("bf16", "length", 0.45, (1, 3), True): [("none", 2.0)],
}
# the pruning rates chosen on training text, not on the held-out sources: token-pruning's own
# search (``target_cos``, measured time as the cost) on the calibration documents above, at the
# issue's floor (0.97) plus a 0.01 margin for the change of kind of text (at 0.99 no setting saved
# 2 % of the measured time there, so nothing was pruned), and each calibration text's 10 nearest
# calibration texts at least 90 % the same (a margin above the 0.85 top-10 line: cosine
# alone let the search pick a setting that reordered neighbours, top-10 0.83 held out)
SEARCHED = TokenPruningConfig(layers=(1, 2, 3, 4), keep_ratio=0.4, target_cos=0.98, target_top10=0.9, schedule="length", min_tokens=32)
# the same search for the 0.95 floor (plus the same 0.01 margin), with the dropped tokens
# fused (EViT) and no neighbour floor (the 0.95 line asks for cosine only)
SEARCHED_FUSED = TokenPruningConfig(layers=(1, 2, 3, 4), keep_ratio=0.3, target_cos=0.96, schedule="length", min_tokens=32, fuse=True)
# static + dynamic, compiled: these bf16 models again with their blocks compiled by Inductor with
# frozen weights (the whole forward for `bf16`, the runs of blocks between pruning points for the
# pruned ones), compiled on a batch of training text before anything is timed
COMPILED = ("bf16", "bf16+prune-length", "bf16+prune-length-keep0.5-after2", "bf16+prune-length-keep0.4", "bf16+prune-searched",
            "bf16+prune-length-fused", "bf16+prune-length-keep0.7-after0-1-2-3-4-fused", "bf16+prune-length-keep0.45-fused", "bf16+prune-searched0.96-fused")
MIN_TOKENS = 32


def _family(name: str) -> str:
    if name.startswith("bf16") and name.endswith(" compiled+tiles"):
        return "bf16 compiled, AMX tile attention, measured widths (+ token pruning)"
    if name.startswith("bf16") and name.endswith(" compiled+widths"):
        return "bf16 compiled, measured widths (+ token pruning)"
    if name.startswith("bf16") and name.endswith(" compiled"):
        return "bf16 compiled (+ token pruning)"
    if name.startswith("bf16"):
        return "bf16 cast (+ token pruning)"
    if name.startswith("exit-frozen"):
        return "exits, frozen backbone"
    if name.startswith("slim75-frozen"):
        return "slim 75%, frozen (before joint training)"
    if name.startswith("costeff"):
        return "COST-EFF joint training"
    return "token pruning"


def evaluate_all(repeats: int = 3, n_texts: int = 128, quick: bool = False, bf16: bool = True, stem: str = "costeff", compile_models: bool = True) -> int:
    import copy
    import datetime as _dt

    import compression_methods as cm
    from slimformer.evaluate.quality import _tokenize, encode, encoder_quality, encoder_reference
    from slimformer.methods import TokenPruningConfig
    from slimformer.methods.dynamic import install_token_pruning, set_exit_rule
    from slimformer.runtime.machine import describe_machine, machine_line

    start = time.perf_counter()
    machine = describe_machine()
    original = load_model()
    texts = {s: load_texts(TextSpec(source=s, split="evaluation", n=n_texts, seed=0)) for s in HELD_OUT}
    n_queries = n_texts // 5
    refs = {s: encoder_reference(original, t, n_queries, 128, 32) for s, t in texts.items()}
    corpus = [t for s in HELD_OUT for t in texts[s]]
    models = {"original": original}
    present = [name for name in VARIANTS if (WORK / name).is_dir()]
    for name in present:
        m = load_compressed(WORK / name)
        if m.tokenizer is None:
            m.tokenizer = original.tokenizer
        models[name] = m
    records = {name: json.loads((WORK / name / "costeff_record.json").read_text()) for name in present}
    configs = [("original", "original", None, "none", 2.0)]  # (label, model key, prune schedule, rule, threshold)
    for name, rules in EXIT_RULES.items():
        if name not in models:
            continue
        for rule, t in rules:
            configs.append((name if rule == "none" else f"{name} {rule}@{t}", name, None, rule, t))
    if bf16:
        from slimformer.methods.quantization.cast import cast_model

        models["bf16"] = copy.deepcopy(original)
        cast_model(models["bf16"].model, torch.bfloat16)
        configs.append(("bf16", "bf16", None, "none", 2.0))
    for (base, schedule, *extra), rules in PRUNED.items():
        if base not in models:
            continue
        keep = extra[0] if extra else PRUNE["keep_ratio"]
        layers = extra[1] if len(extra) > 1 else PRUNE["layers"]
        fuse = len(extra) > 2 and extra[2]
        key = (f"{base}+prune-{schedule}" + (f"-keep{keep:g}" if extra and (keep != PRUNE["keep_ratio"] or not fuse) else "")
               + (f"-after{'-'.join(map(str, layers))}" if len(extra) > 1 and tuple(layers) != PRUNE["layers"] else "") + ("-fused" if fuse else ""))
        m = copy.deepcopy(models[base])
        install_token_pruning(m, TokenPruningConfig(**{**PRUNE, "keep_ratio": keep, "layers": layers}, schedule=schedule, min_tokens=MIN_TOKENS if schedule == "length" else 0, fuse=fuse))
        models[key] = m
        for rule, t in rules:
            configs.append((key if rule == "none" else f"{key} {rule}@{t}", key, schedule, rule, t))
    searches: dict[str, dict] = {}  # row name -> what the rate search on training text chose
    if bf16:
        for name, config in (("bf16+prune-searched", SEARCHED), ("bf16+prune-searched0.96-fused", SEARCHED_FUSED)):
            m = copy.deepcopy(models["bf16"])
            t0 = time.perf_counter()
            compress(m, Recipe(steps=[config], calibration=calibration(32) if quick else calibration()))
            found = searches[name] = {**m.applied[-1], "seconds": time.perf_counter() - t0, "config": config.to_dict()}
            log(f"{name}: rates searched on training text in {found['seconds']:.0f} s: {found['layers']} keep {found['keep_ratios']}, "
                f"calibration cos {found['calibration_cos']:.4f}, FLOPs {found['flops_ratio']:.2f}")
            models[name] = m
            configs.append((name, name, "length", "none", 2.0))
    searched, searched_fused = searches.get("bf16+prune-searched", {}), searches.get("bf16+prune-searched0.96-fused", {})
    compile_reports = {}
    widths_report: dict = {}
    attention_report: dict = {}
    if bf16 and compile_models:
        from slimformer.dynamo import allow_graphs
        from slimformer.runtime.compile import compile_model

        # every compiled model here shares the same code objects: room for all their graphs
        allow_graphs(128)
        cal_texts = [json.loads(line)["text"] for line in calibration_file().read_text().splitlines()]
        example = _tokenize(original, cal_texts[:: max(1, len(cal_texts) // 32)][:32], 128)
        for key in COMPILED:
            if key not in models:
                continue
            m = copy.deepcopy(models[key])
            report = compile_model(m, example, freezing=True)
            compile_reports[key] = {"compiled": report.compiled, "seconds": report.compile_seconds, "ratio_on_example": report.ratio, "reason": report.reason}
            log(f"{key} compiled: {report.compiled} in {report.compile_seconds:.1f} s, {report.ratio or 0:.2f}x on the example ({report.reason or 'kept'})")
            if not report.compiled:
                continue
            models[f"{key} compiled"] = m
            schedule = "length" if "prune-length" in key else None
            configs.append((f"{key} compiled", f"{key} compiled", schedule, "none", 2.0))
        # the same compiled models, each batch and each pruned width run at the width this
        # machine's block runs fastest per row (slimformer.runtime.alignment; masked columns)
        from slimformer.runtime.alignment import measure_widths

        found = measure_widths(models["bf16"], max_length=128, cache=False)
        widths_report.update({"moved": {str(k): v for k, v in found["moved"].items()}, "seconds": found["seconds"],
                              "seconds_per_row": found["seconds_per_row"]})
        log(f"batch widths measured in {found['seconds']:.1f} s: {len(found['moved'])} of 128 widths run wider")
        def add_compiled_variants(suffix: str, prepare) -> None:
            """Each compiled model again, ``prepare``d (widths, attention) before compiling: rows ``<key> compiled+<suffix>``."""
            for key in COMPILED:
                if f"{key} compiled" not in models:
                    continue
                m = copy.deepcopy(models[key])
                prepare(m)
                report = compile_model(m, example, freezing=True)
                compile_reports[f"{key}+{suffix}"] = {"compiled": report.compiled, "seconds": report.compile_seconds, "ratio_on_example": report.ratio, "reason": report.reason}
                if not report.compiled:
                    continue
                models[f"{key} compiled+{suffix}"] = m
                schedule = "length" if "prune-length" in key else None
                configs.append((f"{key} compiled+{suffix}", f"{key} compiled+{suffix}", schedule, "none", 2.0))

        add_compiled_variants("widths", lambda m: setattr(m, "padded_widths", found["widths"]))
        # and again with the encoder's attention chosen by measurement (slimformer.runtime.tile_attention:
        # the AMX tile kernel where one of the model's blocks runs faster with it), widths measured under it
        from slimformer.runtime.tile_attention import NAME as TILES, choose_attention, use_tile_attention

        probe = copy.deepcopy(models["bf16"])
        chosen = choose_attention(probe, cache=False)
        attention_report.update({k: chosen[k] for k in ("chosen", "packing", "seconds", "reason")})
        log(f"attention chosen: {chosen['chosen']} ({chosen['reason'] or 'measured'})")
        if chosen["chosen"] == TILES:
            tiled = measure_widths(probe, max_length=128, cache=False)
            attention_report["widths_moved"] = {str(k): v for k, v in tiled["moved"].items()}

            def on_tiles(m) -> None:
                use_tile_attention(m.model)
                m.padded_widths = tiled["widths"]
                m.packing = chosen["packing"]  # the pruned models too: the dynamic runtime packs their rows

            add_compiled_variants("tiles", on_tiles)

    def setting(key, rule, t):
        m = models[key]
        if getattr(m, "dynamic", None) is not None and m.dynamic.exits is not None:
            if rule == "none":
                set_exit_rule(m, "similarity", 2.0)  # a similarity above 1 never exits: the full depth
            else:
                set_exit_rule(m, rule, t, 2)
        return m

    rows = []
    for label, key, schedule, rule, t in configs:
        m = setting(key, rule, t)
        row = {"name": label, "model": key, "family": _family(key) if key != "original" else "original", "rule": rule, "threshold": t,
               "prune": schedule}
        for s in HELD_OUT:
            q = encoder_quality(original, m, texts[s], n_queries, 128, 32, reference=refs[s])
            row[s] = {"cos_mean": q["embedding_cosine_mean"], "cos_min": q["embedding_cosine_min"], "top10": q["retrieval_agreement_at_10"]}
        row["cos_mean"] = sum(row[s]["cos_mean"] for s in HELD_OUT) / len(HELD_OUT)
        row["top10"] = min(row[s]["top10"] for s in HELD_OUT)
        row["gap"] = abs(row[HELD_OUT[0]]["cos_mean"] - row[HELD_OUT[1]]["cos_mean"])
        rows.append(row)
        log(f"{label}: cos {row[HELD_OUT[0]]['cos_mean']:.4f} / {row[HELD_OUT[1]]['cos_mean']:.4f} top10 {row[HELD_OUT[0]]['top10']:.3f} / "
            f"{row[HELD_OUT[1]]['top10']:.3f}")
    oracle = {}
    if "exit-frozen" in models:
        set_exit_rule(models["exit-frozen"], "similarity", 2.0)
        oracle = {s: exit_oracle(models["exit-frozen"], original, texts[s]) for s in HELD_OUT}
        log(f"exit oracle: {json.dumps(oracle)}")
    # speed: the whole mixed-length held-out corpus (both sources), length-sorted batches of 32,
    # every setting timed in the same interleaved rounds, medians
    torch.set_num_threads(int(os.environ.get("COSTEFF_THREADS", "2")))
    load_before = [round(x, 2) for x in os.getloadavg()]
    fns = {}
    for (label, key, schedule, rule, t), row in zip(configs, rows):
        fns[label] = (lambda key=key, rule=rule, t=t: encode(setting(key, rule, t), corpus, 128, 32))
        # the warm-up round: the corpus in the same length-sorted batches, with per-input statistics
        m = setting(key, rule, t)
        order = sorted(range(len(corpus)), key=lambda i: -len(m.tokenizer(corpus[i], truncation=True, max_length=128)["input_ids"]))
        runs = []
        for i in range(0, len(order), 32):
            _, st = m.embed(_tokenize(m, [corpus[j] for j in order[i : i + 32]], 128), return_stats=True)
            runs.append(st.layers_run.float())
        row["mean_layers"] = float(torch.cat(runs).mean())
    lat = cm_interleaved(fns, repeats)
    load_after = [round(x, 2) for x in os.getloadavg()]
    from slimformer.runtime.compile import compile_fallbacks

    for row in rows:
        row["seconds"] = lat[row["name"]]
        row["speedup"] = lat["original"] / lat[row["name"]]
        # a "compiled" row whose compiled segments met a compiler error on some batch ran eagerly from there
        row["compile_fallbacks"] = compile_fallbacks(models[row["model"]])
    meta = {"started": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"), "minutes": (time.perf_counter() - start) / 60,
            "machine": machine, "threads": torch.get_num_threads(), "loadavg_timing": [load_before, load_after], "repeats": repeats,
            "n_texts": n_texts, "n_queries": n_queries, "held_out": HELD_OUT, "train_sources": TRAIN_SOURCES,
            "n_calibration": N_CAL_PER_SOURCE * len(TRAIN_SOURCES), "prune": {**PRUNE, "min_tokens": MIN_TOKENS}, "compiled": compile_reports, "widths": widths_report, "attention": attention_report, "exit_oracle": oracle, "searched_pruning": searched, "searched_pruning_fused": searched_fused,
            "variants": {k: [c.to_dict() for c in v] for k, v in VARIANTS.items()},
            "training": {k: {"seconds": r.get("train_seconds"), "loss_before": r.get("training", {}).get("loss_before"),
                             "loss_after": r.get("training", {}).get("loss_after"), "held_back_after": r.get("training", {}).get("held_back_after"),
                             "width": r.get("width", {}).get("block_flops_ratio"), "confidence": r.get("confidence")} for k, r in records.items()},
            "machine_line": machine_line(machine)}
    stem = stem + ("_quick" if quick else "")
    cm.write_text_atomic(RESULTS / f"{stem}.md", markdown(meta, rows))
    cm.write_text_atomic(RESULTS / f"{stem}.json", json.dumps({"meta": meta, "results": rows}, indent=2, default=str) + "\n")
    plot(rows, RESULTS / f"{stem}.png")
    log(f"wrote {RESULTS}/{stem}.{{md,json,png}}")
    return 0


@torch.no_grad()
def exit_oracle(model, original, texts: list[str], floor: float = 0.97) -> dict:
    """The most any exit rule could save with ``model``'s exits: per input, the cosine of every
    exit's output and of the full-depth output to the original's embedding; then the fewest blocks
    on average that any input-by-input rule needs at mean cos >= floor (``exit_bound.oracle``: a
    Lagrangian-dual lower bound, and the best assignment found). Returns the mean depth found, its
    lower bound, the block-compute bound (blocks / that) at the floor, and each exit's mean cosine."""
    from slimformer.evaluate.quality import _tokenize, encode
    from slimformer.methods.dynamic.runtime import DynamicEncoder

    heads = model.dynamic.exits
    layers = heads.layers
    n_blocks = model.adapter.num_layers()
    reference = encode(original, texts, 128, 32)
    cols = []
    for i in range(0, len(texts), 32):
        batch = _tokenize(model, texts[i : i + 32], 128)
        final, pooled = DynamicEncoder(model).embed(batch, collect_layers=True)
        per_exit = [torch.nn.functional.normalize(heads(k, pooled[k]).float(), dim=-1) for k in layers]
        cols.append(torch.stack(per_exit + [torch.nn.functional.normalize(final, dim=-1)], 1))  # (rows, exits + 1, dim)
    emb = torch.cat(cols)
    cos = (emb * reference[:, None, :]).sum(-1)  # (n, exits + 1)
    from exit_bound import oracle

    best = oracle(cos, floor, torch.tensor([k + 1 for k in layers] + [n_blocks]))
    return {"floor": floor, "mean_depth": best["blocks"], "mean_cos": best["cos"], "depth_lower": best["blocks_lower"], "bound": best["speedup_bound"],
            "exit_cos": {str(k): float(cos[:, j].mean()) for j, k in enumerate(layers)}}


def cm_interleaved(fns, repeats):
    from slimformer.evaluate.cost import interleaved_latency

    return interleaved_latency(fns, repeats=repeats, warmup=0)


def best(rows, floor: float, top10: float = 0.0):
    ok = [r for r in rows if all(r[s]["cos_mean"] >= floor for s in HELD_OUT) and r["top10"] >= top10]
    return max(ok, key=lambda r: r["speedup"]) if ok else None


def markdown(meta, rows) -> str:
    a, b = HELD_OUT
    lines = [
        "# COST-EFF on all-MiniLM-L6-v2: learned-confidence exits, joint training, length-aware pruning",
        "",
        f"- Training text ({meta['n_calibration']} documents, ≤ 128 tokens): calibration split of {', '.join(f'`{s}`' for s in meta['train_sources'])} only. "
        f"Held-out text of two kinds never used for training: `{a}` (READMEs, Markdown/reST prose) and `{b}` (licences, credits, release notes), "
        f"{meta['n_texts']} documents of each one's evaluation split (natural lengths, ≤ 128 tokens), the first {meta['n_queries']} as top-10 queries.",
        f"- cos = mean embedding cosine to the fp32 original, per source; gap = |cos {a} − cos {b}|; top-10 = retrieval agreement@10; "
        "layers = mean blocks run per input over both sources.",
        f"- Speed: wall time to encode the whole mixed-length held-out corpus (both sources, {2 * meta['n_texts']} documents, length-sorted batches of 32, "
        f"padding-free buckets), float32 (bfloat16 for the `bf16` rows), {meta['threads']} threads, one warm-up pass per setting (which also counts the blocks run) then the median of {meta['repeats']} interleaved rounds of every setting in one run; "
        f"speed-up = original time / setting time. Load average before / after timing: {meta['loadavg_timing'][0]} / {meta['loadavg_timing'][1]}"
        + (" — taken under load (shared 2-core machine): ratios are noisy." if meta['loadavg_timing'][0][0] > 2.5 else "."),
        f"- Machine: {meta['machine_line']}. Run {meta['started']} UTC, {meta['minutes']:.1f} min.",
        "- Models: `exit-frozen` = linear exits after blocks 0–4 trained by self-distillation on the frozen original (+ learned confidence); "
        "`costeff-w100` = the same exits trained jointly with the full-width backbone (COST-EFF loss: every exit weighted (k+1)/6 plus the final embedding, "
        "cosine to the original's final embedding); `slim75-frozen` = width slimmed to 75% of block FLOPs (heads 9 of 12, MLP shrunk), exits trained on the "
        "frozen slimmed backbone (before joint training); `costeff-w75` = the same slimming trained jointly (after). Rules: `predicted@t` = learned, "
        "isotonic-calibrated confidence ≥ t (t = expected cosine); `similarity@t` = MuE consecutive-exit agreement; `patience` = 2 agreeing exits; "
        "no rule = full depth. `+prune-constant` / `+prune-length`: token pruning after blocks 1 and 3 keeping "
        f"{meta['prune']['keep_ratio']:.0%} by [CLS] attention, constant or length-aware (inputs ≤ {meta['prune']['min_tokens']} tokens untouched); "
        "applied at run time, not trained with (`-keep0.4`: keeping 40%; `-keep0.5-after2`: keeping 50% after block 2 only; `-fused`: each row's dropped tokens fused into one token, their size-weighted mean carrying their total size, as EViT does, instead of discarded; `-keep0.7-after0-1-2-3-4`: keeping 70% after every block but the last). `bf16` = the original cast to bfloat16 (weights and activations; no training), "
        "the static half of a static + dynamic combination. `+prune-searched` = length-aware pruning with per-layer rates chosen by `token-pruning`'s own search "
        "(`target_cos`) on the training text alone"
        + (f" (candidates blocks {', '.join(map(str, meta['searched_pruning']['config']['layers']))}, mean cos ≥ {meta['searched_pruning']['config']['target_cos']} there"
           + (f" and calibration top-10 neighbour agreement ≥ {meta['searched_pruning']['config']['target_top10']}" if meta['searched_pruning']['config'].get('target_top10') else "")
           + "; "
           + f"chosen: {describe_rates(meta['searched_pruning'])}" + ("" if meta['searched_pruning']['layers'] else " (no move saved enough)") + ", "
           + f"calibration cos {meta['searched_pruning']['calibration_cos']:.4f}, {meta['searched_pruning']['flops_ratio']:.0%} of the block FLOPs, "
           f"{meta['searched_pruning']['seconds']:.0f} s of search)" if meta.get("searched_pruning") else "")
        + (f"; `+prune-searched0.96-fused` = the same search with the dropped tokens fused, candidates blocks "
           f"{', '.join(map(str, meta['searched_pruning_fused']['config']['layers']))}, mean cos ≥ {meta['searched_pruning_fused']['config']['target_cos']} "
           f"(the 0.95 floor plus the same margin), no neighbour floor; chosen: {describe_rates(meta['searched_pruning_fused'])}, "
           + f"calibration cos {meta['searched_pruning_fused']['calibration_cos']:.4f}, {meta['searched_pruning_fused']['flops_ratio']:.0%} of the block FLOPs, "
           f"{meta['searched_pruning_fused']['seconds']:.0f} s of search" if meta.get("searched_pruning_fused") else "")
        + ". `compiled` = that model compiled by Inductor with frozen weights (`compile_model(..., freezing=True)`, on a batch of "
        "training text): the whole forward for `bf16`, each run of blocks between two pruning points for the pruned ones (pruning itself stays eager)"
        + (": " + "; ".join(f"`{k}` {v['seconds']:.0f} s to compile" + ("" if v["compiled"] else f", not kept ({v['reason']})") for k, v in meta.get("compiled", {}).items()) if meta.get("compiled") else "") + "."
        + (f" `compiled+widths` = the same, every batch and every pruned width run at the width this machine's block runs fastest per row, a few masked columns "
           f"wider (`slimformer.runtime.alignment`; measured in {meta['widths']['seconds']:.1f} s, {len(meta['widths']['moved'])} of 128 widths run wider, e.g. "
           + ", ".join(f"{k}→{v}" for k, v in list(meta['widths']['moved'].items())[-6:]) + ")." if meta.get("widths") else "")
        + (" `compiled+tiles` = the same with the encoder's attention on the AMX tile kernel (`slimformer.runtime.tile_attention`, chosen by timing the bf16 "
           "model's embed of 32 rows of 8-128 tokens: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in meta['attention']['seconds'].items())
           + f"; packed rows {'chosen' if meta['attention'].get('packing') else 'not chosen'}: for the pruned models too: the dynamic runtime runs each batch's "
           f"real tokens in one row and repacks what each pruning point keeps), widths measured again under it ({len(meta['attention'].get('widths_moved', {}))} of 128 run wider)."
           if (meta.get("attention") or {}).get("chosen") == "slimformer_tile" else
           (f" Attention stayed on SDPA: {meta['attention'].get('reason') or 'the tile kernel was not faster here'}." if meta.get("attention") else "")),
        "",
        f"| setting | family | cos {a} | cos {b} | gap | worst cos | top-10 {a} | top-10 {b} | layers | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['family']} | {r[a]['cos_mean']:.4f} | {r[b]['cos_mean']:.4f} | {r['gap']:.4f} | "
                     f"{min(r[a]['cos_min'], r[b]['cos_min']):.3f} | {r[a]['top10']:.3f} | {r[b]['top10']:.3f} | {r['mean_layers']:.2f} | {r['speedup']:.2f}× |")
    lines += ["", "Training (loss = 1 − cos to the original's final embedding, training rows; held-back rows for the final layer):", ""]
    if not meta["training"]:
        lines.append("- no trained model was present in this run (`costeff.py train` writes them; this table has the untrained rows only)")
    for k, t in meta["training"].items():
        if t.get("loss_before"):
            before = ", ".join(f"{n} {v:.3f}→{t['loss_after'][n]:.3f}" for n, v in t["loss_before"].items())
            lines.append(f"- `{k}` ({(t['seconds'] or 0) / 60:.1f} min, block FLOPs {t['width'] or 1.0:.2f}): {before}; held-back final {t['held_back_after']['final']:.4f}")
        else:
            lines.append(f"- `{k}` ({(t['seconds'] or 0) / 60:.1f} min): exits on the frozen backbone")
    lines += compile_fallback_lines(rows, "name")
    lines += ["", "Operating points (both held-out sources must meet the floor; fastest by measured speed-up):", ""]
    for floor, top in ((0.99, 0.0), (0.97, 0.0), (0.97, 0.85), (0.95, 0.0)):
        r = best(rows, floor, top)
        cond = f"cos ≥ {floor}" + (f" and top-10 ≥ {top}" if top else "")
        lines.append(f"- {cond}: " + (f"**{r['name']}** — {r['speedup']:.2f}×, cos {r[a]['cos_mean']:.4f} / {r[b]['cos_mean']:.4f} (gap {r['gap']:.4f}), top-10 {r['top10']:.3f}" if r else "none"))
    exits_only = [r for r in rows if r["prune"] is None and r["model"] in ("exit-frozen", "costeff-w100")]
    r = best(exits_only, 0.97)
    lines.append("- early exit alone (full width, no pruning), cos ≥ 0.97: " + (f"**{r['name']}** — {r['speedup']:.2f}×, {r['mean_layers']:.2f} blocks per input"
                                                                              + (" (no input exited: the ratio is timing noise)" if r["mean_layers"] >= 5.999 else "") if r else "none"))
    for source, o in meta.get("exit_oracle", {}).items():
        lines.append(f"  - bound on `{source}`: the `exit-frozen` exits reach mean cos {', '.join(f'{v:.3f}' for v in o['exit_cos'].values())} after blocks "
                     f"{', '.join(o['exit_cos'])}; a perfect input-by-input rule keeps mean cos ≥ {o['floor']} at {o['mean_depth']:.2f} blocks on average "
                     f"(cos {o['mean_cos']:.4f}; no rule below {o.get('depth_lower', o['mean_depth']):.2f}): at most {o['bound']:.2f}× in block compute, "
                     "before the exit heads' own cost")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import compression_methods as cm

    a, b = HELD_OUT
    fig, ax = plt.subplots(figsize=(11, 7))
    colors = {"bf16 cast (+ token pruning)": "tab:orange", "bf16 compiled (+ token pruning)": "tab:olive", "bf16 compiled, measured widths (+ token pruning)": "tab:cyan", "bf16 compiled, AMX tile attention, measured widths (+ token pruning)": "tab:red", "exits, frozen backbone": "tab:blue", "COST-EFF joint training": "tab:purple", "slim 75%, frozen (before joint training)": "tab:green",
              "token pruning": "tab:brown", "original": "tab:red"}
    for fam, color in colors.items():
        pts = [r for r in rows if r["family"] == fam]
        if pts:
            ax.scatter([r["speedup"] for r in pts], [r[a]["cos_mean"] for r in pts], c=color, marker="o", s=30, label=f"{fam} ({a})", zorder=3)
            ax.scatter([r["speedup"] for r in pts], [r[b]["cos_mean"] for r in pts], c=color, marker="^", s=30, label=f"{fam} ({b})", zorder=3)
    front, top = [], 0.0
    for r in sorted(rows, key=lambda r: -min(r[a]["cos_mean"], r[b]["cos_mean"])):
        if r["speedup"] > top:
            front.append(r)
            top = r["speedup"]
    ax.plot([r["speedup"] for r in front], [min(r[a]["cos_mean"], r[b]["cos_mean"]) for r in front], "k--", lw=0.8, label="Pareto front (worse source)")
    fig.tight_layout()
    cm._place_labels(ax, [(r["speedup"], min(r[a]["cos_mean"], r[b]["cos_mean"]), r["name"]) for r in front], 6.5)
    ax.axhline(0.97, color="grey", lw=0.5)
    ax.set_xlabel("speed-up on the mixed-length held-out corpus (fp32 original time / setting time)")
    ax.set_ylabel("mean embedding cosine to the fp32 original")
    ax.set_title(f"all-MiniLM-L6-v2, COST-EFF: quality on held-out {a} (o) and {b} (^) against measured speed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    cm._atomic_write(path, lambda p: fig.savefig(p, dpi=130, format="png"))
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("train", "eval"))
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--quick", action="store_true", help="eval smoke test on 10 documents per source (results/costeff_quick.*)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median) after one warm-up round")
    parser.add_argument("--n-texts", type=int, default=128, help="held-out documents per source")
    parser.add_argument("--stem", default="costeff", help="results/<stem>.{md,json,png} (e.g. a run on another machine, beside the committed table)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16-cast rows (static + dynamic, no training)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled bf16 rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    names = args.only.split(",") if args.only else list(VARIANTS)
    if args.phase == "train":
        train(names)
        return 0
    if args.quick:
        return evaluate_all(repeats=1, n_texts=10, quick=True, bf16=not args.no_bf16, stem=args.stem, compile_models=not args.no_compile)
    return evaluate_all(repeats=args.repeats, n_texts=args.n_texts, bf16=not args.no_bf16, stem=args.stem, compile_models=not args.no_compile)


if __name__ == "__main__":
    sys.exit(main())
