"""Vector-quantised tokenizers: LlamaGen-VQ (l2-normalised low-dim codes) and VQGAN (taming lineage).

Both are conv encoder -> 1x1 `quant_conv` to the code dim -> nearest codebook entry ->
1x1 `post_quant_conv` -> conv decoder. The only switch between the two families is
`l2_norm` (cosine lookup on unit vectors, LlamaGen) and the code dim (8 vs 256).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskgil.checkpoint import check_state_dict, register_model
from maskgil.precision import CONV_MEMORY_FORMAT
from maskgil.tokenizers.base import ImageTokenizer
from maskgil.tokenizers.layers import Decoder, Encoder


@dataclass
class VQConfig:
    # encoder / decoder (defaults: LlamaGen VQ-16, 71,883,403 parameters)
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    enc_res_blocks: int = 2
    dec_res_blocks: int = 3
    z_channels: int = 256
    attn_at_lowest: bool = True  # attention after every res block of the lowest-resolution level
    mid_attn: bool = True
    norm_groups: int = 32
    norm: str = "group"  # "group" (VQGAN lineage) | "none" (local codes; see layers.norm_layer)
    dropout: float = 0.0
    # quantizer
    codebook_size: int = 16384
    codebook_dim: int = 8
    l2_norm: bool = True  # LlamaGen: normalise codes and codebook, i.e. cosine nearest neighbour
    beta: float = 0.25  # commitment weight
    usage_window: int = 65536  # ring of recently used code ids (`quantize.codebook_used`)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with straight-through gradients.

    losses: `codebook` = ||sg(z) - e||^2 (moves the codes), `commitment` = beta ||z - sg(e)||^2.
    """

    def __init__(self, codebook_size: int, dim: int, l2_norm: bool, beta: float, usage_window: int):
        super().__init__()
        self.codebook_size, self.dim, self.l2_norm, self.beta = codebook_size, dim, l2_norm, beta
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        if l2_norm:
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # Recently used ids (float, like LlamaGen's buffer, so its checkpoint loads as is); -1 = empty.
        self.register_buffer("codebook_used", torch.full((usage_window,), -1.0))

    def codebook(self) -> torch.Tensor:  # (K, D)
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def lookup(self, z: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """z (N, D) -> nearest code id (N,), in row chunks so N x K never materialises at once.
        In fp32 even under bf16 autocast (bf16 distances pick wrong codes)."""
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            if self.l2_norm:
                z = F.normalize(z, dim=-1)
            e = self.codebook()
            e_sq = (e * e).sum(-1)  # (K,)
            out = []
            for zc in z.split(chunk):
                # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; ||z||^2 is constant per row
                out.append((e_sq[None] - 2.0 * zc @ e.t()).argmin(-1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=z.device)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> code vectors (B, D, h, w)."""
        return F.embedding(codes, self.codebook()).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor):  # z (B, D, h, w)
        # Always fp32, also under bf16 autocast (losses and straight-through in full precision).
        with torch.autocast(z.device.type, enabled=False):
            return self._quantize(z.float())

    def _quantize(self, z: torch.Tensor):  # z (B, D, h, w) fp32
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (N, D)
        codes = self.lookup(flat.detach())
        if self.l2_norm:
            z = F.normalize(z, dim=1)
        z_q = self.embed(codes.view(B, h, w))  # (B, D, h, w)
        losses = {
            "codebook": F.mse_loss(z_q, z.detach()),
            "commitment": self.beta * F.mse_loss(z, z_q.detach()),
        }
        if self.training:
            self.record_usage(codes)
            self.last_inputs = flat.detach()  # for dead-code restarts (not state)
        z_q = z + (z_q - z).detach()  # straight-through
        return z_q, losses, codes.view(B, h, w)

    @torch.no_grad()
    def record_usage(self, codes: torch.Tensor) -> None:
        n = min(codes.numel(), self.codebook_used.numel())
        ids = codes.reshape(-1)[-n:].to(self.codebook_used.dtype)
        self.codebook_used.copy_(torch.cat([self.codebook_used[n:], ids]))

    @torch.no_grad()
    def restart_dead_codes(self, dead: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """Move codes flagged in `dead` (bool (K,)) onto randomly drawn recent encoder outputs.

        Codes no input picks get no codebook gradient and stay dead forever; re-seeding them where the
        data is keeps the codebook in use (a standard VQ training trick). Returns how many moved.
        """
        inputs = getattr(self, "last_inputs", None)
        n = int(dead.sum())
        if inputs is None or n == 0:
            return 0
        # Distinct vectors, drawn without replacement: codes restarted onto one vector tie in every
        # lookup, the lowest index wins each time and the others stay dead (flat image regions give
        # many identical encoder outputs).
        pool = torch.unique(F.normalize(inputs, dim=-1) if self.l2_norm else inputs, dim=0)  # (U, D)
        order = torch.randperm(len(pool), generator=generator, device="cpu")
        new = pool[order.repeat(-(-n // len(pool)))[:n].to(pool.device)]  # (n, D): tiled when U < n
        if n > len(pool):  # the tiled copies are nudged apart (noise at 1 % of the vectors' spread)
            spread = (float(pool.std()) if len(pool) > 1 else 0.0) or float(pool.abs().mean()) or 1.0
            noise = torch.randn(new.shape, generator=generator, device="cpu").to(new.device)
            noise[: len(pool)] = 0
            new = new + 0.01 * spread * noise
            if self.l2_norm:
                new = F.normalize(new, dim=-1)
        self.embedding.weight[dead.to(self.embedding.weight.device)] = new.to(self.embedding.weight.dtype)
        return n

    def usage(self) -> float:
        """Fraction of the codebook seen in the usage window (training forward passes)."""
        seen = self.codebook_used[self.codebook_used >= 0]
        return float(seen.long().unique().numel()) / self.codebook_size


@register_model("vq_tokenizer")
class VQTokenizer(ImageTokenizer):
    config_class = VQConfig

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = Encoder(c.ch, tuple(c.ch_mult), c.enc_res_blocks, c.z_channels, c.attn_at_lowest,
                               c.mid_attn, c.norm_groups, c.dropout, norm=c.norm)
        self.decoder = Decoder(c.ch, tuple(c.ch_mult), c.dec_res_blocks, c.z_channels, c.attn_at_lowest,
                               c.mid_attn, c.norm_groups, c.dropout, norm=c.norm)
        self.quantize = VectorQuantizer(c.codebook_size, c.codebook_dim, c.l2_norm, c.beta, c.usage_window)
        self.quant_conv = nn.Conv2d(c.z_channels, c.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.codebook_dim, c.z_channels, 1)
        self.codebook_size = c.codebook_size
        self.downsample = 2 ** (len(c.ch_mult) - 1)
        self.embed_dim = c.codebook_dim

    def encode_to_codes(self, x: torch.Tensor) -> torch.Tensor:  # (B,3,H,W) -> (B,h,w)
        z = self.quant_conv(self.encoder(x))  # (B, D, h, w)
        B, D, h, w = z.shape
        return self.quantize.lookup(z.permute(0, 2, 3, 1).reshape(-1, D)).view(B, h, w)

    def decode_from_codes(self, codes: torch.Tensor) -> torch.Tensor:  # (B,h,w) -> (B,3,H,W)
        return self.decoder(self.post_quant_conv(self.quantize.embed(codes)))

    def forward(self, x: torch.Tensor, code_noise: float = 0.0):
        """Training pass: x (B,3,H,W) in [-1,1] -> (reconstruction, {codebook, commitment}, codes (B,h,w))."""
        z_q, losses, codes = self.quantize(self.quant_conv(self.encoder(x)))  # z_q (B, D, h, w)
        return self.decoder(self.post_quant_conv(self.corrupt_latents(z_q, code_noise))), losses, codes

    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's output conv weight: the adaptive GAN weight balances gradients here."""
        return self.decoder.conv_out.weight

    def codebook_usage(self) -> float:
        return self.quantize.usage()


def load_llamagen_vq(path: str | os.PathLike, config: VQConfig | None = None, map_location: str = "cpu") -> VQTokenizer:
    """Load LlamaGen's released `vq_ds16_c2i.pt` (weights under `ckpt["model"]`) strictly by key name.

    Uses `torch.load(weights_only=True)`: tensors only, nothing unpickled beyond plain containers.
    """
    ckpt = torch.load(str(path), map_location=map_location, weights_only=True)
    state = ckpt["model"] if isinstance(ckpt, dict) and "model" in ckpt else ckpt
    return vq_from_state_dict(state, config or VQConfig())


def vq_from_state_dict(state: dict, config: VQConfig) -> VQTokenizer:
    """Build a VQTokenizer on the meta device and assign `state` to it; strict keys and shapes."""
    with torch.device("meta"):
        model = VQTokenizer(config)
    check_state_dict(model, state)
    model.load_state_dict(state, assign=True)
    return model.eval().to(memory_format=CONV_MEMORY_FORMAT)
