"""The dynamic encoder runtime: runs an encoder's blocks one by one so that the work can adapt
to each input — tokens merged or pruned between blocks, and rows that have exited leaving the
batch so that later blocks run on fewer rows.

It is used whenever a model carries dynamic settings (``loaded.dynamic``); with none, it runs
exactly the ordinary forward pass. Shapes: ``input_ids``/``attention_mask`` (batch, seq);
hidden states (rows, tokens, dim); token ``sizes`` (rows, tokens) = how many original tokens a
(possibly merged) token stands for, 0 for padding; embeddings (batch, dim).

Where the model's attention keeps packed sequences apart (``loaded.packing``, the AMX tile
kernel) a batch runs *packed*: every real token in one row (1, tokens, dim), sequence boundaries
``cu_seq_lens`` (texts + 1,), ``sizes`` (tokens,). A reducer still sees padded rows
(:func:`unpack_state`) and what it keeps is packed again (:func:`pack_state`), so after a pruning
point each text goes on with exactly its own tokens, and rows that exit leave the packed row.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from slimformer.models.adapters import attention_implementation
from slimformer.models.batching import PACKED_ATTENTION, length_buckets, pack_rows, run_width, sequence_index, widen


@dataclass
class DynamicSettings:
    """What a model does at run time. ``exits``: ``ExitHeads`` module (or None) with its
    ``rule``; ``reducers``: token reducers applied after given blocks (``layer -> reducer``)."""

    exits: nn.Module | None = None
    rule: object | None = None
    reducers: dict[int, list] = field(default_factory=dict)
    proportional_attention: bool = True
    configs: list[dict] = field(default_factory=list)  # for the manifest
    # (start, end) -> fn(hidden, mask) -> hidden running blocks start..end-1, installed by
    # ``slimformer.runtime.compile.compile_model`` (compiled segments); empty: eager
    compiled: dict = field(default_factory=dict, repr=False)

    def active(self) -> bool:
        return self.exits is not None or bool(self.reducers)


@dataclass
class RunStats:
    """Per-input and per-block accounting of one dynamic forward pass."""

    layers_run: torch.Tensor  # (batch,) blocks each input ran through
    tokens_per_layer: list[float]  # mean real tokens (sizes > 0) per input entering each block
    rows_per_layer: list[int]  # rows in the batch entering each block
    flops: float  # estimated multiply-adds x2 of the blocks actually run


class ExitHeads(nn.Module):
    """One exit head per chosen block: maps that block's pooled hidden state (rows, dim) into the
    final embedding space (rows, dim). Stored as ``model.slimformer_exits`` so it is saved.

    With ``confidence``, each exit also predicts its own cosine to the final embedding: a linear
    head on ``confidence_features`` (rows, dim + 3) gives a raw score, and a monotone
    piecewise-linear map (``knots`` points per exit, buffers ``calib_x``/``calib_y`` (exits, knots),
    fitted by isotonic regression on held-back calibration rows) turns it into the expected cosine."""

    def __init__(self, layers: list[int], dim: int, confidence: bool = False, knots: int = 32) -> None:
        super().__init__()
        self.layers = list(layers)
        self.heads = nn.ModuleDict({str(l): nn.Linear(dim, dim) for l in layers})
        for head in self.heads.values():
            nn.init.eye_(head.weight)
            nn.init.zeros_(head.bias)
        self.has_confidence = confidence
        if confidence:
            self.confidence = nn.ModuleDict({str(l): nn.Linear(dim + 3, 1) for l in layers})
            for head in self.confidence.values():
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
            grid = torch.linspace(-1.0, 1.0, knots).repeat(len(layers), 1)
            self.register_buffer("calib_x", grid.clone())
            self.register_buffer("calib_y", grid.clone())

    def has(self, layer: int) -> bool:
        return str(layer) in self.heads

    def forward(self, layer: int, pooled: torch.Tensor) -> torch.Tensor:
        head = self.heads[str(layer)]
        return head(pooled.to(head.weight.dtype))

    @staticmethod
    def confidence_features(output: torch.Tensor, previous: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
        """Features (rows, dim + 3) of an exit's output (rows, dim): its direction, its cosine to
        the previous exit's output (rows, dim; 0 with a flag when there is none) and the input's
        log length (``tokens`` (rows,) real tokens)."""
        out = output.float()
        n = out.shape[0]
        if previous is None:
            agree, flag = torch.zeros(n, 1), torch.zeros(n, 1)
        else:
            agree, flag = torch.nn.functional.cosine_similarity(out, previous.float(), dim=-1).unsqueeze(-1), torch.ones(n, 1)
        length = torch.log1p(tokens.float()).unsqueeze(-1) / 5.0
        return torch.cat([torch.nn.functional.normalize(out, dim=-1), agree, flag, length], -1)

    def raw_confidence(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """Uncalibrated score (rows,) of features (rows, dim + 3)."""
        head = self.confidence[str(layer)]
        return head(features.to(head.weight.dtype)).squeeze(-1).float()

    def calibrate(self, layer: int, raw: torch.Tensor) -> torch.Tensor:
        """Expected cosine (rows,) of raw scores (rows,): the exit's monotone piecewise-linear map,
        constant beyond its end knots."""
        i = self.layers.index(layer)
        x, y = self.calib_x[i].float(), self.calib_y[i].float()
        r = raw.float().clamp(float(x[0]), float(x[-1]))
        j = torch.searchsorted(x, r.contiguous()).clamp(1, x.numel() - 1)
        x0, x1, y0, y1 = x[j - 1], x[j], y[j - 1], y[j]
        t = ((r - x0) / (x1 - x0).clamp(min=1e-12)).clamp(0, 1)
        return y0 + t * (y1 - y0)

    def predicted_cos(self, layer: int, output: torch.Tensor, previous: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
        """Expected cosine (rows,) of this exit's output (rows, dim) to the final embedding."""
        return self.calibrate(layer, self.raw_confidence(layer, self.confidence_features(output, previous, tokens)))


def pool(hidden: torch.Tensor, sizes: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool (rows, tokens, dim) with token ``sizes`` (rows, tokens) -> (rows, dim) float32."""
    if mode == "cls":
        return hidden[:, 0].float()
    w = sizes.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * w).sum(1) / w.sum(1).clamp(min=1e-9)


def special_token_mask(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Bool (batch, seq): special tokens ([CLS], [SEP], BOS/EOS) that token reduction never removes."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    pad = getattr(tokenizer, "pad_token_id", None)
    ids.discard(pad)
    if not ids:
        return torch.zeros_like(input_ids, dtype=torch.bool)
    return torch.isin(input_ids, torch.tensor(sorted(ids), dtype=input_ids.dtype))


def block_segments(settings: DynamicSettings, num_layers: int, every_block: bool = False) -> list[tuple[int, int]]:
    """The runs ``[start, end)`` of blocks with nothing between them: a segment ends after a
    block that has a token reducer or an exit head (and after every block with ``every_block``),
    so shapes only change at segment boundaries and each segment can be one compiled graph."""
    exits = settings.exits
    cuts = {i for i in settings.reducers if 0 <= i < num_layers}
    if exits is not None:
        cuts |= {i for i in range(num_layers - 1) if exits.has(i)}
    out, start = [], 0
    for i in range(num_layers):
        if every_block or i in cuts or i == num_layers - 1:
            out.append((start, i + 1))
            start = i + 1
    return out


def run_blocks(blocks, hidden: torch.Tensor, mask, cu_seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden states (rows, tokens, dim) through ``blocks`` in order with one attention ``mask``.
    With ``cu_seq_lens`` (sequences + 1,) the single row (1, tokens, dim) holds packed sequences
    (transformers' ``cu_seq_lens_q``/``cu_seq_lens_k``) and ``mask`` is None or a per-key bias."""
    packed = {} if cu_seq_lens is None else {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens}
    for block in blocks:
        output = block(hidden, attention_mask=mask, **packed)
        hidden = output[0] if isinstance(output, (tuple, list)) else output
    return hidden


def unpack_state(hidden: torch.Tensor, sizes: torch.Tensor, protect: torch.Tensor, cu_seq_lens: torch.Tensor):
    """Packed state -- hidden (1, tokens, dim), sizes (tokens,), protect (tokens,) with sequence
    boundaries ``cu_seq_lens`` -- as padded rows: hidden (rows, T, dim), sizes and protect
    (rows, T), T = the longest sequence, padding with size 0 (what the token reducers take)."""
    counts = cu_seq_lens.diff()
    rows, width, dim = len(counts), int(counts.max()) if len(counts) else 0, hidden.shape[-1]
    segment = sequence_index(cu_seq_lens, hidden.shape[1])
    flat = segment * width + torch.arange(hidden.shape[1]) - cu_seq_lens[:-1][segment]
    h = hidden.new_zeros(rows * width, dim).index_copy_(0, flat, hidden[0])
    s = sizes.new_zeros(rows * width).index_copy_(0, flat, sizes)
    p = protect.new_zeros(rows * width).index_copy_(0, flat, protect)
    return h.view(rows, width, dim), s.view(rows, width), p.view(rows, width)


def pack_state(hidden: torch.Tensor, sizes: torch.Tensor, protect: torch.Tensor):
    """Padded rows (see :func:`unpack_state`) back to the packed state: every slot of size > 0
    in row order -> (hidden (1, tokens, dim), sizes (tokens,), protect (tokens,), cu_seq_lens)."""
    real = sizes > 0
    flat = real.reshape(-1).nonzero().squeeze(1)
    cu = torch.zeros(sizes.shape[0] + 1, dtype=torch.long)
    cu[1:] = real.sum(1).cumsum(0)
    return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat)[None], sizes.reshape(-1)[flat],
            protect.reshape(-1)[flat], cu)


def pool_packed(hidden: torch.Tensor, sizes: torch.Tensor, cu_seq_lens: torch.Tensor, mode: str) -> torch.Tensor:
    """:func:`pool` of packed sequences: hidden (1, tokens, dim), sizes (tokens,) -> (rows, dim)
    float32."""
    rows = len(cu_seq_lens) - 1
    if mode == "cls":
        return hidden[0, cu_seq_lens[:-1]].float()
    w = sizes.to(torch.float32)
    segment = sequence_index(cu_seq_lens, hidden.shape[1])
    total = torch.zeros(rows, hidden.shape[-1]).index_add_(0, segment, hidden[0].float() * w[:, None])
    return total / torch.zeros(rows).index_add_(0, segment, w).clamp(min=1e-9)[:, None]


def _widen_state(hidden: torch.Tensor, sizes: torch.Tensor, protect: torch.Tensor, width: int):
    """Hidden (rows, tokens, dim), sizes and protect (rows, tokens) padded to ``width`` tokens
    with empty (size 0, masked) columns."""
    extra = width - sizes.shape[1]
    if extra <= 0:
        return hidden, sizes, protect
    rows = sizes.shape[0]
    return (torch.cat([hidden, hidden.new_zeros(rows, extra, hidden.shape[-1])], 1),
            torch.cat([sizes, sizes.new_zeros(rows, extra)], 1),
            torch.cat([protect, protect.new_zeros(rows, extra)], 1))


def _block_flops(tokens: torch.Tensor, dim: int, ffn: int) -> float:
    """Multiply-add x2 of one encoder block for rows with ``tokens`` real tokens each."""
    t = tokens.float()
    return float((2 * t * (4 * dim * dim + 2 * dim * ffn) + 2 * 2 * t * t * dim).sum())


@functools.lru_cache(maxsize=None)
def _takes_position_ids(embeddings: type) -> bool:
    """Whether an embeddings module class's forward takes ``position_ids`` (restarting per
    packed text); looked up once per class, not on every batch."""
    return "position_ids" in inspect.signature(embeddings.forward).parameters


class _Pass:
    """The per-input results and per-block accounting of one dynamic pass over ``n`` inputs:
    ``rows`` (the batch indices of the inputs still running), ``out`` (n, dim) float32 embeddings,
    blocks run per input, tokens and rows entering each block, FLOPs, and the exit rule's
    per-row ``rule_state`` (filtered as rows leave); ``tokens`` (n,) real tokens per input."""

    def __init__(self, n: int, dim: int, tokens: torch.Tensor) -> None:
        self.rows = torch.arange(n)
        self.out = torch.zeros(n, dim, dtype=torch.float32)
        self.layers_run = torch.zeros(n, dtype=torch.long)
        self.tokens_per_layer: list[float] = []
        self.rows_per_layer: list[int] = []
        self.flops = 0.0
        self.rule_state: dict = {"tokens": tokens.to(torch.float32)}

    def enter(self, start: int, end: int, real: torch.Tensor, computed: torch.Tensor, dim: int, ffn: int) -> None:
        """Blocks ``start..end-1`` about to run on rows with ``real`` (rows,) real tokens, of
        which the blocks compute ``computed`` (rows,) positions each (padding included)."""
        for _ in range(start, end):  # shapes do not change inside a segment
            self.tokens_per_layer.append(float(real.float().mean()) if len(self.rows) else 0.0)
            self.rows_per_layer.append(len(self.rows))
            self.flops += _block_flops(computed, dim, ffn)

    def leave(self, done: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Rows ``done`` (rows,) bool exit with embeddings ``emb`` (rows, dim); returns the
        rows that go on (rows,) bool."""
        self.out[self.rows[done]] = emb[done]
        keep = ~done
        self.rows = self.rows[keep]
        self.rule_state = {k: v[keep] for k, v in self.rule_state.items()}
        return keep

    def finish(self, pooled) -> None:
        """The rows still running get ``pooled()`` (rows, dim), their final embeddings."""
        if len(self.rows):
            self.out[self.rows] = pooled()

    def stats(self) -> RunStats:
        return RunStats(self.layers_run, self.tokens_per_layer, self.rows_per_layer, self.flops)


class DynamicEncoder:
    """Runs a loaded encoder with its dynamic settings (see the module docstring)."""

    def __init__(self, loaded) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.adapter = loaded.adapter
        self.settings: DynamicSettings = getattr(loaded, "dynamic", None) or DynamicSettings()
        self.widths = getattr(loaded, "padded_widths", None)  # run widths measured on this machine

    def _mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor, sizes: torch.Tensor | None):
        if sizes is not None and not self.settings.proportional_attention:
            attention_mask, sizes = (sizes > 0).long(), None
        if sizes is None:
            from transformers.masking_utils import create_bidirectional_mask

            return create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=attention_mask)
        # Proportional attention (ToMe): a merged token of size s gets log(s) added to its logits.
        neg = torch.finfo(hidden.dtype).min
        bias = torch.where(sizes > 0, torch.log(sizes.clamp(min=1e-9)), torch.full_like(sizes, neg))
        return bias.to(hidden.dtype)[:, None, None, :]

    @torch.no_grad()
    def embed(self, batch: dict, return_stats: bool = False, collect_layers: bool = False):
        """Embeddings (batch, dim) float32 of a tokenized batch; with ``return_stats`` also a
        ``RunStats``; with ``collect_layers`` also the pooled state after every block
        (list of (batch, dim)), for training exits.

        A padded batch runs as length buckets (padded positions are not computed, see
        :mod:`slimformer.models.batching`) unless ``loaded.bucketing`` is False or layers are
        collected; where ``loaded.packing`` is set and the attention keeps packed sequences apart,
        every real token of the batch runs in one row instead (:meth:`_embed_packed`)."""
        if not collect_layers and self._packs():
            return self._embed_packed(batch, return_stats)
        mask = batch["attention_mask"]
        lengths = [int(x) for x in mask.sum(1).tolist()]
        if collect_layers or not getattr(self.loaded, "bucketing", True) or not lengths or min(lengths) == mask.shape[1]:
            if not collect_layers:
                batch = widen(batch, run_width(mask.shape[1], self.widths))
            return self._embed_padded(batch, return_stats, collect_layers)
        out = torch.zeros(mask.shape[0], self.model.config.hidden_size, dtype=torch.float32)
        parts = []
        for rows in length_buckets(lengths):
            index = torch.tensor(rows, dtype=torch.long)
            width = max(lengths[r] for r in rows)
            sub = {k: (v[index, :width] if isinstance(v, torch.Tensor) and v.shape == mask.shape else v) for k, v in batch.items()}
            emb, stats = self._embed_padded(widen(sub, run_width(width, self.widths)), True, False)
            out[index] = emb
            parts.append((index, stats))
        if not return_stats:
            return out
        layers_run = torch.zeros(mask.shape[0], dtype=torch.long)
        blocks = max(len(st.rows_per_layer) for _, st in parts)
        rows_per_layer = [sum(st.rows_per_layer[b] for _, st in parts if b < len(st.rows_per_layer)) for b in range(blocks)]
        tokens_per_layer = []
        for b in range(blocks):  # mean real tokens per row entering block b, over all buckets
            total = sum(st.tokens_per_layer[b] * st.rows_per_layer[b] for _, st in parts if b < len(st.rows_per_layer))
            tokens_per_layer.append(total / rows_per_layer[b] if rows_per_layer[b] else 0.0)
        for index, st in parts:
            layers_run[index] = st.layers_run
        return out, RunStats(layers_run, tokens_per_layer, rows_per_layer, sum(st.flops for _, st in parts))

    def _packs(self) -> bool:
        """Whether batches run packed: ``loaded.packing`` and ``bucketing`` on, attention that keeps
        packed sequences apart, and embeddings that take restarting ``position_ids``."""
        if not (getattr(self.loaded, "packing", False) and getattr(self.loaded, "bucketing", True)):
            return False
        if attention_implementation(self.model) not in PACKED_ATTENTION:
            return False
        return _takes_position_ids(type(self.adapter.base().embeddings))

    def _embed_packed(self, batch: dict, return_stats: bool = False):
        """:meth:`embed` with the batch's real tokens packed into one row
        (:func:`slimformer.models.batching.pack_rows`): blocks run on exactly the real tokens,
        each text attending only to itself (``cu_seq_lens``); a reducer sees the packed tokens as
        padded rows (:func:`unpack_state`) and what it keeps is packed again, so after a pruning
        point every text continues with its own count and no padding; rows that exit leave the
        row. Proportional attention passes the log-size of merged tokens as a per-key bias."""
        inputs, _ = pack_rows(batch)
        n = batch["attention_mask"].shape[0]
        base = self.adapter.base()
        blocks = self.adapter.blocks()
        config = self.model.config
        hidden = base.embeddings(input_ids=inputs["input_ids"], token_type_ids=inputs["token_type_ids"], position_ids=inputs["position_ids"])
        cu = inputs["cu_seq_lens_q"]
        dim = hidden.shape[-1]
        ffn = getattr(config, "intermediate_size", 4 * dim)
        mode = self.loaded.pooling
        sizes = torch.ones(hidden.shape[1])
        protect = special_token_mask(inputs["input_ids"][0], self.loaded.tokenizer)
        run = _Pass(n, dim, cu.diff())
        exits, rule = self.settings.exits, self.settings.rule
        last = len(blocks) - 1
        compiled = self.settings.compiled
        merged = False
        for start, end in block_segments(self.settings, len(blocks)):
            counts = cu.diff()
            run.enter(start, end, counts, counts, dim, ffn)
            bias = None
            if merged and self.settings.proportional_attention and bool((sizes != 1).any()):
                bias = sizes.clamp(min=1e-9).log().to(hidden.dtype)[None, None, None, :]  # (1, 1, 1, tokens)
            segment = compiled.get((start, end))
            hidden = segment(hidden, bias, cu) if segment is not None else run_blocks(blocks[start:end], hidden, bias, cu)
            run.layers_run[run.rows] += end - start
            index = end - 1
            reducers = self.settings.reducers.get(index, [])
            if reducers:
                state = unpack_state(hidden, sizes, protect, cu)
                for reducer in reducers:
                    state = reducer.reduce(self, index, *state)
                hidden, sizes, protect, cu = pack_state(*state)
                merged = True
            if exits is not None and index < last and exits.has(index):
                emb = exits(index, pool_packed(hidden, sizes, cu, mode)).float()
                done = rule.decide(index, emb, run.rule_state)
                if done.any():
                    keep = run.leave(done, emb)
                    tokens = keep[sequence_index(cu, hidden.shape[1])]
                    hidden, sizes, protect = hidden[:, tokens], sizes[tokens], protect[tokens]
                    cu = torch.cat([cu.new_zeros(1), cu.diff()[keep].cumsum(0)])
                    if len(run.rows) == 0:
                        break
        run.finish(lambda: pool_packed(hidden, sizes, cu, mode))
        return (run.out, run.stats()) if return_stats else run.out

    def _embed_padded(self, batch: dict, return_stats: bool = False, collect_layers: bool = False):
        input_ids = batch["input_ids"]
        attention_mask = batch["attention_mask"]
        base = self.adapter.base()
        blocks = self.adapter.blocks()
        config = self.model.config
        hidden = base.embeddings(input_ids=input_ids)
        n, dim = input_ids.shape[0], hidden.shape[-1]
        ffn = getattr(config, "intermediate_size", 4 * dim)
        mode = self.loaded.pooling
        sizes = attention_mask.to(torch.float32)
        merged = False
        protect = special_token_mask(input_ids, self.loaded.tokenizer) & attention_mask.bool()
        run = _Pass(n, dim, attention_mask.sum(1))
        collected: list[torch.Tensor] = []
        exits, rule = self.settings.exits, self.settings.rule
        last = len(blocks) - 1
        compiled = self.settings.compiled
        for start, end in block_segments(self.settings, len(blocks), every_block=collect_layers):
            real = (sizes > 0).sum(1)
            run.enter(start, end, real, torch.full_like(real, sizes.shape[1]), dim, ffn)
            mask = self._mask(hidden, attention_mask, sizes if merged else None)
            segment = compiled.get((start, end))
            hidden = segment(hidden, mask) if segment is not None else run_blocks(blocks[start:end], hidden, mask)
            run.layers_run[run.rows] += end - start
            index = end - 1
            reducers = self.settings.reducers.get(index, [])
            for reducer in reducers:
                hidden, sizes, protect = reducer.reduce(self, index, hidden, sizes, protect)
                merged = True
            if reducers:
                if self.widths is not None and not collect_layers:
                    # the reduced width run at the width this machine runs fastest (masked columns)
                    hidden, sizes, protect = _widen_state(hidden, sizes, protect, run_width(sizes.shape[1], self.widths))
                attention_mask = (sizes > 0).long()
            if collect_layers:
                collected.append(pool(hidden, sizes, mode))
            if exits is not None and index < last and exits.has(index):
                emb = exits(index, pool(hidden, sizes, mode)).float()
                done = rule.decide(index, emb, run.rule_state)
                if done.any():
                    keep = run.leave(done, emb)
                    hidden, sizes, protect, attention_mask = hidden[keep], sizes[keep], protect[keep], attention_mask[keep]
                    if len(run.rows) == 0:
                        break
        run.finish(lambda: pool(hidden, sizes, mode))
        result = [run.out]
        if return_stats:
            result.append(run.stats())
        if collect_layers:
            result.append(collected)
        return result[0] if len(result) == 1 else tuple(result)
