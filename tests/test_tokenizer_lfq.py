"""LFQ quantisation, its entropy loss and token factorisation, against hand computations."""
import itertools
import math

import pytest
import torch

from maskgil.tokenizers import build_tokenizer, factorize_codes, lfq_entropy_terms, unfactorize_codes
from maskgil.tokenizers.lfq import LFQuantizer


def test_lfq_code_is_the_bit_pattern_of_the_signs():
    q = LFQuantizer(bits=4, beta=0.25, entropy_weight=0.0, temperature=0.01, chunk=16, usage_window=8)
    # one token per column: signs (+,-,+,+) -> 0b1011 = 11; (-,-,-,+) -> 1; (+,+,+,+) -> 15; (-,-,-,-) -> 0
    z = torch.tensor([[0.3, -2.0, 0.1, 5.0], [-1.0, -0.2, -0.3, 0.7], [1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]])
    z = z.t().reshape(1, 4, 1, 4)  # (B=1, D=4, h=1, w=4)
    assert q.codes(z).tolist() == [[[11, 1, 15, 0]]]
    expected = torch.tensor([[1, -1, 1, 1], [-1, -1, -1, 1], [1, 1, 1, 1], [-1, -1, -1, -1]], dtype=torch.float)
    assert torch.equal(q.embed(q.codes(z))[0, :, 0, :].t(), expected)


def test_lfq_forward_straight_through_and_commitment():
    q = LFQuantizer(bits=3, beta=0.25, entropy_weight=0.0, temperature=0.01, chunk=8, usage_window=8)
    z = torch.randn(2, 3, 2, 2, requires_grad=True)
    z_q, losses, codes = q(z)
    signs = torch.where(z.detach() > 0, 1.0, -1.0)
    assert torch.equal(z_q.detach(), signs)
    assert torch.allclose(losses["commitment"], 0.25 * ((z.detach() - signs) ** 2).mean())
    (z_q * torch.arange(24.0).view(2, 3, 2, 2)).sum().backward()
    assert torch.equal(z.grad, torch.arange(24.0).view(2, 3, 2, 2))  # identity gradient through the sign


def hand_entropy_terms(z: torch.Tensor, temperature: float):
    """Enumerate every code c in {-1,1}^D, softmax(-||z - c||^2 / T), in float64."""
    N, D = z.shape
    codes = torch.tensor(list(itertools.product([1.0, -1.0], repeat=D)), dtype=torch.float64)  # (K, D)
    d2 = ((z.double()[:, None, :] - codes[None]) ** 2).sum(-1)  # (N, K)
    p = torch.softmax(-d2 / temperature, dim=-1)
    per_sample = -(p * torch.log(p.clamp_min(1e-300))).sum(-1).mean()
    avg = p.mean(0)
    return per_sample, -(avg * torch.log(avg.clamp_min(1e-300))).sum()


@pytest.mark.parametrize("temperature", [0.01, 0.5])
def test_entropy_terms_match_enumeration(temperature):
    z = torch.randn(37, 6) * 0.05
    per_sample, codebook = lfq_entropy_terms(z, temperature, chunk=None)
    hp, hc = hand_entropy_terms(z, temperature)
    assert per_sample.item() == pytest.approx(hp.item(), rel=1e-4, abs=1e-5)
    assert codebook.item() == pytest.approx(hc.item(), rel=1e-4, abs=1e-5)
    assert 0 <= codebook.item() <= 6 * math.log(2) + 1e-5


def test_entropy_loss_is_weighted_per_sample_minus_codebook_entropy():
    """MAGVIT-v2 / Open-MAGVIT2 sign: loss = w * (mean per-token entropy - entropy of the batch
    average), so minimising it makes each token sure of its code and the batch use many codes."""
    q = LFQuantizer(bits=4, beta=0.25, entropy_weight=0.3, temperature=0.5, chunk=5, usage_window=8)
    z = torch.randn(2, 4, 2, 3) * 0.4  # (B, D, h, w): 12 tokens of 4 bits
    _, losses, _ = q(z)
    per_sample, codebook = hand_entropy_terms(z.permute(0, 2, 3, 1).reshape(-1, 4), 0.5)
    assert losses["entropy"].item() == pytest.approx(0.3 * (per_sample - codebook).item(), rel=1e-4, abs=1e-6)


def test_entropy_loss_rewards_confident_tokens_spread_over_the_codebook():
    """Hand values: tokens sure of distinct codes covering all 16 give 0 - log 16; tokens sure of one
    shared code give 0 - 0; tokens with z = 0 (every code equally likely) give log 16 - log 16."""
    q = LFQuantizer(bits=4, beta=0.25, entropy_weight=0.3, temperature=0.01, chunk=16, usage_window=8)
    every_code = torch.tensor(list(itertools.product([1.0, -1.0], repeat=4)))  # (16 tokens, 4 bits)

    def entropy_loss(tokens):  # (N, 4) -> the quantiser's entropy loss for a (1, 4, 1, N) latent
        return q(tokens.t().reshape(1, 4, 1, -1))[1]["entropy"].item()

    assert entropy_loss(every_code) == pytest.approx(-0.3 * math.log(16), abs=1e-5)
    assert entropy_loss(every_code[:1].expand(16, 4)) == pytest.approx(0.0, abs=1e-5)
    assert entropy_loss(torch.zeros(16, 4)) == pytest.approx(0.0, abs=1e-5)


def test_chunked_entropy_equals_dense_values_and_gradients():
    z = (torch.randn(50, 7, dtype=torch.float64) * 0.02).requires_grad_(True)
    dense = lfq_entropy_terms(z, 0.01, chunk=None)
    (dense[0] - dense[1]).backward()
    g_dense = z.grad.clone()
    z.grad = None
    chunked = lfq_entropy_terms(z, 0.01, chunk=13)  # 128 codes in uneven chunks
    (chunked[0] - chunked[1]).backward()
    assert torch.allclose(dense[0], chunked[0]) and torch.allclose(dense[1], chunked[1], rtol=1e-12)
    assert torch.allclose(g_dense, z.grad, rtol=1e-9, atol=1e-12)


def test_factorize_hand_example_and_round_trip():
    code = 0b101010101_000000011  # 18 bits
    assert factorize_codes(torch.tensor([code]), (9, 9)).tolist() == [[0b101010101, 0b11]]
    assert factorize_codes(torch.tensor([code]), (6, 12)).tolist() == [[0b101010, 0b101000000011]]
    codes = torch.randint(0, 2**18, (3, 4, 5))
    for bits in [(9, 9), (6, 12), (6, 6, 6)]:
        sub = factorize_codes(codes, bits)
        assert sub.shape == (3, 4, 5, len(bits))
        for j, b in enumerate(bits):
            assert int(sub[..., j].max()) < 2**b
        assert torch.equal(unfactorize_codes(sub, bits), codes)


def test_factorize_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 2\^18\)"):
        factorize_codes(torch.tensor([2**18]), (9, 9))
    with pytest.raises(ValueError, match="sub-token 1 must lie in"):
        unfactorize_codes(torch.tensor([[3, 512]]), (9, 9))


def test_lfq_tokenizer_round_trip_of_codes_through_decode_encode_bits():
    tok = build_tokenizer("lfq-magvit2-tiny")
    assert (tok.codebook_size, tok.downsample, tok.embed_dim) == (4096, 8, 12)
    codes = torch.randint(0, 4096, (2, 3, 4))
    # the decoder's input is the +-1 bit pattern: re-reading its signs gives the codes back
    assert torch.equal(tok.quantize.codes(tok.quantize.embed(codes)), codes)
    out, losses, c = tok(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert out.shape == (2, 3, 32, 32) and c.shape == (2, 4, 4) and set(losses) == {"commitment", "entropy"}


def test_full_lfq_preset_is_2_to_18_codes():
    with torch.device("meta"):
        tok = build_tokenizer("lfq-magvit2")
    assert tok.codebook_size == 262_144 and tok.downsample == 16
    assert not any(isinstance(m, torch.nn.MultiheadAttention) or "attn" in n for n, m in tok.named_modules())
