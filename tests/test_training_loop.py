"""The training loop without Ray: batch plan, schedules, loss going down, exact resume,
NaN stop keeping the last good checkpoint, keep-last-K, checkpoints loading into the samplers."""
import math

import pytest
import torch

from maskgil.checkpoint import load_pretrained
from maskgil.models import build_model
from maskgil.sampling import sample_ar, sample_fusion, sample_maskgit
from maskgil.training import (Hooks, NonFiniteLossError, TrainConfig, batch_plan, build_optimizer, compile_blocks,
                              compute_loss, cpu_compile_available, fit, grid_at, list_checkpoints, load_checkpoint,
                              lr_at, prune_checkpoints, save_checkpoint, train_step)

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


def make(preset, cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(preset, **SMALL)
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


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    """Stop at step 3 (mid-epoch), restore into fresh objects, finish: identical to 6 straight steps."""
    cfg = TrainConfig(max_steps=6, global_batch=8, lr=1e-3, checkpoint_every=3)
    data = synthetic_data(n=40, micro=4)  # 10 micro-batches per epoch, 5 steps: crosses an epoch
    ref, opt = make("maskgil-tiny", cfg)
    fit(ref, opt, cfg, data, micro_batch=4, accum=2)

    model, opt = make("maskgil-tiny", cfg)
    saved = {}

    def on_ckpt(step, metrics, state):
        save_checkpoint(tmp_path / f"step_{step:08d}", model, opt, state)
        saved[step] = state

    half = TrainConfig(**{**cfg.to_dict(), "max_steps": 3})
    fit(model, opt, half, data, micro_batch=4, accum=2, hooks=Hooks(on_checkpoint=on_ckpt))
    assert saved[3]["step"] == 3 and saved[3]["batches_in_epoch"] == 6

    model2, opt2 = make("maskgil-tiny", cfg, seed=99)  # different init: everything must come from disk
    start = load_checkpoint(tmp_path / "step_00000003", model2, opt2)
    assert start == {"step": 3, "epoch": 0, "batches_in_epoch": 6}
    steps = []
    out = fit(model2, opt2, cfg, data, micro_batch=4, accum=2, start=start,
              hooks=Hooks(on_step_end=steps.append))
    assert steps == [4, 5, 6] and out["step"] == 6
    for (k, a), b in zip(ref.state_dict().items(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = TrainConfig(max_steps=10, global_batch=8, lr=1e-3, checkpoint_every=2)
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
    assert [p.name for p in kept] == ["step_00000002", "step_00000004"]  # keep-last-2 pruned step 2's elder
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
