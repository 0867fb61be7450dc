"""CUDA paths: bf16 autocast, the KV cache on the GPU (eager, compiled, CUDA graphs), FSDP2 (`fully_shard`) training with a
checkpoint that restores unsharded, and dropout on the GPU seeded by the step (a resumed run drops what the first did). Skipped on machines without a GPU (CI has none); run with
`python -m pytest tests/test_gpu.py` on a GPU box (benchmarks/gpu_checks.sh does, with the benchmarks).
"""
import contextlib

import pytest
import torch
import torch.distributed as dist

from maskgil.models import build_model
from maskgil.sampling import sample_ar, sample_maskgit
from maskgil.training import TrainConfig, build_optimizer, train_step
from maskgil.training.distributed import (full_model_state, full_optimizer_state, init_single_process_group,
                                          wrap_model)
from maskgil.training.loop import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda", 0)  # an index: init_process_group(device_id=...) needs one
GRID = (8, 8)


def fixed_batches(n_micro: int, micro: int, vocab: int = 512, seed: int = 0) -> list[dict]:
    """Micro-batches of structured token grids (each class a fixed pattern) the model can fit fast."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(0, vocab, (16, GRID[0] * GRID[1]), generator=g)
    out = []
    for _ in range(n_micro):
        labels = torch.randint(0, 16, (micro,), generator=g)
        out.append({"tokens": patterns[labels], "label": labels})
    return out


@contextlib.contextmanager
def single_rank_group():
    """A one-process NCCL group, enough for FSDP2's collectives to run for real."""
    init_single_process_group(CUDA)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_bf16_forward_matches_fp64_reference():
    torch.manual_seed(0)
    model = build_model("maskgil-tiny", vocab_size=512, num_classes=16, grid_size=GRID).eval()
    tokens = torch.randint(0, 512, (4, 64))
    labels = torch.arange(4)
    with torch.no_grad():
        ref = model.double()(tokens, labels).float()
        model = model.float().to(CUDA)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = model(tokens.to(CUDA), labels.to(CUDA)).float().cpu()
    rel = (got - ref).norm() / ref.norm()
    assert rel < 2e-2, f"bf16 forward off the fp64 reference by {rel:.2e}"


def test_kv_cache_decoding_on_gpu_equals_full_forward():
    torch.manual_seed(2)
    model = build_model("llamagen-tiny", vocab_size=512, num_classes=16, grid_size=GRID).to(CUDA).eval()
    tokens = torch.randint(0, 512, (3, 64), device=CUDA)
    cond = torch.tensor([0, 5, 15], device=CUDA)
    with torch.no_grad():
        full = model(tokens, cond)  # (B, N, V): position i predicts token i from tokens < i
        model.setup_kv_cache(3, GRID)
        step_logits = [model.prefill(cond)]
        for i in range(63):
            step_logits.append(model.decode_tokens(tokens[:, i:i + 1], i))
        model.clear_kv_cache()
    cached = torch.stack(step_logits, dim=1)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", [True, "reduce-overhead"], ids=["compiled", "cuda_graphs"])
def test_compiled_ar_decoding_on_gpu_equals_eager(mode):
    """The compiled decode step (inductor; with CUDA graphs) writes the same greedy tokens as the
    eager step, twice in a row on the kept cache; fp32 so near-ties cannot flip."""
    torch.manual_seed(3)
    model = build_model("llamagen-tiny", vocab_size=512, num_classes=16, grid_size=GRID).to(CUDA).eval()
    cond = torch.tensor([0, 5, 15], device=CUDA)
    eager = sample_ar(model, cond, cfg_scale=2.0, top_k=1)
    for _ in range(2):
        torch.testing.assert_close(sample_ar(model, cond, cfg_scale=2.0, top_k=1, compile=mode), eager)
    model.clear_kv_cache()


def test_compiled_maskgit_sampling_on_gpu_equals_eager():
    torch.manual_seed(4)
    model = build_model("maskgil-tiny", vocab_size=512, num_classes=16, grid_size=GRID).to(CUDA).eval()
    cond = torch.tensor([0, 5, 15], device=CUDA)
    run = lambda **kw: sample_maskgit(model, cond, cfg_scale=2.0, top_k=1,  # noqa: E731
                                      generator=torch.Generator(device=CUDA).manual_seed(0), **kw)
    torch.testing.assert_close(run(compile=True), run())


def test_maskgit_sampling_on_gpu_reveals_every_token():
    torch.manual_seed(1)
    model = build_model("maskgil-tiny", vocab_size=512, num_classes=16, grid_size=GRID).to(CUDA).eval()
    g = torch.Generator(device=CUDA).manual_seed(0)
    out = sample_maskgit(model, torch.arange(4, device=CUDA), cfg_scale=2.0, generator=g)
    assert out.shape == (4, 64) and out.device.type == CUDA.type
    assert int(out.min()) >= 0 and int(out.max()) < 512  # no mask id left


def test_bf16_autocast_training_fits_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model("maskgil-tiny", vocab_size=512, num_classes=16, grid_size=GRID).to(CUDA)
    cfg = TrainConfig(preset="maskgil-tiny", global_batch=32, precision="bf16", strategy="none", lr=3e-3,
                      warmup_steps=0, label_smoothing=0.0)
    opt = build_optimizer(model, cfg)
    batches = fixed_batches(1, 32)
    losses = [train_step(model, opt, batches, cfg, s, GRID, device=CUDA)["loss"] for s in range(60)]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses[::10]  # from ln(512) = 6.2 nats


def test_fsdp2_bf16_trains_and_its_checkpoint_restores_unsharded(tmp_path):
    cfg = TrainConfig(preset="maskgil-tiny", global_batch=32, precision="bf16", strategy="fsdp", lr=3e-3,
                      warmup_steps=0, label_smoothing=0.0)
    batches = fixed_batches(2, 16)  # two micro-batches: the no-gradient-sync path runs too
    with single_rank_group():
        torch.manual_seed(0)
        model = wrap_model(build_model("maskgil-tiny", vocab_size=512, num_classes=16, grid_size=GRID), "fsdp",
                           CUDA, "bf16")
        assert type(model).__name__.startswith("FSDP"), type(model)
        opt = build_optimizer(model, cfg)
        losses = [train_step(model, opt, batches, cfg, s, GRID, device=CUDA)["loss"] for s in range(40)]
        save_checkpoint(tmp_path / "ck", model, opt, {"step": 40})
        saved_model = {k: v.clone() for k, v in full_model_state(model).items()}
        saved_opt = {k: {n: t.clone() for n, t in st.items()} for k, st in full_optimizer_state(model, opt)["state"].items()}
        next_loss = train_step(model, opt, batches, cfg, 40, GRID, device=CUDA)["loss"]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses[::10]

    # Restore on a different layout: one unsharded model, no process group.
    plain = build_model("maskgil-tiny", vocab_size=512, num_classes=16, grid_size=GRID)
    opt2 = build_optimizer(plain, TrainConfig(preset="maskgil-tiny", lr=3e-3))
    assert load_checkpoint(tmp_path / "ck", plain, opt2)["step"] == 40
    for k, v in saved_model.items():
        assert torch.equal(plain.state_dict()[k], v), k
    restored_opt = full_optimizer_state(plain, opt2)["state"]
    for k, s in saved_opt.items():
        torch.testing.assert_close(restored_opt[k]["exp_avg"], s["exp_avg"])
    # The restored weights, now on the GPU with the optimizer built there as a resumed run does, give
    # the loss the sharded run saw next (bf16 autocast here vs FSDP2's bf16 parameters there).
    cfg_plain = TrainConfig(**{**cfg.__dict__, "strategy": "none"})
    on_gpu = build_model("maskgil-tiny", vocab_size=512, num_classes=16, grid_size=GRID).to(CUDA)
    opt3 = build_optimizer(on_gpu, cfg_plain)
    load_checkpoint(tmp_path / "ck", on_gpu, opt3)
    resumed = train_step(on_gpu, opt3, batches, cfg_plain, 40, GRID, device=CUDA)["loss"]
    assert abs(resumed - next_loss) < 0.02 * max(1.0, next_loss), (resumed, next_loss)


@pytest.mark.parametrize("strategy", ["none", "fsdp"])
def test_compiled_bf16_training_matches_eager_and_fits(strategy):
    """`train.compile` on the GPU (compiled blocks and loss; with FSDP2 the blocks are compiled, then
    sharded): the first loss equals eager's to bf16 rounding, and it fits the fixed batch."""
    from maskgil.training import compile_blocks

    batches = fixed_batches(2, 16)
    first, losses = {}, []
    with single_rank_group() if strategy == "fsdp" else contextlib.nullcontext():
        for compiled in (False, True):
            cfg = TrainConfig(preset="maskgil-tiny", global_batch=32, precision="bf16", strategy=strategy, lr=3e-3,
                              warmup_steps=0, label_smoothing=0.0, compile=compiled)
            torch.manual_seed(0)
            model = build_model("maskgil-tiny", vocab_size=512, num_classes=16, grid_size=GRID)
            if compiled:
                compile_blocks(model)
            model = wrap_model(model, strategy, CUDA, "bf16")
            opt = build_optimizer(model, cfg)
            first[compiled] = train_step(model, opt, batches, cfg, 0, GRID, device=CUDA)["loss"]
            if compiled:
                losses = [train_step(model, opt, batches, cfg, s, GRID, device=CUDA)["loss"] for s in range(1, 40)]
    assert abs(first[True] - first[False]) < 0.01 * first[False], first
    assert sum(losses[-5:]) / 5 < first[True] - 1.0, losses[::10]


def test_resumed_run_drops_on_the_gpu_what_the_first_run_did(tmp_path):
    """Dropout on the GPU draws from the device's CUDA generator, which each micro-batch seeds from
    (run seed, step, rank, micro-batch): a resumed run, whatever that generator holds after the
    restart, drops the same activations and computes the same losses as the uninterrupted run, and
    another rank drops other ones."""
    cfg = TrainConfig(preset="llamagen-tiny", global_batch=16, lr=3e-3, strategy="none")
    batches = fixed_batches(1, 16)

    def build(seed):
        torch.manual_seed(seed)
        model = build_model("llamagen-tiny", vocab_size=512, num_classes=16, grid_size=GRID, token_dropout=0.5,
                            class_dropout=0.0)
        model = model.to(CUDA)
        return model, build_optimizer(model, cfg)

    model, opt = build(0)
    for s in range(2):
        train_step(model, opt, batches, cfg, s, GRID, device=CUDA)
    save_checkpoint(tmp_path / "ck", model, opt, {"step": 2})
    ref = [train_step(model, opt, batches, cfg, s, GRID, device=CUDA)["loss"] for s in (2, 3)]

    resumed, opt2 = build(1)
    torch.cuda.manual_seed(12345)  # a restarted process's generator is anywhere
    assert load_checkpoint(tmp_path / "ck", resumed, opt2)["step"] == 2
    other_rank = train_step(*build(0), batches, cfg, 0, GRID, rank=1, device=CUDA)["loss"]
    losses = [train_step(resumed, opt2, batches, cfg, s, GRID, device=CUDA)["loss"] for s in (2, 3)]
    assert losses[0] == ref[0]  # same weights, batch and dropout: the same forward
    assert losses[1] == pytest.approx(ref[1], rel=1e-6)
    first = train_step(*build(0), batches, cfg, 0, GRID, device=CUDA)["loss"]
    assert other_rank != first


def test_tokenizer_training_resumes_on_the_gpu_exactly(tmp_path):
    """A tokenizer checkpoint resumed onto the GPU loads its saved generator states there (the CPU
    one must go back to the CPU) and restores both: crops draw on the CPU, code noise on the GPU, so
    the resumed run continues as the uninterrupted one."""
    import numpy as np

    from maskgil.tokenizers.training import TokenizerTrainConfig, TokenizerTrainer

    micro = dict(ch=16, ch_mult=(1, 2), enc_res_blocks=1, dec_res_blocks=1, z_channels=16, norm_groups=4,
                 codebook_size=64)
    cfg = TokenizerTrainConfig(preset="llamagen-vq-tiny", model_overrides=micro, batch_size=8, lr=2e-3,
                               perceptual="none", perceptual_weight=0.0, disc_weight=0.0, code_noise=0.3,
                               crop_size=12, dead_code_restart=1)
    data = np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    batches = [data[i:i + 8] for i in (0, 8, 16)]
    straight = TokenizerTrainer(cfg, device=CUDA)
    for b in batches:
        straight.train_step(b)
    first = TokenizerTrainer(cfg, device=CUDA)
    for b in batches[:2]:
        first.train_step(b)
    first.save(tmp_path / "ck")
    torch.manual_seed(99)  # a restarted process's generators are anywhere
    resumed = TokenizerTrainer.resume(tmp_path / "ck", device=CUDA)
    resumed.train_step(batches[2])
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
