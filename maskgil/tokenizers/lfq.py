"""Lookup-free quantisation (MAGVIT-v2 / Open-MAGVIT2): each latent channel quantised to its sign.

With `bits` channels the codebook is implicit: code = the bit pattern of the signs, channel 0 the
most significant bit, so 18 channels give 2^18 = 262,144 codes with no embedding table.

Entropy loss (temperature T): with p_n(c) = softmax_c(-||z_n - c||^2 / T) over all codes c in
{-1,+1}^bits, loss = mean_n H(p_n) - H(mean_n p_n) (confident per token, diverse over the batch).
The softmax factorises over bits (p_n(c) = prod_i sigmoid(4 z_ni c_i / T)), so the per-sample term
is a sum of binary entropies; the codebook term does not factorise and is computed over code
chunks with activation checkpointing, so neither pass holds the dense N x 2^bits tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from maskgil.checkpoint import register_model
from maskgil.tokenizers.base import ImageTokenizer
from maskgil.tokenizers.layers import Decoder, Encoder


@dataclass
class LFQConfig:
    # encoder / decoder: no attention, depth-to-space upsampling (Open-MAGVIT2 style)
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    enc_res_blocks: int = 4
    dec_res_blocks: int = 4
    norm_groups: int = 32
    norm: str = "group"  # "group" | "none" (see layers.norm_layer)
    dropout: float = 0.0
    # quantizer
    bits: int = 18  # codebook size 2^bits
    beta: float = 0.25  # commitment weight
    entropy_weight: float = 0.1
    entropy_temperature: float = 0.01
    entropy_chunk: int = 8192  # codes per chunk of the codebook-entropy term
    usage_window: int = 65536


def bit_weights(bits: int, device=None) -> torch.Tensor:
    """(bits,) powers of two, most significant first: code = sum_i b_i * 2^(bits-1-i)."""
    return 2 ** torch.arange(bits - 1, -1, -1, device=device, dtype=torch.long)


def codes_to_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(...,) long -> (..., bits) in {0, 1}, most significant bit first."""
    return (codes.unsqueeze(-1) // bit_weights(bits, codes.device)) % 2


def binary_entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H(Bernoulli(sigmoid(l))) in nats, stable for large |l|."""
    p = torch.sigmoid(logits)
    return F.softplus(logits) - p * logits


def _chunk_mean_prob(log_p1: torch.Tensor, log_p0: torch.Tensor, chunk_bits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of p_n(c) for the codes in one chunk. log_p1/log_p0: (N, D); chunk_bits: (M, D)."""
    log_p = log_p0.sum(1, keepdim=True) + (log_p1 - log_p0) @ chunk_bits.t()  # (N, M)
    return log_p.exp().mean(0)  # (M,)


def lfq_entropy_terms(z: torch.Tensor, temperature: float, chunk: int | None = 8192):
    """(per-sample entropy, codebook entropy) for latents z (N, D); `chunk=None` is the dense reference."""
    N, D = z.shape
    logits = 4.0 * z.to(torch.promote_types(z.dtype, torch.float32)) / temperature  # log-odds of bit = +1
    per_sample = binary_entropy_from_logits(logits).sum(1).mean()
    log_p1, log_p0 = F.logsigmoid(logits), F.logsigmoid(-logits)
    K = 2**D
    if chunk is None:
        all_bits = codes_to_bits(torch.arange(K, device=z.device), D).to(logits.dtype)
        avg = _chunk_mean_prob(log_p1, log_p0, all_bits)
    else:
        parts = []
        for start in range(0, K, chunk):
            bits = codes_to_bits(torch.arange(start, min(start + chunk, K), device=z.device), D).to(logits.dtype)
            if torch.is_grad_enabled() and z.requires_grad:
                parts.append(checkpoint(_chunk_mean_prob, log_p1, log_p0, bits, use_reentrant=False))
            else:
                parts.append(_chunk_mean_prob(log_p1, log_p0, bits))
        avg = torch.cat(parts)
    codebook = -(avg * torch.log(avg.clamp_min(1e-30))).sum()
    return per_sample, codebook


class LFQuantizer(nn.Module):
    def __init__(self, bits: int, beta: float, entropy_weight: float, temperature: float, chunk: int, usage_window: int):
        super().__init__()
        self.bits, self.beta, self.entropy_weight, self.temperature, self.chunk = bits, beta, entropy_weight, temperature, chunk
        self.codebook_size = 2**bits
        self.register_buffer("codebook_used", torch.full((usage_window,), -1.0))

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D, h, w) -> codes (B, h, w): bit i = [z_i > 0]."""
        return ((z > 0).long() * bit_weights(self.bits, z.device).view(1, -1, 1, 1)).sum(1)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> +-1 latents (B, D, h, w)."""
        return (codes_to_bits(codes, self.bits).float() * 2 - 1).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor):  # z (B, D, h, w)
        # Always fp32, also under bf16 autocast: the entropy terms' code-chunk matmuls and logs need it.
        with torch.autocast(z.device.type, enabled=False):
            return self._quantize(z.float())

    def _quantize(self, z: torch.Tensor):  # z (B, D, h, w) fp32
        q = torch.where(z > 0, 1.0, -1.0).to(z.dtype)
        codes = self.codes(z)
        losses = {"commitment": self.beta * F.mse_loss(z, q.detach())}
        if self.entropy_weight > 0:
            per_sample, codebook = lfq_entropy_terms(z.permute(0, 2, 3, 1).reshape(-1, self.bits),
                                                     self.temperature, self.chunk)
            losses["entropy"] = self.entropy_weight * (per_sample - codebook)
        if self.training:
            self.record_usage(codes)
        return z + (q - z).detach(), losses, codes  # straight-through

    @torch.no_grad()
    def record_usage(self, codes: torch.Tensor) -> None:
        n = min(codes.numel(), self.codebook_used.numel())
        ids = codes.reshape(-1)[-n:].to(self.codebook_used.dtype)
        self.codebook_used.copy_(torch.cat([self.codebook_used[n:], ids]))

    def usage(self) -> float:
        seen = self.codebook_used[self.codebook_used >= 0]
        return float(seen.long().unique().numel()) / self.codebook_size


@register_model("lfq_tokenizer")
class LFQTokenizer(ImageTokenizer):
    config_class = LFQConfig

    def __init__(self, config: LFQConfig):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c.ch, tuple(c.ch_mult), c.enc_res_blocks, c.bits, attn_at_lowest=False, mid_attn=False,
                               groups=c.norm_groups, dropout=c.dropout, norm=c.norm)
        self.decoder = Decoder(c.ch, tuple(c.ch_mult), c.dec_res_blocks, c.bits, attn_at_lowest=False, mid_attn=False,
                               groups=c.norm_groups, dropout=c.dropout, upsample="depth_to_space", norm=c.norm)
        self.quantize = LFQuantizer(c.bits, c.beta, c.entropy_weight, c.entropy_temperature, c.entropy_chunk, c.usage_window)
        self.codebook_size = 2**c.bits
        self.downsample = 2 ** (len(c.ch_mult) - 1)
        self.embed_dim = c.bits

    def encode_to_codes(self, x: torch.Tensor) -> torch.Tensor:  # (B,3,H,W) -> (B,h,w)
        return self.quantize.codes(self.encoder(x))

    def decode_from_codes(self, codes: torch.Tensor) -> torch.Tensor:  # (B,h,w) -> (B,3,H,W)
        return self.decoder(self.quantize.embed(codes))

    def forward(self, x: torch.Tensor, code_noise: float = 0.0):
        """Training pass: x (B,3,H,W) -> (reconstruction, {commitment, entropy}, codes (B,h,w))."""
        z_q, losses, codes = self.quantize(self.encoder(x))  # z_q (B, bits, h, w)
        return self.decoder(self.corrupt_latents(z_q, code_noise)), losses, codes

    def last_layer_weight(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def codebook_usage(self) -> float:
        return self.quantize.usage()


# -- token factorisation (generator side: summed sub-token embeddings in, one head per sub-token out) --
def _check_bits(bits) -> tuple[int, ...]:
    bits = tuple(int(b) for b in bits)
    if not bits or any(b <= 0 for b in bits):
        raise ValueError(f"sub-token bit widths must be positive, got {bits}")
    return bits


def factorize_codes(codes: torch.Tensor, bits=(9, 9)) -> torch.Tensor:
    """Split codes of sum(bits) bits into sub-tokens: (...) -> (..., len(bits)).

    Sub-token 0 holds the most significant `bits[0]` bits, and so on; sub-token j lies in
    [0, 2^bits[j]). For an 18-bit LFQ code, bits=(9, 9) gives two 512-way tokens, (6, 12) a 64- and
    a 4,096-way token, so a generator needs heads of 512+512 (or 64+4,096) rows instead of 262,144.
    """
    bits = _check_bits(bits)
    total = sum(bits)
    if codes.is_floating_point():
        raise ValueError(f"codes must be integers, got {codes.dtype}")
    # The range check reads values, which a compiled graph cannot branch on (compiled AR decoding
    # feeds sampled, hence valid, codes); eager calls always check.
    if codes.numel() and not torch.compiler.is_compiling() and (int(codes.min()) < 0 or int(codes.max()) >= 2**total):
        raise ValueError(f"codes must lie in [0, 2^{total}) for sub-token bits {bits}, "
                         f"got [{int(codes.min())}, {int(codes.max())}]")
    shifts = [sum(bits[j + 1 :]) for j in range(len(bits))]
    return torch.stack([(codes.long() >> s) & ((1 << b) - 1) for s, b in zip(shifts, bits)], dim=-1)


def unfactorize_codes(sub_codes: torch.Tensor, bits=(9, 9)) -> torch.Tensor:
    """Inverse of `factorize_codes`: (..., len(bits)) sub-tokens -> (...) codes."""
    bits = _check_bits(bits)
    if sub_codes.shape[-1] != len(bits):
        raise ValueError(f"last dim {sub_codes.shape[-1]} != number of sub-tokens {len(bits)}")
    out = torch.zeros(sub_codes.shape[:-1], dtype=torch.long, device=sub_codes.device)
    for j, b in enumerate(bits):
        s = sub_codes[..., j].long()
        if s.numel() and (int(s.min()) < 0 or int(s.max()) >= 2**b):
            raise ValueError(f"sub-token {j} must lie in [0, 2^{b}), got [{int(s.min())}, {int(s.max())}]")
        out = (out << b) | s
    return out
