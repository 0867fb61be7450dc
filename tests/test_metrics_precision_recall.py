import numpy as np
import pytest
from scipy.spatial.distance import cdist

from maskgil.metrics.inception_score import inception_score
from maskgil.metrics.precision_recall import knn_sq_radii, precision_recall


def brute_force_pr(real, gen, k):
    """The definition, straight: full distance matrices, sorted neighbours."""
    def radii(x):
        return np.sort(cdist(x, x), axis=1)[:, k]  # column 0 is the point itself
    rr, gr = radii(real), radii(gen)
    precision = (cdist(gen, real) <= rr[None, :]).any(axis=1).mean()
    recall = (cdist(real, gen) <= gr[None, :]).any(axis=1).mean()
    return precision, recall


def on_line(xs):
    return np.stack([np.asarray(xs, float), np.zeros(len(xs))], axis=1)


def test_identical_sets_give_one_one():
    x = np.random.default_rng(0).normal(size=(300, 32))
    pr = precision_recall(x, x, block_size=128)
    assert pr == {"precision": 1.0, "recall": 1.0}


def test_disjoint_far_apart_sets_give_zero_zero():
    rng = np.random.default_rng(1)
    pr = precision_recall(rng.normal(size=(200, 16)), rng.normal(size=(200, 16)) + 100.0, block_size=50)
    assert pr == {"precision": 0.0, "recall": 0.0}


def test_hand_checked_small_case_k1():
    # real 0,1,2,3: nearest-neighbour radius 1 each. gen 0.5,1.5,10,10.3: radii 1,1,0.3,0.3.
    # precision: 0.5 and 1.5 are within 1 of a real point, 10 and 10.3 are not -> 1/2.
    # recall: 0,1,2 are within 1 of 0.5 or 1.5; 3 is 1.5 from 1.5 and 7 from 10 -> 3/4.
    pr = precision_recall(on_line([0, 1, 2, 3]), on_line([0.5, 1.5, 10, 10.3]), k=1, block_size=3)
    assert pr["precision"] == pytest.approx(0.5) and pr["recall"] == pytest.approx(0.75)


def test_hand_checked_radii_k3():
    # 0..5 on a line, k=3: ends reach 3 away, inner points 2 away.
    np.testing.assert_allclose(knn_sq_radii(on_line(range(6)), k=3, block_size=4).numpy(), [9, 4, 4, 4, 4, 9])
    # gen -3.5 (3.5 from 0, radius 3: out), 8.5 (3.5 from 5: out), 2.5 (in), 30 (out) -> precision 1/4.
    pr = precision_recall(on_line(range(6)), on_line([-3.5, 8.5, 2.5, 30]), k=3)
    assert pr["precision"] == pytest.approx(1 / 4)


def test_blocked_matches_brute_force_on_random_clouds():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(157, 8))
    gen = rng.normal(size=(131, 8)) * 1.3 + 0.4
    expected = brute_force_pr(real, gen, k=3)
    for block in (7, 64, 10_000):
        pr = precision_recall(real, gen, k=3, block_size=block)
        assert (pr["precision"], pr["recall"]) == pytest.approx(expected, abs=1e-12)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="dims differ"):
        precision_recall(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(np.zeros((3, 3)), np.zeros((10, 3)))


def test_inception_score_uniform_is_one():
    mean, std = inception_score(np.zeros((100, 1008)))
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_one_hot_distinct_classes_is_class_count():
    logits = np.full((100, 1008), -1e4)
    logits[np.arange(100), np.arange(100)] = 0.0  # 10 splits of 10 images, each a different class
    mean, _ = inception_score(logits, splits=10)
    assert mean == pytest.approx(10.0)
    assert inception_score(logits[:40], splits=1)[0] == pytest.approx(40.0)


def test_inception_score_two_class_hand_computation():
    # p(y|x) = (0.9, 0.1) and (0.1, 0.9): marginal (0.5, 0.5); each KL = 0.9 ln 1.8 + 0.1 ln 0.2.
    logits = np.log(np.array([[0.9, 0.1], [0.1, 0.9]]))
    kl = 0.9 * np.log(1.8) + 0.1 * np.log(0.2)
    assert inception_score(logits, splits=1)[0] == pytest.approx(np.exp(kl))
    with pytest.raises(ValueError, match="splits"):
        inception_score(logits, splits=10)


def test_inception_score_two_splits_hand_computation():
    """Each split scores exp(mean KL) (not the mean of exp KL: samples within a split have different
    KLs here); the result is the mean and population std (ddof=0) of the two split scores."""
    p = np.array([[0.99, 0.01], [0.5, 0.5], [0.02, 0.98], [0.7, 0.3]])

    def split_score(q):
        marginal = q.mean(0)
        kl = (q * np.log(q / marginal)).sum(1)
        assert abs(kl[0] - kl[1]) > 0.1  # the two orders of exp and mean differ
        return np.exp(kl.mean())

    a, b = split_score(p[:2]), split_score(p[2:])
    mean, std = inception_score(np.log(p), splits=2)
    assert mean == pytest.approx((a + b) / 2, rel=1e-12)
    assert std == pytest.approx(abs(a - b) / 2, rel=1e-12) and std > 0.05


def test_points_exactly_on_a_radius_are_inside():
    """The balls are closed (distance <= radius), for both precision and recall. k=1, on a line:
    real 0..3 (radii 1); generated 4 (radius 4, reaching 8), 8, 20, 21. Generated 4 lies exactly
    1 from real 3: precision 1/4. Real 0 lies exactly 4 from generated 4: recall 4/4, not 3/4."""
    pr = precision_recall(on_line([0, 1, 2, 3]), on_line([4, 8, 20, 21]), k=1)
    assert pr == {"precision": 0.25, "recall": 1.0}
