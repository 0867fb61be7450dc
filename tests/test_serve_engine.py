"""Serving engine without Ray: batched sampling equals the library samplers run per request."""
import pytest
import torch

from maskgil.models import build_model
from maskgil.sampling import sample_ar, sample_fusion, sample_maskgit
from maskgil.serving.engine import Job, ar_batch, make_generator, maskgit_batch
from maskgil.training import cpu_compile_available


# Smaller than the tiny presets (same vocab, classes, grid) so the suite stays fast on 2 cores.
SMALL = dict(n_layers=2, n_heads=2, dim=64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Under a loaded 2-core machine two intra-op threads make these small ops ~100x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Plain heads, and factorised tokens (512 = 2^5 x 2^4 codes as two sub-token heads).
@pytest.fixture(scope="module", params=[(), (5, 4)], ids=["plain", "factorised"])
def factorization(request):
    return request.param


@pytest.fixture(scope="module")
def mar(factorization):
    torch.manual_seed(1)
    return build_model("maskgil-tiny", factorization=factorization, **SMALL).eval()


@pytest.fixture(scope="module")
def ar(factorization):
    torch.manual_seed(2)
    return build_model("llamagen-tiny", factorization=factorization, **SMALL).eval()


def gen(seed):
    return torch.Generator().manual_seed(seed)


# Three requests of different sizes and seeds that will share batches.
REQS = [(torch.tensor([3, 3]), 11), (torch.tensor([5]), 12), (torch.tensor([0, 7]), 13)]


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_maskgit_batch_equals_per_request_sampler(mar, cfg):
    jobs = [Job(c, make_generator("cpu", s)) for c, s in REQS]
    got = maskgit_batch(mar, jobs, (8, 8), steps=6, cfg_scale=cfg, top_k=50)
    for (c, s), tokens in zip(REQS, got):
        ref = sample_maskgit(mar, c, (8, 8), steps=6, cfg_scale=cfg, top_k=50, generator=gen(s))
        assert torch.equal(tokens, ref)


def test_maskgit_batch_mixed_prefill_lengths(mar):
    # Jobs with different numbers of pre-filled tokens (fusion requests with different k) share a batch.
    N, mask = 64, mar.mask_token_id
    inits = []
    for (c, s), k in zip(REQS, [0, 40, 63]):
        t = torch.full((len(c), N), mask)
        t[:, :k] = torch.randint(0, 512, (len(c), k), generator=gen(100 + k))
        inits.append(t)
    jobs = [Job(c, make_generator("cpu", s), t) for (c, s), t in zip(REQS, inits)]
    got = maskgit_batch(mar, jobs, (8, 8), steps=8)
    for (c, s), t, tokens in zip(REQS, inits, got):
        ref = sample_maskgit(mar, c, (8, 8), steps=8, init_tokens=t, generator=gen(s))
        assert torch.equal(tokens, ref)
        known = t != mask
        assert torch.equal(tokens[known], t[known])  # pre-filled tokens never change
        assert (tokens != mask).all()


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_ar_batch_equals_per_request_sampler(ar, cfg):
    jobs = [Job(c, make_generator("cpu", s)) for c, s in REQS]
    got = ar_batch(ar, jobs, (8, 8), num_tokens=20, cfg_scale=cfg, temperature=0.9)
    for (c, s), tokens in zip(REQS, got):
        ref = sample_ar(ar, c, (8, 8), cfg_scale=cfg, temperature=0.9, num_tokens=20, generator=gen(s))
        assert tokens.shape == (len(c), 20)
        assert torch.equal(tokens, ref)


@pytest.mark.skipif(not cpu_compile_available(), reason="torch.compile (inductor) needs a C++ compiler on CPU")
def test_compiled_ar_batch_matches_the_eager_sampler_whatever_the_batch(ar):
    """Batches of 10, 2 and 6 rows through one compiled step write the eager sampler's tokens."""
    for reqs in (REQS, REQS[1:2], REQS[:2]):
        jobs = [Job(c, make_generator("cpu", s)) for c, s in reqs]
        got = ar_batch(ar, jobs, (8, 8), num_tokens=20, cfg_scale=3.0, top_k=1, compile=True)
        for (c, s), tokens in zip(reqs, got):
            assert torch.equal(tokens, sample_ar(ar, c, (8, 8), cfg_scale=3.0, top_k=1, num_tokens=20))
    assert ar.__dict__["_compiled_methods"]  # built once, kept for the next batch


@pytest.mark.parametrize("k", [0, 24, 64])
def test_fusion_over_two_stages_equals_sample_fusion(ar, mar, k):
    """AR stage -> generator state -> MAR stage (as the replicas do) == in-process sample_fusion."""
    c, s = REQS[2]
    g = make_generator("cpu", s)
    init = None
    if k:
        (prefix,) = ar_batch(ar, [Job(c, g)], (8, 8), num_tokens=k, cfg_scale=2.0)
        g = make_generator("cpu", state=g.get_state())  # what crosses the replica boundary
        init = torch.full((len(c), 64), mar.mask_token_id)
        init[:, :k] = prefix
    if k == 64:
        tokens = prefix
    else:
        (tokens,) = maskgit_batch(mar, [Job(c, g, init)], (8, 8), steps=4, cfg_scale=2.0)
    ref = sample_fusion(ar, mar, c, (8, 8), ar_tokens=k, mar_steps=4, cfg_scale=2.0, generator=gen(s))
    assert torch.equal(tokens, ref)


def test_other_grids(mar):
    jobs = [Job(torch.tensor([1]), make_generator("cpu", 5))]
    (t,) = maskgit_batch(mar, jobs, (4, 6), steps=3)
    assert torch.equal(t, sample_maskgit(mar, torch.tensor([1]), (4, 6), steps=3, generator=gen(5)))


def test_text_jobs_equal_the_per_request_samplers():
    """Text requests (features padded to text_len, as the ingress sends them) batched together get
    the tokens each would get alone from the library samplers, for MAR, AR and fusion."""
    from maskgil.text import TextEncoder

    torch.manual_seed(3)
    text = dict(cond="text", text_dim=384, text_len=24, **SMALL)
    mar, ar = build_model("maskgil-tiny", **text).eval(), build_model("llamagen-tiny", **text).eval()
    enc = TextEncoder(max_len=24)
    prompts = [("a red circle", 2, 21), ("a large blue square on a plain grey background", 1, 22)]
    feats = [enc.encode([p], pad_to=24) for p, _, _ in prompts]

    def jobs():
        return [Job(f.expand(n, -1, -1), make_generator("cpu", s), text_mask=m.expand(n, -1))
                for (f, m), (_, n, s) in zip(feats, prompts)]

    got_mar = maskgit_batch(mar, jobs(), (8, 8), steps=4, cfg_scale=2.0)
    got_ar = ar_batch(ar, jobs(), (8, 8), 64, cfg_scale=2.0)
    for (f, m), (p, n, s), t_mar, t_ar in zip(feats, prompts, got_mar, got_ar):
        short, short_mask = enc.encode([p] * n)  # unpadded features: padding must not matter either
        ref = sample_maskgit(mar, short, (8, 8), steps=4, cfg_scale=2.0, text_mask=short_mask, generator=gen(s))
        assert torch.equal(t_mar, ref)
        ref = sample_ar(ar, f.expand(n, -1, -1), (8, 8), cfg_scale=2.0, text_mask=m.expand(n, -1), generator=gen(s))
        assert torch.equal(t_ar, ref)
    with pytest.raises(ValueError, match="text features of one shape"):
        maskgit_batch(mar, [jobs()[0], Job(torch.tensor([1]), make_generator("cpu", 0))], (8, 8), steps=2)
