"""Token merging (ToMe) and token pruning ([CLS] / mean attention) between encoder blocks.

Bolya et al., 2023, "Token Merging: Your ViT But Faster": after a block, split the tokens into
two alternating sets A and B, match every A token to its most similar B token (cosine of the
hidden states), and merge the ``r`` most similar pairs by a size-weighted average; attention in
later blocks adds ``log(size)`` to the logits of merged tokens (proportional attention), and
pooling weighs tokens by size, so a merged token keeps the weight of the tokens it replaced.

Token pruning keeps the tokens the next block's attention marks most important: the attention
of the [CLS] query (VTC-CLS, "[CLS] Attention is All You Need for Training-Free Visual Token
Compression") or the mean attention over all queries, and drops the rest; the per-layer
schedule is constant or staged (PyramidDrop).

With ``fuse``, pruning does not discard what it drops (EViT, Liang et al., 2022, "Not All Patches
are What You Need"): a row's dropped tokens are fused into one extra token, their average
weighted by size, whose size is their total, so later blocks still see them, proportional
attention gives the fused token their combined weight, and mean pooling counts their mass.

Special tokens are never merged or pruned. ToMe merges r real tokens of every row whatever its
padding (a text's output does not depend on its batch-mates); constant-ratio pruning keeps a
share of the batch's padded width, so there padding (size 0) goes first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG = float("-inf")


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (rows, tokens, ...) gathered at index (rows, k) -> (rows, k, ...)."""
    if x.dim() == 2:
        return x.gather(1, index)
    # whole token vectors: one index_select over the flattened rows (a gather with an index
    # expanded along the feature dimension reads that index once per feature, ~10x slower)
    rows, tokens, dim = x.shape
    flat = (index + torch.arange(rows, device=index.device)[:, None] * tokens).reshape(-1)
    return x.reshape(rows * tokens, dim).index_select(0, flat).view(rows, index.shape[1], dim)


def bipartite_merge(hidden: torch.Tensor, sizes: torch.Tensor, protect: torch.Tensor, r: int):
    """Merge ``r`` real tokens per row by bipartite soft matching.

    hidden (rows, T, dim), sizes (rows, T) float (0 = padding), protect (rows, T) bool ->
    the same with T - k tokens. Every row merges its ``r`` best-matched real tokens (fewer only
    if it has fewer unprotected real tokens in its A set), whatever padding it has, so a text's
    output does not depend on the batch it runs in; the k - r further slots a row gives up are
    its padding (k = the smallest r + padding count of any row's A set, so no row loses a real
    token beyond its r).
    """
    rows, T, dim = hidden.shape
    a, b = torch.arange(0, T, 2), torch.arange(1, T, 2)
    if not rows or r <= 0 or not len(b):
        return hidden, sizes, protect
    xa, xb = hidden[:, a], hidden[:, b]
    sa, sb = sizes[:, a], sizes[:, b]
    pa, pb = protect[:, a], protect[:, b]
    scores = F.normalize(xa.float(), dim=-1) @ F.normalize(xb.float(), dim=-1).transpose(1, 2)  # (rows, Ta, Tb)
    scores = scores.masked_fill(((sb == 0) | pb)[:, None, :], NEG)
    best, best_dst = scores.max(-1)  # (rows, Ta)
    mergeable = (sa > 0) & ~pa & torch.isfinite(best)  # real, unprotected, with a real B partner
    padding = (sa == 0) & ~pa
    k = int((mergeable.sum(1).clamp(max=r) + padding.sum(1)).min())
    if k <= 0:
        return hidden, sizes, protect
    # Mergeable real tokens (cosine in [-1, 1], lifted to [2, 4]) rank before padding (0); the rest last.
    rank = torch.where(mergeable, best.float() + 3.0, torch.where(padding, 0.0, NEG))
    order = rank.argsort(dim=-1, descending=True, stable=True)
    src, keep = order[:, :k], order[:, k:]
    dst = best_dst.gather(1, src)
    src_size = sa.gather(1, src)
    weighted = (xb.float() * sb.unsqueeze(-1)).scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, dim), _gather_tokens(xa, src).float() * src_size.unsqueeze(-1))
    sb_new = sb.scatter_add(1, dst, src_size)
    xb_new = torch.where(sb_new.unsqueeze(-1) > 0, weighted / sb_new.clamp(min=1e-9).unsqueeze(-1), xb.float()).to(hidden.dtype)
    hidden = torch.cat([_gather_tokens(xa, keep), xb_new], 1)
    sizes = torch.cat([sa.gather(1, keep), sb_new], 1)
    protect = torch.cat([pa.gather(1, keep), pb], 1)
    # Padding to the end (real tokens keep their order), so the next split into A and B sets
    # sees the same real sequence as the row would alone.
    last = (sizes == 0).to(torch.int8).argsort(dim=1, stable=True)
    return _gather_tokens(hidden, last), sizes.gather(1, last), protect.gather(1, last)


class TokenMerger:
    """Reducer merging ``r`` tokens per row after a block (ToMe)."""

    def __init__(self, r: int) -> None:
        self.r = r

    def reduce(self, runner, layer: int, hidden, sizes, protect):
        return bipartite_merge(hidden, sizes, protect, self.r)


def attention_importance(runner, layer: int, hidden: torch.Tensor, sizes: torch.Tensor, score: str) -> torch.Tensor:
    """Importance (rows, T) of each token to the attention of the block after ``layer``:
    the [CLS] query's attention (``score="cls"``) or the mean over real queries (``"mean"``)."""
    blocks = runner.adapter.blocks()
    nxt = blocks[min(layer + 1, len(blocks) - 1)]
    attn = getattr(nxt, runner.adapter.spec.attention)
    q_proj, k_proj = runner.adapter.query_key(attn)
    rows, T, dim = hidden.shape
    n_heads = runner.model.config.num_attention_heads
    hd = dim // n_heads
    heads = getattr(k_proj, "out_features", n_heads * hd) // hd  # fewer than the config says after width slimming
    bias = torch.where(sizes > 0, sizes.clamp(min=1e-9).log(), torch.full_like(sizes, NEG))  # (rows, T)
    if score == "cls" and type(k_proj) is torch.nn.Linear and k_proj.weight.is_floating_point():
        # one query per row: its logits against every key, q_h . (W_h x_t + b_h), are x_t . (W_h^T q_h)
        # plus q_h . b_h, the same for every token of the row and head, which the softmax over
        # tokens cancels; so the keys are never projected: (rows, heads, dim) vectors instead of a
        # (rows * T, dim) x (dim, dim) GEMM
        q = q_proj(hidden[:, 0].contiguous()).float().view(rows, heads, hd)
        folded = torch.einsum("rhd,hdc->rhc", q, k_proj.weight.float().view(heads, hd, dim))  # (rows, heads, dim)
        # in the hidden states' dtype (bf16 models: a bf16 product, as projecting the keys was)
        logits = torch.bmm(folded.to(hidden.dtype), hidden.transpose(1, 2)).float() / hd**0.5 + bias[:, None, :]  # (rows, heads, T)
        return logits.softmax(-1).mean(1)
    k = k_proj(hidden).view(rows, T, heads, hd)  # in the model's dtype: one GEMM
    if score == "cls":
        # one query per row: a broadcast product, not a batched matmul of transposed copies
        q = q_proj(hidden[:, 0].contiguous()).float().view(rows, 1, heads, hd)
        logits = (k.float() * q).sum(-1) / hd**0.5 + bias[:, :, None]  # (rows, T, heads)
        return logits.softmax(1).mean(-1)
    k = k.float().transpose(1, 2)  # (rows, heads, T, hd)
    q = q_proj(hidden).float().view(rows, T, heads, hd).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / hd**0.5 + bias[:, None, None, :]
    probs = logits.softmax(-1)  # (rows, heads, Q, T)
    qmask = (sizes > 0).float()[:, None, :, None]
    return (probs * qmask).sum((1, 2)) / qmask.sum((1, 2)).clamp(min=1)


class TokenPruner:
    """Reducer keeping ``keep_ratio`` of each row's tokens, by attention importance.

    ``schedule="constant"``: every row keeps ``keep_ratio`` of the batch's (padded) width.
    ``schedule="length"`` (length-aware): a row of ``n`` real tokens loses
    ``round((1 - keep_ratio) * max(0, n - min_tokens))`` of them, so texts of up to
    ``min_tokens`` tokens are untouched and the longer a text, the larger the share removed; the
    rows of a batch then keep different counts (the dropped slots become padding, size 0).
    ``fuse``: the dropped real tokens of each row become one token appended after the kept ones
    (their size-weighted mean, size = their total; size 0 where a row dropped nothing), so the
    total size of a row, and its mean-pooled state at this point, are unchanged."""

    def __init__(self, keep_ratio: float, score: str, schedule: str = "constant", min_tokens: int = 0, fuse: bool = False) -> None:
        self.keep_ratio = keep_ratio
        self.score = score
        self.schedule = schedule
        self.min_tokens = min_tokens
        self.fuse = fuse

    def reduce(self, runner, layer: int, hidden, sizes, protect):
        rows, T, _ = hidden.shape
        if self.schedule == "length":
            return self._reduce_by_length(runner, layer, hidden, sizes, protect)
        keep_n = max(int(protect.sum(1).max()) + 1, int(round(T * self.keep_ratio)))
        if keep_n >= T:
            return hidden, sizes, protect
        importance = attention_importance(runner, layer, hidden, sizes, self.score)
        importance = importance.masked_fill(sizes == 0, NEG).masked_fill(protect, float("inf"))
        keep = importance.topk(keep_n, dim=1).indices.sort(dim=1).values
        kept = (_gather_tokens(hidden, keep), sizes.gather(1, keep), protect.gather(1, keep))
        return self._fused(hidden, sizes, keep, None, kept) if self.fuse else kept

    def _reduce_by_length(self, runner, layer: int, hidden, sizes, protect):
        rows, T, _ = hidden.shape
        real = (sizes > 0).sum(1)
        removed = torch.round((1 - self.keep_ratio) * (real - self.min_tokens).clamp(min=0).float()).long()
        keep_row = torch.maximum(real - removed, protect.sum(1) + 1).clamp(max=T)  # (rows,)
        width = int(keep_row.max()) if rows else 0
        if width >= T and bool((keep_row >= real).all()):
            return hidden, sizes, protect
        importance = attention_importance(runner, layer, hidden, sizes, self.score)
        importance = importance.masked_fill(sizes == 0, NEG).masked_fill(protect, float("inf"))
        top = importance.topk(width, dim=1).indices  # (rows, width), most important first
        ok = torch.arange(width)[None, :] < keep_row[:, None]
        position = torch.where(ok, top, top + T)  # dropped slots sort after the kept ones
        order = position.argsort(dim=1)
        keep, ok = top.gather(1, order), ok.gather(1, order)
        new_sizes = sizes.gather(1, keep) * ok
        kept = (_gather_tokens(hidden, keep), new_sizes, protect.gather(1, keep) & ok)
        return self._fused(hidden, sizes, keep, ok, kept) if self.fuse else kept

    @staticmethod
    def _fused(hidden, sizes, keep, ok, kept):
        """``kept`` (hidden, sizes, protect of the kept slots) with each row's dropped real tokens
        fused into one more token. ``keep`` (rows, k) slots taken from ``hidden`` (rows, T, dim);
        ``ok`` (rows, k) which of them are really kept (None: all)."""
        taken = torch.zeros_like(sizes, dtype=torch.bool).scatter_(1, keep, True if ok is None else ok)
        weight = torch.where(taken, torch.zeros_like(sizes), sizes)  # (rows, T): dropped real tokens' sizes
        total = weight.sum(1)  # (rows,)
        fused = torch.bmm(weight[:, None, :].to(hidden.dtype), hidden).squeeze(1).float() / total.clamp(min=1e-9)[:, None]
        h, sz, pr = kept
        return (torch.cat([h, fused.to(h.dtype)[:, None]], 1), torch.cat([sz, total[:, None]], 1),
                torch.cat([pr, torch.zeros_like(pr[:, :1])], 1))
