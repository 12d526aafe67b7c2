"""The shared visual tokenizer: a Qwen3-VL vision tower whose features pass through Binary Spherical Quantization.

UniAR's central idea (paper: "Visual Tokenizer is Key to Unification") is that ONE discrete tokenizer serves
understanding and generation. The vision tower is tapped at four levels: level 0 is the last ViT block, levels
1..3 are the DeepStack blocks. Each level goes through BSQ (Zhao et al., 2024, "Image and Video Tokenization with
Binary Spherical Quantization"): project to d = 64, L2-normalise onto the unit sphere, take the sign. A code is a
corner of the hypercube scaled onto the sphere, q in {-1/sqrt(d), +1/sqrt(d)}^d, i.e. 64 bits. An output
projection maps the code back to ViT width, and the (DeepStack) mergers map it to the language model's width.

Because the language model reads images only through these bits re-embedded, it can read its own generations
without re-encoding pixels (the "shared context"); the diffusion decoder reads the same bits through the output
projections alone.

Sections of this file:
    BSQ: the quantizer, the 64-bit index conventions of the released code, the entropy loss
    vision tower: patch embedding, interpolated position grid, 2-D RoPE, blocks, mergers, the four BSQ levels
    the tokenizer's input: the resize rule and uint8 RGB -> patch rows in 2x2-merge block order, like the Qwen2-VL
    image processor (reading images and the checkpoint's preprocessor_config.json: pipeline.py)

Letters in shape comments:
    Np patches (16 px), M merged tokens (32 px, Np = 4 M), d = bsq_dim (64), C = ViT width, Co = LLM width,
    L = levels (1 + number of DeepStack taps), U = merge unit (2x2 = 4), m = 2 * dy + dx inside a 2x2 block.

Departures from the official code:
    - The official eval path casts codes to bfloat16; codes (+-1/8) are exact in bfloat16, so here they are cast to
      the weights' dtype instead (float32 on CPU), which changes nothing numerically.
    - The patch embedding is a Conv3d whose kernel equals its stride, computed as one matmul over flattened patch
      rows (same weights, same keys).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from config_schema import known_fields
from kernels import rotate_half
from kernels.attention import attention as kernel_attention
from kernels.attention import use_kernel

# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class VisionConfig:
    """The vision tower + BSQ. Defaults are the released UniAR tokenizer (Qwen3-VL-8B tower, 4 levels of 64 bits)."""

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 4096
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple = (8, 16, 24)
    bsq_dim: int = 64
    bsq_hidden_dim: int = 8192
    bsq_skip_final_layernorm: bool = True

    def __post_init__(self):  # a config file is checked where it is read (config_schema.VISION, _vision_rules)
        self.deepstack_visual_indexes = tuple(int(i) for i in self.deepstack_visual_indexes)
        assert self.hidden_size % self.num_heads == 0, ("hidden_size, num_heads", self.hidden_size, self.num_heads)
        assert math.isqrt(self.num_position_embeddings) ** 2 == self.num_position_embeddings, "square position grid"
        assert all(0 <= i < self.depth for i in self.deepstack_visual_indexes), ("taps", self.deepstack_visual_indexes)

    @property
    def levels(self) -> int:
        return 1 + len(self.deepstack_visual_indexes)

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        return cls(**known_fields(cls, d))

    @classmethod
    def tiny(cls) -> "VisionConfig":
        return cls(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                   num_position_embeddings=64, deepstack_visual_indexes=(0, 1, 2), bsq_hidden_dim=96)


# ---------------------------------------------------------------------------------------------------------------------
# BSQ: quantizer, index conventions, entropy loss
# ---------------------------------------------------------------------------------------------------------------------


def _basis(d: int, device=None) -> torch.Tensor:
    # 2**arange(d-1..0) in int64. For d = 64 the first entry overflows to INT64_MIN (-2**63), exactly as the released
    # buffer does, so an index is the two's-complement reading of the 64 bits (bit 0 = sign bit).
    return torch.tensor([-(2**63) if i == 63 else 2**i for i in range(d - 1, -1, -1)], dtype=torch.int64,
                        device=device)


def bsq_sign(z: torch.Tensor) -> torch.Tensor:
    """+-1 codes with a straight-through gradient (d code / dz = identity). sign(0) is -1, as released."""
    zhat = torch.where(z > 0, torch.ones_like(z), -torch.ones_like(z))
    return z + (zhat - z).detach()


def bits_to_indexes(bits: torch.Tensor) -> torch.Tensor:
    """(..., d) bits in {0, 1} -> int64 (...). The sum wraps in int64 like the released `codes_to_indexes`."""
    return (bits.to(torch.int64) * _basis(bits.shape[-1], bits.device)).sum(-1)


def codes_to_indexes(codes: torch.Tensor) -> torch.Tensor:
    """(..., d) codes of sign +-1 (any positive scale) -> int64 (...)."""
    return bits_to_indexes((codes > 0).to(torch.int64))


def indexes_to_bits(idx: torch.Tensor, d: int = 64) -> torch.Tensor:
    """int64 (...) -> (..., d) bits in {0, 1}, emulating the released `indexes_to_codes` bit for bit.

    It floor-divides by the basis and takes the remainder mod 2. With basis[0] = INT64_MIN the first bit comes out
    inverted, so for d = 64 it is flipped back; the round trip is exact except for the two indices 0 and INT64_MIN
    (bits 1..63 all zero), whose first bit is returned inverted. That happens with probability 2**-63 per code and is
    kept so that outputs equal the official ones.
    """
    bits = torch.remainder(torch.floor_divide(idx.to(torch.int64).unsqueeze(-1), _basis(d, idx.device)), 2)
    if d == 64:
        bits[..., :1] = 1 - bits[..., :1]
    return bits


def indexes_to_codes(idx: torch.Tensor, d: int = 64) -> torch.Tensor:
    """int64 (...) -> float32 (..., d) codes in {-1, +1} (unscaled), see `indexes_to_bits`."""
    return (indexes_to_bits(idx, d) * 2 - 1).to(torch.float32)


def bits_to_codes(bits: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(..., d) bits {0, 1} -> codes on the sphere, (2 b - 1) / sqrt(d)."""
    return ((2 * bits.to(torch.int64) - 1).to(dtype)) / math.sqrt(bits.shape[-1])


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p + 1e-8)).sum(-1)


def bsq_entropy_loss(z: torch.Tensor, gamma0: float = 1.0, gamma: float = 0.5, zeta: float = 1.0,
                     inv_temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The BSQ entropy penalty on unit-norm z (..., d): zeta * (gamma0 * H_sample - gamma * H_codebook) * tau, with
    the temperature tau = 1 / inv_temperature.

    With codes +-1/sqrt(d) the softmax over a bit's two values, softmax_c(-(z - c)^2 / tau), is analytical:
    p(-1) = sigmoid(-4 z / sqrt(d) / tau). H_sample (mean over samples of the summed per-bit entropies) is pushed
    down, so each bit is confident; H_codebook (entropy of the batch-averaged per-bit distribution, summed over bits)
    is pushed up, so the bits are used evenly. Returns (penalty, H_sample, H_codebook).
    """
    p = torch.sigmoid(-4 * z / math.sqrt(z.shape[-1]) * inv_temperature)
    prob = torch.stack([p, 1 - p], dim=-1)  # (..., d, 2)
    per_sample = _entropy(prob).sum(-1).mean()
    avg_prob = prob.reshape(-1, *prob.shape[-2:]).mean(0)  # (d, 2)
    codebook = _entropy(avg_prob).sum()
    return zeta * (gamma0 * per_sample - gamma * codebook) / inv_temperature, per_sample, codebook


class BSQ(nn.Module):
    """Binary Spherical Quantizer over the last axis (group size 1, l2-normalised input, beta = 0).

    The buffers `basis` and `group_basis` are stored in the released checkpoints; they hold no learned state.
    """

    def __init__(self, dim: int = 64, gamma0: float = 1.0, gamma: float = 0.5, zeta: float = 1.0, beta: float = 0.0):
        super().__init__()
        self.dim, self.gamma0, self.gamma, self.zeta, self.beta = dim, gamma0, gamma, zeta, beta
        self.register_buffer("basis", _basis(dim))
        self.register_buffer("group_basis", torch.ones(1, dtype=torch.int64))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """z (..., d) on the unit sphere -> (codes +-1/sqrt(d) with straight-through gradient, loss, info)."""
        assert z.shape[-1] == self.dim, (z.shape, self.dim)
        zq = bsq_sign(z)
        penalty, per_sample, codebook = bsq_entropy_loss(z, self.gamma0, self.gamma, self.zeta)
        commit = self.beta * ((zq.detach() - z) ** 2).sum(-1).mean()
        bits = (zq.detach() > 0).to(torch.int64)
        info = {"per_sample_entropy": per_sample, "codebook_entropy": codebook, "bits": bits}
        return zq / math.sqrt(self.dim), commit + penalty, info


# ---------------------------------------------------------------------------------------------------------------------
# Vision tower (Qwen3-VL ViT) with multi-level BSQ
# ---------------------------------------------------------------------------------------------------------------------


class PatchMerger(nn.Module):
    """LayerNorm -> (merge neighbours) -> Linear -> GELU(erf) -> Linear.

    Used for the main merger (norm before the 2x2 shuffle), the DeepStack mergers (norm after it), and, with merge
    size 1, for every BSQ input / output projection (names and shapes as in the checkpoint).
    """

    def __init__(self, dim_in: int, dim_out: int, merge: int, postshuffle_norm: bool, mid: int | None = None):
        super().__init__()
        self.merged = dim_in * merge * merge
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.merged if postshuffle_norm else dim_in, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged, mid or self.merged)
        self.linear_fc2 = nn.Linear(mid or self.merged, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, self.merged))
        else:
            x = self.norm(x).reshape(-1, self.merged)  # (Np, C) -> (M, U*C)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # kernel == stride: the Conv3d is one matmul over the flattened (C, T, P, P) patch rows
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)  # (Np, C)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


def _segment_attention(q, k, v, cu_seqlens: list[int]) -> torch.Tensor:
    """Bidirectional attention restricted to each image / frame. q, k, v: (H, Np, hd) -> (Np, H * hd).

    On CUDA without autograd (or UNIAR_KERNELS=triton) one variable-length flash kernel launch (kernels/attention.py)
    covers every image; elsewhere one batched SDPA call when the images have one size (a training batch), else one
    call per image.
    """
    H, Np, hd = q.shape
    sizes = {e - s for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])}
    if use_kernel(q):
        cu = torch.tensor(cu_seqlens, device=q.device)
        o = kernel_attention(q[None], k[None], v[None], cu_seqlens=cu, backend="triton")[0]
    elif len(sizes) == 1 and len(cu_seqlens) > 2:
        n = Np // sizes.pop()
        q, k, v = (t.reshape(H, n, -1, hd).transpose(0, 1) for t in (q, k, v))  # (images, H, n_patches, hd)
        o = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(H, Np, hd)
    else:
        out = [F.scaled_dot_product_attention(q[:, s:e], k[:, s:e], v[:, s:e])
               for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])]
        o = torch.cat(out, dim=1) if len(out) > 1 else out[0]  # (H, Np, hd)
    return o.transpose(0, 1).reshape(Np, -1)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, cos, sin, cu_seqlens):
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, -1).unbind(1)  # each (Np, H, hd)
        # 2-D RoPE in float32 (cos / sin: (Np, 1, hd))
        dt = q.dtype
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(dt)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(dt)
        o = _segment_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu_seqlens)
        return self.proj(o)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, cu_seqlens):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


def _grid_rows(grid_thw: torch.Tensor, n_rows: int, merge: int) -> list[tuple[int, int, int]]:
    """grid_thw (images, 3) -> [(t, h, w), ...]: whole merge blocks, as many patch rows as pixel_values has."""
    grid = torch.as_tensor(grid_thw).reshape(-1, 3).tolist()
    assert all(t >= 1 and h >= merge and w >= merge and h % merge == w % merge == 0 for t, h, w in grid), grid
    assert sum(t * h * w for t, h, w in grid) == n_rows, ("patch rows", n_rows, grid)
    return grid


class VisionModel(nn.Module):
    """Qwen3-VL vision tower + four BSQ levels. State-dict keys equal the released `bsq_encoder/` files (and the AR
    checkpoint's `model.visual.*`)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        C, d = cfg.hidden_size, cfg.bsq_dim
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, C)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        # with bsq_skip_final_layernorm the main merger normalises before the 2x2 shuffle (released: True)
        self.merger = PatchMerger(C, cfg.out_hidden_size, cfg.spatial_merge_size,
                                  postshuffle_norm=not cfg.bsq_skip_final_layernorm)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(C, cfg.out_hidden_size, cfg.spatial_merge_size, postshuffle_norm=True)
            for _ in cfg.deepstack_visual_indexes)
        self.bsq = BSQ(d)
        self.bsq_input_proj = PatchMerger(C, d, 1, True, cfg.bsq_hidden_dim)
        self.bsq_output_proj = PatchMerger(d, C, 1, True, cfg.bsq_hidden_dim)
        for k in range(len(cfg.deepstack_visual_indexes)):
            setattr(self, f"bsq_input_proj_list_{k}", PatchMerger(C, d, 1, True, cfg.bsq_hidden_dim))
            setattr(self, f"bsq_output_proj_list_{k}", PatchMerger(d, C, 1, True, cfg.bsq_hidden_dim))

    # ----- level plumbing: level 0 = last block, level l >= 1 = DeepStack tap l - 1 -----
    def input_proj(self, level: int) -> PatchMerger:
        return self.bsq_input_proj if level == 0 else getattr(self, f"bsq_input_proj_list_{level - 1}")

    def output_proj(self, level: int) -> PatchMerger:
        return self.bsq_output_proj if level == 0 else getattr(self, f"bsq_output_proj_list_{level - 1}")

    # ----- position information -----
    def _pos_embed(self, grid: list[tuple[int, int, int]]) -> torch.Tensor:
        """Bilinear interpolation of the learned (S, S) position grid to each image's (h, w), in block order."""
        S = math.isqrt(self.cfg.num_position_embeddings)
        ms = self.cfg.spatial_merge_size
        table = self.pos_embed.weight
        out = []
        for t, h, w in grid:
            hi = torch.linspace(0, S - 1, h)
            wi = torch.linspace(0, S - 1, w)
            hf, wf = hi.int(), wi.int()
            hc, wc = (hf + 1).clip(max=S - 1), (wf + 1).clip(max=S - 1)
            dh, dw = (hi - hf)[:, None], (wi - wf)[None, :]
            idx = torch.stack([hf[:, None] * S + wf[None], hf[:, None] * S + wc[None],
                               hc[:, None] * S + wf[None], hc[:, None] * S + wc[None]]).reshape(4, -1)
            wts = torch.stack([(1 - dh) * (1 - dw), (1 - dh) * dw, dh * (1 - dw), dh * dw]).reshape(4, -1)
            e = table[idx.to(table.device)] * wts.to(table)[..., None]  # (4, h*w, C)
            e = e[0] + e[1] + e[2] + e[3]
            e = e.repeat(t, 1).view(t, h // ms, ms, w // ms, ms, -1).permute(0, 1, 3, 2, 4, 5)  # raster -> blocks
            out.append(e.reshape(-1, e.shape[-1]))
        return torch.cat(out)

    def _rope(self, grid: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D rotary angles: [row * inv_freq, col * inv_freq], duplicated to the head dim. -> cos, sin (Np, 1, hd)."""
        ms = self.cfg.spatial_merge_size
        coords = []
        for t, h, w in grid:
            r = torch.arange(h).view(h // ms, 1, ms, 1).expand(h // ms, w // ms, ms, ms)  # block order
            c = torch.arange(w).view(1, w // ms, 1, ms).expand(h // ms, w // ms, ms, ms)
            coords.append(torch.stack([r.reshape(-1), c.reshape(-1)], -1).repeat(t, 1))
        device = self.pos_embed.weight.device
        pos = torch.cat(coords).to(device)
        half = self.cfg.head_dim // 2  # rotary dims per axis pair; computed here, not stored, so meta builds load
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, half, 2, dtype=torch.float, device=device) / half))
        max_hw = max(max(h, w) for _, h, w in grid)
        table = torch.outer(torch.arange(max_hw, device=device, dtype=torch.float), inv_freq)
        ang = table[pos].flatten(1)  # (Np, hd/2)
        emb = torch.cat([ang, ang], -1)[:, None, :]
        return emb.cos(), emb.sin()

    # ----- the tower -----
    def tower(self, pixel_values: torch.Tensor, grid_thw) -> list[torch.Tensor]:
        """Patch rows -> ViT states of every level, [last block, DeepStack taps...], each (Np, C)."""
        shape_ok = pixel_values.ndim == 2 and pixel_values.shape[1] == self.cfg.patch_dim
        assert shape_ok, f"pixel_values must be (Np, {self.cfg.patch_dim}), got {tuple(pixel_values.shape)}"
        assert torch.isfinite(pixel_values).all(), "pixel_values contain NaN or inf"
        grid = _grid_rows(grid_thw, pixel_values.shape[0], self.cfg.spatial_merge_size)
        x = self.patch_embed(pixel_values) + self._pos_embed(grid)
        cos, sin = self._rope(grid)
        cu = np.cumsum([0] + [h * w for t, h, w in grid for _ in range(t)]).tolist()
        taps = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, cu)
            if i in self.cfg.deepstack_visual_indexes:
                taps.append(x)
        return [x] + taps

    def quantize_level(self, x: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """BSQ of one level, for inference and training alike: project the ViT states (Np, C) to d, L2-normalise onto
        the unit sphere, take the sign. -> (bits (Np, d) int64, 1 where z > 0, so sign(0) is bit 0; z (Np, d) fp32)."""
        z = F.normalize(self.input_proj(level)(x).float(), dim=-1)
        return (z > 0).to(torch.int64), z

    def encode_bits(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        """Patch rows -> bits (M, L, U, d) int64 in {0, 1}: the discrete tokens of every level."""
        U, d = self.cfg.merge_unit, self.cfg.bsq_dim
        bits = [self.quantize_level(x, lvl)[0].view(-1, U, d) for lvl, x in enumerate(self.tower(pixel_values,
                                                                                                grid_thw))]
        # the released eval path reads the bits back through the int64 index (see indexes_to_bits)
        return indexes_to_bits(bits_to_indexes(torch.stack(bits, dim=1)), d)  # (M, L, U, d)

    def _level_features(self, codes: torch.Tensor, level: int, with_merger: bool) -> torch.Tensor:
        """Codes (Np, d) -> output projection (Np, C) -> [merger for the LLM] (M, Co)."""
        h = self.output_proj(level)(codes)
        if not with_merger:
            return h
        if level == 0:
            return self.merger(h)
        if self.cfg.bsq_skip_final_layernorm:
            h = self.merger.norm(h)  # DeepStack levels reuse the main merger's norm, as released
        return self.deepstack_merger_list[level - 1](h)

    def forward(self, pixel_values: torch.Tensor, grid_thw) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Understanding path: image -> BSQ bits -> re-embedded features the LLM reads.

        Returns main (M, Co) and the DeepStack list, L - 1 tensors (M, Co).
        """
        return self.bits_to_llm_features(self.encode_bits(pixel_values, grid_thw))

    def _codes(self, bits: torch.Tensor) -> torch.Tensor:
        L, U, d = self.cfg.levels, self.cfg.merge_unit, self.cfg.bsq_dim
        assert tuple(bits.shape[-3:]) == (L, U, d), ("bits must end in (levels, merge_unit, bsq_dim)", bits.shape)
        assert not bits.dtype.is_floating_point or torch.isfinite(bits).all(), "bits contain NaN or inf"
        return bits_to_codes(bits.reshape(-1, L, U, d), self.bsq_output_proj.linear_fc1.weight.dtype)  # (M, L, U, d)

    def bits_to_llm_features(self, bits: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Bits (..., L, U, d) -> main (M, Co), DeepStack L - 1 x (M, Co): how generated tokens are read back."""
        codes = self._codes(bits)
        feats = [self._level_features(codes[:, lvl].reshape(-1, codes.shape[-1]), lvl, True)
                 for lvl in range(self.cfg.levels)]
        return feats[0], feats[1:]

    def bits_to_decoder_features(self, bits: torch.Tensor) -> torch.Tensor:
        """Bits (..., L, U, d) -> (..., U, C * L): output projections only, levels interleaved per channel
        (channel c * L + l), the diffusion decoder's condition."""
        codes = self._codes(bits)
        feats = [self._level_features(codes[:, lvl].reshape(-1, codes.shape[-1]), lvl, False)
                 for lvl in range(self.cfg.levels)]  # L x (M*U, C)
        x = torch.stack(feats, dim=-1).flatten(-2)  # (M*U, C*L), interleaved
        return x.reshape(*bits.shape[:-3], self.cfg.merge_unit, -1)

    def training_forward(self, pixel_values: torch.Tensor, grid_thw, flip_prob: float = 0.0,
                         generator=None) -> "TokenizerOutput":
        """Tokenizer training: quantize_level on every level, plus straight-through codes and the BSQ entropy loss.

        flip_prob: each code bit the decoder features read is flipped with this probability (the LLM features read
        the clean codes), so a decoder trained on them tolerates the bit errors of generated tokens (a project
        choice for toy training, in the spirit of bitwise self-correction; the released recipe is not published).
        """
        U = self.cfg.merge_unit
        loss, llm, dec, bits = 0.0, [], [], []
        for lvl, x in enumerate(self.tower(pixel_values, grid_thw)):
            b, z = self.quantize_level(x, lvl)
            q, lvl_loss, _ = self.bsq(z)  # codes +-1/sqrt(d), gradient straight through to z; entropy penalty
            loss = loss + lvl_loss
            bits.append(b.view(-1, U, b.shape[-1]))
            dec.append(self.output_proj(lvl)(flip_codes(q, flip_prob, generator)))
            llm.append(self._level_features(q, lvl, True))
        dec = torch.stack(dec, dim=-1).flatten(-2).reshape(-1, U, dec[0].shape[-1] * len(dec))
        return TokenizerOutput(llm[0], llm[1:], dec, loss, torch.stack(bits, dim=1))


class TokenizerOutput(NamedTuple):
    """VisionModel.training_forward's result."""

    main: torch.Tensor  # (M, Co): the level-0 features the LLM reads
    deepstack: list  # L - 1 x (M, Co)
    decoder_features: torch.Tensor  # (M, U, C * L), levels interleaved per channel, from the flipped codes
    loss: torch.Tensor  # the BSQ entropy penalty summed over levels
    bits: torch.Tensor  # (M, L, U, d) int64, the clean bits


def flip_codes(q: torch.Tensor, p: float, generator=None) -> torch.Tensor:
    """Each code negated (its bit flipped) with probability p, drawn on the CPU from `generator`."""
    if p <= 0:
        return q
    flip = torch.rand(q.shape, generator=generator) < p
    return torch.where(flip.to(q.device), -q, q)


# ---------------------------------------------------------------------------------------------------------------------
# The tokenizer's input (like the Qwen2-VL image processor): the resize rule and the patch rows. Reading a user's
# image (file, PIL, array) and the checkpoint's preprocessor_config.json are pipeline.py's (`preprocess_image`).
# ---------------------------------------------------------------------------------------------------------------------

MIN_PIXELS = 65536  # the released processor's size["shortest_edge"] (in pixels)
MAX_PIXELS = 16777216  # size["longest_edge"]


def smart_resize(h: int, w: int, factor: int = 32, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The nearest (H, W), multiples of `factor`, with H * W in [min_pixels, max_pixels] and the aspect kept (an
    aspect ratio over 200 is refused where the image is read, pipeline.preprocess_image)."""
    assert min(h, w) > 0 and max(h, w) / min(h, w) <= 200, ("image size", h, w)
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = max(factor, math.floor(h / beta / factor) * factor), max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return max(hb, factor), max(wb, factor)


def patch_rows(arr: np.ndarray, patch_size: int = 16, merge_size: int = 2,
               temporal_patch_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (H, W, 3), sides multiples of patch_size * merge_size -> (pixel_values (Np, 3 * T * P * P) float32 in
    [-1, 1], grid_thw (1, 3) int64): one row per patch, the patches of each merge block consecutive."""
    th, tw = arr.shape[:2]
    x = torch.from_numpy(arr.astype(np.float32) / np.float32(255.0))
    x = ((x - 0.5) / 0.5).permute(2, 0, 1)  # (3, H, W)
    gh, gw = th // patch_size, tw // patch_size
    x = x[None].expand(temporal_patch_size, -1, -1, -1)  # a still image is repeated over T
    x = x.reshape(temporal_patch_size, 3, gh // merge_size, merge_size, patch_size,
                  gw // merge_size, merge_size, patch_size)
    x = x.permute(2, 5, 3, 6, 1, 0, 4, 7)  # (h/2, w/2, dy, dx, C, T, P, P): 2x2 blocks contiguous
    pixel_values = x.reshape(gh * gw, -1).contiguous()
    return pixel_values, torch.tensor([[1, gh, gw]], dtype=torch.int64)
