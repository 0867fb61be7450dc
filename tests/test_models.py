"""Model properties the paper states, each checked against an independent computation."""
import math
from pathlib import Path

import pytest
import torch

from maskgil.checkpoint import CheckpointMismatchError, load_pretrained, save_pretrained
from maskgil.models import build_model, load_llamagen_gpt, preset_config
from maskgil.models.llama import HeadNorm, LlamaConfig, LlamaGenerator, ffn_hidden_dim
from maskgil.models.rope import apply_rope, rope_table
from maskgil.training import cpu_compile_available

FIXTURES = Path(__file__).parent / "fixtures"


def small(**kw):
    base = dict(dim=64, n_layers=2, n_heads=4, vocab_size=37, num_classes=5, grid_size=(4, 4), multiple_of=32)
    return LlamaGenerator(LlamaConfig(**{**base, **kw})).eval()


# ---------------------------------------------------------------- attention direction
@pytest.mark.parametrize("factory", [lambda: small(causal=False), lambda: build_model("transformer-tiny").eval()])
def test_bidirectional_output_depends_on_later_tokens(factory):
    m = factory()
    N = m.config.grid_size[0] * m.config.grid_size[1]
    toks = torch.randint(0, m.config.vocab_size, (2, N))
    cond = torch.tensor([1, 2])
    base = m(toks, cond)
    toks2 = toks.clone()
    toks2[:, -1] = (toks2[:, -1] + 1) % m.config.vocab_size
    out = m(toks2, cond)
    assert not torch.allclose(base[:, 0], out[:, 0], atol=1e-6)  # the first position sees the last token


def test_causal_output_ignores_later_tokens():
    m = small(causal=True, qk_norm="none", post_norm=False)
    toks = torch.randint(0, 37, (2, 16))
    cond = torch.tensor([0, 3])
    base = m(toks, cond)
    k = 9
    toks2 = toks.clone()
    toks2[:, k:] = (toks2[:, k:] + 5) % 37
    out = m(toks2, cond)
    # logits[:, i] predicts token i from tokens < i: positions <= k are unaffected by tokens >= k
    torch.testing.assert_close(base[:, : k + 1], out[:, : k + 1])
    assert not torch.allclose(base[:, k + 1:], out[:, k + 1:])


def test_causal_text_model_ignores_later_tokens():
    """With a text prefix and its padding mask, the causal mask still holds: image positions <= k
    do not see tokens >= k (the key mask must combine with, not replace, the causal one)."""
    torch.manual_seed(0)
    m = LlamaGenerator(LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=37, cond="text", text_dim=12, text_len=5,
                                   causal=True, qk_norm="none", post_norm=False, grid_size=(4, 4), multiple_of=32)).eval()
    feats, tm = torch.randn(2, 5, 12), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    toks, k = torch.randint(0, 37, (2, 16)), 9
    toks2 = toks.clone()
    toks2[:, k:] = (toks2[:, k:] + 5) % 37
    base, out = m(toks, feats, text_mask=tm), m(toks2, feats, text_mask=tm)
    torch.testing.assert_close(base[:, : k + 1], out[:, : k + 1])
    assert not torch.allclose(base[:, k + 1:], out[:, k + 1:])


def test_condition_changes_output_and_null_row_exists():
    m = small()
    toks = torch.full((1, 16), m.mask_token_id)
    a = m(toks, torch.tensor([1]))
    b = m(toks, torch.tensor([1]), drop_cond=torch.tensor([True]))
    c = m(toks, torch.tensor([5]))  # null class id == num_classes
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, c)
    with pytest.raises(ValueError, match="class ids"):
        m(toks, torch.tensor([6]))


# ---------------------------------------------------------------- 2D RoPE
def hand_rotate(vec, row, col, theta=10000.0):
    """Rotate one head vector with the documented layout: pairs (2p, 2p+1); the first D/4 pairs by
    row * f_p, the rest by col * f_(p - D/4), f_k = theta^(-2k / (D/2))."""
    D = vec.shape[0]
    out = vec.clone().double()
    for p in range(D // 2):
        k = p if p < D // 4 else p - D // 4
        f = theta ** (-2 * k / (D / 2))
        ang = (row if p < D // 4 else col) * f
        a, b = vec[2 * p].double(), vec[2 * p + 1].double()
        out[2 * p] = a * math.cos(ang) - b * math.sin(ang)
        out[2 * p + 1] = b * math.cos(ang) + a * math.sin(ang)
    return out


def test_rope_2d_layout_matches_hand_rotation():
    D, h, w = 16, 3, 5
    table = rope_table("2d", D, h, w, prefix_len=1)
    x = torch.randn(1, 1, 1 + h * w, D)
    y = apply_rope(x, table)
    for idx in [0, 4, 7, 14]:
        r, c = divmod(idx, w)
        torch.testing.assert_close(y[0, 0, 1 + idx].double(), hand_rotate(x[0, 0, 1 + idx], r, c), atol=1e-5, rtol=1e-5)


def test_model_rotates_by_row_then_column_on_non_square_grid():
    """On a 3x5 grid token i sits at (i // 5, i % 5): the model's attention must rotate its first
    half of the rotary pairs by that row and the second half by that column (the class token not
    at all). Swapping h and w still runs on a 3x5 grid, but rotates by (i // 3, i % 3)."""
    h, w, H, Dh = 3, 5, 4, 16
    m = small(n_layers=1, qk_norm="none", grid_size=(h, w))
    att = m.layers[0].attention
    with torch.no_grad():
        att.wqkv.weight.mul_(10)  # sharp attention, so a wrong rotation moves the output visibly
    seen = {}
    att.register_forward_hook(lambda mod, args, out: seen.update(x=args[0][0], out=out[0]))
    m(torch.randint(0, 37, (1, h * w)), torch.tensor([2]), grid=(h, w))
    x = seen["x"].double()  # (L, D): the attention's input
    L, D = x.shape
    q, k, v = (x @ att.wqkv.weight.double().T).view(L, 3, H, Dh).permute(1, 2, 0, 3)  # 3 x (H, L, Dh)

    def rotate(t):  # (H, L, Dh): prefix position untouched, image token i by (row, col) = divmod(i, w)
        return torch.stack([torch.stack([t[hd, 0]] + [hand_rotate(t[hd, 1 + i], *divmod(i, w)) for i in range(h * w)])
                            for hd in range(H)])

    y = torch.softmax(rotate(q) @ rotate(k).transpose(-1, -2) / math.sqrt(Dh), -1) @ v  # bidirectional
    ref = y.transpose(0, 1).reshape(L, D) @ att.wo.weight.double().T
    torch.testing.assert_close(seen["out"].double(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not cpu_compile_available(), reason="torch.compile (inductor) needs a C++ compiler on CPU")
def test_rope_compiled_form_matches_eager():
    """Eager rotates with a complex multiply, torch.compile with the real form: both must agree,
    on the non-contiguous (B, H, L, D) views attention passes in, and in bf16."""
    table = rope_table("2d", 16, 3, 5, prefix_len=2)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 17, 4, 16).to(dtype).transpose(1, 2)  # (B, H, L, D), strided like q and k
        eager = apply_rope(x, table)
        compiled = torch.compile(apply_rope, fullgraph=True)(x, table)
        assert eager.dtype == compiled.dtype == dtype
        torch.testing.assert_close(compiled.float(), eager.float(), atol=1e-6 if dtype == torch.float32 else 1e-2,
                                   rtol=1e-5 if dtype == torch.float32 else 1e-2)


def test_rope_2d_scores_invariant_to_grid_shift():
    D, H, W, dy, dx = 32, 9, 9, 2, 3
    table = rope_table("2d", D, H, W, prefix_len=0)
    q, k = torch.randn(D), torch.randn(D)
    pos = [(0, 0), (1, 4), (3, 2), (5, 5), (2, 1)]
    idx = [r * W + c for r, c in pos]
    idx_shift = [(r + dy) * W + (c + dx) for r, c in pos]

    def scores(ids):
        qs = apply_rope(q.expand(1, 1, len(ids), D).contiguous(), table[ids])
        ks = apply_rope(k.expand(1, 1, len(ids), D).contiguous(), table[ids])
        return qs[0, 0] @ ks[0, 0].T

    torch.testing.assert_close(scores(idx), scores(idx_shift), atol=1e-4, rtol=1e-4)
    # and it really is 2D: a shift in rows only is not the same as a raster-index shift of 1D RoPE
    t1 = rope_table("1d", D, H, W, prefix_len=0)
    assert not torch.allclose(t1, table)


def test_prefix_tokens_get_identity_rotation_and_compat_zeroes_them():
    table = rope_table("2d", 16, 4, 4, prefix_len=3)
    x = torch.randn(2, 2, 3 + 16, 16)
    torch.testing.assert_close(apply_rope(x, table)[:, :, :3], x[:, :, :3])
    zt = rope_table("2d", 16, 4, 4, prefix_len=3, zero_prefix=True)
    assert apply_rope(x, zt)[:, :, :3].abs().max() == 0
    torch.testing.assert_close(zt[3:], table[3:])


def test_any_grid_runs_without_new_weights():
    m = small()
    for h, w in [(4, 4), (2, 6), (8, 8)]:
        out = m(torch.randint(0, 37, (1, h * w)), torch.tensor([0]), grid=(h, w))
        assert out.shape == (1, h * w, 37)
    with pytest.raises(ValueError, match="grid"):
        m(torch.randint(0, 37, (1, 10)), torch.tensor([0]), grid=(4, 4))


# ---------------------------------------------------------------- QK-Norm, Post-Norm
def test_qk_norm_normalises_each_head_before_rope():
    m = small(qk_norm="layernorm")
    att = m.layers[0].attention
    with torch.no_grad():
        att.q_norm.weight.uniform_(0.5, 1.5), att.k_norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(1, 17, 64) * 10
    B, L, D = x.shape
    q, k, v = (x @ att.wqkv.weight.T).view(B, L, 3, 4, 16).permute(2, 0, 3, 1, 4)

    def layer_norm(t, w, b):  # per head, over head_dim
        t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)
        return t * w + b

    table = m.rope((4, 4), x.device)
    qn = apply_rope(layer_norm(q, att.q_norm.weight, att.q_norm.bias), table)
    kn = apply_rope(layer_norm(k, att.k_norm.weight, att.k_norm.bias), table)
    y = torch.softmax(qn @ kn.transpose(-1, -2) / 4.0, -1) @ v  # bidirectional: no mask
    ref = y.transpose(1, 2).reshape(B, L, D) @ att.wo.weight.T
    torch.testing.assert_close(att(x, table), ref, atol=1e-4, rtol=1e-4)
    # normalising after the rotation would give a different result
    qa = layer_norm(apply_rope(q, table), att.q_norm.weight, att.q_norm.bias)
    assert not torch.allclose(qa, qn, atol=1e-3)
    assert att.q_norm.weight.shape == (4, 1, 16)  # per-head affine
    assert small(qk_norm="none").layers[0].attention.q_norm is None


def test_rmsnorm_qk_norm_divides_each_head_by_its_rms():
    """qk_norm="rmsnorm": x * rsqrt(mean(x^2) + eps) * weight over head_dim, per head; no bias."""
    norm = HeadNorm(4, 16, "rmsnorm", eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, 7, 16) * 10
    ref = x / torch.sqrt((x * x).sum(-1, keepdim=True) / 16 + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), ref, atol=1e-5, rtol=1e-5)
    assert norm.bias is None


def test_rmsnorm_qk_norm_changes_the_model():
    """With the same weights, a model with qk_norm="rmsnorm" must not compute what "none" does
    (at unit norm weights that only holds if q and k really are normalised)."""
    with_norm, without = small(qk_norm="rmsnorm"), small(qk_norm="none")
    _, unexpected = without.load_state_dict(with_norm.state_dict(), strict=False)
    assert unexpected and all(".q_norm." in k or ".k_norm." in k for k in unexpected)
    toks, cond = torch.randint(0, 37, (2, 16)), torch.tensor([1, 4])
    a, b = with_norm(toks, cond), without(toks, cond)
    assert torch.isfinite(a).all() and a.shape == (2, 16, 37)
    assert not torch.allclose(a, b, atol=1e-4)


def test_post_norm_bounds_branch_output():
    # Sandwich norm: x_out - x_in after the attention branch is RMS-normalised (unit RMS, weight 1).
    m = small(post_norm=True)
    blk = m.layers[0]
    x = torch.randn(1, 17, 64) * 50
    with torch.no_grad():
        blk.attention.wo.weight.mul_(100)  # make the branch output large so eps does not matter
    table = m.rope((4, 4), x.device)
    h = blk.attention_post_norm(blk.attention(blk.attention_norm(x), table))
    rms = h.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)
    assert small(post_norm=False).layers[0].attention_post_norm is None


def rms_norm(t, weight, eps=1e-5):
    return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("post_norm", [True, False])
def test_block_forward_is_sandwich_or_pre_norm(post_norm):
    """Sandwich Post-Norm (Lumina-Next): h = x + post_attn(attn(attn_norm(x))), out = h +
    post_ffn(ffn(ffn_norm(h))); without post_norm the plain pre-norm block. Random norm weights
    make a missing, extra or swapped norm show."""
    m = small(post_norm=post_norm)
    blk = m.layers[0]
    norms = ["attention_norm", "ffn_norm"] + (["attention_post_norm", "ffn_post_norm"] if post_norm else [])
    with torch.no_grad():
        for name in norms:
            getattr(blk, name).weight.uniform_(0.3, 2.0)
    w = {name: getattr(blk, name).weight for name in norms}
    post = (lambda t, name: rms_norm(t, w[name])) if post_norm else (lambda t, name: t)
    x = torch.randn(2, 17, 64) * 3
    table = m.rope((4, 4), x.device)
    h = x + post(blk.attention(rms_norm(x, w["attention_norm"]), table), "attention_post_norm")
    ref = h + post(blk.feed_forward(rms_norm(h, w["ffn_norm"])), "ffn_post_norm")
    torch.testing.assert_close(blk(x, table), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- sizes and loading
@pytest.mark.parametrize("name,target", [("maskgil-b", 111e6), ("maskgil-l", 343e6), ("maskgil-xl", 775e6),
                                         ("maskgil-xxl", 1.4e9), ("llamagen-l", 343e6), ("llamagen-xl", 775e6),
                                         ("llamagen-xxl", 1.4e9)])
def test_paper_preset_parameter_counts(name, target):
    n = sum(p.numel() for p in build_model(name, device="meta").parameters())
    assert abs(n - target) / target < 0.01, n


def test_llamagen_b_is_exact_and_ffn_rounding():
    assert sum(p.numel() for p in build_model("llamagen-b", device="meta").parameters()) == 110_888_448
    assert [ffn_hidden_dim(d) for d in (768, 1024, 1280, 1536)] == [2048, 2816, 3584, 4096]


def reference_shapes():
    rows = [l.split("\t") for l in (FIXTURES / "llamagen_gpt_b_state_dict.tsv").read_text().splitlines()
            if l and not l.startswith("#")]
    return {k: tuple(int(s) for s in shape.strip("()").split(",") if s.strip()) for k, shape in rows}


def test_llamagen_state_dict_keys_load_strictly():
    shapes = reference_shapes()
    assert len(shapes) == 88
    ours = {k: tuple(v.shape) for k, v in build_model("llamagen-b", device="meta").state_dict().items()}
    assert ours == shapes
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    state["freqs_cis"] = torch.empty(257, 32, 2, device="meta")  # stray buffer in LlamaGen checkpoints
    model = load_llamagen_gpt({"model": state}, preset="llamagen-b")
    assert model.config.vocab_size == 16384 and model.config.num_classes == 1000
    assert model.config.llamagen_compat
    bad = dict(state)
    bad.pop("norm.weight")
    bad["layers.0.attention.wo.weight"] = torch.empty(768, 700, device="meta")
    with pytest.raises(CheckpointMismatchError, match=r"missing: norm.weight.*shape mismatch: layers.0.attention.wo"):
        load_llamagen_gpt(bad, preset="llamagen-b")


def reference_llamagen_forward(sd, cls, toks, n_layers, n_heads, grid, maskgil=False):
    """An independent LlamaGen GPT forward written from its published equations, using complex
    rotation and zero rotary rows at the class position (LlamaGen's behaviour).

    maskgil=True: the paper's MaskGIL instead: every token in (no shift), no attention mask,
    per-head LayerNorm on q and k before the rotation, the class position unrotated (identity),
    sandwich norms on both branch outputs, and logits at the image positions."""
    body = toks if maskgil else toks[:, :-1]
    x = torch.cat([sd["cls_embedding.embedding_table.weight"][cls][:, None], sd["tok_embeddings.weight"][body]], 1)
    B, L, D = x.shape
    hd = D // n_heads
    half = hd // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, half, 2)[: half // 2].double() / half))
    ang = torch.cat([torch.arange(grid[0]).double()[:, None, None].expand(grid[0], grid[1], 1) * freqs,
                     torch.arange(grid[1]).double()[None, :, None].expand(grid[0], grid[1], 1) * freqs], -1).reshape(-1, half)
    rot = torch.polar(torch.ones_like(ang), ang)
    cls_row = torch.ones(1, half, dtype=rot.dtype) if maskgil else torch.zeros(1, half, dtype=rot.dtype)
    rot = torch.cat([cls_row, rot])[:L]  # the class token: identity (MaskGIL) or zero rows (LlamaGen)

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def head_layer_norm(t, w, b):  # (B, L, H, hd); weights (H, 1, hd)
        t = (t - t.mean(-1, keepdim=True)) * torch.rsqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)
        return t * w.transpose(0, 1) + b.transpose(0, 1)

    def rope(t):  # (B, L, H, hd)
        c = torch.view_as_complex(t.double().reshape(*t.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(c * rot[None, :, None]).flatten(3).float()

    mask = torch.ones(L, L).bool() if maskgil else torch.ones(L, L).tril().bool()
    for i in range(n_layers):
        p = f"layers.{i}."
        hx = rms(x, sd[p + "attention_norm.weight"])
        q, k, v = (hx @ sd[p + "attention.wqkv.weight"].T).split(D, -1)
        q, k, v = [t.view(B, L, n_heads, hd) for t in (q, k, v)]
        if maskgil:
            q = head_layer_norm(q, sd[p + "attention.q_norm.weight"], sd[p + "attention.q_norm.bias"])
            k = head_layer_norm(k, sd[p + "attention.k_norm.weight"], sd[p + "attention.k_norm.bias"])
        q, k = rope(q), rope(k)
        att = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(hd)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = torch.einsum("bhlm,bmhd->blhd", att, v).reshape(B, L, D) @ sd[p + "attention.wo.weight"].T
        x = x + (rms(y, sd[p + "attention_post_norm.weight"]) if maskgil else y)
        hx = rms(x, sd[p + "ffn_norm.weight"])
        f = torch.nn.functional.silu(hx @ sd[p + "feed_forward.w1.weight"].T) * (hx @ sd[p + "feed_forward.w3.weight"].T)
        f = f @ sd[p + "feed_forward.w2.weight"].T
        x = x + (rms(f, sd[p + "ffn_post_norm.weight"]) if maskgil else f)
    logits = rms(x, sd["norm.weight"]) @ sd["output.weight"].T
    return logits[:, 1:] if maskgil else logits


def test_llamagen_compat_forward_matches_independent_reference():
    cfg = dict(n_layers=2, n_heads=4, dim=64, vocab_size=50, num_classes=7, grid_size=(4, 4), multiple_of=32)
    m = build_model("llamagen-b", **cfg).eval()
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    for v in sd.values():  # non-trivial norm weights
        if v.dim() == 1:
            v.copy_(torch.rand_like(v) + 0.5)
    compat = load_llamagen_gpt(sd, preset="llamagen-b", compat=True, n_heads=4, grid_size=(4, 4), multiple_of=32)
    toks = torch.randint(0, 50, (2, 16))
    cls = torch.tensor([3, 7])
    ref = reference_llamagen_forward(sd, cls, toks, 2, 4, (4, 4))
    torch.testing.assert_close(compat(toks, cls), ref, atol=2e-4, rtol=2e-4)
    ours = load_llamagen_gpt(sd, preset="llamagen-b", compat=False, n_heads=4, grid_size=(4, 4), multiple_of=32)
    assert not torch.allclose(ours(toks, cls), ref, atol=1e-3)  # identity prefix rotation differs


def test_maskgil_forward_matches_independent_reference():
    """The whole bidirectional MaskGIL forward (QK-Norm, 2D RoPE with an unrotated class token,
    sandwich norms, final norm, logits at the image positions) against the paper's equations, with
    random norm weights and biases so a missing, moved or swapped norm shows; masked inputs too."""
    m = build_model("maskgil-b", n_layers=2, n_heads=4, dim=64, vocab_size=50, num_classes=7, grid_size=(3, 5),
                    multiple_of=32).eval()
    with torch.no_grad():
        for name, v in m.named_parameters():
            if "norm" in name:
                v.copy_(torch.rand_like(v) + 0.5 if name.endswith("weight") else torch.rand_like(v) - 0.5)
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    toks = torch.randint(0, 50, (2, 15))
    toks[0, ::3] = m.mask_token_id  # the mask row is an embedding like any other
    cls = torch.tensor([3, 7])  # 7 = the null class
    ref = reference_llamagen_forward(sd, cls, toks, 2, 4, (3, 5), maskgil=True)
    torch.testing.assert_close(m(toks, cls), ref, atol=2e-4, rtol=2e-4)


def test_paper_presets_pin_the_maskgil_and_llamagen_flags():
    """MaskGIL = bidirectional + 2D RoPE + QK-Norm (LayerNorm) + Post-Norm; LlamaGen AR = causal,
    2D RoPE, neither norm. maskgil-b is llamagen-b plus its mask-token row (768), per-head QK-Norm
    weights and biases (12 layers x 2 x 2 x 768) and two post-norms (12 x 2 x 768)."""
    flags = lambda c: (c.causal, c.rope, c.qk_norm, c.post_norm)  # noqa: E731
    for size in ("b", "l", "xl", "xxl"):
        assert flags(preset_config(f"maskgil-{size}")) == (False, "2d", "layernorm", True)
        assert flags(preset_config(f"llamagen-{size}")) == (True, "2d", "none", False)
    count = sum(p.numel() for p in build_model("maskgil-b", device="meta").parameters())
    assert count == 110_888_448 + 768 + 12 * 2 * 2 * 768 + 12 * 2 * 768


# ---------------------------------------------------------------- Bidirectional Transformer baseline
def test_transformer_null_class_serves_cfg_and_label_dropout():
    """The baseline's unconditional branch is its null class row (num_classes): drop_cond gives the
    null row's logits, not the class's, and training with class_dropout=1 drops every label."""
    m = build_model("transformer-tiny").eval()
    toks, cls = torch.full((2, 64), m.mask_token_id), torch.tensor([3, 9])
    null = torch.full_like(cls, m.config.num_classes)
    dropped = m(toks, cls, drop_cond=torch.tensor([True, True]))
    torch.testing.assert_close(dropped, m(toks, null))
    assert not torch.allclose(dropped, m(toks, cls), atol=1e-4)
    always = build_model("transformer-tiny", class_dropout=1.0).train()
    always.load_state_dict(m.state_dict())
    torch.testing.assert_close(always(toks, cls), m(toks, null))


def test_transformer_smaller_grid_adds_top_left_block_of_position_table():
    """A 4x6 grid inside the 8x8 table: token (r, c) gets pos_embedding[r, c], not row r*6+c of
    the flattened table (that would give token (1, 0) the entry of (0, 6))."""
    m = build_model("transformer-tiny", n_layers=1).eval()
    h, w = 4, 6
    seen = {}
    m.emb_norm.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    toks, cond = torch.randint(0, 512, (2, h * w)), torch.tensor([3, 16])
    m(toks, cond, grid=(h, w))
    added = seen["x"] - torch.cat([m.cls_embedding(cond)[:, None], m.tok_embeddings(toks)], 1)  # (B, 1 + N, D)
    expected = torch.stack([m.cls_pos[0]] + [m.pos_embedding[i // w, i % w] for i in range(h * w)])
    torch.testing.assert_close(added, expected.expand_as(added))


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", ["maskgil-tiny", "llamagen-tiny", "transformer-tiny"])
def test_checkpoint_directory_round_trip(tmp_path, name):
    m = build_model(name).eval()
    save_pretrained(m, tmp_path / "ckpt", extra={"note": "test"})
    assert (tmp_path / "ckpt" / "config.json").is_file() and (tmp_path / "ckpt" / "model.safetensors").is_file()
    m2 = load_pretrained(tmp_path / "ckpt")
    assert type(m2) is type(m) and m2.config == m.config
    toks = torch.randint(0, 512, (2, 64))
    torch.testing.assert_close(m(toks, torch.tensor([1, 2])), m2(toks, torch.tensor([1, 2])))


def test_a_failed_save_leaves_the_last_checkpoint_whole(tmp_path, monkeypatch):
    """A save that fails (an `extra` JSON cannot hold; a kill while config.json is written) keeps the
    previous checkpoint loadable and whole: its weights beside its own config."""
    import maskgil.checkpoint as ckpt

    m = build_model("maskgil-tiny").eval()
    save_pretrained(m, tmp_path / "ckpt", extra={"step": 1})
    other = build_model("maskgil-tiny", num_classes=32).eval()
    with pytest.raises(TypeError):
        save_pretrained(other, tmp_path / "ckpt", extra={"where": tmp_path})
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("killed mid-save")))
    with pytest.raises(OSError, match="killed"):
        save_pretrained(other, tmp_path / "ckpt", extra={"step": 2})
    loaded = load_pretrained(tmp_path / "ckpt")
    assert loaded.config == m.config and ckpt.read_config(tmp_path / "ckpt")["extra"] == {"step": 1}
    toks = torch.randint(0, 512, (2, 64))
    torch.testing.assert_close(loaded(toks, torch.tensor([1, 2])), m(toks, torch.tensor([1, 2])))


def test_text_conditioning_prefix():
    m = small(cond="text", text_dim=24, text_len=6)
    feats = torch.randn(2, 4, 24)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    out = m(torch.full((2, 16), 37), feats, text_mask=mask)
    assert out.shape == (2, 16, 37)
    feats2 = feats.clone()
    feats2[0, 3] += 10  # a padded (masked-out) text token must not matter
    out2 = m(torch.full((2, 16), 37), feats2, text_mask=mask)
    torch.testing.assert_close(out[0], out2[0])
    null = m(torch.full((2, 16), 37), feats, drop_cond=torch.tensor([True, True]))
    torch.testing.assert_close(null[0], null[1])


def test_preset_override_errors_name_the_field():
    with pytest.raises(TypeError, match=r"unknown LlamaConfig field\(s\) \[.nonsense.\]"):
        preset_config("maskgil-b", nonsense=1)
    with pytest.raises(KeyError, match="unknown preset"):
        preset_config("maskgil-q")
