"""Convolutional building blocks shared by the tokenizer families.

Module and attribute names follow the LlamaGen / taming state-dict layout (`norm1`, `conv1`,
`nin_shortcut`, `q`/`k`/`v`/`proj_out`, `downsample.conv`, `upsample.conv`) so released
checkpoints load by key name; the code itself is written for this project.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


NORMS = ("group", "none")


def norm_layer(channels: int, groups: int = 32, kind: str = "group") -> nn.Module:
    """GroupNorm(32, eps 1e-6) as in the VQGAN lineage; fewer groups when channels are few (tiny presets).

    kind="none" gives an identity instead. GroupNorm pools statistics over the whole image, so every
    code depends on every pixel (recolouring the object changes ~95% of the background codes of a
    tiny VQ); without it the encoder is a plain conv net and codes follow their neighbourhood, which
    a small generator learns far faster (see `llamagen-vq-tiny`)."""
    if kind == "none":
        return nn.Identity()
    if kind != "group":
        raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
    groups = min(groups, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3, twice, plus a (1x1-projected when widths differ) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32, dropout: float = 0.0, norm: str = "group"):
        super().__init__()
        self.norm1 = norm_layer(in_channels, groups, norm)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm_layer(out_channels, groups, norm)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions (used only at the lowest resolution)."""

    def __init__(self, channels: int, groups: int = 32, norm: str = "group"):
        super().__init__()
        self.norm = norm_layer(channels, groups, norm)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(B, 1, C, H * W).transpose(-1, -2) for m in (self.q, self.k, self.v))  # (B,1,HW,C)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        out = out.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column on the bottom/right (VQGAN convention)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DepthToSpaceUpsample(nn.Module):
    """Conv to 4x channels then pixel shuffle (Open-MAGVIT2's upsampler; no nearest-neighbour blur)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels * 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return F.pixel_shuffle(self.conv(x), 2)


class Level(nn.Module):
    """One resolution level: `res` blocks, optional `attn` after each, optional resampler."""

    def __init__(self, res: list[nn.Module], attn: list[nn.Module], resample_name: str | None, resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        if attn:
            self.attn = nn.ModuleList(attn)
        self.resample_name = resample_name
        if resample is not None:
            setattr(self, resample_name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = getattr(self, "attn", None)
        for i, block in enumerate(self.res):
            x = block(x)
            if attn is not None:
                x = attn[i](x)
        if self.resample_name is not None and hasattr(self, self.resample_name):
            x = getattr(self, self.resample_name)(x)
        return x


class Encoder(nn.Module):
    """Image (B,3,H,W) -> latent (B, z_channels, H/2^(L-1), W/2^(L-1)) for L = len(ch_mult) levels."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int,
                 attn_at_lowest: bool, mid_attn: bool, groups: int = 32, dropout: float = 0.0, in_channels: int = 3,
                 norm: str = "group"):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        blocks, c_in = [], ch
        last = len(ch_mult) - 1
        for i, mult in enumerate(ch_mult):
            c_out = ch * mult
            res = [ResnetBlock(c_in if j == 0 else c_out, c_out, groups, dropout, norm) for j in range(num_res_blocks)]
            attn = [AttnBlock(c_out, groups, norm) for _ in range(num_res_blocks)] if (attn_at_lowest and i == last) else []
            blocks.append(Level(res, attn, "downsample", Downsample(c_out) if i != last else None))
            c_in = c_out
        self.conv_blocks = nn.ModuleList(blocks)
        mid = [ResnetBlock(c_in, c_in, groups, dropout, norm)]
        if mid_attn:
            mid.append(AttnBlock(c_in, groups, norm))
        mid.append(ResnetBlock(c_in, c_in, groups, dropout, norm))
        self.mid = nn.ModuleList(mid)
        self.norm_out = norm_layer(c_in, groups, norm)
        self.conv_out = nn.Conv2d(c_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,3,H,W) -> (B,z,h,w)
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, 3, h*2^(L-1), w*2^(L-1)).

    `conv_blocks[0]` is the lowest resolution (widest); attention, when enabled, sits there.
    """

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int,
                 attn_at_lowest: bool, mid_attn: bool, groups: int = 32, dropout: float = 0.0,
                 upsample: str = "nearest", out_channels: int = 3, norm: str = "group"):
        super().__init__()
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        mid = [ResnetBlock(c_in, c_in, groups, dropout, norm)]
        if mid_attn:
            mid.append(AttnBlock(c_in, groups, norm))
        mid.append(ResnetBlock(c_in, c_in, groups, dropout, norm))
        self.mid = nn.ModuleList(mid)
        up_cls = {"nearest": Upsample, "depth_to_space": DepthToSpaceUpsample}[upsample]
        blocks, last = [], len(ch_mult) - 1
        for i, mult in enumerate(reversed(ch_mult)):
            c_out = ch * mult
            res = [ResnetBlock(c_in if j == 0 else c_out, c_out, groups, dropout, norm) for j in range(num_res_blocks)]
            attn = [AttnBlock(c_out, groups, norm) for _ in range(num_res_blocks)] if (attn_at_lowest and i == 0) else []
            blocks.append(Level(res, attn, "upsample", up_cls(c_out) if i != last else None))
            c_in = c_out
        self.conv_blocks = nn.ModuleList(blocks)
        self.norm_out = norm_layer(c_in, groups, norm)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B,z,h,w) -> (B,3,H,W)
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))
