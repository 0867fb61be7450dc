"""Sampler properties: CFG formula, reveal schedule, frozen tokens, fusion prefix, KV cache, seeds."""
import math

import pytest
import torch

from maskgil.models import build_model
from maskgil.models.llama import LlamaConfig, LlamaGenerator
from maskgil.sampling import (cfg_combine, filter_logits, guided_logits, masked_after_steps, reveal_counts,
                              sample_ar, sample_fusion, sample_maskgit, training_mask_counts)
from maskgil.training import cpu_compile_available


def mar_model():
    torch.manual_seed(1)
    return build_model("maskgil-tiny").eval()


def ar_model():
    torch.manual_seed(2)
    return build_model("llamagen-tiny").eval()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_cfg_logits_equal_hand_formula():
    m = mar_model()
    toks = torch.full((2, 64), m.mask_token_id)
    toks[:, :10] = torch.randint(0, 512, (2, 10))
    cond = torch.tensor([3, 9])
    l_c = m(toks, cond)
    l_u = m(toks, torch.tensor([16, 16]))  # the null class row
    s = 2.5
    torch.testing.assert_close(guided_logits(m, toks, cond, (8, 8), s), l_u + s * (l_c - l_u), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(guided_logits(m, toks, cond, (8, 8), 1.0), l_c)
    torch.testing.assert_close(cfg_combine(torch.tensor([3.0]), torch.tensor([1.0]), 2.0), torch.tensor([5.0]))


@pytest.mark.parametrize("steps", [8, 5, 1])
def test_revealed_per_step_follows_cosine_schedule(steps):
    m = mar_model()
    trace = []
    sample_maskgit(m, torch.tensor([0, 5]), steps=steps, cfg_scale=2.0, generator=gen(), trace=trace)
    N = 64
    # hand: still masked after step i = floor(N cos(pi/2 (i+1)/T)), 0 after the last step
    still = [math.floor(N * math.cos(math.pi / 2 * (i + 1) / steps)) for i in range(steps - 1)] + [0]
    expected = [N - still[0]] + [still[i - 1] - still[i] for i in range(1, steps)]
    assert [int(t["revealed"][0].sum()) for t in trace] == expected
    assert [int(t["revealed"][1].sum()) for t in trace] == expected
    assert not (trace[-1]["tokens"] == m.mask_token_id).any()


def test_schedules_and_training_counts():
    assert masked_after_steps(256, 8, "linear") == [224, 192, 160, 128, 96, 64, 32, 0]
    assert sum(reveal_counts(100, 8, "arccos")) == 100
    assert all(c >= 1 for c in reveal_counts(10, 10, "cosine"))
    g = gen(3)
    counts = training_mask_counts(10000, 256, generator=g)
    r = torch.rand(10000, generator=gen(3), dtype=torch.float64)
    torch.testing.assert_close(counts, torch.ceil(torch.cos(r * math.pi / 2) * 256).clamp(1, 256).long())
    with pytest.raises(ValueError):
        masked_after_steps(10, 8, "bogus")


def test_revealed_and_prefilled_tokens_never_change():
    m = mar_model()
    init = torch.full((3, 64), -1)
    known = torch.rand(3, 64, generator=gen(5)) < 0.3
    init[known] = torch.randint(0, 512, (int(known.sum()),), generator=gen(6))
    trace = []
    out = sample_maskgit(m, torch.tensor([1, 2, 3]), steps=6, init_tokens=init, generator=gen(), trace=trace)
    assert torch.equal(out[known], init[known])
    prev = init.clone()
    prev[~known] = m.mask_token_id
    for t in trace:
        was_set = prev != m.mask_token_id
        assert torch.equal(t["tokens"][was_set], prev[was_set])
        assert not (t["revealed"] & was_set).any()
        prev = t["tokens"]
    # the schedule runs over each sample's own number of initially unknown tokens
    n0 = (~known).sum(1)
    for b in range(3):
        assert [int(t["revealed"][b].sum()) for t in trace] == reveal_counts(int(n0[b]), 6)


def test_same_seed_same_sample_and_different_seed_differs():
    m, a = mar_model(), ar_model()
    c = torch.tensor([4, 7])
    x1 = sample_maskgit(m, c, cfg_scale=2.0, generator=gen(11))
    x2 = sample_maskgit(m, c, cfg_scale=2.0, generator=gen(11))
    x3 = sample_maskgit(m, c, cfg_scale=2.0, generator=gen(12))
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    y1 = sample_ar(a, c, cfg_scale=2.0, top_k=50, generator=gen(11))
    y2 = sample_ar(a, c, cfg_scale=2.0, top_k=50, generator=gen(11))
    assert torch.equal(y1, y2)


def greedy_by_recomputation(model, cond, n, cfg_scale):
    """Greedy AR decoding without a cache: a full forward over the sequence at every step."""
    B, N = len(cond), 64
    toks = torch.zeros(B, N, dtype=torch.long)
    for i in range(n):
        logits = guided_logits(model, toks, cond, (8, 8), cfg_scale)  # causal: position i sees tokens < i
        toks[:, i] = logits[:, i].argmax(-1)
    return toks[:, :n]


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_kv_cache_decoding_equals_full_recomputation(cfg_scale):
    a = ar_model()
    c = torch.tensor([0, 15, 6])
    cached = sample_ar(a, c, cfg_scale=cfg_scale, top_k=1)
    torch.testing.assert_close(cached, greedy_by_recomputation(a, c, 64, cfg_scale))


def test_kv_cache_with_text_prefix_equals_full_recomputation():
    torch.manual_seed(0)
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=40, cond="text", text_dim=12, text_len=5,
                      causal=True, qk_norm="none", post_norm=False, grid_size=(3, 3), multiple_of=32)
    a = LlamaGenerator(cfg).eval()
    feats, tm = torch.randn(2, 5, 12), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    cached = sample_ar(a, feats, top_k=1, text_mask=tm)
    toks = torch.zeros(2, 9, dtype=torch.long)
    for i in range(9):
        toks[:, i] = a(toks, feats, text_mask=tm)[:, i].argmax(-1)
    torch.testing.assert_close(cached, toks)


def test_decode_step_compiles_to_one_graph_for_every_position_and_call():
    """The KV-cache step has position-independent shapes: one graph serves a whole image, and the
    next image too; a second batch size gets a graph with a symbolic batch, which a third reuses.
    Its logits match the full causal forward at every position."""
    a = ar_model()
    graphs = []
    torch.compiler.reset()  # dynamo remembers, per function, which sizes earlier tests saw vary

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    step = torch.compile(a.decode_step, backend=counting_backend, fullgraph=True)  # as compiled_method does
    with torch.no_grad():
        for B, n_graphs in ((3, 1), (3, 1), (5, 2), (7, 2)):
            tokens, cond = torch.randint(0, 512, (B, 64), generator=gen(B)), torch.arange(B) * 2
            full = a(tokens, cond)  # (B, N, V): position i predicts token i from tokens < i
            a.setup_kv_cache(B, (8, 8))
            cached = [a.prefill(cond)]
            cached += [step(tokens[:, i:i + 1], torch.tensor([1 + i])) for i in range(63)]
            torch.testing.assert_close(torch.stack(cached, 1), full, rtol=1e-4, atol=1e-4)
            assert len(graphs) == n_graphs, f"batch {B}: {len(graphs)} graphs"
        a.clear_kv_cache()


@pytest.mark.skipif(not cpu_compile_available(), reason="torch.compile (inductor) needs a C++ compiler on CPU")
def test_compiled_ar_decoding_equals_full_recomputation():
    a = ar_model()
    c = torch.tensor([0, 15, 6])
    torch.testing.assert_close(sample_ar(a, c, cfg_scale=3.0, top_k=1, compile=True),
                               greedy_by_recomputation(a, c, 64, 3.0))
    m = mar_model()  # fusion: the compiled AR prefix (on the cache the call above left), then MAR
    eager = sample_fusion(a, m, c, ar_tokens=20, mar_steps=4, cfg_scale=2.0, top_k=1, generator=gen(5))
    compiled = sample_fusion(a, m, c, ar_tokens=20, mar_steps=4, cfg_scale=2.0, top_k=1, generator=gen(5),
                             compile=True)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.skipif(not cpu_compile_available(), reason="torch.compile (inductor) needs a C++ compiler on CPU")
def test_compiled_maskgit_decoding_equals_eager():
    """The compiled forward reveals the same tokens as the eager one, step for step, and still
    refuses an out-of-range class id (checked before the graph, which cannot raise on values)."""
    m = mar_model()
    c = torch.tensor([1, 14, 16])  # 16: the null class
    for B in (3, 2):  # a second batch size: the graph with a symbolic batch
        eager, compiled = [], []
        sample_maskgit(m, c[:B], steps=8, cfg_scale=2.0, top_k=1, generator=gen(7), trace=eager)
        sample_maskgit(m, c[:B], steps=8, cfg_scale=2.0, top_k=1, generator=gen(7), trace=compiled, compile=True)
        for e, k in zip(eager, compiled, strict=True):
            assert torch.equal(e["revealed"], k["revealed"]) and torch.equal(e["tokens"], k["tokens"])
    with pytest.raises(ValueError, match="class ids"):
        sample_maskgit(m, torch.tensor([17]), compile=True)


def test_compiled_ar_decoding_without_a_compiler_says_so(monkeypatch):
    import maskgil.training.loop as loop

    monkeypatch.setattr(loop, "cpu_compile_available", lambda: False)
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
        sample_ar(ar_model(), torch.tensor([1]), compile=True)


@pytest.mark.parametrize("k", [0, 20, 64])
def test_fusion_keeps_the_ar_prefix_bit_for_bit(k):
    m, a = mar_model(), ar_model()
    c = torch.tensor([2, 13])
    out = sample_fusion(a, m, c, ar_tokens=k, mar_steps=4, cfg_scale=2.0, generator=gen(21))
    assert out.shape == (2, 64) and (out < 512).all()
    if k:
        prefix = sample_ar(a, c, cfg_scale=2.0, num_tokens=k, generator=gen(21))
        assert torch.equal(out[:, :k], prefix)
    if k == 0:
        assert torch.equal(out, sample_maskgit(m, c, steps=4, cfg_scale=2.0, generator=gen(21)))
    if k == 64:
        assert torch.equal(out, sample_ar(a, c, cfg_scale=2.0, generator=gen(21)))


def test_fusion_mar_completes_in_m_steps_over_remaining_tokens():
    m, a = mar_model(), ar_model()
    calls = []
    orig = m.forward

    def counting(*args, **kw):
        calls.append(1)
        return orig(*args, **kw)

    m.forward = counting
    sample_fusion(a, m, torch.tensor([1]), ar_tokens=32, mar_steps=3, generator=gen())
    assert len(calls) == 3


def test_filter_logits_top_k_top_p():
    l = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(l, top_k=2)).tolist() == [[False, False, True, True]]
    # nucleus 0.7: 0.5 alone < 0.7, 0.5 + 0.3 reaches it -> keep two
    assert torch.isinf(filter_logits(l, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(l, top_p=0.4)).tolist() == [[False, True, True, True]]
    torch.testing.assert_close(filter_logits(l, temperature=2.0), l / 2)


def test_any_grid_for_maskgit():
    m = mar_model()
    out = sample_maskgit(m, torch.tensor([1]), grid=(4, 12), steps=4, generator=gen())
    assert out.shape == (1, 48)


def test_bidirectional_transformer_baseline_samples():
    t = build_model("transformer-tiny").eval()
    out = sample_maskgit(t, torch.tensor([0, 1]), steps=4, cfg_scale=2.0, generator=gen())
    assert out.shape == (2, 64) and (out < 512).all()
    with pytest.raises(ValueError, match="causal"):
        sample_ar(t, torch.tensor([0]))
