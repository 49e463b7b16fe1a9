"""Structure removal (SLEB, attention/MLP drop, BlockPruner, width slimming): removed modules
leave the state dict, the FLOP count and the forward; SLEB's greedy choice equals a by-hand
greedy search on full forward passes; slimmed widths compute exactly the masked original;
distillation lowers the calibration loss and resumes from its checkpoint; generation with a KV
cache still works when early attention sub-layers are gone; save/load is bit-exact."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import model_output, sample_batch

from slimformer.compress import compress
from slimformer.errors import ConfigError
from slimformer.io import load_compressed, save_compressed
from slimformer.methods import CalibrationSettings, CompressionContext, method_from_dict
from slimformer.methods import distill as distill_module
from slimformer.methods.structure.flops import forward_flops
from slimformer.recipe import Recipe

CAL = CalibrationSettings(n_samples=8, max_length=32, batch_size=4)


def _run(loaded, **step):
    compress(loaded, Recipe(steps=[method_from_dict(step)], calibration=CAL))
    return loaded.applied[-1]


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_removed_attention_leaves_state_dict_and_flops(tiny_factory, family):
    loaded = tiny_factory(family)
    batch = sample_batch(loaded)
    before = forward_flops(loaded, batch)
    keys_before = set(loaded.model.state_dict())
    block = loaded.adapter.blocks()[1]
    attention_params = {n for n, _ in block.named_parameters() if n.split(".")[0] in (loaded.adapter.spec.attention, "input_layernorm", "ln_1")}
    loaded.adapter.remove_sublayer(1, "attention")
    prefix = loaded.adapter.block_prefix(1) + "."
    keys_after = set(loaded.model.state_dict())
    gone = keys_before - keys_after
    assert {k[len(prefix):] for k in gone} == attention_params
    after = forward_flops(loaded, batch)
    b, s = batch["input_ids"].shape
    hidden, heads, hd = 64, 4, 16
    kv = loaded.model.config.num_key_value_heads if family == "llama" else heads
    expected = 2 * b * s * hidden * hd * (heads + 2 * kv) + 2 * b * s * heads * hd * hidden + 4 * b * s * s * heads * hd
    assert before["blocks"] - after["blocks"] == expected
    assert after["outside_blocks"] == before["outside_blocks"]
    # the block now adds only its MLP: h + mlp(norm(h + 0))
    other = loaded.adapter.sublayer_modules(1, "mlp")
    assert all(any(True for _ in m.parameters()) for m in other[:1])


def test_removing_both_sublayers_drops_the_block(tiny_factory):
    loaded = tiny_factory("llama")
    block = loaded.adapter.blocks()[2]
    loaded.adapter.remove_sublayer(2, "mlp")
    assert loaded.adapter.num_layers() == 4
    loaded.adapter.remove_sublayer(2, "attention")
    assert loaded.adapter.num_layers() == 3 and all(b is not block for b in loaded.adapter.blocks())
    assert loaded.model.config.num_hidden_layers == 3


def _full_loss(loaded, batches) -> float:
    """Mean next-token NLL of a whole forward pass (no cache tricks)."""
    total = count = 0.0
    with torch.no_grad():
        for b in batches:
            logits = loaded.model(**b, use_cache=False).logits[:, :-1]
            valid = (b["attention_mask"][:, 1:] * b["attention_mask"][:, :-1]).bool()
            total += float(torch.nn.functional.cross_entropy(logits[valid], b["input_ids"][:, 1:][valid], reduction="sum"))
            count += float(valid.sum())
    return total / count


def test_sleb_equals_greedy_search_by_hand(tiny_factory):
    base = tiny_factory("llama")
    batches = CompressionContext(CAL).batches(base.tokenizer)
    # by hand: at each step, drop each remaining block from a full copy and run the whole model
    current = copy.deepcopy(base)
    ids = list(range(4))
    by_hand, losses = [], []
    for _ in range(2):
        trial = []
        for i in range(current.adapter.num_layers()):
            probe = copy.deepcopy(current)
            probe.adapter.drop_blocks([i])
            trial.append(_full_loss(probe, batches))
        best = min(range(len(trial)), key=trial.__getitem__)
        by_hand.append(ids.pop(best))
        losses.append(trial[best])
        current.adapter.drop_blocks([best])
    record = _run(base, method="sleb", num_layers=2)
    assert record["removal_order"] == by_hand
    assert record["calibration_loss_after_each"] == pytest.approx(losses, rel=1e-4)
    # the second step was scored on the model without the first block: its loss is that of
    # the final two-block model, which a one-shot score of single removals never measures
    assert record["calibration_loss_after_each"][-1] == pytest.approx(_full_loss(base, batches), rel=1e-4)


def test_shortlist_picks_the_cheapest_removals_by_their_last_cost():
    from slimformer.methods.structure.search import Shortlist

    full = Shortlist(None)
    assert full.pick(["a", "b", "c"]) == ["a", "b", "c"]
    short = Shortlist(2)
    assert short.pick(["a", "b", "c", "d"]) == ["a", "b", "c", "d"], "the first step scores every candidate"
    for key, loss in (("a", 5.0), ("b", 2.5), ("c", 4.0), ("d", 2.1)):
        short.record(key, loss, 2.0)  # costs 3.0, 0.5, 2.0, 0.1
    assert short.pick(["a", "b", "c"]) == ["b", "c"], "the two cheapest by their last cost, in model order"
    assert short.pick(["a", "b", "c", "e"]) == ["b", "e"], "an unseen candidate is always scored"


@pytest.mark.parametrize("method", ["sleb", "blockpruner"])
def test_rescore_shortlist_limits_the_candidates_scored(tiny_factory, method):
    base = tiny_factory("llama")  # 4 blocks, 8 sub-blocks
    step = {"num_layers": 2} if method == "sleb" else {"num_sublayers": 3}
    full = _run(copy.deepcopy(base), method=method, **step)
    wide = _run(copy.deepcopy(base), method=method, rescore=8, **step)
    assert wide["removal_order"] == full["removal_order"], "a shortlist as long as the candidate list is the full search"
    short = _run(copy.deepcopy(base), method=method, rescore=1, **step)
    first = 4 if method == "sleb" else 8
    assert short["candidates_scored_each_step"] == [first] + [1] * (len(short["removal_order"]) - 1)
    assert full["candidates_scored_each_step"][0] == first and full["candidates_scored_each_step"][1] == first - 1
    # with one re-scored candidate, step 2 removes the cheapest survivor of step 1's scores
    assert short["removal_order"][0] == full["removal_order"][0]


def test_fusegpt_hosts_split_each_run_between_its_kept_neighbours():
    from slimformer.methods.structure.fuse import assign_hosts

    assert assign_hosts(8, [2]) == {0: [], 1: [], 3: [2], 4: [], 5: [], 6: [], 7: []}
    assert assign_hosts(8, [2, 3, 4]) == {0: [], 1: [2], 5: [3, 4], 6: [], 7: []}
    assert assign_hosts(8, [0, 1, 7]) == {2: [0, 1], 3: [], 4: [], 5: [], 6: [7]}
    assert assign_hosts(30, [4, 5, 13, 14, 15, 16, 17, 18])[12] == [13, 14, 15]
    with pytest.raises(ConfigError, match="cannot remove"):
        assign_hosts(3, [0, 1, 2])


def test_fused_weight_is_the_host_plus_coefficients_times_the_folded_weights():
    from torch import nn

    from slimformer.methods.structure.fuse import FoldedHost

    torch.manual_seed(0)
    host, gone = nn.Sequential(nn.Linear(6, 4)), nn.Sequential(nn.Linear(6, 4))
    w_h, w_r = host[0].weight.detach().clone(), gone[0].weight.detach().clone()
    folded = FoldedHost(host, [host, gone], rank=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(folded.weights()["0.weight"], w_h), "A starts at zero: training starts from plain removal"
    with torch.no_grad():
        for p in folded.A.values():
            p.normal_()
    ch = folded.A["0__0"] @ folded.B["0__0"]
    cr = folded.A["0__1"] @ folded.B["0__1"]
    folded.merge()
    assert torch.allclose(host[0].weight, w_h + ch * w_h + cr * w_r, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_fusegpt_removes_what_sleb_removes_and_lowers_the_output_error(tiny_factory, family):
    base = tiny_factory(family)
    batches = CompressionContext(CAL).batches(base.tokenizer)
    with torch.no_grad():
        target = [base.model(**b, output_hidden_states=True).hidden_states[-1] for b in batches]

    def error(loaded):
        with torch.no_grad():
            outs = [loaded.model(**b, output_hidden_states=True).hidden_states[-1] for b in batches]
        return sum(float(((o - t)[b["attention_mask"].bool()] ** 2).sum()) for o, t, b in zip(outs, target, batches)) / \
            sum(float((t[b["attention_mask"].bool()] ** 2).sum()) for t, b in zip(target, batches))

    plain = copy.deepcopy(base)
    plain.adapter.drop_blocks([1, 2])
    zero = copy.deepcopy(base)
    unfolded = _run(zero, method="fusegpt", layers=[1, 2], steps=0)
    batch = sample_batch(base)
    assert torch.equal(model_output(zero, batch), model_output(plain, batch)), "no steps: exactly plain removal"
    fused = copy.deepcopy(base)
    record = _run(fused, method="fusegpt", layers=[2, 1], steps=48, lr=0.005)
    assert record["dropped_layers"] == [1, 2] and record["hosts"] == {"0": [1], "3": [2]}
    assert set(fused.model.state_dict()) == set(plain.model.state_dict())  # the same parameters as plain removal
    assert sum(p.numel() for p in fused.model.parameters()) == sum(p.numel() for p in plain.model.parameters())
    assert unfolded["folds"]["0"]["held_out_loss_folded"] == unfolded["folds"]["0"]["held_out_loss_removed"]
    for fold in record["folds"].values():
        assert fold["held_out_loss_folded"] <= fold["held_out_loss_removed"]
    assert error(fused) < 0.97 * error(plain)
    # SLEB's choice when no blocks are given
    chosen = _run(copy.deepcopy(base), method="fusegpt", num_layers=1, steps=4)
    sleb = _run(copy.deepcopy(base), method="sleb", num_layers=1)
    assert chosen["dropped_layers"] == sleb["dropped_layers"] and chosen["select"] == "sleb"


@pytest.mark.parametrize("family", ["bert", "llama", "qwen2", "gpt2"])
def test_width_slimming_equals_masked_original(tiny_factory, family):
    loaded = tiny_factory(family)
    masked = copy.deepcopy(loaded)
    batch = sample_batch(loaded)
    record = _run(loaded, method="width-slim", flops_ratio=0.5)
    adapter = masked.adapter
    hd = adapter.head_dim()
    with torch.no_grad():
        for i, kept in record["kept"].items():
            i = int(i)
            _, out, _ = adapter.attention_linears(adapter.attention(i))
            n_q = adapter.attention_heads(i)[0]
            for h in set(range(n_q)) - set(kept["query_heads"]):
                out.weight[:, h * hd : (h + 1) * hd] = 0
            _, down = adapter.mlp_linears(i)
            drop = sorted(set(range(down.in_features)) - set(kept["mlp_neurons"]))
            down.weight[:, drop] = 0
    assert torch.allclose(model_output(loaded, batch), model_output(masked, batch), atol=1e-5, rtol=1e-4)
    assert record["block_flops_ratio"] <= 0.55
    flops = forward_flops(loaded, batch)["blocks"] / forward_flops(masked, batch)["blocks"]
    assert flops < 0.6, "the shrunk forward must do about half the block FLOPs"


def test_refit_projection_is_the_least_squares_fit_on_the_kept_inputs():
    from slimformer.methods.structure.width import refit_projection

    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g) @ torch.randn(12, 12, generator=g) + 0.3  # correlated, non-centred
    w, b = torch.randn(5, 12, generator=g), torch.randn(5, generator=g)
    keep = torch.tensor([0, 2, 3, 7, 8, 11])
    new_w, new_b = refit_projection(w, b, x.t() @ x, x.sum(0), x.shape[0], keep, damp=1e-9)
    y = x @ w.t() + b
    design = torch.cat([x[:, keep], torch.ones(500, 1)], 1).double()
    solution = torch.linalg.lstsq(design, y.double()).solution  # (k + 1, out)
    assert torch.allclose(new_w.double(), solution[:-1].t(), atol=1e-4) and torch.allclose(new_b.double(), solution[-1], atol=1e-4)
    masked = ((x[:, keep] @ w[:, keep].t() + b - y) ** 2).sum()
    assert ((x[:, keep] @ new_w.t() + new_b - y) ** 2).sum() < 0.5 * masked
    no_bias, none = refit_projection(w, None, x.t() @ x, x.sum(0), 500, keep, damp=1e-9)
    assert none is None and no_bias.shape == (5, 6)


def test_obs_removes_the_unit_whose_refitted_loss_is_least_and_honours_gqa_groups():
    from slimformer.methods.structure.width import obs_heads, obs_removal

    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 8, generator=g) @ torch.randn(8, 8, generator=g)
    w = torch.randn(3, 8, generator=g)
    gram = x.t() @ x
    units = [[0, 1], [2, 3], [4, 5], [6, 7]]

    def refitted_error(gone, units=units):
        keep = [c for u, cols in enumerate(units) if u not in gone for c in cols]
        sol = torch.linalg.lstsq(x[:, keep].double(), (x @ w.t()).double()).solution
        return float(((x[:, keep].double() @ sol - (x @ w.t()).double()) ** 2).sum())

    first = obs_removal(w, gram, units, 1, damp=1e-9)
    assert first == [min(range(4), key=lambda u: refitted_error({u}))]
    singles = obs_removal(w, gram, [[c] for c in range(8)], 3, damp=1e-9)
    assert len(set(singles)) == 3
    assert singles[0] == min(range(8), key=lambda c: refitted_error({c}, [[k] for k in range(8)]))
    # greedy: a shorter removal is the prefix of a longer one (the local-error allocation reuses it)
    assert obs_removal(w, gram, [[c] for c in range(8)], 6, damp=1e-9)[:3] == singles
    # 4 query heads of dim 2 in 2 KV groups: within-groups keeps one per group
    proj = torch.nn.Linear(8, 3, bias=False)
    q, kv = obs_heads(proj, gram, n_kv=2, head_dim=2, ratio=0.5, mode="within-groups", damp=1e-6)
    assert kv == [0, 1] and len(q) == 2 and {h // 2 for h in q} == {0, 1}
    q, kv = obs_heads(proj, gram, n_kv=2, head_dim=2, ratio=0.5, mode="groups", damp=1e-6)
    assert len(kv) == 1 and q == [2 * kv[0], 2 * kv[0] + 1]


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_width_refit_brings_the_slimmed_model_closer_to_the_original(tiny_factory, family):
    original = tiny_factory(family)
    batch = sample_batch(original)
    ref = model_output(original, batch)
    errors = {}
    for refit, select in ((False, "importance"), (True, "importance"), (True, "obs")):
        m = tiny_factory(family)
        record = _run(m, method="width-slim", flops_ratio=0.5, refit=refit, select=select)
        assert record["refit"] is refit and record["select"] == select
        errors[refit, select] = _rel_error(model_output(m, batch), ref)
    assert errors[True, "importance"] < 0.9 * errors[False, "importance"], errors
    assert errors[True, "obs"] < 0.9 * errors[False, "importance"], errors


def _rel_error(a, b):
    return float((a - b).norm() / b.norm())


def test_gqa_groups_mode_shrinks_kv_heads(tiny_factory):
    loaded = tiny_factory("llama")  # 4 query heads, 2 KV heads
    record = _run(loaded, method="width-slim", flops_ratio=0.5, gqa="groups")
    assert all(v == [2, 1] for v in record["heads"].values())
    within = tiny_factory("llama")
    record = _run(within, method="width-slim", flops_ratio=0.5, gqa="within-groups")
    assert all(v == [2, 2] for v in record["heads"].values())
    assert within.model.model.layers[0].self_attn.num_key_value_groups == 1


def test_per_block_flops_ratios_slim_each_block_to_its_own_target(tiny_factory):
    """``block_flops_ratios``: a block at 1.0 is left exactly as it was (even with refit), the
    others meet their own FLOPs targets; a list of the wrong length is refused before any work."""
    loaded = tiny_factory("bert")
    n = loaded.adapter.num_layers()
    before = copy.deepcopy(list(loaded.adapter.blocks())[0].state_dict())
    ratios = [1.0] + [0.5] * (n - 1)
    record = _run(loaded, method="width-slim", block_flops_ratios=ratios, refit=True)
    after = list(loaded.adapter.blocks())[0].state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    widths = record["mlp_widths"]
    full = loaded.model.config.intermediate_size
    assert widths["0"] == full and all(widths[str(i)] < full for i in range(1, n))
    assert record["block_flops_ratio"] == pytest.approx((1 + 0.5 * (n - 1)) / n, abs=0.06)
    with pytest.raises(ConfigError, match="block_flops_ratios has"):
        _run(tiny_factory("bert"), method="width-slim", block_flops_ratios=[0.5] * (n + 1))
    with pytest.raises(ConfigError, match="block_flops_ratios"):
        method_from_dict({"method": "width-slim", "block_flops_ratios": [0.5, 1.5]})


def test_allocate_flops_finds_the_least_error_within_the_budget():
    """The dynamic programme's choice equals a brute-force search over every combination."""
    import itertools

    from slimformer.methods.structure.width import allocate_flops

    torch.manual_seed(1)
    levels = (0.25, 0.5, 0.75, 1.0)
    errors = {i: {r: float(torch.rand(())) * (1 - r) * (10 if i == 3 else 1) for r in levels} for i in range(4)}
    costs = {i: {r: (1000, int(1000 * r)) for r in levels} for i in range(4)}
    chosen = allocate_flops(errors, costs, 0.5)
    feasible = [c for c in itertools.product(levels, repeat=4) if sum(c) <= 2.0]
    best = min(feasible, key=lambda c: sum(errors[i][r] for i, r in enumerate(c)))
    assert [chosen[i] for i in range(4)] == list(best)
    assert chosen[3] > 0.5  # the sensitive block gets more than the uniform share
    with pytest.raises(ConfigError, match="no choice"):
        allocate_flops(errors, {i: {r: (1000, 1000) for r in levels} for i in range(4)}, 0.5)


def test_local_error_allocation_meets_the_budget_and_leaves_no_trace(tiny_factory):
    """``allocation: local-error``: the chosen per-block targets meet the FLOPs ratio, minimise
    the recorded summed error among the level combinations that do, and the model equals one
    slimmed with those targets given by hand (the trial slimmings left nothing behind)."""
    import itertools

    loaded = tiny_factory("bert")
    levels = [0.25, 0.5, 0.75, 1.0]
    record = _run(loaded, method="width-slim", flops_ratio=0.5, allocation="local-error", allocation_levels=levels, refit=True, select="obs")
    alloc = record["allocation"]
    n = loaded.adapter.num_layers()
    errors = {i: {float(r): e for r, e in alloc["errors"][str(i)].items()} for i in range(n)}
    assert all(errors[i][1.0] == 0.0 and errors[i][0.25] > 0 for i in range(n))
    assert record["block_flops_ratio"] <= 0.5 + 1e-9
    chosen = alloc["chosen"]
    by_hand = tiny_factory("bert")
    _run(by_hand, method="width-slim", block_flops_ratios=chosen, refit=True, select="obs")
    batch = sample_batch(loaded)
    assert torch.equal(model_output(loaded, batch), model_output(by_hand, batch))
    # no level combination within the FLOPs budget has a smaller summed error
    share = {i: {float(r): f for r, f in alloc["flops_share"][str(i)].items()} for i in range(n)}
    feasible = [c for c in itertools.product(levels, repeat=n) if sum(share[i][r] for i, r in enumerate(c)) <= 0.5]
    best = min(sum(errors[i][r] for i, r in enumerate(c)) for c in feasible)
    assert sum(errors[i][r] for i, r in enumerate(chosen)) == pytest.approx(best, rel=1e-9)
    with pytest.raises(ConfigError, match="allocation chooses"):
        method_from_dict({"method": "width-slim", "allocation": "local-error", "block_flops_ratios": [0.5, 0.5]})


def _interrupted_at_step(at: int, monkeypatch, loaded, step: dict, checkpoint) -> None:
    """Run width-slim ``step`` on ``loaded`` with ``checkpoint``, killed at training step ``at``
    (1-based; the CAL set's 2 calibration batches give loss_before first)."""
    real = distill_module.distillation_loss
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 + at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_module, "distillation_loss", failing)
    with pytest.raises(KeyboardInterrupt):
        _run(loaded, **step, checkpoint=str(checkpoint))
    monkeypatch.setattr(distill_module, "distillation_loss", real)


def test_distillation_lowers_loss_and_resumes(tiny_factory, tmp_path, monkeypatch):
    loaded = tiny_factory("bert")
    record = _run(loaded, method="width-slim", flops_ratio=0.5, distill_steps=12, distill_lr=1e-4)
    d = record["distillation"]
    assert d["loss_after"] < d["loss_before"]
    # resumable: an interrupted run continued from its checkpoint ends where an uninterrupted one does
    step = {"method": "width-slim", "flops_ratio": 0.5, "distill_steps": 6, "distill_lr": 1e-3, "seed": 3, "checkpoint_every": 3,
            "distill_attention": "sdpa"}
    straight = tiny_factory("bert")
    _run(straight, **step, checkpoint=str(tmp_path / "a.ckpt"))
    _interrupted_at_step(4, monkeypatch, tiny_factory("bert"), step, tmp_path / "b.ckpt")
    resumed = tiny_factory("bert")
    record = _run(resumed, **step, checkpoint=str(tmp_path / "b.ckpt"))
    assert record["distillation"]["resumed_at"] == 3
    batch = sample_batch(resumed)
    assert torch.allclose(model_output(resumed, batch), model_output(straight, batch), atol=1e-6)


@pytest.mark.parametrize("allocation", ["uniform", "local-error"])
def test_width_slimming_spills_its_calibration_streams_to_disk_with_identical_results(tiny_factory, tmp_path, monkeypatch, allocation):
    from slimformer.methods import calibration
    from slimformer.methods.structure import width

    opened = []
    real = calibration.open_activation_store
    record = lambda *a: opened.append(real(*a)) or opened[-1]  # noqa: E731
    monkeypatch.setattr(calibration, "open_activation_store", record)
    monkeypatch.setattr(width, "open_activation_store", record)
    step = method_from_dict({"method": "width-slim", "flops_ratio": 0.5, "select": "obs", "refit": True, "allocation": allocation})
    results = {}
    for offload in ("memory", "disk"):
        loaded = tiny_factory("llama")
        cal = CalibrationSettings(n_samples=8, max_length=32, batch_size=4, offload=offload)
        compress(loaded, Recipe(steps=[step], calibration=cal), work_dir=str(tmp_path))
        results[offload] = loaded.model.state_dict()
    assert results["memory"].keys() == results["disk"].keys()
    assert all(torch.equal(results["memory"][k], results["disk"][k]) for k in results["memory"])
    streams = 3 if allocation == "local-error" else 1  # local-error: its two streams, then the slimming's
    assert [store.spilled for store in opened] == [False] * streams + [True] * streams
    assert not list(tmp_path.glob("slimformer-activations-*"))  # the spill folder is gone


def test_fusegpt_spills_its_three_streams_to_disk_with_identical_results(tiny_factory, tmp_path, monkeypatch):
    from slimformer.methods import calibration
    from slimformer.methods.structure import fuse

    opened = []
    real = calibration.open_activation_store
    record = lambda *a: opened.append(real(*a)) or opened[-1]  # noqa: E731
    monkeypatch.setattr(calibration, "open_activation_store", record)
    monkeypatch.setattr(fuse, "open_activation_store", record)
    step = method_from_dict({"method": "fusegpt", "layers": [0, 3], "steps": 6, "rank": 2})
    results = {}
    for offload in ("memory", "disk"):
        loaded = tiny_factory("llama")
        compress(loaded, Recipe(steps=[step], calibration=CalibrationSettings(n_samples=8, max_length=32, batch_size=4, offload=offload)), work_dir=str(tmp_path))
        results[offload] = (loaded.model.state_dict(), loaded.applied[-1]["folds"])
    (a, folds_a), (b, folds_b) = results["memory"], results["disk"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and folds_a == folds_b
    assert [store.spilled for store in opened] == [False] * 3 + [True] * 3  # original, targets, student
    assert not list(tmp_path.glob("slimformer-activations-*"))


def test_distillation_trains_with_the_measured_faster_attention_and_resumes_with_its_own(tiny_factory, tmp_path, monkeypatch):
    """``distill_attention: auto`` times SDPA and eager on the training pass and trains with the
    faster (here made eager by the timing); the model comes back on SDPA; the timing leaves no
    gradients; a run resumed from a checkpoint keeps that checkpoint's attention whatever it is
    told, and ends as the uninterrupted run does."""
    from slimformer.methods.distill import fastest_training_attention

    timed = []

    def fake_medians(calls, repeats, setup=None, warmup=True, steady=True):
        assert not steady  # a training job keeps its allocator
        for name in calls:
            setup[name]()
            calls[name]()
            timed.append((name, tiny.model.config._attn_implementation))
        return {"sdpa": 2.0, "eager": 1.0}

    monkeypatch.setattr(distill_module, "interleaved_medians", fake_medians)
    tiny = tiny_factory("bert")
    assert tiny.model.config._attn_implementation == "sdpa"
    batch = CompressionContext(CAL).batches(tiny.tokenizer)[0]
    for p in tiny.model.parameters():
        p.requires_grad_(True)
    assert fastest_training_attention(tiny.model, batch, False, False, None) == "eager"
    assert timed == [("sdpa", "sdpa"), ("eager", "eager")]  # each candidate timed on its own kernels
    assert tiny.model.config._attn_implementation == "eager" and all(p.grad is None for p in tiny.model.parameters())
    step = {"method": "width-slim", "flops_ratio": 0.5, "distill_steps": 4, "distill_lr": 1e-3, "seed": 2, "checkpoint_every": 2}
    auto = tiny_factory("bert")
    record = _run(auto, **step)["distillation"]
    assert record["attention"] == "eager" and auto.model.config._attn_implementation == "sdpa"
    fixed = tiny_factory("bert")
    assert _run(fixed, **step, distill_attention="eager")["distillation"]["loss_after"] == record["loss_after"]
    with pytest.raises(ConfigError, match="distill_attention"):
        method_from_dict(step | {"distill_attention": "flash"})
    # interrupted after its first checkpoint (step 2), resumed under another setting: eager still
    _interrupted_at_step(3, monkeypatch, tiny_factory("bert"), step | {"distill_attention": "eager"}, tmp_path / "e.ckpt")
    resumed = tiny_factory("bert")
    again = _run(resumed, **step, distill_attention="sdpa", checkpoint=str(tmp_path / "e.ckpt"))["distillation"]
    assert (again["resumed_at"], again["attention"]) == (2, "eager")
    assert again["loss_after"] == record["loss_after"]


def test_recomputed_teacher_outputs_train_exactly_as_cached_ones(tiny_factory, monkeypatch):
    step = {"method": "width-slim", "flops_ratio": 0.5, "distill_steps": 5, "distill_lr": 1e-3, "seed": 1, "distill_attention": "eager"}
    cached, recomputed = tiny_factory("bert"), tiny_factory("bert")
    batches = CompressionContext(CAL).batches(cached.tokenizer)
    expected = sum(b["input_ids"].numel() for b in batches) * cached.model.config.hidden_size * 4
    c = _run(cached, **step, distill_teacher_outputs="cache")["distillation"]
    r = _run(recomputed, **step, distill_teacher_outputs="recompute")["distillation"]
    assert (c["teacher_outputs"], c["teacher_cache_bytes"]) == ("cached", expected)
    assert (r["teacher_outputs"], r["teacher_cache_bytes"]) == ("recomputed", 0)
    assert (c["loss_before"], c["loss_after"]) == (r["loss_before"], r["loss_after"])
    sc, sr = cached.model.state_dict(), recomputed.model.state_dict()
    assert sc.keys() == sr.keys() and all(torch.equal(sc[k], sr[k]) for k in sc)
    # auto keeps them while they fit half of the memory still available
    monkeypatch.setenv("SLIMFORMER_MEMORY_LIMIT", str(2 * expected))
    assert distill_module.caches_teacher_outputs("auto", expected)
    monkeypatch.setenv("SLIMFORMER_MEMORY_LIMIT", str(2 * expected - 2))
    assert not distill_module.caches_teacher_outputs("auto", expected)
    assert distill_module.caches_teacher_outputs("cache", expected) and not distill_module.caches_teacher_outputs("recompute", 1)
    with pytest.raises(ConfigError, match="distill_teacher_outputs"):
        method_from_dict(step | {"distill_teacher_outputs": "disk"})
    # the checkpoint of a run is the same run whichever way its teacher outputs are kept
    from slimformer.methods.structure.width import _fingerprint

    cfg = method_from_dict(step)
    assert _fingerprint(cfg, cached.adapter) == _fingerprint(method_from_dict(step | {"distill_teacher_outputs": "recompute"}), cached.adapter)


def test_a_finished_distillation_continues_to_more_steps(tiny_factory, tmp_path, monkeypatch):
    """``distill_continue_from``: the finished run's student is where the continuation starts
    (its loss there = the finished run's loss after), the learning rate follows the tail of a
    cosine over the new total, and a checkpoint of another slimming, an unfinished run or no
    extra steps are refused with the fix."""
    step = {"method": "width-slim", "flops_ratio": 0.5, "distill_lr": 1e-4, "seed": 1, "checkpoint_every": 2, "distill_attention": "sdpa"}
    first = tiny_factory("bert")
    done = _run(first, **step, distill_steps=4, checkpoint=str(tmp_path / "four.ckpt"))["distillation"]
    lrs = []
    real = distill_module.optimizer_step

    def recording(loss, optim, sched, params, **kwargs):
        lrs.append(optim.param_groups[0]["lr"])
        return real(loss, optim, sched, params, **kwargs)

    monkeypatch.setattr(distill_module, "optimizer_step", recording)
    more = tiny_factory("bert")
    d = _run(more, **step, distill_steps=7, checkpoint=str(tmp_path / "seven.ckpt"), distill_continue_from=str(tmp_path / "four.ckpt"))["distillation"]
    assert d["continued_from_steps"] == 4 and d["resumed_at"] == 4 and d["continued_from"] == str(tmp_path / "four.ckpt")
    assert d["loss_at_continuation"] == pytest.approx(done["loss_after"], rel=1e-6)
    assert lrs == pytest.approx([1e-4 * distill_module.cosine_factor(s, 7) for s in (4, 5, 6)], rel=1e-9)
    assert d["loss_after"] < d["loss_at_continuation"] < d["loss_before"]
    monkeypatch.setattr(distill_module, "optimizer_step", real)
    # the continued run's own checkpoint resumes it (here: already finished, nothing left to train)
    again = tiny_factory("bert")
    d2 = _run(again, **step, distill_steps=7, checkpoint=str(tmp_path / "seven.ckpt"), distill_continue_from=str(tmp_path / "four.ckpt"))["distillation"]
    assert d2["resumed_at"] == 7 and d2["loss_at_continuation"] is None
    batch = sample_batch(more)
    assert torch.equal(model_output(again, batch), model_output(more, batch))
    with pytest.raises(ConfigError, match="different slimming"):
        _run(tiny_factory("bert"), **(step | {"flops_ratio": 0.75}), distill_steps=7, distill_continue_from=str(tmp_path / "four.ckpt"))
    with pytest.raises(ConfigError, match="raise the steps"):
        _run(tiny_factory("bert"), **step, distill_steps=4, distill_continue_from=str(tmp_path / "four.ckpt"))
    state = torch.load(tmp_path / "four.ckpt", weights_only=False)
    torch.save(state | {"step": 2}, tmp_path / "half.ckpt")
    with pytest.raises(ConfigError, match="not a finished run"):
        _run(tiny_factory("bert"), **step, distill_steps=7, distill_continue_from=str(tmp_path / "half.ckpt"))
    with pytest.raises(ConfigError, match="same file"):
        method_from_dict(step | {"distill_steps": 7, "checkpoint": "/tmp/x.ckpt", "distill_continue_from": "/tmp/x.ckpt"})


def test_distillation_under_bfloat16_autocast_trains_float32_weights(tiny_factory):
    """``distill_autocast: bfloat16``: the training passes run in bfloat16, the weights stay
    float32, the float32-measured loss still falls; an unknown dtype is refused on construction."""
    loaded = tiny_factory("bert")
    trained_in = set()  # dtypes of linear outputs in passes that build a graph (the training passes)

    def hook(module, inputs, out):
        if isinstance(module, torch.nn.Linear) and torch.is_grad_enabled():
            trained_in.add(out.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        record = _run(loaded, method="width-slim", flops_ratio=0.5, distill_steps=12, distill_lr=1e-4, distill_autocast="bfloat16")
    finally:
        handle.remove()
    d = record["distillation"]
    assert trained_in == {torch.bfloat16}
    assert d["autocast"] == "bfloat16" and d["loss_after"] < d["loss_before"]
    assert {p.dtype for p in loaded.model.parameters() if p.is_floating_point()} == {torch.float32}
    with pytest.raises(ConfigError, match="distill_autocast"):
        method_from_dict({"method": "width-slim", "distill_autocast": "float16"})


def test_cosine_distillation_loss_is_the_pooled_embedding_distance():
    """``cos``: 1 - cos of the mean-pooled embeddings over valid tokens only (padding ignored);
    ``mse+cos`` is ``mse`` plus exactly that."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    pooled = lambda x: torch.stack([x[0].mean(0), x[1, :3].mean(0)])  # noqa: E731
    want = 1 - torch.nn.functional.cosine_similarity(pooled(s), pooled(t), dim=-1).mean()
    got = distill_module.distillation_loss(s, t, mask, "cos")
    assert torch.allclose(got, want, atol=1e-6)
    s2 = s.clone()
    s2[1, 3:] = 100.0  # padding changes nothing
    assert torch.allclose(distill_module.distillation_loss(s2, t, mask, "cos"), want, atol=1e-6)
    both = distill_module.distillation_loss(s, t, mask, "mse+cos")
    assert torch.allclose(both, distill_module.distillation_loss(s, t, mask, "mse") + want, atol=1e-6)


def test_layerwise_distillation_loss_adds_every_earlier_block(tiny_factory):
    """``mse+cos+layers``: the final layer's ``mse+cos`` plus the mean relative error of the
    earlier blocks' outputs, zero for identical models; width-slim trains with it and refuses it
    for causal LMs before any work."""
    from slimformer.errors import ConfigError

    torch.manual_seed(0)
    s, t = torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    want = distill_module.distillation_loss(s[-1], t[-1], mask, "mse+cos") + 0.5 * sum(
        distill_module.distillation_loss(s[i], t[i], mask, "mse") for i in range(2))
    assert torch.allclose(distill_module.distillation_loss(s, t, mask, "mse+cos+layers"), want)
    assert float(distill_module.distillation_loss(t, t, mask, "mse+cos+layers")) == pytest.approx(0.0, abs=1e-6)
    loaded = tiny_factory("bert")
    record = _run(loaded, method="width-slim", flops_ratio=0.5, distill_steps=12, distill_lr=1e-4, distill_loss="mse+cos+layers")
    d = record["distillation"]
    assert d["loss"] == "mse+cos+layers" and d["loss_after"] < d["loss_before"]
    with pytest.raises(ConfigError, match="for encoders"):
        _run(tiny_factory("llama"), method="width-slim", flops_ratio=0.5, distill_steps=2, distill_loss="mse+cos+layers")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generation_with_cache_after_attention_removal(tiny_factory, family):
    loaded = tiny_factory(family)
    loaded.adapter.remove_sublayer(0, "attention")
    loaded.adapter.remove_sublayer(2, "mlp")
    prompt = loaded.tokenizer(["def foo(x):"], return_tensors="pt")
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = loaded.model.generate(**prompt, use_cache=True, **kw)
        plain = loaded.model.generate(**prompt, use_cache=False, **kw)
    assert torch.equal(cached, plain)


def test_structure_round_trip(tiny_factory, tmp_path):
    loaded = tiny_factory("qwen2")
    _run(loaded, method="width-slim", flops_ratio=0.75)
    _run(loaded, method="sublayer-drop", sublayer="attention", num_sublayers=1)
    _run(loaded, method="sleb", num_layers=1)
    batch = sample_batch(loaded)
    again = load_compressed(save_compressed(loaded, tmp_path / "out"))
    assert again.manifest["structure"] == loaded.adapter.structure_record() != {}
    assert set(again.model.state_dict()) == set(loaded.model.state_dict())
    assert torch.equal(model_output(again, batch), model_output(loaded, batch))


def test_bad_settings_raise():
    with pytest.raises(ConfigError, match="fraction"):
        method_from_dict({"method": "sleb", "fraction": 1.5})
    with pytest.raises(ConfigError, match="sublayer"):
        method_from_dict({"method": "sublayer-drop", "sublayer": "ffn"})
    with pytest.raises(ConfigError, match="gqa"):
        method_from_dict({"method": "width-slim", "gqa": "some"})
    with pytest.raises(ConfigError, match="budget"):
        method_from_dict({"method": "blockpruner", "num_layers": 2, "param_fraction": 0.2})


def test_sleb_refuses_to_remove_every_block(tiny_factory):
    with pytest.raises(ConfigError, match="at most 3"):
        _run(tiny_factory("llama"), method="sleb", num_layers=4)


def test_fusegpt_refuses_blocks_without_float_linears(tiny_factory):
    loaded = tiny_factory("llama")
    _run(loaded, method="rtn", bits=8, group_size=None, symmetric=True)
    with pytest.raises(ConfigError, match="before quantization"):
        _run(loaded, method="fusegpt", layers=[1], steps=2)
    assert loaded.adapter.num_layers() == 4, "refused before anything was removed"


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_distillation_can_keep_the_embedding_table(tiny_factory, family):
    """``distill_embeddings: false``: the input embedding table (and a tied head) is bit-identical
    after distillation, the rest of the student trained, the loss lower; trained by default."""
    kept = tiny_factory(family)
    before = kept.model.get_input_embeddings().weight.detach().clone()
    record = _run(kept, method="width-slim", flops_ratio=0.5, distill_steps=12, distill_lr=1e-3, distill_embeddings=False)
    d = record["distillation"]
    assert d["embeddings"] == "kept" and d["loss_after"] < d["loss_before"]
    assert torch.equal(kept.model.get_input_embeddings().weight, before)
    trained = tiny_factory(family)
    record = _run(trained, method="width-slim", flops_ratio=0.5, distill_steps=12, distill_lr=1e-3)
    assert record["distillation"]["embeddings"] == "trained"
    assert not torch.equal(trained.model.get_input_embeddings().weight, before)
    # the requires_grad flags are restored alike either way
    assert [p.requires_grad for p in kept.model.parameters()] == [p.requires_grad for p in trained.model.parameters()]
    with pytest.raises(ConfigError, match="distill_embeddings"):
        method_from_dict({"method": "width-slim", "distill_embeddings": "no"})
