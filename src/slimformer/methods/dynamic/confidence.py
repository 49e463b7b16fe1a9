"""Learned exit confidence: each exit learns to predict its own cosine to the final embedding,
and a per-exit isotonic map calibrates the prediction into an expected cosine.

The calibration text is split by row: exits and confidence heads are fitted on two thirds of it,
and the isotonic map (``scipy.optimize.isotonic_regression``) on the held-back third, whose exit
outputs neither has seen; so a threshold ``t`` of the ``predicted`` rule means "the inputs that
stop here have an expected cosine of ``t``", on any text whose exits behave as on calibration text.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import isotonic_regression

from slimformer.methods.dynamic.runtime import DynamicEncoder, DynamicSettings, ExitHeads


def held_back_rows(n: int) -> torch.Tensor:
    """Bool (n,): rows kept back from fitting heads, for calibrating their confidence (every third)."""
    return torch.arange(n) % 3 == 2


@torch.no_grad()
def pooled_states(loaded, batches: list[dict], reducers: bool = True) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Final embeddings (N, dim), pooled states after every block (list of (N, dim)) and real
    token counts (N,) of all calibration rows, exits off (token reducers on if ``reducers``)."""
    runner = DynamicEncoder(loaded)
    if not reducers:
        runner.settings = DynamicSettings()
    else:
        runner.settings = DynamicSettings(reducers=runner.settings.reducers, proportional_attention=runner.settings.proportional_attention)
    finals, layers, tokens = [], [], []
    for batch in batches:
        final, per_layer = runner.embed(batch, collect_layers=True)
        finals.append(final)
        layers.append(per_layer)
        tokens.append(batch["attention_mask"].sum(1).float())
    per_layer = [torch.cat([p[i] for p in layers]) for i in range(len(layers[0]))]
    return torch.cat(finals), per_layer, torch.cat(tokens)


def exit_features(heads: ExitHeads, final: torch.Tensor, per_layer: list[torch.Tensor], tokens: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per exit layer: confidence features (N, dim + 3) and the true cosine (N,) of the exit's
    output to the final embedding; "previous" is the preceding exit, as at run time."""
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    previous = None
    with torch.no_grad():
        for layer in heads.layers:
            emb = heads(layer, per_layer[layer]).float()
            out[layer] = (heads.confidence_features(emb, previous, tokens), F.cosine_similarity(emb, final, dim=-1))
            previous = emb
    return out


def _knots(raw: torch.Tensor, target: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Monotone map raw score -> expected target as ``k`` knots (strictly increasing x)."""
    order = torch.argsort(raw)
    xs = raw[order].double().numpy()
    fitted = isotonic_regression(target[order].double().numpy(), increasing=True).x
    qs = np.quantile(xs, np.linspace(0.0, 1.0, k))
    ys = np.interp(qs, xs, fitted)
    qs = qs + np.arange(k) * 1e-6  # strictly increasing even where quantiles tie
    return torch.tensor(qs, dtype=torch.float32), torch.tensor(np.maximum.accumulate(ys), dtype=torch.float32)


def fit_confidence(loaded, heads: ExitHeads, batches: list[dict], steps: int = 300, lr: float = 0.01, seed: int = 0) -> dict:
    """Fit every exit's confidence head (regression of the true cosine, on the rows not held
    back) and its isotonic calibration (on the held-back rows). Returns per exit the mean true
    and mean predicted cosine on the held-back rows and their mean absolute error."""
    final, per_layer, tokens = pooled_states(loaded, batches)
    data = exit_features(heads, final, per_layer, tokens)
    held = held_back_rows(final.shape[0])
    if held.sum() < 4 or (~held).sum() < 4:  # too little text to hold any back: use it all for both
        held = torch.ones_like(held)
        fit = held
    else:
        fit = ~held
    summary: dict[int, dict] = {}
    torch.manual_seed(seed)
    for i, layer in enumerate(heads.layers):
        x, y = data[layer]
        head = heads.confidence[str(layer)]
        head.float()
        with torch.enable_grad():
            head.requires_grad_(True)
            opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-4)
            for _ in range(steps):
                loss = F.mse_loss(head(x[fit]).squeeze(-1), y[fit])
                opt.zero_grad()
                loss.backward()
                opt.step()
            head.requires_grad_(False)
        with torch.no_grad():
            raw = heads.raw_confidence(layer, x)
            kx, ky = _knots(raw[held], y[held], heads.calib_x.shape[1])
            heads.calib_x[i] = kx
            heads.calib_y[i] = ky
            pred = heads.calibrate(layer, raw[held])
            summary[layer] = {"true_cos": float(y[held].mean()), "predicted_cos": float(pred.mean()), "abs_error": float((pred - y[held]).abs().mean())}
    return summary
