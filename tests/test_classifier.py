"""The embedded-set classifier: trained briefly here (the full default run reaches ~99%, see the
report); it must call real val images right far above chance and noise at about chance."""
import numpy as np
import pytest
import torch

from maskgil.classifier import (
    EmbeddedClassifier,
    class_accuracy,
    classify,
    load_embedded_classifier,
    shape_and_colour,
    train_embedded_classifier,
)
from maskgil.data.embedded import CLASS_NAMES, COLOUR_NAMES, SHAPES, EmbeddedSpec, make_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("clf")
    model, val_acc = train_embedded_classifier(out, n_train=1024, n_val=256, steps=400, batch_size=32, seed=0)
    return out, model, val_acc


@pytest.fixture(scope="module")
def val_set():
    images, labels, _ = make_dataset(EmbeddedSpec(split="val", seed=0), 256, start=1000)  # unseen indices
    return images, labels


def test_label_factorisation_matches_class_names():
    shape, colour = shape_and_colour(np.arange(len(CLASS_NAMES)))
    for label, name in enumerate(CLASS_NAMES):
        assert name == f"{COLOUR_NAMES[colour[label]]} {SHAPES[shape[label]]}"


@pytest.mark.slow
def test_classifier_calls_real_images_right_and_noise_at_chance(trained, val_set):
    _, model, val_acc = trained
    images, labels = val_set
    real = class_accuracy(model, images, labels)
    assert val_acc >= 0.8 and real["accuracy"] >= 0.8, (val_acc, real)
    # The split scores are consistent: a right class has the right shape and the right colour.
    assert real["colour_accuracy"] >= real["accuracy"] and real["shape_accuracy"] >= real["accuracy"]
    noise = np.random.default_rng(0).integers(0, 256, size=images.shape, dtype=np.uint8)
    assert class_accuracy(model, noise, labels)["accuracy"] <= 0.25


@pytest.mark.slow
def test_checkpoint_roundtrip_and_input_forms(trained, val_set):
    out, model, val_acc = trained
    loaded = load_embedded_classifier(out)
    assert isinstance(loaded, EmbeddedClassifier)
    for m in (model, loaded):  # one layout, trained or loaded: the same calls, and the fast one on CPUs
        convs = [p for p in m.parameters() if p.ndim == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    images, _ = val_set
    pred = classify(model, images[:32])  # NHWC uint8
    np.testing.assert_array_equal(classify(loaded, images[:32]), pred)
    nchw_float = torch.from_numpy(images[:32]).permute(0, 3, 1, 2).float() / 127.5 - 1
    np.testing.assert_array_equal(classify(loaded, nchw_float), pred)
    # Any size: a 96 px rendering of the same kind of images is still called mostly right.
    big, big_labels, _ = make_dataset(EmbeddedSpec(split="val", width=96, height=96), 64)
    assert class_accuracy(loaded, big, big_labels)["accuracy"] >= 0.6
    import json
    extra = json.loads((out / "config.json").read_text())["extra"]
    assert extra["val_accuracy"] == pytest.approx(val_acc)


def test_shape_accuracy_by_shape_counts_by_hand(monkeypatch):
    import maskgil.classifier as C

    labels = np.array([0, 1, 4, 5, 8, 12, 13])  # true shapes: circle x2, square x2, triangle, cross x2
    calls = np.array([0, 5, 4, 0, 8, 13, 1])  # shapes called: circle, square | square, circle | triangle | cross, circle
    monkeypatch.setattr(C, "classify", lambda model, images: calls)
    r = class_accuracy(EmbeddedClassifier(EmbeddedClassifier.config_class()), np.zeros((7, 8, 8, 3), np.uint8), labels)
    assert r["shape_accuracy_by_shape"] == {"circle": 0.5, "square": 0.5, "triangle": 1.0, "cross": 0.5}
    assert r["shape_accuracy"] == pytest.approx(4 / 7)


def test_bad_labels_are_refused(val_set):
    model = EmbeddedClassifier(EmbeddedClassifier.config_class())
    images, labels = val_set
    with pytest.raises(ValueError, match="labels"):
        class_accuracy(model, images[:4], labels[:3])
    with pytest.raises(ValueError, match="0..15"):
        class_accuracy(model, images[:2], np.array([0, 16]))


def test_gaussian_blur_matches_a_direct_convolution():
    from maskgil.classifier import gaussian_blur

    sigma = 1.3
    r = int(np.ceil(2.5 * sigma))
    g = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma**2))
    kernel = np.outer(g, g) / g.sum() ** 2  # the 2D kernel the separable filter must equal
    img = np.zeros((1, 1, 21, 21))
    img[0, 0, 10, 10] = 1.0  # an impulse far from the border: its blur is the kernel itself
    out = gaussian_blur(torch.tensor(img, dtype=torch.float64), sigma)[0, 0].numpy()
    np.testing.assert_allclose(out[10 - r:11 + r, 10 - r:11 + r], kernel, atol=1e-12)
    assert abs(out.sum() - 1.0) < 1e-12
    flat = torch.full((2, 3, 16, 16), 0.3, dtype=torch.float64)  # reflect padding keeps flat images flat
    torch.testing.assert_close(gaussian_blur(flat, 2.0), flat)


def test_augmentation_blurs_three_quarters_of_a_batch():
    from maskgil.classifier import augment_batch

    x = torch.zeros(8, 3, 16, 16)
    x[:, :, 8, 7:9] = 1.0  # symmetric under the horizontal flip
    out = augment_batch(x, torch.Generator().manual_seed(0))
    peaks = out[:, :, 8, 7:9].mean(dim=(1, 2))  # an unblurred impulse keeps ~1 (noise 0.05), a blurred one drops
    assert (peaks[:2] > 0.8).all() and (peaks[2:] < 0.5).all()
