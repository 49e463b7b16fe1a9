"""Scale tuning: the continuous parameters of a quantized model trained end to end, codes fixed.

PV-Tuning (Malinovskii et al., 2024) alternates two steps after a one-shot quantizer: a *P step*
that trains the model's continuous parameters (for a uniform grid: the group scales, and the
normalization weights) by backpropagation of a distillation loss against the original model,
the discrete codes held fixed, and a *V step* that moves codes. This is the P step (EfficientQAT
calls the same step E2E-QP): every packed uniform-grid linear layer with float activations
(``QuantizedLinear`` as GPTQ, QuantEase, RTN, mixed precision and the search's level databases
write it, HQQ's with its real zero points, AWQ's with its input scaling) gets a trainable gain per
group scale, ``scale = scale0 * exp(g)`` (g = 0 at the start: the one-shot solution; the gain
makes the step size relative to each scale; the forward pass uses the scales rounded to the
bfloat16 they are stored in, the rounding passed straight through to the gains), and with ``norms`` the weights of the RMS/layer
norms train too. The loss is the KL divergence of the next-token distributions to the original
model's (``kl``; encoders: ``mse+cos`` of the final hidden states and pooled embeddings), on
calibration text drawn for this step (``n_samples`` documents, ``batch_size``), with AdamW and a
cosine-decayed ``lr`` (:func:`slimformer.methods.distill.distill`: checkpoints, resume, the
measured faster attention for training). Nothing but continuous values changes: the codes and
zero points stay bit for bit, the scales are written back in the format's bfloat16, so the
stored bytes are the same. The calibration loss is reported before, after training, and after
the scales are rounded to bfloat16 (what is stored); where tuning did not lower it (a learning
rate too large for the model, say) the one-shot scales and norms are put back and the record
says so (``kept``).

The step needs the model as it was before the recipe (the teacher): ``compress`` keeps a copy
when a step sets ``requires_teacher`` (the float model's bytes once more, for the whole job), or
a caller sets ``ctx.teacher``. Training holds a float32 copy of the centred codes of every tuned
layer (4 bytes per weight) besides the packed ones; memory grows with the model, not a block.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import MethodConfig, register_method
from slimformer.methods.calibration import CompressionContext
from slimformer.methods.distill import AUTOCAST_DTYPES, _outputs, calibration_loss, distill
from slimformer.methods.quantization import grid
from slimformer.methods.quantization.awq import AWQLinear
from slimformer.methods.quantization.hqq import HQQLinear
from slimformer.methods.quantization.modules import QuantizedLinear
from slimformer.models.adapters import set_submodule


@dataclass
class ScaleTuningConfig(MethodConfig):
    """``steps`` of AdamW at ``lr`` (cosine to 0) on ``n_samples`` calibration documents of at
    most ``max_length`` tokens in batches of ``batch_size`` (each None: the recipe's calibration
    setting; more documents than a one-shot quantizer needs keep the training from fitting them);
    ``norms``: train the normalization weights as well as the scales; ``autocast``: the
    training passes' matrix products (``bfloat16`` or ``float32``; losses are reported in
    float32); ``seed``: the batch order; ``checkpoint``: a file the training state is saved to
    every ``checkpoint_every`` steps (a rerun with the same file resumes)."""

    name = "scale-tuning"
    family = "quantization"
    paper = "PV-Tuning: Beyond Straight-Through Estimation for Extreme LLM Compression (Malinovskii et al., 2024), its P step"
    summary = "train the group scales (and norms) of a quantized model by KL to the original, codes fixed: the same bytes"
    requires_calibration = True
    requires_teacher = True

    steps: int = 100
    lr: float = 1e-3
    norms: bool = True
    n_samples: int | None = None
    max_length: int | None = None
    batch_size: int | None = None
    autocast: str = "bfloat16"
    seed: int = 0
    checkpoint: str | None = None
    checkpoint_every: int = 25

    def __post_init__(self) -> None:
        if not is_int_at_least(self.steps, 1):
            raise ConfigError(f"scale-tuning: steps={self.steps!r} must be a positive integer", "use e.g. steps: 100")
        if not (isinstance(self.lr, float) and 0 < self.lr < 1):
            raise ConfigError(f"scale-tuning: lr={self.lr!r} must be in (0, 1)", "use e.g. lr: 1.0e-3 (a relative change of the scales per step)")
        if not isinstance(self.norms, bool):
            raise ConfigError(f"scale-tuning: norms={self.norms!r} must be true or false", "write norms: true or norms: false")
        for key in ("n_samples", "max_length", "batch_size"):
            value = getattr(self, key)
            if value is not None and not is_int_at_least(value, 1):
                raise ConfigError(f"scale-tuning: {key}={value!r} must be a positive integer or null", f"use e.g. {key}: 8, or leave it out for the recipe's")
        if self.autocast not in AUTOCAST_DTYPES:
            raise ConfigError(f"scale-tuning: autocast={self.autocast!r} is not one of {list(AUTOCAST_DTYPES)}", "use autocast: bfloat16 or float32")
        if not is_int_at_least(self.checkpoint_every, 1):
            raise ConfigError(f"scale-tuning: checkpoint_every={self.checkpoint_every!r} must be a positive integer", "use e.g. checkpoint_every: 25")

    def calibration_context(self, ctx: CompressionContext) -> CompressionContext:
        """The context whose batches this step trains on: ``ctx``'s calibration with this step's
        ``n_samples``/``max_length``/``batch_size`` where set, and ``ctx``'s position limit."""
        overrides = {k: getattr(self, k) for k in ("n_samples", "max_length", "batch_size") if getattr(self, k) is not None}
        drawn = CompressionContext(dataclasses.replace(ctx.calibration, **overrides))
        drawn.max_positions = ctx.max_positions
        return drawn


TUNABLE_TYPES = (QuantizedLinear, HQQLinear, AWQLinear)


class ScaleTunedLinear(nn.Module):
    """Training stand-in for a packed uniform-grid linear layer (:data:`TUNABLE_TYPES`): ``W =
    (codes - zero) * scale0 * exp(gain)``, per group, with ``gain`` (out, groups) trainable and
    the centred codes ``(out, groups, group_size)`` float32 fixed (HQQ's fixed-point zero points
    read as the values they stand for); an AWQ layer's input is multiplied by its ``1/s`` first,
    as its kernels do; ``x`` (..., in) -> (..., out)."""

    def __init__(self, packed: QuantizedLinear) -> None:
        super().__init__()
        rows, cols = packed.weight_shape
        self.group = grid.effective_group_size(cols, packed.group_size)
        zero = packed.zero_points()  # (rows, groups)
        codes = packed.codes().float().view(rows, -1, self.group)
        self.register_buffer("centred", codes - zero.unsqueeze(-1))
        self.register_buffer("scale0", packed.scales.float())
        self.stored_dtype = packed.scales.dtype
        self.gain = nn.Parameter(torch.zeros_like(self.scale0))
        self.bias = packed.bias if getattr(packed, "bias", None) is not None else None
        self.register_buffer("inv_input_scale", 1.0 / packed.input_scale.float() if isinstance(packed, AWQLinear) else None)
        self.shape = (rows, cols)

    def scales(self) -> torch.Tensor:
        """The tuned scales (out, groups), float32."""
        return self.scale0 * self.gain.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = self.scales()
        # the forward sees the scales as they will be stored (bfloat16); the gradient passes the
        # rounding straight through to the float32 gains, which keep the small steps
        scales = scales + (scales.to(self.stored_dtype).float() - scales).detach()
        weight = (self.centred * scales.unsqueeze(-1)).view(self.shape)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self.inv_input_scale is not None:
            x = x * self.inv_input_scale.to(x.dtype)
        return F.linear(x, weight.to(x.dtype), bias)


def tunable_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """The packed uniform-grid linear layers by qualified name: exactly the types of
    :data:`TUNABLE_TYPES` (GPTQ's, QuantEase's, RTN's, mixed precision's, HQQ's, AWQ's; other
    subclasses compute something else) with float activations (a W8A8 layer's activation
    rounding depends on the execution path the planner takes, so it is left alone)."""
    return {name: m for name, m in model.named_modules() if type(m) in TUNABLE_TYPES and m.act_bits is None}


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights (and biases) of the model's normalization layers (RMSNorm, LayerNorm)."""
    return [p for m in model.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False) if p.is_floating_point()]


@contextmanager
def trainable_scales(model: nn.Module):
    """Swap every packed layer of :func:`tunable_layers` for a :class:`ScaleTunedLinear`; yields
    ``{name: stand-in}``. On a normal exit the tuned scales are rounded to the packed format's
    bfloat16, written into the packed layers (their run-time tensors rebuilt) and the packed
    layers put back; on an error the packed layers go back unchanged."""
    packed = tunable_layers(model)
    stand_ins = {name: ScaleTunedLinear(m) for name, m in packed.items()}
    for name, s in stand_ins.items():
        set_submodule(model, name, s)
    try:
        yield stand_ins
    except BaseException:
        for name, m in packed.items():
            set_submodule(model, name, m)
        raise
    with torch.no_grad():
        for name, m in packed.items():
            m.scales.copy_(stand_ins[name].scales().to(m.scales.dtype))
            m.prepare()
            set_submodule(model, name, m)


@register_method(ScaleTuningConfig)
def apply_scale_tuning(loaded, config: ScaleTuningConfig, ctx) -> dict:
    teacher = getattr(ctx, "teacher", None)
    if teacher is None:
        raise ConfigError("scale-tuning: no original model to learn from", "apply it through a recipe (compress keeps the original) or set ctx.teacher")
    model = loaded.model
    if not tunable_layers(model):
        raise ConfigError("scale-tuning: the model has no packed uniform-grid linear layers with float activations",
                          "put it after a gptq, quantease, rtn, hqq, awq or mixed-precision step in the recipe")
    drawn = config.calibration_context(ctx)
    batches = drawn.batches_in_draw_order(loaded.tokenizer)
    causal = loaded.kind == "causal-lm"
    loss = "kl" if causal else "mse+cos"
    norms = norm_parameters(model) if config.norms else []
    one_shot_scales = {name: m.scales.clone() for name, m in tunable_layers(model).items()}
    one_shot_norms = [p.detach().clone() for p in norms]
    with trainable_scales(model) as stand_ins:
        gains = [s.gain for s in stand_ins.values()]
        record = distill(model, teacher, batches, causal=causal, steps=config.steps, lr=config.lr, loss=loss, seed=config.seed,
                         checkpoint=config.checkpoint, checkpoint_every=config.checkpoint_every,
                         fingerprint={"method": config.to_dict(), "layers": sorted(stand_ins)}, progress=ctx.progress,
                         autocast=config.autocast, train_embeddings=False, parameters=gains + norms)
        moved = torch.cat([g.detach().flatten() for g in gains]).abs()
    record["loss_stored"] = _stored_loss(model, teacher, batches, causal, loss)
    record["kept"] = "tuned"
    if not record["loss_stored"] < record["loss_before"]:  # e.g. a step size too large for the model: keep the one-shot model
        with torch.no_grad():
            for name, m in tunable_layers(model).items():
                m.scales.copy_(one_shot_scales[name])
                m.prepare()
            for p, before in zip(norms, one_shot_norms):
                p.copy_(before)
        record["kept"] = "one-shot (tuning did not lower the calibration loss)"
    record.update(layers=len(stand_ins), scales=int(moved.numel()), norm_parameters=sum(p.numel() for p in norms),
                  median_abs_scale_change=float(moved.median().expm1()), max_abs_scale_change=float(moved.max().expm1()),
                  calibration_documents=len(drawn.texts()))
    return {"scale_tuning": record}


def _stored_loss(model, teacher, batches, causal: bool, loss: str) -> float:
    """The calibration loss of the model as stored (scales in bfloat16), float32."""
    def target_of(b):
        return lambda: _outputs(teacher, b, causal).detach()
    with torch.no_grad():
        return calibration_loss(model, [target_of(b) for b in batches], batches, causal, loss)


__all__ = ["ScaleTuningConfig", "ScaleTunedLinear", "apply_scale_tuning", "tunable_layers", "trainable_scales", "norm_parameters"]
