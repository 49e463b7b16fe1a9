"""Command line: a thin layer over the Python API.

    slimformer compress [MODEL] --recipe RECIPE --out DIR [--force]
    slimformer eval MODEL_OR_DIR [--against ORIGINAL] [--json]
    slimformer methods
    slimformer report DIR [--out DIR]
    slimformer export MODEL --format gguf --type Q8_0|Q4_0|Q4_1 [--out FILE] [--force]

Errors the user can fix print one line (problem; fix) and exit with status 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from slimformer.errors import OutputExistsError, SlimformerError

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


def cmd_compress(args) -> int:
    from slimformer.compress import compress
    from slimformer.evaluate import evaluate
    from slimformer.evaluate.report import markdown_table, row_of
    from slimformer.io.serialization import prepare_output_dir, read_manifest, save_compressed
    from slimformer.models import load_model
    from slimformer.recipe import Recipe

    prepare_output_dir(args.out, args.force)
    if args.model not in (None, "default") and Path(args.model).exists():
        source, out = Path(args.model).resolve(), Path(args.out).resolve()
        if out == source or out in source.parents:
            raise OutputExistsError(f"--out {args.out} would replace the model being compressed", "write the compressed model to another folder")
    recipe = Recipe.from_file(args.recipe)
    settings = _eval_settings(args)
    _status(f"loading {args.model or 'the embedded default model (all-MiniLM-L6-v2)'}")
    original = load_model(args.model)
    if original.manifest is not None:
        raise SlimformerError(f"{args.model} is already a compressed folder", "compress the original model instead")
    model = copy.deepcopy(original)
    _status(f"applying recipe {recipe.name!r} ({len(recipe.steps)} steps)")
    compress(model, recipe, progress=not args.quiet)
    evaluation = None
    if not args.no_eval:
        _status("evaluating against the original on held-out text")
        evaluation = evaluate(original, model, settings, progress=not args.quiet)
    out = save_compressed(model, args.out, evaluation=evaluation, force=args.force)
    _status(f"wrote {out}")
    print(markdown_table([row_of(Path(args.out).name, read_manifest(out))]), end="")
    return 0


def cmd_eval(args) -> int:
    from slimformer.evaluate import evaluate
    from slimformer.evaluate.report import markdown_table, row_of
    from slimformer.io.serialization import build_manifest
    from slimformer.models import load_model

    model = load_model(args.model)
    stored = (model.manifest or {}).get("evaluation") or {}
    settings = _eval_settings(args, stored.get("settings"))
    if args.against:
        original = load_model(args.against)
    elif model.manifest is not None:
        original = load_model(model.manifest["base_model"])
    else:
        original = model
    result = evaluate(original, model, settings, progress=not args.quiet)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimformer", description="Make transformer models smaller and faster, and measure what it costs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="apply a recipe to a model, evaluate it and save it")
    p.add_argument("model", nargs="?", default=None, help="model folder, hub id or 'default' (default: embedded all-MiniLM-L6-v2)")
    p.add_argument("--recipe", required=True, help="recipe file (.yaml/.yml/.json); see recipes/")
    p.add_argument("--out", required=True, help="output folder for the compressed model")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation against the original")
    p.add_argument("--eval-texts", type=int, default=None, help="number of held-out texts to evaluate on")
    p.add_argument("--eval-source", default=None, help="evaluation text source (built-in name or .txt/.jsonl)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="evaluate a compressed folder against its original (or any model)")
    p.add_argument("model", help="compressed folder, model folder, hub id or 'default'")
    p.add_argument("--against", default=None, help="original to compare with (default: the manifest's base model)")
    p.add_argument("--eval-texts", type=int, default=None)
    p.add_argument("--eval-source", default=None)
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("methods", help="list the compression methods and their papers")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("report", help="markdown table and PNG plot of quality against size")
    p.add_argument("folder", help="a compressed folder or a folder of them")
    p.add_argument("--out", default=None, help="where to write report.md and report.png (default: FOLDER/report)")
    p.set_defaults(func=cmd_report)

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
        print("slimformer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
