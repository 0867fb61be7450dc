"""The training loop without Ray: batch plan, schedules, loss going down, exact resume,
NaN stop keeping the last good checkpoint, keep-last-K, checkpoints loading into the samplers,
resume across a weak-to-strong grid switch, the loss as a mean over the whole batch's scored tokens
(however it is split into micro-batches and ranks), the optimizer's groups, clipping, config checks."""
import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from maskgil.checkpoint import load_pretrained
from maskgil.models import build_model
from maskgil.sampling import sample_ar, sample_fusion, sample_maskgit
from maskgil.training import (Hooks, NonFiniteLossError, TrainConfig, batch_plan, build_optimizer, compile_blocks,
                              compute_loss, cpu_compile_available, fit, grid_at, list_checkpoints, load_checkpoint,
                              lr_at, prune_checkpoints, save_checkpoint, train_step)
from maskgil.training.loop import TRAIN_STATE_NAME
from maskgil.training.runconfig import load_run_config

SMALL = dict(n_layers=2, dim=64, n_heads=2, vocab_size=32, num_classes=4)


def test_batch_plan():
    assert batch_plan(256, 1) == (256, 256, 1)
    assert batch_plan(256, 4, 16) == (64, 16, 4)
    assert batch_plan(256, 2, 32) == (128, 32, 4)
    with pytest.raises(ValueError, match="divisible by 3 workers"):
        batch_plan(256, 3)
    with pytest.raises(ValueError, match="multiple of micro batch 48"):
        batch_plan(256, 2, 48)


def test_lr_schedule_hand_values():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, lr_schedule="cosine", max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way: cos(pi/2) = 0
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(5, TrainConfig(lr=2e-4)) == 2e-4
    constant = TrainConfig(lr=2e-4, warmup_steps=4)  # warmup applies to the constant schedule too (sweeps use it)
    assert [lr_at(s, constant) for s in (0, 3, 4, 100)] == pytest.approx([5e-5, 2e-4, 2e-4, 2e-4])


def test_fit_applies_the_schedule_to_every_group_and_logs_the_stability_signals():
    """Each step sets lr_at(step) on every parameter group (decayed and not), the logged lr is the
    one used, and the log carries the loss, grad norm, tokens/s and the paper's output norms: the
    last block's output (before the final norm) and the final normed states, as hooks here see them."""
    cfg = TrainConfig(max_steps=5, global_batch=8, lr=1e-3, warmup_steps=2, lr_schedule="cosine", log_every=1)
    model, opt = make("maskgil-tiny", cfg)
    assert len(opt.param_groups) >= 2
    hand = {}
    model.layers[-1].register_forward_hook(lambda mod, a, out: hand.update(pre=float(out.norm(dim=-1).mean())))
    model.norm.register_forward_hook(lambda mod, a, out: hand.update(post=float(out.norm(dim=-1).mean())))
    logged = []

    def on_log(step, m):
        logged.append(dict(m, groups=[g["lr"] for g in opt.param_groups]))
        assert (m["output_norm_prenorm"], m["output_norm"]) == pytest.approx((hand["pre"], hand["post"]))

    fit(model, opt, cfg, synthetic_data(), micro_batch=8, accum=1, hooks=Hooks(on_log=on_log))
    expected = [lr_at(s, cfg) for s in range(5)]
    assert expected[0] == pytest.approx(5e-4) and expected[-1] < expected[1]  # warmup, then the cosine
    assert [m["lr"] for m in logged] == pytest.approx(expected)
    assert all(m["groups"] == pytest.approx([lr] * len(m["groups"])) for m, lr in zip(logged, expected))
    assert all(m["tokens_per_s"] > 0 and math.isfinite(m["grad_norm"]) for m in logged)


def test_a_non_finite_gradient_leaves_weights_and_optimizer_untouched():
    """A NaN gradient (finite loss) stops the step before optimizer.step(): weights and Adam state
    stay as they were, and the error names the step."""
    cfg = TrainConfig(max_steps=1, global_batch=8, lr=1e-3)
    model, opt = make("maskgil-tiny", cfg)
    batch = next(synthetic_data()((8, 8), 0))
    train_step(model, opt, [batch], cfg, 0, (8, 8))  # Adam state exists
    weights = copy.deepcopy(model.state_dict())
    adam = copy.deepcopy(opt.state_dict()["state"])
    model.output.weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(NonFiniteLossError, match="step 1"):
        train_step(model, opt, [batch], cfg, 1, (8, 8))
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for i, st in opt.state_dict()["state"].items():
        assert all(torch.equal(v, adam[i][k]) for k, v in st.items()), i


def test_an_epoch_too_small_for_one_step_is_an_error_not_a_loop():
    cfg = TrainConfig(max_steps=3, global_batch=16, lr=1e-3)
    model, opt = make("maskgil-tiny", cfg)
    with pytest.raises(RuntimeError, match="an epoch ended before its first step"):
        fit(model, opt, cfg, synthetic_data(n=8), micro_batch=8, accum=2)


def test_paper_defaults_and_grid_schedule():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.betas, cfg.weight_decay, cfg.global_batch) == (1e-4, (0.9, 0.96), 1e-5, 256)
    cfg = TrainConfig(grid_schedule=[[0, 16, 16], [1000, 32, 32]])
    assert grid_at(999, cfg, (8, 8)) == (16, 16) and grid_at(1000, cfg, (8, 8)) == (32, 32)
    assert grid_at(5, TrainConfig(), (8, 8)) == (8, 8)
    with pytest.raises(ValueError, match="grid_schedule"):
        TrainConfig(grid_schedule=[[10, 16, 16]])
    with pytest.raises(ValueError, match="unknown training config key"):
        TrainConfig.from_dict({"learning_rate": 1})


def synthetic_data(n=64, micro=8, grid=(8, 8), vocab=32, classes=4, seed=0):
    """Class c's image is one token everywhere, plus 10% noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randint(0, vocab, (classes, 1), generator=g).expand(classes, grid[0] * grid[1])
    labels = torch.arange(n) % classes
    tokens = protos[labels].clone()
    noise = torch.rand(tokens.shape, generator=g) < 0.1
    tokens[noise] = torch.randint(0, vocab, (int(noise.sum()),), generator=g)

    def data(grid_now, epoch):
        assert tuple(grid_now) == tuple(grid)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + epoch))
        for i in range(0, n, micro):
            idx = order[i:i + micro]
            yield {"tokens": tokens[idx], "label": labels[idx]}

    return data


def make(preset, cfg, seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_model(preset, **{**SMALL, **overrides})
    return model, build_optimizer(model, cfg)


@pytest.mark.parametrize("preset", ["maskgil-tiny", "llamagen-tiny"])
def test_loss_goes_down(preset):
    cfg = TrainConfig(preset=preset, max_steps=30, global_batch=16, micro_batch=8, lr=3e-3, log_every=1)
    model, opt = make(preset, cfg)
    losses = []
    fit(model, opt, cfg, synthetic_data(), micro_batch=8, accum=2, hooks=Hooks(on_log=lambda s, m: losses.append(m["loss"])))
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert losses[0] > 0.8 * math.log(32)  # starts near chance


@pytest.mark.parametrize("preset,overrides", [("maskgil-tiny", {}), ("llamagen-tiny", {"token_dropout": 0.3})],
                         ids=["maskgil", "llamagen_dropout"])
def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path, preset, overrides):
    """Stop at step 3 (mid-epoch), restore into fresh objects, finish: identical to 6 straight steps.
    With dropout too: each step seeds its own, so the checkpoint needs no generator state."""
    cfg = TrainConfig(preset=preset, max_steps=6, global_batch=8, lr=1e-3, checkpoint_every=3)
    data = synthetic_data(n=40, micro=4)  # 10 micro-batches per epoch, 5 steps: crosses an epoch
    ref, opt = make(preset, cfg, **overrides)
    fit(ref, opt, cfg, data, micro_batch=4, accum=2)

    model, opt = make(preset, cfg, **overrides)
    saved = {}

    def on_ckpt(step, metrics, state):
        save_checkpoint(tmp_path / f"step_{step:08d}", model, opt, state)
        saved[step] = state

    half = TrainConfig(**{**cfg.to_dict(), "max_steps": 3})
    fit(model, opt, half, data, micro_batch=4, accum=2, hooks=Hooks(on_checkpoint=on_ckpt))
    assert saved[3]["step"] == 3 and saved[3]["batches_in_epoch"] == 6

    model2, opt2 = make(preset, cfg, seed=99, **overrides)  # different init: everything must come from disk
    start = load_checkpoint(tmp_path / "step_00000003", model2, opt2)
    assert start == {"step": 3, "epoch": 0, "batches_in_epoch": 6}
    steps = []
    out = fit(model2, opt2, cfg, data, micro_batch=4, accum=2, start=start,
              hooks=Hooks(on_step_end=steps.append))
    assert steps == [4, 5, 6] and out["step"] == 6
    for (k, a), b in zip(ref.state_dict().items(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = TrainConfig(max_steps=10, global_batch=8, lr=1e-3, checkpoint_every=1)
    model, opt = make("maskgil-tiny", cfg)

    def on_ckpt(step, metrics, state):
        save_checkpoint(tmp_path / f"step_{step:08d}", model, opt, state)
        prune_checkpoints(tmp_path, keep=2)

    def poison(step):
        if step == 5:  # a weight blows up after step 5: step 6 must refuse to apply
            with torch.no_grad():
                model.output.weight[0, 0] = float("inf")

    with pytest.raises(NonFiniteLossError, match="step 5"):
        fit(model, opt, cfg, synthetic_data(), micro_batch=8, accum=1,
            hooks=Hooks(on_checkpoint=on_ckpt, on_step_end=poison))
    kept = list_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["step_00000004", "step_00000005"]  # keep-last-2 pruned steps 1-3
    good = load_pretrained(kept[-1])
    assert all(torch.isfinite(v).all() for v in good.state_dict().values())


def test_checkpoint_loads_into_samplers(tmp_path):
    cfg = TrainConfig(max_steps=2, global_batch=8)
    models = {}
    for preset in ("maskgil-tiny", "llamagen-tiny"):
        model, opt = make(preset, cfg)
        fit(model, opt, cfg, synthetic_data(), micro_batch=8, accum=1,
            hooks=Hooks(on_checkpoint=lambda s, m, st, model=model, opt=opt, p=preset:
                        save_checkpoint(tmp_path / p, model, opt, st)))
        loaded = load_pretrained(tmp_path / preset)
        for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
        models[preset] = loaded
    cond = torch.tensor([0, 3])
    g = torch.Generator().manual_seed(0)
    mar = sample_maskgit(models["maskgil-tiny"], cond, (8, 8), steps=4, cfg_scale=2.0, generator=g)
    ar = sample_ar(models["llamagen-tiny"], cond, (8, 8), cfg_scale=2.0, generator=g)
    fu = sample_fusion(models["llamagen-tiny"], models["maskgil-tiny"], cond, (8, 8), ar_tokens=16, mar_steps=3,
                       generator=g)
    for t in (mar, ar, fu):
        assert t.shape == (2, 64) and t.min() >= 0 and t.max() < 32


@pytest.mark.skipif(not cpu_compile_available(), reason="torch.compile (inductor) needs a C++ compiler on CPU")
@pytest.mark.parametrize("preset", ["maskgil-tiny", "llamagen-tiny"])
def test_compiled_training_matches_eager(preset):
    """`train.compile`: compiled blocks and loss give the eager loss and gradients (to fp32 kernel
    rounding), keep parameter names (checkpoints stay loadable), go through the compiler, and
    train on with a different number of hidden tokens every step."""
    import torch._dynamo

    cfg = TrainConfig(preset=preset, max_steps=4, global_batch=8, lr=3e-3, log_every=1)
    batch = next(iter(synthetic_data()((8, 8), 0)))
    grads, losses = {}, {}
    for compiled in (False, True):
        cfg.compile = compiled
        model, opt = make(preset, cfg)
        if compiled:
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            compile_blocks(model)
        gen = torch.Generator().manual_seed(5)
        out = compute_loss(model, model.config, batch["tokens"], batch["label"], (8, 8), generator=gen,
                           compiled=compiled)
        out.loss.backward()
        grads[compiled] = {k: p.grad.clone() for k, p in model.named_parameters()}
        opt.zero_grad()
        losses[compiled] = [out.loss.item()]
        fit(model, opt, cfg, synthetic_data(), micro_batch=8, accum=1,
            hooks=Hooks(on_log=lambda s, m: losses[compiled].append(m["loss"])))
    assert torch._dynamo.utils.counters["frames"]["ok"] >= 2  # the blocks and the loss were captured
    assert grads[True].keys() == grads[False].keys()  # same parameter names
    for k, g in grads[False].items():
        torch.testing.assert_close(grads[True][k], g, rtol=1e-3, atol=1e-4 * g.abs().max().item(), msg=k)
    assert len(set(losses[False][1:])) == 4  # different batches (and masks: the loss's shapes changed)
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


def bucketed_data(sizes, micro, vocab=32, classes=4, seed=0):
    """`data(grid, epoch)` like an aspect-ratio-bucketed stage: one-grid micro-batches that carry
    their "grid", `sizes[g]` batches of grid g per epoch, interleaved in a per-epoch order."""
    g = torch.Generator().manual_seed(seed)
    batches = [{"tokens": torch.randint(0, vocab, (micro, h * w), generator=g),
                "label": torch.randint(0, classes, (micro,), generator=g), "grid": (h, w)}
               for (h, w), n in sizes.items() for _ in range(n)]

    def data(grid_now, epoch):
        order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(1000 + epoch))
        yield from (batches[i] for i in order)

    return data


def test_bucketed_batches_train_on_their_own_grid(monkeypatch):
    """A micro-batch that names its grid (an aspect-ratio bucket) is trained on that grid, not the
    stage's; accumulation mixes grids within a step; a batch whose tokens miss its grid is refused."""
    import maskgil.training.loop as loop

    seen = []

    def recording(model, config, tokens, cond, grid, **kw):
        seen.append((tuple(grid), tuple(tokens.shape)))
        return compute_loss(model, config, tokens, cond, grid, **kw)

    monkeypatch.setattr(loop, "compute_loss", recording)
    sizes = {(8, 8): 2, (6, 10): 3, (10, 6): 3}
    data = bucketed_data(sizes, micro=4)
    cfg = TrainConfig(max_steps=8, global_batch=8, lr=1e-3, log_every=1)
    model, opt = make("maskgil-tiny", cfg)
    logged = []
    out = fit(model, opt, cfg, data, micro_batch=4, accum=2, hooks=Hooks(on_log=lambda s, m: logged.append(m)))
    fed = [(b["grid"], tuple(b["tokens"].shape)) for e in (0, 1) for b in data((8, 8), e)][:16]
    assert seen == fed  # epoch 0 (8 batches = 4 steps), then epoch 1
    assert {g for g, _ in seen} == set(sizes) and out["epoch"] == 1 and out["step"] == 8
    assert all(m["grid_h"] == 8 and m["grid_w"] == 8 for m in logged)  # the stage's grid, for the record
    bad = {"tokens": torch.zeros(4, 64, dtype=torch.long), "label": torch.zeros(4, dtype=torch.long), "grid": (6, 10)}
    with pytest.raises(ValueError, match="64 tokens per image but the grid at step 0 is 6x10"):
        train_step(model, opt, [bad], cfg, 0, (8, 8))


def _uneven_epochs_worker(rank, port, out):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = TrainConfig(max_steps=7, global_batch=8, lr=1e-3)
        model, opt = make("maskgil-tiny", cfg)
        # rank 0's buckets fill 3 micro-batches per epoch, rank 1's 5
        data = bucketed_data({(8, 8): 1, (6, 10): 1 + rank, (10, 6): 1 + rank}, micro=4, seed=rank)
        state = fit(model, opt, cfg, data, micro_batch=4, accum=1, rank=rank, world_size=2)
        torch.save({"state": {k: state[k] for k in ("step", "epoch", "batches_in_epoch")}}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_end_an_epoch_together(tmp_path):
    """Bucketed data fills a different number of batches per rank. When one rank runs out, every
    rank starts the next epoch (Ray Data's splits need all ranks at an epoch's start), so the
    loop state a checkpoint saves from rank 0 is every rank's: 7 steps of 3 per epoch on both."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_uneven_epochs_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt")["state"] for r in (0, 1)]
    assert states[0] == states[1] == {"step": 7, "epoch": 2, "batches_in_epoch": 1}


# ---------------------------------------------------------------------------- weak-to-strong resume
def grid_stage_data(opened, n_micro=6, micro=4, vocab=32):
    """`data(grid, epoch)`: 6 micro-batches per epoch of the grid's resolution, each named by "id"
    (grid, epoch, index); `opened` records every (grid, epoch) whose data was actually read."""

    def data(grid, epoch):
        opened.append((tuple(grid), epoch))
        h, w = grid
        g = torch.Generator().manual_seed(100 * h + epoch)
        for i in range(n_micro):
            yield {"tokens": torch.randint(0, vocab, (micro, h * w), generator=g), "label": torch.arange(micro) % 4,
                   "id": (tuple(grid), epoch, i)}

    return data


@pytest.mark.parametrize("stop", [1, 2, 3])
def test_resume_around_a_grid_switch_matches_uninterrupted_run(tmp_path, monkeypatch, stop):
    """Weak-to-strong 4x4 -> 8x8 at step 2 (3 steps per epoch). A checkpoint saved at the switch
    step holds the 4x4 epoch's data position; the resumed run must still start a fresh 8x8 epoch
    there, as the uninterrupted run does. Stopped before, at or after the switch, it trains on the
    same batches (never reading the 4x4 data again) to the same weights, bit for bit."""
    import maskgil.training.loop as loop

    fed, real = [], loop.train_step

    def recording(model, opt, micro, cfg, step, grid, *args, **kw):
        fed.append((step, tuple(grid), [b["id"] for b in micro]))
        return real(model, opt, micro, cfg, step, grid, *args, **kw)

    monkeypatch.setattr(loop, "train_step", recording)
    cfg = TrainConfig(max_steps=6, global_batch=8, lr=1e-3, grid_schedule=[[0, 4, 4], [2, 8, 8]])

    def build(seed):
        torch.manual_seed(seed)
        model = build_model("maskgil-tiny", **SMALL, grid_size=(4, 4))
        return model, build_optimizer(model, cfg)

    ref, opt = build(0)
    opened_ref = []
    fit(ref, opt, cfg, grid_stage_data(opened_ref), micro_batch=4, accum=2)
    straight = list(fed)
    assert [f[1] for f in straight] == [(4, 4)] * 2 + [(8, 8)] * 4
    assert straight[2][2] == [((8, 8), 1, 0), ((8, 8), 1, 1)]  # the switch starts epoch 1 on the 8x8 data
    assert straight[5][2] == [((8, 8), 2, 0), ((8, 8), 2, 1)]  # and that epoch runs out after 3 steps

    model, opt = build(0)
    first = TrainConfig(**{**cfg.to_dict(), "max_steps": stop})
    fit(model, opt, first, grid_stage_data([]), micro_batch=4, accum=2,
        hooks=Hooks(on_checkpoint=lambda step, metrics, state: save_checkpoint(tmp_path, model, opt, state)))
    model2, opt2 = build(99)  # everything must come from the checkpoint
    start = load_checkpoint(tmp_path, model2, opt2)
    assert start["step"] == stop
    fed.clear()
    opened = []
    fit(model2, opt2, cfg, grid_stage_data(opened), micro_batch=4, accum=2, start=start)
    assert fed == straight[stop:]
    assert set(opened) <= set(opened_ref), opened  # no data the uninterrupted run did not read
    for (k, a), b in zip(ref.state_dict().items(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------------- the loss's normalisation
class MaskQueue:
    """Stands in for `random_token_mask`: hands out the rows of fixed masks in call order (one call
    per micro-batch), so differently split steps train on the same hidden tokens."""

    def __init__(self, masks):
        self.masks, self.at = masks, 0

    def __call__(self, batch, n_tokens, schedule="cosine", generator=None):
        out = self.masks[self.at:self.at + batch]
        self.at += batch
        assert out.shape == (batch, n_tokens)
        return out.clone()


def loss_case(preset):
    """8 rows of a 4x4 grid whose hidden-token counts range from 1 to 16 (a mean per micro-batch
    would weight a token of row 0 16x more than one of row 4), and a model without condition dropout."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (8, 16), generator=g)
    labels = torch.arange(8) % 4
    counts = torch.tensor([1, 1, 2, 3, 16, 16, 12, 9])
    order = torch.rand(8, 16, generator=g).argsort(1)
    masks = torch.zeros(8, 16, dtype=torch.bool).scatter_(1, order, torch.arange(16) < counts[:, None])
    torch.manual_seed(0)
    model = build_model(preset, **SMALL, grid_size=(4, 4), class_dropout=0.0)
    return model, tokens, labels, masks


def hand_loss_and_grads(model, tokens, labels, masks):
    """sum(token NLL) / count over every scored token, from one full forward over all 8 rows (the
    hidden tokens for a masked model, every token for a causal one)."""
    model.train()
    model.zero_grad()
    drop = torch.zeros(len(tokens), dtype=torch.bool)
    if model.config.causal:
        logits = model(tokens, labels, (4, 4), drop_cond=drop)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1), reduction="sum") / tokens.numel()
    else:
        logits = model(tokens.masked_fill(masks, model.config.mask_token_id), labels, (4, 4), drop_cond=drop)
        loss = F.cross_entropy(logits[masks], tokens[masks], reduction="sum") / masks.sum()
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}


def split_rows(tokens, labels, sizes):
    out, at = [], 0
    for n in sizes:
        out.append({"tokens": tokens[at:at + n], "label": labels[at:at + n]})
        at += n
    return out


@pytest.mark.parametrize("preset", ["maskgil-tiny", "llamagen-tiny"])
@pytest.mark.parametrize("sizes", [[8], [2, 2, 2, 2], [4, 4]], ids=["accum1", "accum4", "accum2_by_count"])
def test_step_loss_is_the_mean_over_every_scored_token_however_the_batch_is_split(monkeypatch, preset, sizes):
    """Gradient accumulation must not reweight tokens: the step's gradient and logged loss are
    sum(token NLL) / count over the whole batch, for one micro-batch or several (the last split
    puts the lightly masked rows in one micro-batch and the heavily masked in the other)."""
    from maskgil.training import objectives

    model, tokens, labels, masks = loss_case(preset)
    hand_loss, hand = hand_loss_and_grads(copy.deepcopy(model), tokens, labels, masks)
    monkeypatch.setattr(objectives, "random_token_mask", MaskQueue(masks))
    cfg = TrainConfig(preset=preset, global_batch=8, lr=1e-3, grad_clip=0.0, label_smoothing=0.0)
    out = train_step(model, build_optimizer(model, cfg), split_rows(tokens, labels, sizes), cfg, 0, (4, 4))
    assert out["loss"] == pytest.approx(hand_loss, rel=1e-6)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, hand[k], rtol=0, atol=1e-6, msg=k)


def _global_mean_worker(rank, port, out):
    import os
    import sys

    import torch.distributed as dist

    from maskgil.training import objectives
    from maskgil.training.distributed import unwrap, wrap_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = {}
        for strategy in ("ddp", "fsdp"):
            model, tokens, labels, masks = loss_case("maskgil-tiny")
            rows = slice(4 * rank, 4 * rank + 4)  # rank 0: the lightly masked rows, rank 1: the heavily masked
            objectives.random_token_mask = MaskQueue(masks[rows])
            model = wrap_model(model, strategy, torch.device("cpu"))
            cfg = TrainConfig(global_batch=8, lr=1e-3, grad_clip=0.0, label_smoothing=0.0, strategy=strategy)
            metrics = train_step(model, build_optimizer(model, cfg), split_rows(tokens[rows], labels[rows], [2, 2]), cfg,
                                 0, (4, 4), rank=rank, world_size=2)
            grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                     for k, p in unwrap(model).named_parameters()}
            result[strategy] = (metrics["loss"], grads)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # saved: skip the interpreter teardown a gloo rank occasionally aborts in (see test_fsdp_cpu.py)


def test_two_ranks_weight_every_hidden_token_alike_under_ddp_and_fsdp(tmp_path):
    """2 gloo ranks x 2 micro-batches, one rank holding the lightly and the other the heavily masked
    rows: after DDP's and FSDP2's gradient averaging, the gradient and the logged loss are still
    sum(token NLL) / count over all 8 rows (the hidden-token count is summed over the ranks)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_global_mean_worker, args=(port, str(tmp_path / "out.pt")), nprocs=2, join=True)
    result = torch.load(tmp_path / "out.pt")
    model, tokens, labels, masks = loss_case("maskgil-tiny")
    hand_loss, hand = hand_loss_and_grads(model, tokens, labels, masks)
    for strategy, (loss, grads) in result.items():
        assert loss == pytest.approx(hand_loss, rel=1e-6), strategy
        for k, g in hand.items():
            torch.testing.assert_close(grads[k], g, rtol=0, atol=1e-6, msg=f"{strategy} {k}")


@pytest.mark.parametrize("preset", ["maskgil-tiny", "llamagen-tiny"])
def test_train_step_draws_the_masks_and_condition_dropout_of_its_step_seed(preset):
    """Counting a step's hidden tokens before its forwards does not change what it trains on: the
    model sees the masks and dropped conditions drawn, in that order, from each micro-batch's
    (seed, step, rank, micro) generator, as the objective draws them."""
    from maskgil.training.loop import step_seed
    from maskgil.training.objectives import condition_dropout, random_token_mask

    model, _ = make(preset, TrainConfig())
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args[0].clone(), kwargs["drop_cond"].clone())),
                                    with_kwargs=True)
    cfg = TrainConfig(preset=preset, global_batch=16, lr=1e-3, seed=7)
    batches = list(synthetic_data(n=16, micro=8)((8, 8), 0))
    train_step(model, build_optimizer(model, cfg), batches, cfg, 5, (8, 8), rank=3)
    assert len(seen) == 2
    for i, (batch, (inputs, drop)) in enumerate(zip(batches, seen)):
        g = torch.Generator().manual_seed(step_seed(7, 5, 3, i))
        expected = batch["tokens"]
        if not model.config.causal:
            expected = expected.masked_fill(random_token_mask(8, 64, "cosine", g), model.config.mask_token_id)
        assert torch.equal(inputs, expected)
        assert torch.equal(drop, condition_dropout(8, model.config.class_dropout, g))


# ---------------------------------------------------------------------------- optimizer and clipping
@pytest.mark.parametrize("preset", ["maskgil-tiny", "llamagen-tiny", "transformer-tiny"])
def test_optimizer_decays_matrices_and_embeddings_but_not_norms_or_biases(preset):
    """AdamW with the configured betas; weight decay on weight matrices and embedding tables only.
    QK-Norm's per-head gains and biases are 3-D but are norm parameters: no decay."""
    cfg = TrainConfig(lr=2e-4, betas=(0.8, 0.95), weight_decay=0.05)
    model = build_model(preset, **SMALL)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert all(g["betas"] == (0.8, 0.95) and g["lr"] == 2e-4 for g in opt.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, kept = ({names[id(p)] for p in g["params"]} for g in (decay, no_decay))
    assert decayed | kept == set(names.values()) and not decayed & kept
    assert kept == {n for n in names.values() if "norm" in n or n.endswith("bias")}, kept
    assert {"tok_embeddings.weight"} <= decayed and any("cls_embedding" in n for n in decayed)
    if preset == "maskgil-tiny":
        assert "layers.0.attention.q_norm.weight" in kept and "layers.0.attention.k_norm.bias" in kept


def test_grad_clip_scales_the_gradient_to_the_configured_norm():
    """grad_clip bounds the global gradient norm the optimizer steps with (the logged grad_norm is
    the norm before clipping); 0 leaves the gradient as it is."""
    batch = next(iter(synthetic_data()((8, 8), 0)))
    grads, norms = {}, {}
    for clip in (0.0, 1e-3):
        cfg = TrainConfig(global_batch=8, lr=1e-3, grad_clip=clip)
        model, opt = make("maskgil-tiny", cfg)
        norms[clip] = train_step(model, opt, [batch], cfg, 0, (8, 8))["grad_norm"]
        grads[clip] = [p.grad.clone() for p in model.parameters()]
    assert norms[0.0] == norms[1e-3] > 0.1
    unclipped = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads[0.0]])).item()
    assert unclipped == pytest.approx(norms[0.0], rel=1e-5)
    clipped = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads[1e-3]])).item()
    assert clipped == pytest.approx(1e-3, rel=1e-4)
    for a, b in zip(grads[1e-3], grads[0.0]):
        torch.testing.assert_close(a, b * (1e-3 / (norms[0.0] + 1e-6)))


# ---------------------------------------------------------------------------- config validation
@pytest.mark.parametrize("field,value,message", [
    ("lr", -1e-4, "lr must be > 0, got -0.0001"),
    ("lr", 0.0, "lr must be > 0"),
    ("lr", float("nan"), "lr must be > 0"),
    ("min_lr_ratio", -1.0, r"min_lr_ratio must be in \[0, 1\], got -1.0"),
    ("min_lr_ratio", 1.5, r"min_lr_ratio must be in \[0, 1\]"),
    ("warmup_steps", -5, "warmup_steps must be >= 0, got -5"),
    ("weight_decay", -1e-5, "weight_decay must be >= 0"),
    ("betas", (0.9, 1.0), r"betas must be two numbers in \[0, 1\), got \[0.9, 1.0\]"),
    ("betas", (-0.1, 0.96), r"betas must be two numbers in \[0, 1\)"),
    ("grad_clip", -1.0, r"grad_clip must be >= 0 \(0 disables clipping\), got -1.0"),
    ("label_smoothing", 1.0, r"label_smoothing must be null \(the objective's default\) or in \[0, 1\), got 1.0"),
    ("label_smoothing", -0.1, "label_smoothing must be null"),
    ("mask_schedule", "cosin", r"mask_schedule must be one of \('cosine', 'arccos', 'linear'\), got 'cosin'"),
    ("lr_schedule", "cosin", "lr_schedule must be 'constant' or 'cosine', got 'cosin'"),
    ("max_steps", 0, "max_steps and global_batch must be >= 1"),
    ("global_batch", 0, "max_steps and global_batch must be >= 1"),
    ("micro_batch", 0, "micro_batch must be null or an integer >= 1, got 0"),
    ("micro_batch", -4, "micro_batch must be null or an integer >= 1"),
    ("strategy", "ddpp", r"strategy must be one of \('auto', 'none', 'ddp', 'fsdp'\), got 'ddpp'"),
    ("checkpoint_every", 0, "checkpoint_every must be >= 1, got 0"),
    ("keep_checkpoints", 0, "keep_checkpoints must be >= 1"),
    ("log_every", -3, "log_every must be >= 1"),
    ("sample_every", -1, "sample_every must be >= 0"),
    ("grid_schedule", [[0, 0, 8]], "grid_schedule must be"),
])
def test_train_config_rejects_values_that_would_train_wrongly(field, value, message):
    """Each rejected at construction with the field and its accepted range (and, from a run file,
    under its `train.` key) instead of a negative learning rate, clipping silently off, a checkpoint
    every step, or a failure inside a Ray worker."""
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})
    with pytest.raises(ValueError, match="train." + message):
        load_run_config(None, {"train": {field: value if not isinstance(value, tuple) else list(value)}})


def test_train_config_accepts_the_edges_of_its_ranges():
    TrainConfig(lr=1e-9, min_lr_ratio=0.0, warmup_steps=0, weight_decay=0.0, betas=(0.0, 0.999), grad_clip=0.0,
                label_smoothing=0.0, micro_batch=1, checkpoint_every=1, keep_checkpoints=1, log_every=1, sample_every=0)
    TrainConfig(min_lr_ratio=1.0, label_smoothing=None, micro_batch=None, mask_schedule="arccos")
    with pytest.raises(ValueError, match="mask_schedule must be one of"):  # a causal model's too
        TrainConfig(preset="llamagen-tiny", mask_schedule="cosin")


def test_run_config_rejects_values_that_would_fail_later():
    """Outside `train`: values Ray or the final sample grid would refuse only after the run started;
    strategy 'none' (no gradient sync) with several workers."""
    bad = {("scaling", "threads_per_worker", 0): "scaling.threads_per_worker must be >= 1, got 0",
           ("scaling", "cpus_per_worker", -1.0): "scaling.cpus_per_worker must be > 0",
           ("scaling", "gpus_per_worker", 0.0): "scaling.gpus_per_worker must be > 0",
           ("data", "shuffle_buffer", -1): "data.shuffle_buffer must be >= 0",
           ("run", "max_failures", -2): r"run.max_failures must be >= -1 \(-1: retry forever\)",
           ("sample", "steps", 0): "sample.steps must be >= 1",
           ("sample", "per_class", 0): "sample.per_class must be >= 1",
           ("sample", "temperature", 0.0): "sample.temperature must be a finite number > 0",
           ("sample", "temperature", float("inf")): "sample.temperature must be a finite number > 0",
           ("sample", "top_k", -1): r"sample.top_k must be None or 0 \(off\), or an integer >= 1"}
    for (section, key, value), message in bad.items():
        with pytest.raises(ValueError, match=message):
            load_run_config(None, {section: {key: value}})
    with pytest.raises(ValueError, match="train.strategy 'none' syncs no gradients: with 2 workers"):
        load_run_config(None, {"train": {"strategy": "none"}, "scaling": {"num_workers": 2}})
    ok = load_run_config(None, {"train": {"strategy": "none"}, "run": {"max_failures": -1}, "sample": {"top_k": 0}})
    assert ok["run"]["max_failures"] == -1 and ok["sample"]["top_k"] == 0  # retry forever; top-k off


def test_every_training_run_file_loads():
    files = sorted((Path(__file__).resolve().parents[1] / "ray_configs").glob("train_*.yaml"))
    assert len(files) >= 10
    for f in files:
        cfg = load_run_config(f)
        TrainConfig.from_dict(cfg["train"])


# ---------------------------------------------------------------------------- dropout RNG
def test_dropout_is_seeded_per_step_rank_and_micro_batch_not_by_the_process_generator():
    """A step's dropout draws from a generator seeded by (run seed, step, rank, micro-batch). Seeded
    once at start-up, every rank would drop the same activations of its different rows, and a
    resumed run would need the generator's state from the checkpoint. The caller's generator is
    left where it was."""
    cfg = TrainConfig(preset="llamagen-tiny", global_batch=8, lr=1e-3)
    batch = next(iter(synthetic_data(n=8, micro=8)((8, 8), 0)))

    def loss(rank=0, step=0, token_dropout=0.5, scramble=0, micro=(batch,)):
        model, opt = make("llamagen-tiny", cfg, token_dropout=token_dropout, class_dropout=0.0)  # causal: no masks
        torch.manual_seed(scramble)  # whatever the process's generator holds
        return train_step(model, opt, list(micro), cfg, step, (8, 8), rank=rank)["loss"]

    base = loss()
    assert loss(scramble=123) == base  # a restarted process drops what the first one did
    assert loss(rank=1) != base  # another rank drops other activations
    assert loss(step=1) != base  # so does another step (same weights: only the dropout differs)
    assert loss(micro=(batch, batch)) != base  # two copies of one micro-batch drop different activations
    assert loss(rank=1, token_dropout=0.0) == loss(token_dropout=0.0)  # control: without dropout rank plays no part

    model, opt = make("llamagen-tiny", cfg, token_dropout=0.5, class_dropout=0.0)
    torch.manual_seed(7)
    expected = torch.rand(100)
    torch.manual_seed(7)
    train_step(model, opt, [batch], cfg, 0, (8, 8))
    assert torch.equal(torch.rand(100), expected)


def test_checkpoints_written_with_rng_state_still_load(tmp_path):
    """Checkpoints no longer hold RNG state (the step seeds every draw); ones written when they did
    (a CPU generator, and a CUDA one from a GPU run) load as before."""
    cfg = TrainConfig(global_batch=8)
    model, opt = make("maskgil-tiny", cfg)
    save_checkpoint(tmp_path, model, opt, {"step": 1})
    state = torch.load(tmp_path / TRAIN_STATE_NAME, weights_only=True)
    assert not any("rng" in k for k in state)
    state.update(torch_rng=torch.get_rng_state(), cuda_rng=torch.zeros(16, dtype=torch.uint8))
    torch.save(state, tmp_path / TRAIN_STATE_NAME)
    model2, opt2 = make("maskgil-tiny", cfg, seed=5)
    assert load_checkpoint(tmp_path, model2, opt2)["step"] == 1
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
