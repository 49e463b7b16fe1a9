"""Exit heads fitted by cross-validated ridge regression (``early-exit`` with ``fit: ridge``)."""

import pytest
import torch
import torch.nn.functional as F

from slimformer.errors import ConfigError
from slimformer.methods import EarlyExitConfig
from slimformer.methods.dynamic.early_exit import fit_exit_ridge


def _apply(weight, bias, x):
    return x @ weight.T + bias


def test_an_exact_linear_relation_is_recovered():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    m, c = torch.randn(16, 8, generator=g), torch.randn(8, generator=g)
    weight, bias, alpha = fit_exit_ridge(x, x @ m + c)
    fresh = torch.randn(100, 16, generator=g)
    cos = F.cosine_similarity(_apply(weight, bias, fresh), fresh @ m + c, dim=-1)
    assert weight.shape == (8, 16) and bias.shape == (8,)
    # the fit is onto the normalised target, which no linear map reproduces exactly
    assert float(cos.mean()) > 0.99 and alpha <= 0.01  # no noise: cross-validation picks little shrinkage


def test_cross_validated_shrinkage_generalises_better_than_a_near_exact_fit():
    """As many rows as features, a target that depends on a few of them plus noise: the nearly
    unregularised fit memorises the training rows (the peak of double descent), the
    cross-validated one does far better on new rows."""
    g = torch.Generator().manual_seed(1)
    d, n = 64, 64
    m = torch.zeros(d, 8)
    m[:4] = torch.randn(4, 8, generator=g)

    def sample(rows):
        x = torch.randn(rows, d, generator=g)
        return x, x @ m + torch.randn(rows, 8, generator=g)

    x, y = sample(n)
    xt, yt = sample(400)
    w_cv, b_cv, alpha = fit_exit_ridge(x, y)
    w_0, b_0, _ = fit_exit_ridge(x, y, alphas=(1e-6,))
    train_0 = float(F.cosine_similarity(_apply(w_0, b_0, x), y, dim=-1).mean())
    held_cv = float(F.cosine_similarity(_apply(w_cv, b_cv, xt), yt, dim=-1).mean())
    held_0 = float(F.cosine_similarity(_apply(w_0, b_0, xt), yt, dim=-1).mean())
    assert train_0 > 0.99  # memorised
    assert alpha >= 0.1 and held_cv > held_0 + 0.2


def test_an_unknown_fit_names_the_fix():
    with pytest.raises(ConfigError) as err:
        EarlyExitConfig(fit="sgd")
    assert "fit: ridge" in err.value.fix
