"""Text conditioning: the packaged MiniLM encoder, caption padding in the model, and a text-conditional
MaskGIL that learns to follow its captions."""
import pytest
import torch

from maskgil.models import LlamaConfig, LlamaGenerator
from maskgil.text import DEFAULT_TEXT_ENCODER, TextEncoder, resolve_text_encoder, with_text_features

CAPTIONS = ["a large red circle on a plain grey background",
            "a small blue square on a plain dark grey background with 2 small grey marks",
            "a medium green triangle rotated 30 degrees on a striped light grey background"]


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(max_len=24)


def test_features_are_the_sentence_transformer_token_embeddings(encoder):
    """Independent computation: sentence-transformers' own all-MiniLM-L6-v2 pipeline (mean pooling
    over real word pieces, then L2 normalisation) applied to our per-token features and mask."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(resolve_text_encoder(DEFAULT_TEXT_ENCODER)), device="cpu")
    ref = st.encode(CAPTIONS, convert_to_tensor=True)  # (3, 384)
    feats, mask = encoder.encode(CAPTIONS)
    assert feats.shape == (3, int(mask.sum(1).max()), 384) and encoder.dim == 384
    assert mask.sum(1).tolist() == [len(encoder.tokenizer(c)["input_ids"]) for c in CAPTIONS]
    assert not feats[~mask].any()  # padding is zero
    pooled = (feats * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(torch.nn.functional.normalize(pooled, dim=-1), ref, atol=1e-5, rtol=1e-4)


def test_a_caption_encodes_the_same_alone_or_in_a_batch_and_is_cached(encoder):
    fresh = TextEncoder(max_len=24)
    alone, m1 = fresh.encode(CAPTIONS[0])
    calls = []
    fresh.model.register_forward_hook(lambda *a: calls.append(1))
    batch, m2 = fresh.encode(CAPTIONS[1:] + CAPTIONS[:1])  # CAPTIONS[0] is cached; the others are new
    assert len(calls) == 1  # one forward for the two new captions
    n = int(m1.sum())
    torch.testing.assert_close(batch[2, :n], alone[0, :n], atol=1e-5, rtol=1e-5)
    assert m2[2].sum() == n
    fresh.encode(CAPTIONS)
    assert len(calls) == 1  # all cached


def test_long_captions_are_cut_at_max_len_and_bad_input_is_refused():
    enc = TextEncoder(max_len=6)
    feats, mask = enc.encode(CAPTIONS)
    assert feats.shape[1] == 6 and mask.all()
    with pytest.raises(ValueError, match="non-empty strings"):
        enc.encode(["a red circle", "  "])
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextEncoder("/nonexistent/encoder")


def _text_model(**kw):
    cfg = dict(dim=64, n_layers=2, n_heads=4, vocab_size=8, cond="text", text_dim=384, text_len=24, grid_size=(4, 4),
               multiple_of=32, class_dropout=0.1)
    return LlamaGenerator(LlamaConfig(**{**cfg, **kw}))


@pytest.mark.parametrize("causal", [False, True])
def test_caption_output_does_not_depend_on_the_longest_caption_of_its_batch(encoder, causal):
    """Features come padded to the longest caption of the batch, then to text_len inside the model:
    neither padding may change a caption's logits, and the CFG null branch (the learned null
    sequence) must not depend on the caption it replaces."""
    torch.manual_seed(0)
    m = _text_model(causal=causal).eval()
    tokens = torch.randint(0, 8, (1, 16)) if causal else torch.full((1, 16), 8)
    short = CAPTIONS[0]
    f1, m1 = encoder.encode([short])
    f3, m3 = encoder.encode([short, CAPTIONS[1], CAPTIONS[2]])
    assert f3.shape[1] > f1.shape[1]
    with torch.no_grad():
        alone = m(tokens, f1, text_mask=m1)
        batched = m(tokens.expand(3, -1), f3, text_mask=m3)
        torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)
        drop = torch.ones(3, dtype=torch.bool)
        null = m(tokens.expand(3, -1), f3, text_mask=m3, drop_cond=drop)
        torch.testing.assert_close(null[0], null[1])
        torch.testing.assert_close(null[0], null[2])
        torch.testing.assert_close(null[:1], m(tokens, f1, text_mask=m1, drop_cond=drop[:1]), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True], ids=["maskgil", "ar"])
def test_text_conditional_generator_learns_to_follow_captions(encoder, causal):
    """Each caption names a colour, and its images are all that colour's code: a generator trained
    on (caption features, tokens) through the real training step must paint the colour a prompt
    names, including a phrasing it never saw in training."""
    from maskgil.sampling import sample_ar, sample_maskgit
    from maskgil.training.loop import TrainConfig, build_optimizer, train_step

    colours = ["red", "green", "blue", "yellow"]
    captions = [f"a {size} {c} {shape} on a plain grey background"
                for c in colours for size in ("small", "large") for shape in ("circle", "square")]
    code = {cap: colours.index(cap.split()[2]) for cap in captions}
    torch.manual_seed(0)
    model = _text_model(causal=causal)
    cfg = TrainConfig(preset="maskgil-tiny", max_steps=150, global_batch=32, lr=3e-3, warmup_steps=10,
                      lr_schedule="cosine", seed=0)
    opt = build_optimizer(model, cfg)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(cfg.max_steps):
        idx = torch.randint(0, len(captions), (32,), generator=g).tolist()
        caps = [captions[i] for i in idx]
        batch = {"tokens": torch.tensor([[code[c]] * 16 for c in caps]), "caption": caps}
        batch = next(with_text_features([batch], encoder))
        losses.append(train_step(model, opt, [batch], cfg, step, (4, 4))["loss"])
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    model.eval()
    prompts = ["a small green circle on a plain grey background", "yellow square", "a large blue square"]
    feats, mask = encoder.encode(prompts)
    g = torch.Generator().manual_seed(1)
    if causal:
        out = sample_ar(model, feats, (4, 4), cfg_scale=2.0, text_mask=mask, generator=g)  # (3, 16)
    else:
        out = sample_maskgit(model, feats, (4, 4), steps=4, cfg_scale=2.0, text_mask=mask, generator=g)
    want = torch.tensor([1, 3, 2])
    assert (out == want[:, None]).float().mean(1).min() >= 0.9, out

