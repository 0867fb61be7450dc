"""Tokenizer interface, LlamaGen-VQ strict loading, VQ lookup against hand computations."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskgil.checkpoint import CheckpointMismatchError
from maskgil.tokenizers import (
    TOKENIZER_PRESETS,
    ImageTokenizer,
    VectorQuantizer,
    build_tokenizer,
    load_llamagen_vq,
    load_tokenizer,
    vq_from_state_dict,
)
from maskgil.tokenizers.vq import VQConfig

FIXTURE = Path(__file__).parent / "fixtures" / "llamagen_vq16_state_dict.tsv"
TINY = [n for n in TOKENIZER_PRESETS if n.endswith("-tiny")]


def reference_shapes() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of LlamaGen's vq_ds16_c2i.pt `model` state dict, from the reference TSV."""
    shapes = {}
    for line in FIXTURE.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")
        shapes[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return shapes


def fake_state(shapes, generator=None):
    return {k: torch.randn(s, generator=generator) * 0.02 for k, s in shapes.items()}


def shapes_image(batch=2, h=64, w=64, seed=0):
    """Coloured rectangles/discs on a flat background, uint8 (B,H,W,3)."""
    rng = np.random.default_rng(seed)
    imgs = np.zeros((batch, h, w, 3), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for b in range(batch):
        imgs[b] = rng.integers(0, 255, 3)
        cy, cx, r = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4), rng.integers(4, min(h, w) // 3)
        imgs[b][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    return imgs


# -- LlamaGen-VQ strict loading ------------------------------------------------------------------
def test_reference_fixture_has_344_keys_and_71_883_403_params():
    shapes = reference_shapes()
    assert len(shapes) == 344
    assert sum(math.prod(s) for k, s in shapes.items() if k != "quantize.codebook_used") == 71_883_403


def test_llamagen_vq_matches_reference_keys_and_shapes():
    with torch.device("meta"):
        tok = build_tokenizer("llamagen-vq")
    got = {k: tuple(v.shape) for k, v in tok.state_dict().items()}
    assert got == reference_shapes()
    assert sum(p.numel() for p in tok.parameters()) == 71_883_403
    assert (tok.codebook_size, tok.downsample, tok.embed_dim) == (16384, 16, 8)


def test_llamagen_vq_loads_reference_state_dict_strictly_and_runs():
    state = fake_state(reference_shapes(), torch.Generator().manual_seed(1))
    tok = vq_from_state_dict(state, VQConfig())
    assert tok.quantize.embedding.weight.data_ptr() == state["quantize.embedding.weight"].data_ptr()  # assigned
    codes = tok.encode(torch.zeros(1, 3, 32, 48))
    assert codes.shape == (1, 2, 3) and codes.dtype == torch.long
    assert tok.decode(codes).shape == (1, 3, 32, 48)


def test_mismatched_state_dict_lists_first_mismatches():
    shapes = reference_shapes()
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    del state["decoder.conv_blocks.0.attn.2.q.weight"]
    state["quantize.embedding.weight"] = torch.empty(8192, 8, device="meta")
    state["quantize.extra"] = torch.empty(3, device="meta")
    with pytest.raises(CheckpointMismatchError) as err:
        vq_from_state_dict(state, VQConfig())
    msg = str(err.value)
    assert "decoder.conv_blocks.0.attn.2.q.weight" in msg
    assert "quantize.embedding.weight: checkpoint (8192, 8) vs model (16384, 8)" in msg
    assert "quantize.extra" in msg


def test_load_llamagen_checkpoint_file_model_key(tmp_path):
    config = TOKENIZER_PRESETS["llamagen-vq-tiny"][1]
    src = build_tokenizer("llamagen-vq-tiny")
    torch.save({"model": src.state_dict(), "steps": 3}, tmp_path / "vq.pt")
    tok = load_llamagen_vq(tmp_path / "vq.pt", config=config)
    for k, v in src.state_dict().items():
        assert torch.equal(tok.state_dict()[k], v), k


# -- the interface -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("hw", [(64, 64), (32, 48)])
def test_encode_decode_shapes(name, hw):
    tok = build_tokenizer(name)
    d = tok.downsample
    imgs = shapes_image(2, *hw)
    codes = tok.encode(imgs)
    assert codes.shape == (2, hw[0] // d, hw[1] // d) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < tok.codebook_size
    out = tok.decode(codes)
    assert out.shape == (2, 3, *hw) and out.dtype == torch.float32
    assert float(out.min()) >= -1 and float(out.max()) <= 1
    assert tok.training  # encode/decode restore the caller's mode


@pytest.mark.parametrize("name", TINY)
def test_size_not_divisible_is_a_clear_error(name):
    tok = build_tokenizer(name)
    with pytest.raises(ValueError, match=rf"60x64 is not divisible .* downsample factor {tok.downsample}"):
        tok.encode(shapes_image(1, 60, 64))


def test_input_layouts_agree():
    tok = build_tokenizer("llamagen-vq-tiny")
    hwc = shapes_image(2, 32, 32)
    chw = np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))
    as_float = torch.from_numpy(chw).float() / 127.5 - 1
    a, b, c = tok.encode(hwc), tok.encode(torch.from_numpy(chw)), tok.encode(as_float)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_bad_inputs_raise():
    tok = build_tokenizer("llamagen-vq-tiny")
    with pytest.raises(ValueError, match=r"in \[-1,1\]"):
        tok.encode(torch.full((1, 3, 16, 16), 200.0))
    with pytest.raises(ValueError, match="4-D"):
        tok.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 512\)"):
        tok.decode(torch.full((1, 2, 2), 512))


def test_encode_is_no_grad_and_deterministic():
    tok = build_tokenizer("llamagen-vq-tiny")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    a = tok.encode(x)
    assert not a.requires_grad and torch.equal(a, tok.encode(x))
    assert not tok.decode(a).requires_grad


def test_save_load_round_trip_identical_codes(tmp_path):
    tok = build_tokenizer("llamagen-vq-tiny")
    with torch.no_grad():  # move away from init so a silent re-init would be caught
        for p in tok.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    imgs = shapes_image(3, 32, 32)
    tok.save_pretrained(tmp_path / "tok")
    for loaded in (load_tokenizer(tmp_path / "tok"), ImageTokenizer.from_pretrained(tmp_path / "tok")):
        assert type(loaded) is type(tok) and loaded.config == tok.config
        assert torch.equal(loaded.encode(imgs), tok.encode(imgs))
        assert torch.equal(loaded.decode(tok.encode(imgs)), tok.decode(tok.encode(imgs)))


def test_every_way_to_get_a_tokenizer_gives_one_layout_and_the_same_pixels(tmp_path):
    """Built, loaded, converted from a state dict, or trained: the conv weights are channels-last
    (the fast layout on CPUs), so the same weights decode to the same pixels bit for bit whichever
    path made the model (a default-layout copy rounds differently on CPUs, ~1e-7); images come
    back in the default layout."""
    from maskgil.tokenizers.training import TokenizerTrainer, default_train_config

    tok = build_tokenizer("llamagen-vq-tiny")
    tok.save_pretrained(tmp_path / "tok")
    trainer = TokenizerTrainer(default_train_config("llamagen-vq-tiny", perceptual="none", disc_weight=0.0,
                                                    ema_decay=0.0), tokenizer=load_tokenizer(tmp_path / "tok"))
    made = {"built": tok, "loaded": load_tokenizer(tmp_path / "tok"),
            "converted": vq_from_state_dict({k: v.contiguous() for k, v in tok.state_dict().items()}, tok.config),
            "trained": trainer.final_model()}  # (a state dict from torch.load is in the default layout)
    codes = torch.randint(0, tok.codebook_size, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    pixels = tok.decode(codes)
    assert pixels.is_contiguous()
    for how, model in made.items():
        convs = [p for p in model.parameters() if p.ndim == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs), how
        assert torch.equal(model.decode(codes), pixels), how
    default_layout = load_tokenizer(tmp_path / "tok").to(memory_format=torch.contiguous_format)
    assert torch.allclose(default_layout.decode(codes), pixels, atol=1e-5)  # (equal only to rounding)


def test_loading_a_non_tokenizer_dir_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        load_tokenizer(tmp_path)


# -- the quantizer against hand computations ------------------------------------------------------
def test_l2_lookup_is_cosine_nearest_neighbour():
    q = VectorQuantizer(codebook_size=37, dim=5, l2_norm=True, beta=0.25, usage_window=16)
    with torch.no_grad():
        q.embedding.weight.normal_()  # un-normalised storage: the lookup must normalise it
    z = torch.randn(50, 5) * 3
    w = q.embedding.weight.detach().numpy().astype(np.float64)
    zn = z.numpy().astype(np.float64)
    expected = []
    for row in zn:
        cos = [float(row @ e) / (np.linalg.norm(row) * np.linalg.norm(e)) for e in w]
        expected.append(int(np.argmax(cos)))
    assert q.lookup(z, chunk=7).tolist() == expected


def test_unnormalised_lookup_is_euclidean_nearest_neighbour():
    q = VectorQuantizer(codebook_size=29, dim=4, l2_norm=False, beta=0.25, usage_window=16)
    with torch.no_grad():
        q.embedding.weight.normal_()
    z = torch.randn(40, 4)
    w = q.embedding.weight.detach().numpy().astype(np.float64)
    expected = [int(np.argmin(((w - row) ** 2).sum(1))) for row in z.numpy().astype(np.float64)]
    assert q.lookup(z).tolist() == expected


def test_quantizer_losses_straight_through_and_usage():
    q = VectorQuantizer(codebook_size=10, dim=3, l2_norm=True, beta=0.25, usage_window=12)
    z = torch.randn(2, 3, 2, 2, requires_grad=True)
    z_q, losses, codes = q(z)
    zn = F.normalize(z.detach(), dim=1)
    e = F.normalize(q.embedding.weight.detach(), dim=1)
    e_sel = e[codes].permute(0, 3, 1, 2)  # (2,3,2,2)
    mse = ((e_sel - zn) ** 2).mean()
    assert torch.allclose(losses["codebook"], mse) and torch.allclose(losses["commitment"], 0.25 * mse)
    assert torch.allclose(z_q, e_sel, atol=1e-6)  # forward value is the code
    # straight-through: d(sum z_q)/dz equals d(sum normalize(z))/dz
    z_q.sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    F.normalize(z2, dim=1).sum().backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-6)
    # usage window: 8 ids recorded, the other 4 slots still empty
    assert q.usage() == pytest.approx(len(set(codes.flatten().tolist())) / 10)
    assert (q.codebook_used[:4] == -1).all()


def test_codebook_loss_trains_the_codes_and_commitment_the_encoder():
    """VQ-VAE's stop-gradients: ||sg[z] - e||^2 moves only the codebook, beta ||z - sg[e]||^2 only
    the encoder output, each with the gradient of its own mean squared error."""
    q = VectorQuantizer(codebook_size=10, dim=3, l2_norm=False, beta=0.25, usage_window=12)
    z = torch.randn(2, 3, 2, 2, requires_grad=True)
    _, losses, codes = q(z)
    e_sel = q.embedding.weight.detach()[codes].permute(0, 3, 1, 2)  # (2, 3, 2, 2)
    diff = z.detach() - e_sel  # d/dz mean((z - e)^2) = 2 (z - e) / n
    losses["codebook"].backward()
    assert z.grad is None and q.embedding.weight.grad.abs().sum() > 0
    grad_e = torch.zeros(10, 3).index_add_(0, codes.flatten(), -2 * diff.permute(0, 2, 3, 1).reshape(-1, 3) / diff.numel())
    torch.testing.assert_close(q.embedding.weight.grad, grad_e)
    q.embedding.weight.grad = None
    losses["commitment"].backward()
    assert q.embedding.weight.grad is None
    torch.testing.assert_close(z.grad, 0.25 * 2 * diff / diff.numel())


# -- code locality (the tiny VQ drops GroupNorm and attention) -----------------------------------
def _encoder_latent(tok, x):
    with torch.no_grad():
        return tok.quant_conv(tok.encoder(x))  # (B, D, h, w) before the nearest-code lookup


@pytest.mark.parametrize("norm, local", [("none", True), ("group", False)])
def test_encoder_without_norm_is_local(norm, local):
    """Without GroupNorm (and attention) a token's latent depends only on the pixels in its conv receptive field.

    The tiny encoder's 3x3 convs (14 at strides 1/2/4/8 and 3 stride-2 downsamplers) give a receptive
    field radius of about 85 px, so at 256 px a change in the top-left 32x32 px corner cannot reach the
    bottom-right 8x8 tokens (pixels >= 192) of the 32x32 grid. GroupNorm pools over the whole image, so
    with it the same change reaches everywhere."""
    torch.manual_seed(0)
    tok = build_tokenizer("llamagen-vq-tiny", norm=norm)
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    y = x.clone()
    y[..., :32, :32] = -y[..., :32, :32]
    far = (slice(None), slice(None), slice(24, 32), slice(24, 32))
    changed = (_encoder_latent(tok, x) - _encoder_latent(tok, y)).abs()
    assert float(changed[..., :2, :2].max()) > 1e-3  # the change is seen where it happened
    assert (float(changed[far].max()) == 0.0) is local


def test_tiny_vq_preset_is_local_and_unknown_norm_is_an_error():
    cfg = TOKENIZER_PRESETS["llamagen-vq-tiny"][1]
    assert (cfg.norm, cfg.attn_at_lowest, cfg.mid_attn) == ("none", False, False)
    with pytest.raises(ValueError, match="norm must be one of"):
        build_tokenizer("llamagen-vq-tiny", norm="batch")
