"""Sampler properties: CFG formula, reveal schedule, frozen tokens, fusion prefix, KV cache, seeds."""
import math

import pytest
import torch

import maskgil.sampling.ar as ar_sampler
import maskgil.sampling.maskgit as maskgit_sampler
from maskgil.evaluation.generation import SamplerSpec
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


def test_every_step_reveals_a_token_when_steps_equal_the_unknown_count():
    """n tokens in n steps reveal one each, for every schedule (n * (1 - 4/5) is 0.999... in floats:
    the linear schedule had floored it to 0, revealed 2 at step 4 and nothing at the last)."""
    assert reveal_counts(5, 5, "linear") == [1] * 5
    for kind in ("cosine", "linear", "arccos"):
        for n in range(1, 65):
            assert reveal_counts(n, n, kind) == [1] * n, (kind, n)


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
    y3 = sample_ar(a, c, cfg_scale=2.0, top_k=50, generator=gen(12))
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


def test_choice_noise_is_standard_gumbel():
    """MaskGIT's confidence noise is Gumbel(0, 1): mean = Euler's gamma, variance pi^2 / 6, and its
    CDF exp(-exp(-x)) (Kolmogorov-Smirnov distance, ~0.003 expected at this size)."""
    g = maskgit_sampler.gumbel_noise((200_000,), generator=gen(4)).double()
    assert abs(g.mean().item() - 0.5772) < 0.02 and abs(g.var().item() - math.pi ** 2 / 6) < 0.05
    x = g.sort().values
    empirical = torch.arange(1, len(x) + 1, dtype=torch.float64) / len(x)
    assert (empirical - torch.exp(-torch.exp(-x))).abs().max() < 0.01


def greedy_by_recomputation(model, cond, n, cfg_scale, prefix=None):
    """Greedy AR decoding without a cache: a full forward over the sequence at every step (after
    the `prefix` tokens, if given)."""
    B, N = len(cond), 64
    toks = torch.zeros(B, N, dtype=torch.long)
    k = 0 if prefix is None else prefix.shape[1]
    if k:
        toks[:, :k] = prefix
    for i in range(k, n):
        logits = guided_logits(model, toks, cond, (8, 8), cfg_scale)  # causal: position i sees tokens < i
        toks[:, i] = logits[:, i].argmax(-1)
    return toks[:, :n]


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_kv_cache_decoding_equals_full_recomputation(cfg_scale):
    a = ar_model()
    c = torch.tensor([0, 15, 6])
    cached = sample_ar(a, c, cfg_scale=cfg_scale, top_k=1)
    torch.testing.assert_close(cached, greedy_by_recomputation(a, c, 64, cfg_scale))


def test_ar_continues_after_prefix_tokens():
    """prefix_tokens enter the KV cache: the greedy continuation equals a full recomputation that
    starts from them, and the prefix comes back unchanged."""
    a, c = ar_model(), torch.tensor([0, 15, 6])
    prefix = torch.randint(0, 512, (3, 20), generator=gen(3))
    out = sample_ar(a, c, cfg_scale=3.0, top_k=1, prefix_tokens=prefix)
    assert out.shape == (3, 64) and torch.equal(out[:, :20], prefix)
    torch.testing.assert_close(out, greedy_by_recomputation(a, c, 64, 3.0, prefix))
    assert not torch.equal(out[:, 20:], sample_ar(a, c, cfg_scale=3.0, top_k=1)[:, 20:])  # the prefix matters


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


# ----------------------------------------------------------------------------- MaskGIT confidence

def record_draws(monkeypatch):
    """The codes MaskGIT samples at each step, at every position (the trace keeps only the revealed)."""
    draws = []
    orig = maskgit_sampler.sample_tokens

    def recording(*args, **kw):
        sampled, logp = orig(*args, **kw)
        draws.append(sampled)
        return sampled, logp

    monkeypatch.setattr(maskgit_sampler, "sample_tokens", recording)
    return draws


def steps_by_hand(m, cond, cfg_scale, trace, draws):
    """Per step: the tokens before it, which were unknown, and log p of each drawn code under the
    guided logits l_u + s (l_c - l_u) computed here from two plain forwards (no temperature, no top-k)."""
    before = torch.full((len(cond), 64), m.mask_token_id)
    for t, drawn in zip(trace, draws, strict=True):
        l_c, l_u = m(before, cond), m(before, torch.full_like(cond, m.config.num_classes))
        logits = l_u + cfg_scale * (l_c - l_u)
        yield before, before == m.mask_token_id, logits, logits.log_softmax(-1).gather(-1, drawn[..., None])[..., 0]
        before = t["tokens"]


def assert_reveals_top(confidence, unknown, revealed, tol=1e-5):
    """`revealed` are the most confident unknown positions of each row (up to float ties)."""
    assert not (revealed & ~unknown).any()
    for conf, unk, rev in zip(confidence, unknown, revealed):
        kept, passed = conf[rev], conf[unk & ~rev]
        if len(kept) and len(passed):
            assert kept.min() >= passed.max() - tol, f"revealed {kept.min():.5f} < passed over {passed.max():.5f}"


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.5, 1), (0.7, 5)])
def test_zero_choice_temperature_reveals_top_n_by_model_log_p(monkeypatch, temperature, top_k):
    """Confidence is log p(drawn) under the guided logits before temperature and top-k (MaskGIT's
    ranking): under top_k=1 every filtered log p is 0 and the ranking would ignore the model.
    The draws themselves do follow temperature and top-k."""
    m, cond, s = mar_model(), torch.tensor([3, 9]), 2.0
    draws, trace = record_draws(monkeypatch), []
    sample_maskgit(m, cond, steps=4, cfg_scale=s, temperature=temperature, top_k=top_k, choice_temperature=0.0,
                   generator=gen(8), trace=trace)
    for t, (before, unknown, logits, logp), drawn in zip(trace, steps_by_hand(m, cond, s, trace, draws), draws):
        assert_reveals_top(logp, unknown, t["revealed"])
        assert torch.equal(t["tokens"][t["revealed"]], drawn[t["revealed"]])
        if top_k:
            rank = (logits > logits.gather(-1, drawn[..., None])).sum(-1)  # likelier codes than the drawn one
            assert (rank[unknown] < top_k).all()
    assert [int(t["revealed"][0].sum()) for t in trace] == reveal_counts(64, 4)


def test_choice_noise_is_annealed_and_scaled_by_choice_temperature(monkeypatch):
    """Step i of T adds noise x choice_temperature x (1 - (i+1)/T) to log p. The noise source is
    replaced by known draws about as large as the model's log-p spread, so a wrong factor reorders."""
    m, cond, s, T, ct = mar_model(), torch.tensor([3, 9]), 2.0, 5, 3.0
    noise = [torch.randn(2, 64, generator=gen(100 + i)) * 0.01 / ct for i in range(T)]
    calls = []

    def known_noise(shape, generator=None, device=None):
        calls.append(tuple(shape))
        return noise[len(calls) - 1].clone()

    monkeypatch.setattr(maskgit_sampler, "gumbel_noise", known_noise)
    draws, trace = record_draws(monkeypatch), []
    sample_maskgit(m, cond, steps=T, cfg_scale=s, choice_temperature=ct, generator=gen(8), trace=trace)
    assert calls == [(2, 64)] * T
    for i, (t, (_, unknown, _, logp)) in enumerate(zip(trace, steps_by_hand(m, cond, s, trace, draws))):
        assert_reveals_top(logp + noise[i] * ct * (1 - (i + 1) / T), unknown, t["revealed"], tol=1e-6)


# ----------------------------------------------------------------------------- schedules and CFG

@pytest.mark.parametrize("schedule", ["linear", "arccos"])
@pytest.mark.parametrize("steps", [8, 5])
def test_non_cosine_schedules_reveal_their_own_counts(schedule, steps):
    m, N = mar_model(), 64
    gamma = {"linear": lambda r: 1 - r, "arccos": lambda r: math.acos(r) / (math.pi / 2)}[schedule]
    trace = []
    sample_maskgit(m, torch.tensor([0, 5]), steps=steps, schedule=schedule, cfg_scale=2.0, generator=gen(), trace=trace)
    still = [math.floor(N * gamma((i + 1) / steps)) for i in range(steps - 1)] + [0]  # masked after step i
    expected = [N - still[0]] + [still[i - 1] - still[i] for i in range(1, steps)]
    cosine = reveal_counts(N, steps, "cosine")
    assert expected != cosine
    for b in range(2):
        assert [int(t["revealed"][b].sum()) for t in trace] == expected


def record_cfg_scales(monkeypatch):
    """The guidance scale of every cfg_combine call, MAR forwards and AR steps alike, in call order."""
    scales = []
    for module in (maskgit_sampler, ar_sampler):
        def recording(cond_logits, uncond_logits, scale, orig=module.cfg_combine):
            scales.append(scale)
            return orig(cond_logits, uncond_logits, scale)

        monkeypatch.setattr(module, "cfg_combine", recording)
    return scales


@pytest.mark.parametrize("sampler", ["mar", "ar", "fusion"])
def test_linear_cfg_schedule_ramps_from_one_to_the_scale(monkeypatch, sampler):
    """Linear CFG: 1 + (s - 1) * progress, progress (i+1)/T for MAR steps and (position+1)/N for AR
    tokens; fusion runs each stage on its own ramp, as served fusion does."""
    m, a, c, s, k, T = mar_model(), ar_model(), torch.tensor([2, 13]), 3.0, 10, 4
    run = {"mar": lambda **kw: sample_maskgit(m, c, steps=T, **kw),
           "ar": lambda **kw: sample_ar(a, c, num_tokens=k, **kw),
           "fusion": lambda **kw: sample_fusion(a, m, c, ar_tokens=k, mar_steps=T, **kw)}[sampler]
    ar_ramp = [1 + (s - 1) * (p + 1) / 64 for p in range(k)]
    mar_ramp = [1 + (s - 1) * (i + 1) / T for i in range(T)]  # 1.5, 2, 2.5, 3
    hand = {"mar": mar_ramp, "ar": ar_ramp, "fusion": ar_ramp + mar_ramp}[sampler]
    scales = record_cfg_scales(monkeypatch)
    linear = run(cfg_scale=s, cfg_schedule="linear", generator=gen(4))
    assert scales == pytest.approx(hand, rel=1e-12)
    scales.clear()
    constant = run(cfg_scale=s, generator=gen(4))
    assert scales == [s] * len(hand)
    assert not torch.equal(linear, constant)


@pytest.mark.parametrize("cfg_schedule", ["constant", "linear"])
def test_fusion_is_the_ar_prefix_then_maskgit_on_one_random_stream(cfg_schedule):
    """The MAR stage is sample_maskgit from the AR prefix with the same guidance, its generator
    continuing where the AR stage left it."""
    m, a, c, k = mar_model(), ar_model(), torch.tensor([2, 13]), 20
    out = sample_fusion(a, m, c, ar_tokens=k, mar_steps=4, cfg_scale=2.0, cfg_schedule=cfg_schedule,
                        generator=gen(21))
    g = gen(21)
    init = torch.full((2, 64), m.mask_token_id)
    init[:, :k] = sample_ar(a, c, cfg_scale=2.0, cfg_schedule=cfg_schedule, num_tokens=k, generator=g)
    ref = sample_maskgit(m, c, steps=4, cfg_scale=2.0, cfg_schedule=cfg_schedule, init_tokens=init, generator=g)
    assert torch.equal(out, ref)
    unguided = sample_fusion(a, m, c, ar_tokens=k, mar_steps=4, cfg_scale=1.0, generator=gen(21))
    assert not torch.equal(out[:, k:], unguided[:, k:])


def test_fusion_without_one_of_the_models():
    """k = N needs no MAR model (the grid comes from the AR model), k = 0 no AR model."""
    m, a, c = mar_model(), ar_model(), torch.tensor([2, 13])
    assert torch.equal(sample_fusion(a, None, c, ar_tokens=64, cfg_scale=2.0, generator=gen(3)),
                       sample_ar(a, c, cfg_scale=2.0, generator=gen(3)))
    assert torch.equal(sample_fusion(None, m, c, ar_tokens=0, mar_steps=3, generator=gen(3)),
                       sample_maskgit(m, c, steps=3, generator=gen(3)))
    with pytest.raises(ValueError, match="mar_model is None"):
        sample_fusion(a, None, c, ar_tokens=32)
    with pytest.raises(ValueError, match="needs an AR model"):
        sample_fusion(None, m, c, ar_tokens=32)


# ----------------------------------------------------------------------------- temperature, top-k, top-p

def test_tiny_temperature_is_greedy_not_an_error():
    """1 / 1e-40 overflows float32: the top logit must stay finite (argmax), for MaskGIT, AR, fusion."""
    m, a, c = mar_model(), ar_model(), torch.tensor([0, 15, 6])
    torch.testing.assert_close(sample_ar(a, c, cfg_scale=3.0, temperature=1e-40, num_tokens=20),
                               greedy_by_recomputation(a, c, 20, 3.0))
    tiny_mar = sample_maskgit(m, c, cfg_scale=2.0, temperature=1e-40, generator=gen(9))
    assert torch.equal(tiny_mar, sample_maskgit(m, c, cfg_scale=2.0, top_k=1, generator=gen(9)))
    tiny = sample_fusion(a, m, c, ar_tokens=20, cfg_scale=2.0, temperature=1e-40, generator=gen(9))
    assert torch.equal(tiny, sample_fusion(a, m, c, ar_tokens=20, cfg_scale=2.0, top_k=1, generator=gen(9)))
    l = torch.tensor([[2.0, 1.0, -3.0], [-5.0, -4.0, -9.0], [1e-41, 0.0, -1.0]])
    hand = torch.tensor([[0.0, -math.inf, -math.inf], [-math.inf, 0.0, -math.inf], [1e-41 / 1e-40, 0.0, -math.inf]])
    torch.testing.assert_close(filter_logits(l, temperature=1e-40), hand)
    # (B, N, V) as the samplers pass them, overflowing rows mixed with ordinary ones
    torch.testing.assert_close(filter_logits(l.expand(2, 3, 3), temperature=1e-40), hand.expand(2, 3, 3))
    for t in (1e-300, 5e-324):  # round to 0 in float32: x / 0 would give nan for the top logit
        assert torch.equal(filter_logits(l[:2], temperature=t), hand[:2])
        assert torch.equal(sample_maskgit(m, c, cfg_scale=2.0, temperature=t, generator=gen(9)), tiny_mar)


def test_temperature_and_top_p_change_the_draws():
    """Same seed: a lower temperature or a nucleus draws other codes; a tiny nucleus is greedy."""
    m, a, c = mar_model(), ar_model(), torch.tensor([0, 15, 6])
    base = sample_ar(a, c, cfg_scale=2.0, num_tokens=20, generator=gen(5))
    assert not torch.equal(base, sample_ar(a, c, cfg_scale=2.0, num_tokens=20, temperature=0.5, generator=gen(5)))
    assert not torch.equal(base, sample_ar(a, c, cfg_scale=2.0, num_tokens=20, top_p=0.5, generator=gen(5)))
    torch.testing.assert_close(sample_ar(a, c, cfg_scale=2.0, num_tokens=20, top_p=1e-6, generator=gen(5)),
                               greedy_by_recomputation(a, c, 20, 2.0))
    base = sample_maskgit(m, c, cfg_scale=2.0, generator=gen(5))
    assert not torch.equal(base, sample_maskgit(m, c, cfg_scale=2.0, temperature=0.5, generator=gen(5)))


def test_filter_logits_is_bit_exact_for_ordinary_temperatures():
    l = torch.randn(4, 512, generator=gen(2)) * 5
    for t in (0.3, 0.9, 1.0, 1.7):
        assert torch.equal(filter_logits(l, temperature=t), l / t)


def test_out_of_range_sampling_knobs_are_refused_not_ignored(capsys):
    """top_k None/0 = off, >= 1 keeps k (more than the vocabulary keeps all); top_p None = off,
    (0, 1]; temperature finite > 0. Anything else raised nothing and sampled unfiltered before."""
    l = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for kw in (dict(top_k=-1), dict(top_k=2.5), dict(top_p=0.0), dict(top_p=-0.1), dict(top_p=1.5),
               dict(top_p=math.nan), dict(temperature=0.0), dict(temperature=-1.0), dict(temperature=math.inf),
               dict(temperature=math.nan)):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=name):
            filter_logits(l, **kw)
        with pytest.raises(ValueError, match=name):
            SamplerSpec(**kw)
    m, a = mar_model(), ar_model()
    for kw in (dict(cfg_scale=math.nan), dict(cfg_scale=-1.0), dict(choice_temperature=math.nan),
               dict(choice_temperature=-0.5), dict(choice_temperature=math.inf), dict(top_k=3.0)):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=name):  # NaN confidences had revealed in arbitrary order
            SamplerSpec(**kw)
        with pytest.raises(ValueError, match=name):
            sample_maskgit(m, torch.tensor([1]), **kw)
        if name != "choice_temperature":
            with pytest.raises(ValueError, match=name):
                sample_ar(a, torch.tensor([1]), **kw)
    for kw in (dict(top_k=0), dict(top_k=4), dict(top_k=10), dict(top_p=1.0), dict(top_k=None, top_p=None)):
        assert torch.equal(filter_logits(l, **kw), l)
        SamplerSpec(**kw)
    assert torch.isinf(filter_logits(l, temperature=10.0, top_k=1)).tolist() == [[False, True, True, True]]
    with pytest.raises(ValueError, match="schedule"):
        SamplerSpec(schedule="cosinus")
    with pytest.raises(ValueError, match="cfg schedule"):
        SamplerSpec(cfg_schedule="ramp")

    from pipelines.evaluate import main

    with pytest.raises(SystemExit) as exit_info:  # a usage error before any checkpoint or Ray
        main(["--tokenizer", "nowhere", "--reference", "nowhere", "--engine", "local", "--sampler", "ar", "--top-p", "0"])
    assert exit_info.value.code == 2 and "top_p must be" in capsys.readouterr().err
