"""Command line: a thin layer over the Python API.

    slimformer compress [MODEL] --recipe RECIPE --out DIR [--force] [--resume]
    slimformer eval MODEL_OR_DIR [--against ORIGINAL] [--json]
    slimformer methods
    slimformer report DIR [--out DIR]
    slimformer generate MODEL (--prompt TEXT ... | --chat [TEXT]) [--max-new-tokens N] [--speculate MODE] [--kv-cache STEP]
    slimformer kv-eval MODEL --cache STEP [--cache STEP ...] [--prefix N]
    slimformer search [MODEL] --space SPACE --budget bits=3.0 [--budget ...] --out DIR [--ray local|auto|ADDRESS]
    slimformer export MODEL --format gguf --type Q8_0|Q4_0|Q4_1 [--out FILE] [--force]

Errors the user can fix print one line (problem; fix) and exit with status 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from slimformer.errors import InterruptedRunError, OutputExistsError, SlimformerError

EXIT_USAGE = 2


def _eval_settings(args, base: dict | None = None):
    from slimformer.evaluate import EvalSettings

    settings = dict(base or {})
    if getattr(args, "eval_texts", None) is not None:
        settings["n_texts"] = args.eval_texts
        settings["n_queries"] = min(settings.get("n_queries", 64), max(1, args.eval_texts // 5))
    if getattr(args, "eval_source", None):
        settings["source"] = args.eval_source
    return EvalSettings(**settings)


def _execution(args):
    """The execution planner's settings from --memory (``off``: capability-chosen kernels)."""
    memory = getattr(args, "memory", None) or "balanced"
    return "off" if memory == "off" else {"memory": memory}


def cmd_compress(args) -> int:
    from slimformer.compress import compress
    from slimformer.evaluate import evaluate
    from slimformer.evaluate.report import markdown_table, row_of
    from slimformer.io.serialization import clean_stale_temporaries, prepare_output_dir, read_manifest, save_compressed
    from slimformer.methods.checkpoint import remove_work_dir, work_dir_for
    from slimformer.models import load_model
    from slimformer.recipe import Recipe

    clean_stale_temporaries(args.out)
    prepare_output_dir(args.out, args.force)
    if args.model not in (None, "default") and Path(args.model).exists():
        source, out = Path(args.model).resolve(), Path(args.out).resolve()
        if out == source or out in source.parents:
            raise OutputExistsError(f"--out {args.out} would replace the model being compressed", "write the compressed model to another folder")
    recipe = Recipe.from_file(args.recipe)
    settings = _eval_settings(args)
    _status(f"loading {args.model or 'the embedded default model (all-MiniLM-L6-v2)'}")
    original = load_model(args.model, trust_remote_code=args.trust_remote_code)
    if original.manifest is not None:
        raise SlimformerError(f"{args.model} is already a compressed folder", "compress the original model instead")
    model = copy.deepcopy(original)
    work = work_dir_for(args.out)
    if work.is_dir() and not args.resume:
        print(f"slimformer: warning: removing the work folder {work} of an unfinished job (pass --resume to continue it)", file=sys.stderr)
    _status(f"applying recipe {recipe.name!r} ({len(recipe.steps)} steps){' (resuming)' if args.resume and work.is_dir() else ''}")
    try:
        compress(model, recipe, progress=not args.quiet, work_dir=work, resume=args.resume)
        evaluation = None
        if not args.no_eval:
            _status("evaluating against the original on held-out text")
            evaluation = evaluate(original, model, settings, progress=not args.quiet, execution=_execution(args), compile=args.compile)
            _warn_quality_gap(evaluation)
        out = save_compressed(model, args.out, evaluation=evaluation, force=args.force)
    except (SlimformerError, KeyboardInterrupt) as exc:
        _keep_or_remove_work_dir(work, exc)
        raise
    remove_work_dir(work)
    _status(f"wrote {out}")
    print(markdown_table([row_of(Path(args.out).name, read_manifest(out))]), end="")
    return 0


def _keep_or_remove_work_dir(work: Path, exc: BaseException) -> None:
    """After a failed compress: keep the work folder when it holds finished blocks (and say how
    to resume), else remove it, so that nothing is left behind."""
    from slimformer.errors import ResumeError
    from slimformer.methods.checkpoint import finished_units, remove_work_dir

    if isinstance(exc, ResumeError):
        return  # another job's folder, or a busy one: not ours to touch
    n = finished_units(work)
    if not n:
        remove_work_dir(work)
        return
    if isinstance(exc, KeyboardInterrupt):
        raise InterruptedRunError(f"interrupted before the output was complete ({n} finished blocks are kept in {work})", "run the same command with --resume to continue") from None
    print(f"slimformer: warning: {n} finished blocks are kept in {work}: fix the problem and run the same command with --resume to continue", file=sys.stderr)


def cmd_eval(args) -> int:
    from slimformer.evaluate import evaluate
    from slimformer.evaluate.report import markdown_table, row_of
    from slimformer.io.serialization import build_manifest
    from slimformer.models import load_model

    model = load_model(args.model, trust_remote_code=args.trust_remote_code, execution=_execution(args))
    stored = (model.manifest or {}).get("evaluation") or {}
    settings = _eval_settings(args, stored.get("settings"))
    if args.against:
        original = load_model(args.against, trust_remote_code=args.trust_remote_code)
    elif model.manifest is not None:
        original = load_model(model.manifest["base_model"])
    else:
        original = model
    result = evaluate(original, model, settings, progress=not args.quiet, execution=_execution(args), compile=args.compile)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    manifest = dict(model.manifest or build_manifest(model, {}, None))
    manifest["evaluation"] = result
    print(markdown_table([row_of(Path(str(args.model)).name or "model", manifest)]), end="")
    if stored.get("quality"):
        print("\nquality now vs. recorded in the manifest:")
        for key, value in result["quality"].items():
            if isinstance(value, float):
                print(f"  {key}: {value:.6f} (manifest {stored['quality'].get(key, float('nan')):.6f})")
    return 0


def cmd_methods(args) -> int:
    from slimformer.methods import registered_methods

    rows = [(name, m.config_type.family, m.config_type.summary, m.config_type.paper) for name, m in registered_methods().items()]
    width = max(len(r[0]) for r in rows)
    for name, family, summary, paper in rows:
        print(f"{name:<{width}}  [{family}] {summary}")
        print(f"{'':<{width}}  paper: {paper}")
    return 0


def cmd_report(args) -> int:
    from slimformer.evaluate.report import find_runs, markdown_table, plot_tradeoff, row_of
    from slimformer.io.serialization import read_manifest, write_atomically

    folder = Path(args.folder)
    runs = find_runs(folder)
    rows = [row_of(run.name, read_manifest(run)) for run in runs]
    table = markdown_table(rows)
    target = Path(args.out) if args.out else folder / "report"
    if target.exists() and not (target.is_dir() and {p.name for p in target.iterdir()} <= {"report.md", "report.png"}):
        raise OutputExistsError(f"report folder {target} exists and holds more than a previous report", "choose another --out")

    def write(tmp: Path) -> None:
        (tmp / "report.md").write_text(f"# slimformer report: {folder}\n\n" + table + "\n![quality against size](report.png)\n")
        plot_tradeoff(rows, tmp / "report.png")

    write_atomically(target, force=True, write=write)
    print(table, end="")
    _status(f"wrote {target / 'report.md'} and {target / 'report.png'}")
    return 0


def _warn_quality_gap(evaluation: dict) -> None:
    warning = (evaluation.get("transfer") or {}).get("warning")
    if warning:
        print(f"slimformer: warning: {warning}", file=sys.stderr)


def cmd_generate(args) -> int:
    """Generate text with a causal LM (original, .gguf or compressed folder); stream it to stdout."""
    import torch

    from slimformer.models import load_model
    from slimformer.runtime import GenerationConfig, TextGenerator
    from slimformer.runtime.speculative import SpeculationConfig

    if not args.prompt and not args.chat:
        raise SlimformerError("nothing to generate from", "pass --prompt TEXT (repeat it for a batch) or --chat [TEXT]")
    if args.prompt and isinstance(args.chat, str):
        raise SlimformerError("--chat TEXT and --prompt given together", "pass the message with --chat TEXT, or --chat with --prompt TEXT")
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    speculation = None
    if args.speculate:
        draft = load_model(args.draft) if args.draft else None
        speculation = SpeculationConfig(args.speculate, num_draft=args.num_draft, exit_layer=args.exit_layer, draft=draft)
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, stop=tuple(args.stop or ()), speculation=speculation,
        kv_cache=_cache_step(args.kv_cache, "--kv-cache") if args.kv_cache else None,
    )
    loaded = load_model(args.model, execution={"int8_activations": args.int8_activations})
    generator = TextGenerator(loaded, dtype=dtype, compile=False if args.no_compile else None)
    chat = bool(args.chat)
    prompts = list(args.prompt or []) or ([args.chat] if isinstance(args.chat, str) else [])
    if not prompts:  # interactive chat: one user message per line, history kept
        history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
        _status("chat: type a message, an empty line or Ctrl-D ends")
        for line in sys.stdin:
            if not line.strip():
                break
            history.append({"role": "user", "content": line.rstrip("\n")})
            ids, mask = generator.encode_conversations([history])
            result = generator.generate_ids(ids, mask, config, on_text=lambda _r, piece: print(piece, end="", flush=True))
            print()
            history.append({"role": "assistant", "content": result.texts[0]})
            _print_generation_stats(result.stats, args.json)
        return 0
    stream = len(prompts) == 1 and not args.json
    result = generator.generate(
        prompts, config, chat=chat, system=args.system,
        on_text=(lambda _r, piece: print(piece, end="", flush=True)) if stream else None,
    )
    if args.json:
        print(json.dumps({"texts": result.texts, "finish": result.finish, "stats": result.stats.as_dict()}, indent=2))
        return 0
    if stream:
        print()
    else:
        for i, text in enumerate(result.texts):
            print(f"--- [{i}] {prompts[i]!r}\n{text}")
    _print_generation_stats(result.stats, False)
    return 0


def _print_generation_stats(stats, as_json: bool) -> None:
    if as_json:
        return
    spec = stats.speculation
    extra = f", acceptance {spec['acceptance_rate']:.0%} of {spec['drafted']} drafted ({spec['mode']})" if spec else ""
    _status(
        f"{stats.new_tokens} tokens (batch {stats.batch}); time to first token {stats.ttft_s * 1000:.0f} ms, "
        f"prefill {stats.prefill_tokens_per_s:.0f} tok/s, decode {stats.decode_tokens_per_s:.1f} tok/s, "
        f"peak RSS {stats.peak_rss_mb:.0f} MB, KV cache {stats.kv_cache_mb:.1f} MB, "
        f"{'compiled' if stats.compiled else 'eager'}{extra}"
    )


def _add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a causal LM (original, .gguf, or compressed folder)")
    p.add_argument("model", help="model folder, compressed folder, .gguf file, hub id or 'smollm2'")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch; left-padded)")
    p.add_argument("--chat", nargs="?", const=True, default=False, help="use the chat template; with TEXT: one message, without: interactive")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--no-compile", action="store_true", help="run the decode step eagerly (also: SLIMFORMER_COMPILE=0)")
    p.add_argument("--int8-activations", choices=("auto", "keep"), default="auto",
                   help="compressed folders: auto lets the planner round a 4/8-bit layer's activations to int8 per 32 columns where "
                        "that decodes faster (AVX-512 VNNI; llama.cpp's scheme); keep leaves them as the recipe made them")
    p.add_argument("--speculate", choices=("prompt-lookup", "self", "draft"), default=None, help="lossless speculative decoding (greedy)")
    p.add_argument("--draft", default=None, help="draft model for --speculate draft (e.g. a 2-bit compressed folder)")
    p.add_argument("--num-draft", type=int, default=None, help="most tokens drafted per verify step (default: 6 for prompt-lookup, 4 for self and draft)")
    p.add_argument("--exit-layer", type=int, default=None, help="blocks used by the --speculate self draft")
    p.add_argument("--kv-cache", default=None, help="compress the KV cache with this recipe step, e.g. '{method: information, ratio: 0.75, bits: 4}'")
    p.add_argument("--json", action="store_true", help="print texts and measurements as JSON")
    p.set_defaults(func=cmd_generate)


def _cache_step(text: str, flag: str):
    """A KV-cache config from a YAML/JSON recipe step given on the command line."""
    import yaml

    from slimformer.errors import ConfigError
    from slimformer.runtime.kv import kv_config_from_dict

    try:
        step = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{flag} {text!r} is not YAML/JSON", f"write e.g. {flag} '{{method: snapkv, ratio: 0.75}}'") from exc
    return kv_config_from_dict(step)


def cmd_kv_eval(args) -> int:
    """Continuation perplexity/KL over a compressed prefix cache, against the full cache."""
    from slimformer.data import TextSpec, load_texts
    from slimformer.errors import ConfigError
    from slimformer.evaluate.kv_cache import continuation_quality
    from slimformer.models import load_model

    specs = {text: _cache_step(text, "--cache") for text in args.cache}
    loaded = load_model(args.model)
    if loaded.kind != "causal-lm":
        raise ConfigError(f"{args.model} is not a causal language model", "KV-cache compression needs a decoder (e.g. Llama, Qwen2)")
    ids = []
    for t in load_texts(TextSpec(source=args.eval_source or "pydoc-topics", split="evaluation", n=400, min_chars=400, seed=7)):
        ids += loaded.tokenizer(t + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= args.prefix + args.continuation:
            break
    if len(ids) < args.prefix + args.continuation:
        raise ConfigError(f"the held-out text has only {len(ids)} tokens", "lower --prefix or pass a larger --eval-source")
    import torch

    result = continuation_quality(loaded.model.eval(), specs, torch.tensor([ids[: args.prefix]]), torch.tensor([ids[args.prefix : args.prefix + args.continuation]]))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print("| cache | KV ratio (vs 16-bit) | ppl | KL |\n|---|---:|---:|---:|")
    for name, r in result.items():
        print(f"| {name} | {r['ratio']:.2f} | {r['ppl']:.3f} | {r['kl']:.4f} |")
    return 0


def _add_kv_eval_parser(sub) -> None:
    p = sub.add_parser("kv-eval", help="continuation perplexity over a compressed KV cache, against the full cache")
    p.add_argument("model", help="causal LM folder or hub id")
    p.add_argument("--cache", action="append", required=True, help="cache recipe step, e.g. '{method: snapkv, ratio: 0.75}' (repeatable)")
    p.add_argument("--prefix", type=int, default=2048, help="prefix tokens held in the cache")
    p.add_argument("--continuation", type=int, default=128, help="continuation tokens scored")
    p.add_argument("--eval-source", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_kv_eval)


def cmd_search(args) -> int:
    from slimformer.models import load_model
    from slimformer.search import Budget, SearchSpace, search

    space = SearchSpace.from_file(args.space)
    budgets = [Budget.parse(b) for b in args.budget or []]
    if args.generations is not None or args.seed is not None:
        import dataclasses

        evo = dataclasses.replace(space.evolution, **{k: v for k, v in (("generations", args.generations), ("seed", args.seed)) if v is not None})
        space = dataclasses.replace(space, evolution=evo)
    if args.workers < 1:
        raise SlimformerError(f"--workers {args.workers} must be at least 1", "pass e.g. --workers 2")
    _status(f"loading {args.model or 'the embedded default model (all-MiniLM-L6-v2)'}")
    loaded = load_model(args.model)
    if loaded.manifest is not None:
        raise SlimformerError(f"{args.model} is already a compressed folder", "search on the original model instead")
    outcome = search(loaded, space, budgets, args.out, ray=args.ray, workers=args.workers, eval_source=args.eval_source or "stdlib-docs",
                     eval_texts=args.eval_texts or 64, force=args.force, progress=not args.quiet, pareto=args.pareto)
    front = outcome.front
    metric = "KL" if front["kind"] == "causal-lm" else "1-cos"
    print(f"| setting | code bits/weight | stored bits/weight | held-out {metric} |")
    print("|---|---|---|---|")
    names = front.get("level_names", {})
    for bits, p in front["uniform"].items():
        print(f"| uniform {names.get(bits, f'{bits}-bit')} | {p['code_bits_per_weight']:.3f} | {p['stored_bits_per_weight']:.3f} | {p['distortion']:.5f} |")
    for label, entry in front["budgets"].items():
        for name in ("dp", "searched", "dp_tuned", "searched_tuned"):
            if name not in entry:
                continue
            p = {**entry[name.removesuffix("_tuned")], **entry[name]}  # tuning keeps the bits
            what = ("DP allocation" if name.startswith("dp") else "EvoPress") + (", scales tuned" if name.endswith("_tuned") else "")
            print(f"| {label} {what} | {p['code_bits_per_weight']:.3f} | {p['stored_bits_per_weight']:.3f} | {p['distortion']:.5f} |")
    for p in (front.get("pareto") or {}).get("members", []):
        print(f"| NSGA-II front {p['label']} | {p['code_bits_per_weight']:.3f} | {p['stored_bits_per_weight']:.3f} | {p['distortion']:.5f} |")
    _status(f"wrote {outcome.folder} (front.json, front.png, one model per budget) in {outcome.seconds:.0f} s")
    return 0


def cmd_export(args) -> int:
    from slimformer.io.gguf_export import export_gguf
    from slimformer.io.gguf_import import load_gguf
    from slimformer.models import load_model

    source = Path(str(args.model))
    is_gguf = source.suffix == ".gguf" or (source.is_dir() and not (source / "config.json").is_file() and any(source.glob("*.gguf")))
    out = Path(args.out) if args.out else Path(f"{source.stem if source.suffix == '.gguf' else source.name or 'model'}.{args.type}.gguf")
    if out.exists() and not args.force:
        raise OutputExistsError(f"output file {out} already exists", "choose another --out or pass --force to replace it")
    if is_gguf and source.exists() and out.resolve() == source.resolve():
        raise OutputExistsError(f"--out {out} would replace the model being exported", "write the GGUF file to another path")
    _status(f"loading {args.model}")
    loaded = load_gguf(source, keep_quantized=True) if is_gguf else load_model(args.model)
    path = export_gguf(loaded, out, args.type, float_type=args.float_type, force=args.force)
    _status(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    print(path)
    return 0


def _status(message: str) -> None:
    print(f"slimformer: {message}", file=sys.stderr)


def _add_trust_remote_code(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-remote-code", action="store_true",
        help="let a model folder run its own Python code (auto_map in config.json); off by default, use only for authors you trust",
    )


def _add_memory_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--memory", choices=("packed", "balanced", "fast", "off"), default="balanced",
        help="execution planner memory policy: packed (no dense copies), balanced (<= 2 bytes/weight, default), fast (any), off (no planning)",
    )


def _add_compile_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compile", action="store_true",
        help="also time the compressed model compiled (torch.compile, Inductor): kept for the timing only if it agrees with eager and is faster; compile seconds are reported",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimformer", description="Make transformer models smaller and faster, and measure what it costs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="apply a recipe to a model, evaluate it and save it")
    p.add_argument("model", nargs="?", default=None, help="model folder, hub id or 'default' (default: embedded all-MiniLM-L6-v2)")
    p.add_argument("--recipe", required=True, help="recipe file (.yaml/.yml/.json); see recipes/")
    p.add_argument("--out", required=True, help="output folder for the compressed model")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--resume", action="store_true", help="continue a killed job from its last finished block (its work folder .OUT.work beside --out); same bytes as an uninterrupted run")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation against the original")
    p.add_argument("--eval-texts", type=int, default=None, help="number of held-out texts to evaluate on")
    p.add_argument("--eval-source", default=None, help="evaluation text source (built-in name or .txt/.jsonl)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_trust_remote_code(p)
    _add_memory_option(p)
    _add_compile_option(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="evaluate a compressed folder against its original (or any model)")
    p.add_argument("model", help="compressed folder, model folder, hub id or 'default'")
    p.add_argument("--against", default=None, help="original to compare with (default: the manifest's base model)")
    p.add_argument("--eval-texts", type=int, default=None)
    p.add_argument("--eval-source", default=None)
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--quiet", action="store_true")
    _add_trust_remote_code(p)
    _add_memory_option(p)
    _add_compile_option(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("search", help="search per-layer bit widths under budgets (EvoPress); writes models, front.json and front.png")
    p.add_argument("model", nargs="?", default=None, help="model folder, .gguf, hub id or 'default'")
    p.add_argument("--space", required=True, help="search space file (.yaml/.json); see recipes/search/")
    p.add_argument("--budget", action="append", default=None, help="KIND=VALUE, e.g. bits=3.0 (average code bits per weight), bytes=40e6 or params=0.75 (fraction of the weights kept); repeat to trace a front")
    p.add_argument("--pareto", action="store_true", help="also search the whole quality/bits front at once (NSGA-II, the space file's 'pareto' settings)")
    p.add_argument("--out", required=True, help="search folder (resumed when it holds the same search)")
    p.add_argument("--generations", type=int, default=None, help="override the space file's generations")
    p.add_argument("--seed", type=int, default=None, help="override the space file's seed")
    p.add_argument("--ray", default=None, help="score candidates on Ray: 'local' (start one), 'auto', or a cluster address")
    p.add_argument("--workers", type=int, default=2, help="Ray actors (with --ray)")
    p.add_argument("--eval-texts", type=int, default=None, help="held-out texts for the front (default 64)")
    p.add_argument("--eval-source", default=None)
    p.add_argument("--force", action="store_true", help="start over in --out if it holds another search")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("methods", help="list the compression methods and their papers")
    p.set_defaults(func=cmd_methods)

    _add_kv_eval_parser(sub)

    p = sub.add_parser("report", help="markdown table and PNG plot of quality against size")
    p.add_argument("folder", help="a compressed folder or a folder of them")
    p.add_argument("--out", default=None, help="where to write report.md and report.png (default: FOLDER/report)")
    p.set_defaults(func=cmd_report)

    _add_generate_parser(sub)
    p = sub.add_parser("export", help="write a quantized model as a GGUF file for llama.cpp / Ollama (exact block formats)")
    p.add_argument("model", help="compressed folder, or a .gguf file (its quantized tensors are kept as they are)")
    p.add_argument("--format", choices=("gguf",), default="gguf", help="output format (gguf)")
    p.add_argument("--type", required=True, choices=("Q8_0", "Q4_0", "Q4_1"), help="GGUF block type of the linear layers")
    p.add_argument("--float-type", choices=("F16", "F32"), default="F16", help="type of unquantized matrices (norms are always F32)")
    p.add_argument("--out", default=None, help="output .gguf file (default: NAME.TYPE.gguf in the current folder)")
    p.add_argument("--force", action="store_true", help="replace the output file if it exists")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SlimformerError as exc:
        print(f"slimformer: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return _fail(InterruptedRunError("interrupted before the output was complete (nothing was written)", "run the command again"))
    except OSError as exc:  # a file the checks above did not foresee: still one line, no traceback
        where = f" {exc.filename}" if exc.filename else ""
        return _fail(SlimformerError(f"cannot access{where}: {exc.strerror or type(exc).__name__}", "check the path and its permissions"))


def _fail(exc: SlimformerError) -> int:
    print(f"slimformer: error: {exc}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
