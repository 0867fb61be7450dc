"""bf16 training precision: which hardware gets it, and that the tokenizer's quantizers stay fp32 under it."""
from pathlib import Path

import pytest
import torch

import maskgil.precision as precision
from maskgil.precision import native_bf16, resolve_precision
from maskgil.tokenizers.lfq import LFQuantizer
from maskgil.tokenizers.vq import VectorQuantizer


def test_resolve_precision(monkeypatch):
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")
    assert native_bf16("meta") is False


def test_auto_precision_skips_gpus_that_only_emulate_bf16(monkeypatch):
    """V100/T4 (compute capability 7.x) emulate bf16 (torch.cuda.is_bf16_supported() says True);
    Ampere (8.x) and later multiply it natively. The probe asks the device it is given."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    for capability, native in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i, c=capability: asked.append(i) or c)
        precision._native_bf16.cache_clear()
        assert native_bf16("cuda:1") is native and resolve_precision("auto", "cuda:1") == ("bf16" if native else "fp32")
    assert set(asked) == {1}
    precision._native_bf16.cache_clear()


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="needs Linux /proc/cpuinfo")
def test_native_bf16_on_cpu_matches_the_cpu_flags():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    assert native_bf16("cpu") == bool({"amx_tile", "avx512_bf16"} & flags)


def test_vq_picks_nearest_codes_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    vq = VectorQuantizer(512, 8, l2_norm=True, beta=0.25, usage_window=64)
    z = torch.randn(4, 8, 16, 16).bfloat16()  # what a conv under autocast hands the quantizer
    flat = torch.nn.functional.normalize(z.double().permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
    e = vq.codebook().double()
    expected = torch.cdist(flat, e).argmin(-1)  # float64 brute force
    # the test can fail: distances in bf16 pick other codes for some of these rows
    bf16_pick = (e.bfloat16().pow(2).sum(-1)[None] - 2 * flat.bfloat16() @ e.bfloat16().t()).argmin(-1)
    assert (bf16_pick != expected).any()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, losses, codes = vq(z)
        looked_up = vq.lookup(z.permute(0, 2, 3, 1).reshape(-1, 8))
    assert torch.equal(codes.reshape(-1), expected) and torch.equal(looked_up, expected)
    assert z_q.dtype == torch.float32 and all(v.dtype == torch.float32 for v in losses.values())


def test_lfq_losses_are_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    q = LFQuantizer(bits=10, beta=0.25, entropy_weight=0.1, temperature=0.01, chunk=256, usage_window=64)
    z = (0.02 * torch.randn(2, 10, 8, 8)).bfloat16()
    _, ref, ref_codes = q(z.float())  # no autocast: the fp32 reference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, losses, codes = q(z)
    assert torch.equal(codes, ref_codes) and z_q.dtype == torch.float32
    for k in ref:
        assert losses[k].dtype == torch.float32 and torch.equal(losses[k], ref[k]), k


@pytest.mark.parametrize("native", [True, False])
def test_generator_train_step_autocasts_on_auto_only_where_native(monkeypatch, native):
    from maskgil.models import build_model
    from maskgil.training import TrainConfig, build_optimizer, train_step

    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    torch.manual_seed(0)
    model = build_model("maskgil-tiny", dim=64, n_layers=1, n_heads=2, vocab_size=64)
    cfg = TrainConfig.from_dict({"preset": "maskgil-tiny", "precision": "auto"})
    seen = []
    model.layers[0].register_forward_pre_hook(lambda m, i: seen.append(torch.is_autocast_enabled("cpu")) and None)
    batch = {"tokens": torch.randint(0, 64, (4, 64)), "label": torch.randint(0, 16, (4,))}
    out = train_step(model, build_optimizer(model, cfg), [batch], cfg, 0, tuple(model.config.grid_size))
    assert seen == [native] and torch.isfinite(torch.tensor(out["loss"]))
    assert all(p.dtype == torch.float32 for p in model.parameters())
