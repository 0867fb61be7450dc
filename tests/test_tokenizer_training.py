"""Tokenizer training library: loss goes down, GAN/adaptive path, EMA, exact resume, dead-code restart."""
import numpy as np
import pytest
import torch

from maskgil.tokenizers import build_tokenizer
from maskgil.tokenizers.training import (
    TokenizerTrainConfig,
    TokenizerTrainer,
    batch_iterator,
    default_train_config,
    save_recon_grid,
    train_tokenizer,
)

MICRO = dict(ch=16, ch_mult=(1, 2), enc_res_blocks=1, dec_res_blocks=1, z_channels=16, norm_groups=4)


PALETTE = np.array([[220, 40, 40], [40, 175, 60], [45, 85, 225], [240, 215, 40], [128, 128, 128]], np.uint8)


def blobs(n=64, size=16, seed=0):
    """Palette-coloured squares on a palette background: learnable in a few dozen steps."""
    rng = np.random.default_rng(seed)
    imgs = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        imgs[i] = PALETTE[rng.integers(0, len(PALETTE))]
        y, x, s = rng.integers(0, size // 2, 2).tolist() + [size // 2]
        imgs[i, y : y + s, x : x + s] = PALETTE[rng.integers(0, len(PALETTE))]
    return imgs


def micro_config(**kw):
    base = dict(preset="llamagen-vq-tiny", model_overrides=dict(MICRO, codebook_size=64), batch_size=8, lr=2e-3,
                perceptual="none", perceptual_weight=0.0, disc_weight=0.0)
    base.update(kw)
    return TokenizerTrainConfig(**base)


def test_short_training_reduces_reconstruction_error():
    data, held_out = blobs(), blobs(16, seed=1)
    config = micro_config(dead_code_restart=10)
    x = torch.from_numpy(held_out).permute(0, 3, 1, 2).float() / 127.5 - 1
    before = ((build_tokenizer(config.preset, **config.model_overrides).reconstruct(held_out) - x) ** 2).mean()
    tok, hist = train_tokenizer(config, data, steps=100, log_every=10, progress=False)
    assert hist[-1]["step"] == 100 and not tok.training
    after = ((tok.reconstruct(held_out) - x) ** 2).mean()
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("preset", ["vqgan-maskgit-tiny", "lfq-magvit2-tiny"])
def test_other_families_train_with_gan_and_adaptive_weight(preset):
    over = dict(MICRO) if preset.startswith("vqgan") else {k: v for k, v in MICRO.items() if k != "z_channels"}
    config = micro_config(preset=preset, model_overrides=over, disc_weight=0.5, disc_start=1, disc_adaptive=True,
                          disc_ndf=8, disc_layers=1)
    trainer = TokenizerTrainer(config)
    data = blobs(16)
    m0 = trainer.train_step(data[:8])
    m1 = trainer.train_step(data[8:])
    assert "gan_g" not in m0 and {"gan_g", "gan_d", "gan_weight"} <= set(m1)
    assert np.isfinite(m1["loss"]) and m1["gan_weight"] > 0
    if preset.startswith("lfq"):
        assert "q_entropy" in m1


def test_adaptive_weight_is_gradient_norm_ratio():
    trainer = TokenizerTrainer(micro_config(disc_weight=1.0, disc_start=0, disc_adaptive=True, disc_ndf=8, disc_layers=1))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, _, _ = trainer.model(x)
    nll = (rec - x).abs().mean()
    g = -trainer.disc(rec).mean()
    w = trainer._adaptive_weight(nll, g)
    last = trainer.model.decoder.conv_out.weight
    a = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    b = torch.autograd.grad(g, last, retain_graph=True)[0].norm()
    assert w.item() == pytest.approx((a / (b + 1e-4)).item(), rel=1e-5)


def test_hinge_losses_by_hand():
    from maskgil.tokenizers.discriminator import hinge_d_loss, hinge_g_loss

    real, fake = torch.tensor([2.0, -0.5]), torch.tensor([-3.0, 0.5])
    # D: (mean relu(1 - [2, -0.5]) + mean relu(1 + [-3, 0.5])) / 2 = (0.75 + 0.75) / 2; G: -mean(fake)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.75)
    assert hinge_g_loss(fake).item() == pytest.approx(1.25)


class MeanDisc(torch.nn.Module):
    """A discriminator whose logit is 4 x an image's mean plus an offset: real images and their
    reconstructions get different logits, so swapped arguments show."""

    def __init__(self):
        super().__init__()
        self.offset = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return 4 * x.float().mean(dim=(1, 2, 3)) + self.offset


def spied_trainer(monkeypatch, **config):
    """A trainer with MeanDisc (frozen: lr 0), a constant perceptual loss of 0.25 per image, and the
    images and reconstructions of its last step kept in `seen`."""
    trainer = TokenizerTrainer(micro_config(disc_start=0, disc_ndf=8, disc_layers=1, **config))
    trainer.disc = MeanDisc()
    trainer.opt_d = torch.optim.SGD(trainer.disc.parameters(), lr=0.0)
    trainer.perceptual = lambda rec, x: torch.full((len(x),), 0.25)
    seen, losses = {}, trainer.losses

    def spy(x):
        total, rec, m = losses(x)
        seen.update(x=x.detach().float(), rec=rec.detach())
        return total, rec, m

    monkeypatch.setattr(trainer, "losses", spy)
    return trainer, seen


@pytest.mark.parametrize("recon_loss", ["l2", "l1"])
def test_generator_loss_is_the_weighted_sum_and_the_gan_is_wired_as_written(monkeypatch, recon_loss):
    """loss = rw * recon + pw * perceptual + qw * quantizer terms + disc_weight * hinge_g(D(rec));
    D trains on hinge_d(D(real), D(rec)); recon is L1 or L2 as configured."""
    trainer, seen = spied_trainer(monkeypatch, recon_loss=recon_loss, recon_weight=2.0, perceptual_weight=0.5,
                                  quantizer_weight=3.0, disc_weight=0.3)
    m = trainer.train_step(blobs(8))
    x, rec = seen["x"], seen["rec"]
    recon = (rec - x).abs().mean() if recon_loss == "l1" else (rec - x).pow(2).mean()
    assert m["recon"] == pytest.approx(recon.item(), rel=1e-5)
    with torch.no_grad():
        d_real, d_fake = trainer.disc(x), trainer.disc(rec)
    assert m["gan_g"] == pytest.approx(-d_fake.mean().item(), rel=1e-5)
    assert m["gan_d"] == pytest.approx(0.5 * ((1 - d_real).clamp(min=0).mean() + (1 + d_fake).clamp(min=0).mean()).item(),
                                       rel=1e-5)
    assert m["gan_weight"] == pytest.approx(0.3)
    quantizer = sum(v for k, v in m.items() if k.startswith("q_"))
    assert m["loss"] == pytest.approx(2.0 * m["recon"] + 0.5 * 0.25 + 3.0 * quantizer + 0.3 * m["gan_g"], rel=1e-5)


def test_adaptive_gan_weight_balances_the_gan_against_the_reconstruction_terms(monkeypatch):
    """The adaptive weight compares the GAN gradient with the reconstruction + perceptual loss
    (taming's nll), not the total, and is scaled by disc_weight."""
    trainer, _ = spied_trainer(monkeypatch, recon_weight=2.0, perceptual_weight=0.5, quantizer_weight=3.0,
                               disc_weight=0.3, disc_adaptive=True)
    calls, ratio = [], trainer._adaptive_weight
    monkeypatch.setattr(trainer, "_adaptive_weight", lambda nll, g: calls.append((nll.item(), ratio(nll, g))) or calls[-1][1])
    m = trainer.train_step(blobs(8))
    (nll, w), = calls
    assert nll == pytest.approx(2.0 * m["recon"] + 0.5 * 0.25, rel=1e-5)
    assert m["gan_weight"] == pytest.approx(0.3 * w.item(), rel=1e-5)


def test_tokenizer_lr_warmup_and_gradient_clipping():
    """Warmup: lr * (step + 1) / warmup, then lr; the logged lr is the one the step used. Clipping
    bounds the applied gradient norm; grad_clip=0 means no clipping (it had zeroed every gradient)."""
    trainer = TokenizerTrainer(micro_config(warmup_steps=4, lr=1e-3, grad_clip=1e-3))
    lrs = []
    for trainer.step in (0, 3, 8):
        lrs.append(trainer._lr())
    assert lrs == pytest.approx([2.5e-4, 1e-3, 1e-3])
    trainer.step = 0
    m = trainer.train_step(blobs(8))
    assert m["lr"] == pytest.approx(2.5e-4) and all(g["lr"] == pytest.approx(2.5e-4) for g in trainer.opt.param_groups)
    applied = torch.stack([p.grad.norm() for p in trainer.model.parameters() if p.grad is not None]).norm()
    assert m["grad_norm"] > 1e-2 and applied.item() == pytest.approx(1e-3, rel=1e-3)
    unclipped = TokenizerTrainer(micro_config(grad_clip=0.0))
    before = {k: v.clone() for k, v in unclipped.model.state_dict().items()}
    unclipped.train_step(blobs(8))
    changed = [k for k, v in unclipped.model.state_dict().items() if v.is_floating_point() and not torch.equal(before[k], v)]
    assert any("decoder" in k for k in changed)
    with pytest.raises(ValueError, match="recon_loss"):
        micro_config(recon_loss="L1")


def test_ema_is_exponential_average_of_weights():
    config = micro_config(ema_decay=0.9)
    trainer = TokenizerTrainer(config)
    key = "decoder.conv_out.bias"
    snaps = [trainer.model.state_dict()[key].clone()]
    data = blobs(16)
    for i in range(2):
        trainer.train_step(data[8 * i : 8 * i + 8])
        snaps.append(trainer.model.state_dict()[key].clone())
    expected = 0.81 * snaps[0] + 0.09 * snaps[1] + 0.1 * snaps[2]
    assert torch.allclose(trainer.final_model().state_dict()[key], expected, atol=1e-7)


@pytest.mark.parametrize("kind", ["gan_ema", "random_draws"])
def test_resume_continues_exactly(tmp_path, kind):
    """Stop after 2 steps, resume into a fresh process state, take step 3: the same weights as 3
    straight steps. With the GAN and EMA (their state comes back), and with every random draw of
    tokenizer training (crops, code noise, dead-code restarts: the checkpoint's generator state
    continues, whatever the resuming process's generator holds)."""
    config = (micro_config(disc_weight=0.5, disc_start=1, disc_ndf=8, disc_layers=1, ema_decay=0.5) if kind == "gan_ema"
              else micro_config(crop_size=12, code_noise=0.3, dead_code_restart=1))
    data = blobs(24)
    batches = [data[i : i + 8] for i in (0, 8, 16)]
    a = TokenizerTrainer(config)
    for b in batches:
        a.train_step(b)
    b_tr = TokenizerTrainer(config)
    for b in batches[:2]:
        b_tr.train_step(b)
    b_tr.save(tmp_path / "ckpt")
    torch.manual_seed(1234)  # a restarted process's generator is anywhere
    c = TokenizerTrainer.resume(tmp_path / "ckpt")
    assert c.step == 2
    c.train_step(batches[2])
    for (k, va), vc in zip(a.model.state_dict().items(), c.model.state_dict().values()):
        assert torch.allclose(va, vc, atol=1e-6), k
    if a.disc is not None:
        for (k, va), vc in zip(a.disc.state_dict().items(), c.disc.state_dict().values()):
            assert torch.allclose(va.float(), vc.float(), atol=1e-6), k


def test_resumed_train_tokenizer_sees_the_uninterrupted_batches(tmp_path):
    """train_tokenizer stopped at step 4 and resumed to 7 ends with the weights of 7 straight steps
    (3 batches an epoch: the resume starts mid-epoch; a resume had reshuffled from seed + step)."""
    config, data = micro_config(crop_size=12), blobs(24)
    straight, _ = train_tokenizer(config, data, steps=7, progress=False)
    first = TokenizerTrainer(config)
    train_tokenizer(config, data, steps=4, trainer=first, progress=False)
    first.save(tmp_path / "ckpt")
    torch.manual_seed(99)
    resumed, _ = train_tokenizer(config, data, steps=7, trainer=TokenizerTrainer.resume(tmp_path / "ckpt"),
                                 progress=False)
    for (k, va), vb in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k


@pytest.mark.parametrize("images", ["blobs", "flat"])
def test_dead_codes_are_restarted_onto_distinct_encoder_outputs(images):
    """Dead codes move onto the step's encoder outputs (unit vectors), drawn without replacement from
    the distinct ones: codes restarted onto one vector would tie in every lookup and all but one
    stay dead. Flat images give fewer distinct outputs than dead codes: then the tiled copies are
    nudged apart, and still no two restarted codes are equal."""
    # 8 copies of one flat image: 64 distinct outputs (one per grid position), 256 codes
    data = blobs(8) if images == "blobs" else np.full((8, 16, 16, 3), 128, np.uint8)
    K = 64 if images == "blobs" else 256
    trainer = TokenizerTrainer(micro_config(dead_code_restart=1, model_overrides=dict(MICRO, codebook_size=K)))
    m = trainer.train_step(data)
    used = trainer.model.quantize.codebook_used
    n_used = used[used >= 0].long().unique().numel()
    n = m["codes_restarted"]
    assert n == K - n_used
    inputs = torch.unique(torch.nn.functional.normalize(trainer.model.quantize.last_inputs, dim=-1), dim=0)
    w = trainer.model.quantize.embedding.weight.detach()
    dead = torch.ones(K, dtype=torch.bool)
    dead[used[used >= 0].long().unique()] = False
    moved = w[dead]
    assert torch.unique(moved, dim=0).shape[0] == n  # no two restarted codes alike
    sq_dists = ((moved[:, None, :] - inputs[None]) ** 2).sum(-1).min(1).values
    assert int((sq_dists < 1e-10).sum()) == min(n, len(inputs))  # each distinct output taken once
    assert sq_dists.max() < 1e-2  # the copies stay next to an output
    if images == "flat":
        assert len(inputs) < n  # the case with copies


def _rank_streams_worker(rank, port, out):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        trainer = TokenizerTrainer(micro_config(seed=3, dead_code_restart=5))
        state = trainer.state_dict()  # what rank 0 saves, loaded by every rank on a resume
        first = torch.rand(4)
        trainer.load_state_dict({**state, "rng": torch.load(f"{out}/rng0.pt") if rank else state["rng"]})
        resumed = torch.rand(4)
        k = trainer.code_counts.numel()
        trainer.code_counts.copy_(torch.arange(k) * (rank + 1))  # each rank's uses since the last restart check
        trainer.consolidate_code_counts()
        consolidated = trainer.code_counts.clone()
        trainer.load_state_dict({**state, "code_counts": torch.full((k,), 7)})
        torch.save({"first": first, "resumed": resumed, "consolidated": consolidated, "loaded": trainer.code_counts,
                    "weights": torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_draw_their_own_crops_and_code_noise(tmp_path):
    """Under data parallelism every rank starts from rank 0's weights but draws its own random
    stream (seeded alike, all ranks would crop and noise their different images the same way), also
    after a resume from rank 0's checkpoint; rank 0's stream is a single process's. The code usage
    counts rank 0 saves are all ranks' (a resume had restored rank 0's on every rank)."""
    import socket

    import torch.multiprocessing as mp

    single = TokenizerTrainer(micro_config(seed=3))
    torch.save(single.state_dict()["rng"], tmp_path / "rng0.pt")
    expected = torch.rand(4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_streams_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["weights"], r1["weights"])
    assert torch.equal(r0["first"], expected) and not torch.equal(r1["first"], expected)
    assert torch.equal(r0["resumed"], expected)  # rank 0 continues its saved generator
    assert not torch.equal(r1["resumed"], r0["resumed"])  # not rank 0's restored stream
    # Code usage counts: rank 0 saves every rank's, and on a resume only rank 0 holds them.
    k = len(r0["consolidated"])
    assert torch.equal(r0["consolidated"], torch.arange(k) * 3) and not r1["consolidated"].any()
    assert torch.equal(r0["loaded"], torch.full((k,), 7)) and not r1["loaded"].any()


def test_random_crops_are_windows_of_each_image():
    from maskgil.tokenizers.training import random_crops

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).view(2, 3, 8, 8)
    crops = random_crops(x, 4)
    assert crops.shape == (2, 3, 4, 4)
    for i in range(2):  # each crop equals some 4x4 window of its own image
        assert any(torch.equal(crops[i], x[i, :, t : t + 4, l : l + 4]) for t in range(5) for l in range(5))
    with pytest.raises(ValueError, match="larger than"):
        random_crops(x, 9)


def test_batch_iterator_epochs_and_datasets():
    data = np.arange(10)[:, None]
    it = batch_iterator(data, 4, seed=0)
    seen = np.concatenate([next(it)[:, 0] for _ in range(2)])
    assert len(set(seen.tolist())) == 8  # no repeats within an epoch
    for start in range(7):  # 2 batches an epoch: skipping crosses epochs, as a resume at step `start` does
        it, skipped = batch_iterator(data, 4, seed=3), batch_iterator(data, 4, seed=3, start=start)
        for _ in range(start):
            next(it)
        for _ in range(3):
            assert np.array_equal(next(it), next(skipped)), start
    ds = [(np.full((2, 2, 3), i, np.uint8), i) for i in range(5)]  # map-style, (image, label) items
    assert next(batch_iterator(ds, 3)).shape == (3, 2, 2, 3)
    with pytest.raises(ValueError, match="ran out"):
        train_tokenizer(micro_config(), iter([blobs(8)]), steps=3, progress=False)


def test_tiny_defaults_and_grid(tmp_path):
    c = default_train_config("llamagen-vq-tiny")
    assert c.lr == 1e-3 and c.betas == (0.9, 0.95) and c.grad_clip == 1.0
    assert default_train_config("llamagen-vq").lr == 1e-4
    tok = build_tokenizer("llamagen-vq-tiny")
    from PIL import Image

    path = save_recon_grid(tok, blobs(4, 64), tmp_path / "grid.png", scale=1)
    assert Image.open(path).size == (4 * 64, 2 * 64)


def test_bf16_training_runs_convolutions_in_bf16_and_keeps_fp32_weights():
    data = blobs()
    seen = {}

    def record(name):  # forward hook that notes an output dtype (returns None: the output is unchanged)
        def hook(module, inputs, out):
            seen.setdefault(name, (out[0] if isinstance(out, tuple) else out).dtype)
        return hook

    trainer = TokenizerTrainer(micro_config(precision="bf16"))
    assert trainer.precision == "bf16"
    trainer.model.encoder.register_forward_hook(record("encoder_out"))
    trainer.model.quantize.register_forward_hook(record("quantized"))
    first = trainer.train_step(data[:8])["recon"]
    assert seen == {"encoder_out": torch.bfloat16, "quantized": torch.float32}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    for i in range(60):
        m = trainer.train_step(data[8 * (i % 8): 8 * (i % 8) + 8])
    assert np.isfinite(m["loss"]) and m["recon"] < 0.5 * first, (first, m["recon"])
    # fp32 training stays fp32 throughout
    fp32 = TokenizerTrainer(micro_config())
    fp32.model.encoder.register_forward_hook(record("fp32_encoder_out"))
    fp32.train_step(data[:8])
    assert fp32.precision == "fp32" and seen["fp32_encoder_out"] == torch.float32
    with pytest.raises(ValueError, match="precision"):
        micro_config(precision="half")


# ----------------------------------------------------------------------------------- code noise
@pytest.mark.parametrize("preset", ["llamagen-vq-tiny", "lfq-magvit2-tiny"])
def test_code_noise_swaps_whole_code_vectors_without_gradient_into_them(preset):
    """corrupt_latents replaces about p of the positions by some code's vector (a codebook row for
    VQ, a +-1 vector for LFQ) and passes the gradient only through the positions it kept."""
    torch.manual_seed(0)
    tok = build_tokenizer(preset)
    D = tok.embed_dim
    z = torch.randn(8, D, 16, 16, requires_grad=True)
    assert tok.corrupt_latents(z, 0.0) is z
    out = tok.corrupt_latents(z, 0.3)
    swapped = (out != z).any(1)  # (B, h, w)
    assert 0.25 < swapped.float().mean() < 0.35
    kept = ~swapped
    assert torch.equal(out.permute(0, 2, 3, 1)[kept], z.permute(0, 2, 3, 1)[kept])
    vecs = out.permute(0, 2, 3, 1)[swapped]  # (n, D)
    if preset.startswith("llamagen"):
        book = tok.quantize.codebook().detach()  # (K, D)
        assert (vecs.detach()[:, None] - book[None]).abs().amax(-1).min(1).values.max() == 0  # codebook rows
    else:
        assert torch.equal(vecs.abs(), torch.ones_like(vecs))
    out.sum().backward()
    assert torch.equal(z.grad, kept[:, None].expand_as(z).float())
    assert all(p.grad is None for p in tok.parameters())


def test_code_noise_changes_the_reconstruction_only():
    """In training, the codes and the quantizer losses are those of the clean codes; only the
    decoder sees swapped ones."""
    tok = build_tokenizer("llamagen-vq-tiny").train()
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    torch.manual_seed(1)
    rec, losses, codes = tok(x)
    torch.manual_seed(1)
    rec_n, losses_n, codes_n = tok(x, code_noise=0.5)
    assert torch.equal(codes, codes_n)
    assert all(torch.equal(losses[k], losses_n[k]) for k in losses)
    assert not torch.allclose(rec, rec_n)
    with pytest.raises(ValueError, match="code_noise"):
        micro_config(code_noise=1.0)


def test_trainer_passes_code_noise_to_the_model(monkeypatch):
    seen = []
    trainer = TokenizerTrainer(micro_config(code_noise=0.2))
    forward = type(trainer.model).forward
    monkeypatch.setattr(type(trainer.model), "forward",
                        lambda self, x, code_noise=0.0: seen.append(code_noise) or forward(self, x, code_noise))
    trainer.train_step(blobs(8))
    assert seen == [0.2]
