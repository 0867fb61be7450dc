"""Generator side of token factorisation (LFQ, 2^18 codes): summed sub-token embeddings in, one
head per sub-token out, and MaskGIT decoding over factorised tokens."""
import math

import torch

from maskgil.models import build_model
from maskgil.sampling import reveal_counts, sample_ar, sample_maskgit, sample_tokens


def test_factorised_head_is_small_and_unfactorised_head_is_huge():
    full = build_model("maskgil-b", device="meta", vocab_size=2 ** 18)
    fact = build_model("maskgil-b-lfq", device="meta")
    assert full.output.weight.numel() == 201_326_592  # the paper's 201.3M head at width 768
    assert build_model("maskgil-b", device="meta").output.weight.numel() == 12_582_912  # 16,384 codes: 12.6M
    assert sum(h.weight.numel() for h in fact.sub_heads) == 2 * 512 * 768


def test_sub_token_embeddings_are_summed_and_mask_maps_to_each_mask_row():
    m = build_model("maskgil-tiny-lfq").eval()  # 2^10 codes as (5, 5) bits
    codes = torch.tensor([[0, 1023, 37, m.mask_token_id]])
    e = m.embed_tokens(codes)
    E0, E1 = m.sub_embeddings[0].weight, m.sub_embeddings[1].weight
    hand = torch.stack([E0[0] + E1[0], E0[31] + E1[31], E0[37 >> 5] + E1[37 & 31], E0[32] + E1[32]])
    torch.testing.assert_close(e[0], hand)


def test_sample_tokens_joins_sub_tokens_and_sums_log_probs():
    m = build_model("maskgil-tiny-lfq").eval()
    logits = torch.randn(3, 64) * 3
    codes, logp = sample_tokens(m, logits, generator=torch.Generator().manual_seed(0))
    hi, lo = codes // 32, codes % 32
    lp0, lp1 = logits[:, :32].log_softmax(-1), logits[:, 32:].log_softmax(-1)
    hand = lp0.gather(1, hi[:, None])[:, 0] + lp1.gather(1, lo[:, None])[:, 0]
    torch.testing.assert_close(logp, hand)


def test_maskgit_decodes_factorised_tokens_on_schedule():
    m = build_model("maskgil-tiny-lfq").eval()
    trace = []
    out = sample_maskgit(m, torch.tensor([0, 3]), steps=8, cfg_scale=2.0,
                         generator=torch.Generator().manual_seed(0), trace=trace)
    assert out.shape == (2, 64) and int(out.min()) >= 0 and int(out.max()) < 1024
    assert [int(t["revealed"][0].sum()) for t in trace] == reveal_counts(64, 8)
    logits = m(out, torch.tensor([0, 3]))
    assert logits.shape == (2, 64, 64)  # two 32-way heads


def test_causal_factorised_model_decodes_with_cache():
    m = build_model("llamagen-tiny", vocab_size=1024, factorization=(5, 5)).eval()
    a = sample_ar(m, torch.tensor([1, 2]), top_k=1)
    toks = torch.zeros(2, 64, dtype=torch.long)
    for i in range(64):  # greedy by full recomputation, per sub-token argmax
        l0, l1 = m.split_logits(m(toks, torch.tensor([1, 2]))[:, i])
        toks[:, i] = l0.argmax(-1) * 32 + l1.argmax(-1)
    torch.testing.assert_close(a, toks)
    assert math.log2(m.config.vocab_size) == 10


def test_factorised_training_loss_is_sum_of_sub_token_cross_entropies():
    from maskgil.training.objectives import compute_loss

    m = build_model("maskgil-tiny-lfq", class_dropout=0.0).eval()
    tokens = torch.randint(0, 1024, (2, 64))
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, ::3] = True
    from maskgil.training.objectives import masked_token_loss

    out = masked_token_loss(m, tokens, torch.tensor([1, 2]), (8, 8), mask_id=m.mask_token_id, class_dropout=0.0,
                            label_smoothing=0.0, mask=mask, factorization=(5, 5))
    logits = m(tokens.masked_fill(mask, m.mask_token_id), torch.tensor([1, 2]))
    lp_hi, lp_lo = logits[..., :32].log_softmax(-1), logits[..., 32:].log_softmax(-1)
    hand = -(lp_hi.gather(-1, (tokens // 32)[..., None]) + lp_lo.gather(-1, (tokens % 32)[..., None]))[..., 0]
    torch.testing.assert_close(out.loss, hand[mask].mean(), atol=1e-5, rtol=1e-5)
    loss = compute_loss(m, m.config, tokens, torch.tensor([1, 2]), (8, 8), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss.loss)
