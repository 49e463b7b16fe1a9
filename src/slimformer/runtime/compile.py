"""Whole-model compilation where it pays: ``torch.compile`` (Inductor, CPU) of a model's forward,
warmed up on an example batch, checked against the eager forward, timed, and kept only if it
agrees and is faster; an eager fallback takes over if a later call fails to compile.

    report = compile_model(loaded, example_batch)   # CompileReport: compiled?, seconds, speedup
    uncompile_model(loaded)

Inductor caches compiled kernels on disk (``TORCHINDUCTOR_CACHE_DIR``; by default under the
system temp folder), so a second process compiles the same graphs much faster ("warm cache").
``SLIMFORMER_COMPILE=0`` turns compilation off.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass

import torch

from slimformer.timing import interleaved_times
from slimformer.dynamo import allow_graphs


@dataclass
class CompileReport:
    """``compiled``: whether the compiled forward is installed; ``compile_seconds``: the first
    (compiling) call; ``eager_seconds``/``compiled_seconds``: medians on the example batch;
    ``ratio``: median over interleaved rounds of eager / compiled seconds (the decision);
    ``max_abs_diff``: largest output difference to eager; ``reason``: why it was not kept;
    ``frozen``: compiled with frozen weights."""

    compiled: bool
    frozen: bool = False
    compile_seconds: float = 0.0
    eager_seconds: float = 0.0
    compiled_seconds: float = 0.0
    ratio: float | None = None
    max_abs_diff: float = 0.0
    reason: str | None = None

    @property
    def speedup(self) -> float:
        if self.ratio is not None:
            return self.ratio
        return self.eager_seconds / self.compiled_seconds if self.compiled_seconds else 1.0


class _CompiledForward:
    """Calls the compiled forward; on any compiler error falls back to eager for good."""

    def __init__(self, compiled, eager, frozen: bool = False) -> None:
        self.compiled = compiled
        self.eager = eager
        self.frozen = frozen
        self.failed: str | None = None

    def __call__(self, *args, **kwargs):
        if self.failed is None:
            try:
                with _inductor_freezing(self.frozen):  # a recompile (new shape) freezes too
                    return self.compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: run eagerly
                self.failed = exception_line(exc)
                warnings.warn(f"slimformer: compiled forward failed ({self.failed}); running eagerly", stacklevel=2)
        return self.eager(*args, **kwargs)


def exception_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (200 characters at most), for reports and warnings."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _inductor_freezing(on: bool):
    """Inductor's ``freezing`` for the compilations inside (set globally for the call: passing
    it in ``torch.compile(options=...)`` did not freeze, measured on torch 2.13)."""
    import contextlib

    if not on:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)


def _output(out) -> torch.Tensor:
    for key in ("last_hidden_state", "logits"):
        if hasattr(out, key):
            return getattr(out, key)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def compile_model(loaded, example: dict, repeats: int = 5, tolerance: float | None = None, keep_if_slower: bool = False, dynamic: bool = True, backend: str = "inductor", freezing: bool | None = None) -> CompileReport:
    """Compile ``loaded.model``'s forward, warm it up on ``example`` (a tokenized batch),
    compare with eager (:func:`disagreement` <= ``tolerance``),
    time both (``repeats`` interleaved rounds after a warm-up call of each), and install it if
    it agrees and (unless ``keep_if_slower``) the median of the rounds' eager/compiled ratios
    is above 1. ``backend``: ``torch.compile``'s (``inductor``: generated C++
    kernels; ``aot_eager``: the same graph capture without code generation, for quick checks).
    ``tolerance`` (None: by the output's dtype, :func:`agreement_tolerance`). ``freezing``
    (Inductor): weights become constants of the graph, which oneDNN prepacks for the matrix
    units (bf16 linears become ``mkldnn._linear_pointwise``); the compiled forward must not be
    used after the weights change (compile again). It holds those packed copies beside the
    model's own weights (MiniLM's 4-bit demo model, each compiled in a fresh process: +74 MB of
    resident memory against an unfrozen compile, ~7 bytes per linear weight), so ``None``
    freezes only a model planned with ``memory: fast``; ``True`` / ``False`` decide.
    A model with dynamic settings (exits, token reduction) runs its blocks through the dynamic
    runtime, not through ``model.forward``: then each run of blocks between two reduction or exit
    points is compiled instead (:func:`_compile_segments`). Returns the :class:`CompileReport`.
    Measured: a 4-layer tiny BERT took 369 s to compile cold on a heavily loaded 2-core AMD EPYC
    (AVX2), agreed with eager to 7e-7 and ran 1.36x faster. MiniLM planned to bf16 paths on a 2-core Xeon with AMX
    (benchmarks/results/execution_planner.md): not frozen, 2-4 s and 1.04-1.08x over eager for
    4-bit and 8-bit weight-only models (only elementwise work fuses), 1.60x for W8A8 (its
    activation quantization fuses); frozen, 9-25 s and 1.26-1.53x (a plain bf16 cast 1.28x).
    Compile time is reported, never hidden in a latency figure."""
    model = loaded.model
    uncompile_model(loaded)
    if os.environ.get("SLIMFORMER_COMPILE", "1") == "0":
        return CompileReport(False, reason="SLIMFORMER_COMPILE=0")
    settings = getattr(loaded, "dynamic", None)
    if settings is not None and settings.active():
        _trace_batch_paths(model, dynamic)
        report = _compile_segments(loaded, settings, example, tolerance, repeats, keep_if_slower, dynamic, backend, freezes(loaded, freezing, backend))
        if report.compiled:
            loaded.compiled = report
        else:
            _trace_batch_paths(model, False)
        return report
    eager = model.forward
    reference = _output(eager(**example))
    dtype = reference.dtype
    if tolerance is None:
        tolerance = agreement_tolerance(dtype)
    reference = reference.float()
    frozen = freezes(loaded, freezing, backend)
    _trace_batch_paths(model, dynamic)
    report = _compile_checked(model, eager, example, reference, dtype, tolerance, frozen, repeats, keep_if_slower, dynamic, backend)
    if report.compiled:
        loaded.compiled = report
    else:
        _trace_batch_paths(model, False)
    return report


def _compile_checked(model, eager, example, reference, dtype, tolerance, frozen, repeats, keep_if_slower, dynamic, backend) -> CompileReport:
    """The compile, agreement check, timing and installation of :func:`compile_model`."""
    try:
        compiled = torch.compile(eager, dynamic=dynamic, backend=backend)
        t0 = time.perf_counter()
        with _inductor_freezing(frozen):
            out = _output(compiled(**example)).float()
        compile_s = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - no compiler here, unsupported op, ...
        return CompileReport(False, reason=exception_line(exc))
    scale = float(reference.abs().max().clamp_min(1e-6))
    diff = float((out - reference).abs().max())
    report = CompileReport(False, frozen, compile_s, max_abs_diff=diff)
    off = disagreement(out, reference, dtype)
    if off > tolerance:
        measure = "relative RMS" if _is_16bit(dtype) else "of the output's scale"
        report.reason = f"compiled output differs from eager by {off:.3g} {measure} (allowed {tolerance:.3g}; largest difference {diff:.3g}, scale {scale:.3g})"
        return report
    installed = _CompiledForward(compiled, eager, frozen)
    report.eager_seconds, report.compiled_seconds, ratio = interleaved_times(lambda: eager(**example), lambda: installed(**example), repeats)
    report.ratio = ratio
    if ratio <= 1.0 and not keep_if_slower:
        report.reason = f"not faster than eager on the example batch (median of {repeats} interleaved rounds: {ratio:.2f}x)"
        return report
    model.forward = installed
    report.compiled = True
    return report


def _segment_fn(blocks, span: tuple[int, int]):
    """The eager function of one segment, with a code object of its own: Dynamo keeps compiled
    graphs per code object, scans them at every call and stops compiling past
    ``recompile_limit``, so segments sharing one code object (every span of every model) would
    share one growing cache."""
    from slimformer.methods.dynamic.runtime import run_blocks

    def segment(hidden, mask, cu_seq_lens=None):
        return run_blocks(blocks, hidden, mask, cu_seq_lens)

    segment.__code__ = segment.__code__.replace(co_name=f"blocks_{span[0]}_to_{span[1] - 1}")
    return segment


def _segment_inputs(loaded, settings, eager_segments: dict, example: dict) -> dict:
    """``span -> (arguments, output)``: what each segment got (hidden, mask and, for packed
    rows, ``cu_seq_lens``) and gave in an eager pass over the example (its first bucket). Each
    compiled segment is checked against eager on exactly that input: end to end, a rounding
    difference can flip a discrete choice (a pruned token, an exit) and move one output far
    without any fault in the compiled graph."""
    recorded: dict = {}

    def recorder(span, eager):
        def record(*args):
            out = eager(*args)
            recorded.setdefault(span, (args, out))
            return out

        return record

    settings.compiled = {span: recorder(span, fn) for span, fn in eager_segments.items()}
    try:
        loaded.embed(example)
    finally:
        settings.compiled = {}
    return recorded


def _compile_segments(loaded, settings, example, tolerance, repeats, keep_if_slower, dynamic, backend, frozen) -> CompileReport:
    """:func:`compile_model` for a model with dynamic settings (exits, token reduction), which
    runs its blocks through the dynamic runtime, not through ``model.forward``: each run of blocks
    between two reduction or exit points (``block_segments``) becomes one compiled graph, the
    reducers, exit heads and rules between them stay eager. Each segment is checked against eager
    on the inputs an eager pass over the example gives it; the whole embedding is timed both ways
    on the example, and the segments are installed in ``settings.compiled`` if all agree and the
    compiled pass is faster."""
    from slimformer.methods.dynamic.runtime import block_segments

    blocks = loaded.adapter.blocks()
    spans = block_segments(settings, len(blocks))
    allow_graphs(16)  # per segment (each has its own code object): its bucket shapes
    eager_segments = {span: _segment_fn(blocks[span[0]:span[1]], span) for span in spans}
    recorded = _segment_inputs(loaded, settings, eager_segments, example)
    installed, off, worst, diff, dtype = {}, 0.0, None, 0.0, None
    t0 = time.perf_counter()
    try:
        for span, eager in eager_segments.items():
            installed[span] = _CompiledForward(torch.compile(eager, dynamic=dynamic, backend=backend), eager, frozen)
            if span not in recorded:  # every row exited before it on the example
                continue
            args, reference = recorded[span]
            with _inductor_freezing(frozen):
                out = installed[span].compiled(*args).float()
            dtype = reference.dtype
            span_off = disagreement(out, reference.float(), dtype)
            diff = max(diff, float((out - reference.float()).abs().max()))
            if span_off >= off:
                off, worst = span_off, span
    except Exception as exc:  # noqa: BLE001 - no compiler here, unsupported op, ...
        return CompileReport(False, reason=exception_line(exc))
    compile_s = time.perf_counter() - t0
    report = CompileReport(False, frozen, compile_s, max_abs_diff=diff)
    if tolerance is None:
        tolerance = agreement_tolerance(dtype or torch.float32)
    if off > tolerance:
        measure = "relative RMS" if _is_16bit(dtype) else "of the output's scale"
        report.reason = f"compiled blocks {worst[0]}..{worst[1] - 1} differ from eager by {off:.3g} {measure} (allowed {tolerance:.3g}; largest difference {diff:.3g})"
        return report

    def run(segments):
        settings.compiled = segments
        return loaded.embed(example)

    report.eager_seconds, report.compiled_seconds, report.ratio = interleaved_times(lambda: run({}), lambda: run(installed), repeats)
    settings.compiled = {}
    if report.ratio <= 1.0 and not keep_if_slower:
        report.reason = f"not faster than eager on the example batch (median of {repeats} interleaved rounds: {report.ratio:.2f}x)"
        return report
    settings.compiled = installed
    report.compiled = True
    return report


def freezes(loaded, freezing: bool | None, backend: str) -> bool:
    """Whether :func:`compile_model` freezes the weights: only with Inductor; ``None`` = only
    for a model planned with ``memory: fast`` (the packed copies are held beside the weights)."""
    if backend != "inductor":
        return False
    if freezing is None:
        plan = getattr(loaded, "execution", None)
        return plan is not None and plan.settings.memory == "fast"
    return bool(freezing)


def agreement_tolerance(dtype: torch.dtype) -> float:
    """Largest compiled-vs-eager difference, relative to the output, that is rounding and not a
    fault. float32 outputs: 1e-3 of the output's largest magnitude, element by element.
    16-bit outputs: 2^-5 of the output's norm (relative root-mean-square difference), because
    fused kernels round at other points than eager's and in bfloat16 (8 significant bits) that
    alone moves outputs as much as the cast itself did. Measured with Inductor and frozen weights:
    a tiny random BERT in bf16 differs from eager by 0.79% RMS (eager from float32: 0.70%,
    compiled from float32: 0.51%); MiniLM by 0.8% of its scale at the largest element."""
    return 2.0**-5 if _is_16bit(dtype) else 1e-3


def _is_16bit(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def disagreement(out: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> float:
    """How far ``out`` is from ``reference`` in the measure :func:`agreement_tolerance` bounds
    for outputs of ``dtype``: relative RMS for 16-bit, max abs / max magnitude for float32."""
    if _is_16bit(dtype):
        return float((out - reference).norm() / reference.norm().clamp_min(1e-12))
    return float((out - reference).abs().max() / reference.abs().max().clamp_min(1e-6))


def _trace_batch_paths(model, on: bool) -> None:
    """Planned layers take their batch path inside a dynamic-shape graph (no guard on the row
    count, see ``PlannedForward.__call__``)."""
    from slimformer.runtime.execution import planned_forward_of

    for module in model.modules():
        planned = planned_forward_of(module)
        if planned is not None:
            planned.batch_when_traced = on


def compile_fallbacks(loaded) -> list[str]:
    """Why the compiled forward (or a compiled segment) installed by :func:`compile_model` has
    fallen back to eager since (a compiler error on a shape met after the example): one line
    each, empty while everything still runs compiled. A timing labelled "compiled" should be
    checked against this after it is taken."""
    forward = loaded.model.__dict__.get("forward")
    settings = getattr(loaded, "dynamic", None)
    installed = [forward] + list(settings.compiled.values() if settings is not None else [])
    return [f.failed for f in installed if isinstance(f, _CompiledForward) and f.failed is not None]


def uncompile_model(loaded) -> None:
    """Back to the eager forward."""
    _trace_batch_paths(loaded.model, False)
    loaded.model.__dict__.pop("forward", None)
    settings = getattr(loaded, "dynamic", None)
    if settings is not None:
        settings.compiled = {}
    if hasattr(loaded, "compiled"):
        loaded.compiled = None
