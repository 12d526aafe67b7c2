"""The diffusion decoder: bits -> pixels with an SD3 MMDiT conditioned on the BSQ tokenizer's features.

UniAR generates images as BSQ bits (bsq.py). A Stable Diffusion 3 (Esser et al., 2024, "Scaling Rectified Flow
Transformers") MMDiT turns them into pixels: the bits are re-embedded by the tokenizer's output projections
(levels interleaved per channel), resampled to the latent token grid and added to the patch embeddings through one
bias-free projection (`siglip_embed_add_latent`). Sampling is rectified-flow Euler with the scheduler's shift and
guidance over the visual condition only (zeros vs features, the same fixed text prompt on both rows); the SD3 VAE
decoder maps latents to pixels.

Sections: configs | MMDiT | conditioning | flow matching | VAE decoder | Decoder (high level) and toy configuration.
The text encoders that embed the fixed decoder prompt are in text_encoders.py; loading is in load_hf.py.

Letters in shape comments:
    B batch, H x W output pixels, h x w latent token grid (H/16, W/16 with the VAE), gh x gw the AR grid at 16 px,
    S tokens, D transformer width, Dc = siglip_channels = C * L (ViT width times levels), N merged AR tokens,
    L levels, U merge unit, d bsq_dim, P patch size, c latent channels.

Departures from the official code (uniar/modeling_vision_decoder.py + diffusers/transformers):
    - The conditioning grid is passed explicitly to the transformer, so a non-square AR grid can be resampled to the
      output grid; the official code assumes a square grid whenever the token counts differ (it crashes there).
    - The random-crop position embedding (training only, off in the released config) is not implemented; the
      config keys are accepted and ignored. The centre crop is used always.
    - The prompt embeddings of the fixed decoder prompt are cached on disk (text_encoders.py); the text encoders are
      loaded only to fill the cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import bsq
from config_schema import known_fields
from model import guide

DECODER_PROMPT = "Please reconstruct this image and restore all the details."


class JsonConfig:
    @classmethod
    def from_dict(cls, d: dict):
        """A diffusers / transformers config.json dict; unknown keys (_class_name, model_type, ...) are ignored."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in known_fields(cls, d).items()})


# ---------------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class MMDiTConfig(JsonConfig):
    """`sd3_transformer/config.json`. Defaults: SD3.5-medium base (the golden fixture's layout: dual attention +
    RMS qk-norm) with UniAR's 4-level conditioning; `sd3_medium()` is the other candidate base (the SD3-medium
    layout the released folder may also hold)."""
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 24
    attention_head_dim: int = 64
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1536
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 384
    dual_attention_layers: tuple = tuple(range(13))
    qk_norm: str | None = "rms_norm"
    siglip_channels: int = 4608
    image_token_scale_factor: float = 1.0
    add_siglip_tensor_to_latent: bool = True
    super_resolution: bool = True
    upscale_factor: int = 2
    drop_image_token_prob_for_cfg: float = 0.0
    prediction_type: str = "velocity"  # the released decoder; "sample" (x0) is the toy pixel-space decoder's

    def __post_init__(self):  # a config file is checked where it is read (config_schema.mmdit, _mmdit_rules)
        self.dual_attention_layers = tuple(self.dual_attention_layers)
        assert self.caption_projection_dim == self.inner_dim, ("caption_projection_dim", self.caption_projection_dim)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def sd35_medium(cls) -> "MMDiTConfig":
        return cls()

    @classmethod
    def sd3_medium(cls) -> "MMDiTConfig":
        return cls(pos_embed_max_size=192, dual_attention_layers=(), qk_norm=None)

    @classmethod
    def tiny(cls) -> "MMDiTConfig":
        return cls(sample_size=32, num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                   caption_projection_dim=32, pooled_projection_dim=24, pos_embed_max_size=32,
                   dual_attention_layers=(0,), siglip_channels=128)

    @classmethod
    def toy(cls, siglip_channels: int = 128) -> "MMDiTConfig":
        """Pixel space (RGB patches of 4 px, no VAE) with a learned constant context: trains on 2 CPU cores."""
        return cls(sample_size=16, patch_size=4, in_channels=3, out_channels=3, num_layers=2, attention_head_dim=16,
                   num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=32,
                   pos_embed_max_size=32, dual_attention_layers=(), qk_norm="rms_norm", siglip_channels=siglip_channels)


@dataclass
class VAEConfig(JsonConfig):
    """`sd3_pipeline/vae/config.json` (AutoencoderKL); only the decoder half is built."""
    latent_channels: int = 16
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    mid_block_add_attention: bool = True
    use_post_quant_conv: bool = False
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609

    def __post_init__(self):  # a config file is checked where it is read (config_schema.VAE)
        self.block_out_channels = tuple(self.block_out_channels)

    @property
    def scale(self) -> int:
        """Pixels per latent cell (2 ** number of upsamplers)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        return super().from_dict({**d, "shift_factor": d.get("shift_factor") or 0.0})  # null = no shift

    @classmethod
    def tiny(cls) -> "VAEConfig":
        return cls(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8)


@dataclass
class SchedulerConfig(JsonConfig):
    """`sd3_pipeline/scheduler/scheduler_config.json` (FlowMatchEulerDiscreteScheduler, static shift only; the
    options the released scheduler has off are refused where the file is read, config_schema.SCHEDULER)."""
    num_train_timesteps: int = 1000
    shift: float = 3.0


# ---------------------------------------------------------------------------------------------------------------------
# MMDiT (diffusers SD3Transformer2DModel names)
# ---------------------------------------------------------------------------------------------------------------------

def sincos_2d_table(dim: int, max_size: int, base_size: float) -> torch.Tensor:
    """SD3's fixed 2-D sin-cos table (max_size^2, dim): first half encodes the column, second half the row."""
    grid = torch.arange(max_size, dtype=torch.float32) / (max_size / base_size)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def one_axis(pos):  # (max_size^2,) -> (max_size^2, dim/2) = [sin, cos]
        out = torch.outer(pos.reshape(-1).double(), omega)
        return torch.cat([out.sin(), out.cos()], dim=1)

    gy, gx = torch.meshgrid(grid, grid, indexing="ij")  # row-major tokens: row = y, col = x
    return torch.cat([one_axis(gx), one_axis(gy)], dim=1).float()


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features (B, dim) ordered [cos, sin] (diffusers flip_sin_to_cos=True, shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the statistics in fp32, the product cast to the weight's dtype before the weight (the
    diffusers and T5 order; model.RMSNorm casts back to the input's dtype instead, as Qwen3 does, so the two round
    differently when activations and weights differ in dtype and each must follow its own reference)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(var + self.eps)).to(self.weight.dtype) * self.weight


class PatchEmbed(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.patch_size, self.max_size = cfg.patch_size, cfg.pos_embed_max_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.inner_dim, cfg.patch_size, stride=cfg.patch_size)
        if self.proj.weight.is_meta:  # built to be loaded: the table is in the checkpoint (and computing it on the
            # meta device would import torch._dynamo, which slows the start)
            table = torch.empty(cfg.pos_embed_max_size ** 2, cfg.inner_dim)
        else:
            table = sincos_2d_table(cfg.inner_dim, cfg.pos_embed_max_size, cfg.sample_size / cfg.patch_size)
        self.register_buffer("pos_embed", table[None], persistent=True)  # (1, M^2, D), in the checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        assert h <= self.max_size and w <= self.max_size, ("token grid beyond pos_embed_max_size", h, w)
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2  # centre crop of the table
        pos = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)[:, top:top + h, left:left + w]
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, D)
        return (x + pos.reshape(1, h * w, -1)).to(x.dtype)


class MLPEmbed(nn.Module):
    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(dim_in, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.timestep_embedder = MLPEmbed(256, cfg.inner_dim)
        self.text_embedder = MLPEmbed(cfg.pooled_projection_dim, cfg.inner_dim)

    def forward(self, t, pooled):
        return self.timestep_embedder(timestep_embedding(t).to(pooled.dtype)) + self.text_embedder(pooled)


class AdaNorm(nn.Module):
    """adaLN: chunks = Linear(SiLU(temb)) split n ways; the normalisation itself is affine-free (eps 1e-6)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, temb):
        return self.linear(F.silu(temb)).chunk(self.n, dim=1)


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, 4 * dim)
        self.net = nn.ModuleList([proj, nn.Identity(), nn.Linear(4 * dim, dim)])  # names = diffusers ff.net.{0,2}

    def forward(self, x):
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class JointAttention(nn.Module):
    """Joint attention over [image; context] tokens (MMDiT); without context it is plain self-attention (`attn2`)."""

    def __init__(self, cfg: MMDiTConfig, context: bool, context_out: bool):
        super().__init__()
        D, hd = cfg.inner_dim, cfg.attention_head_dim
        self.heads = cfg.num_attention_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.to_out = nn.ModuleList([nn.Linear(D, D), nn.Identity()])
        if cfg.qk_norm:
            self.norm_q, self.norm_k = RMSNorm(hd), RMSNorm(hd)
        if context:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
            if cfg.qk_norm:
                self.norm_added_q, self.norm_added_k = RMSNorm(hd), RMSNorm(hd)
            if context_out:
                self.to_add_out = nn.Linear(D, D)

    def _heads(self, x, proj, norm):
        B, S, D = x.shape
        x = proj(x).view(B, S, self.heads, -1).transpose(1, 2)  # (B, heads, S, hd)
        return norm(x) if norm is not None else x

    def forward(self, x, ctx=None):
        nq, nk = getattr(self, "norm_q", None), getattr(self, "norm_k", None)
        q, k, v = self._heads(x, self.to_q, nq), self._heads(x, self.to_k, nk), self._heads(x, self.to_v, None)
        S = x.shape[1]
        if ctx is not None:
            naq, nak = getattr(self, "norm_added_q", None), getattr(self, "norm_added_k", None)
            q = torch.cat([q, self._heads(ctx, self.add_q_proj, naq)], dim=2)  # sequence [image; context]
            k = torch.cat([k, self._heads(ctx, self.add_k_proj, nak)], dim=2)
            v = torch.cat([v, self._heads(ctx, self.add_v_proj, None)], dim=2)
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.transpose(1, 2).flatten(2).to(q.dtype)  # (B, S_all, D)
        out = self.to_out[0](o[:, :S])
        if ctx is None:
            return out
        c = o[:, S:]
        return out, (self.to_add_out(c) if hasattr(self, "to_add_out") else None)


class JointBlock(nn.Module):
    """MMDiT block with adaLN-Zero; SD3.5 dual blocks add a second self-attention on image tokens (`attn2`); the
    last block is context-pre-only (its context stream is read but not updated)."""

    def __init__(self, cfg: MMDiTConfig, index: int):
        super().__init__()
        D = cfg.inner_dim
        self.last = index == cfg.num_layers - 1
        self.dual = index in cfg.dual_attention_layers
        self.norm1 = AdaNorm(D, 9 if self.dual else 6)
        self.norm1_context = AdaNorm(D, 2 if self.last else 6)
        self.attn = JointAttention(cfg, context=True, context_out=not self.last)
        if self.dual:
            self.attn2 = JointAttention(cfg, context=False, context_out=False)
        self.ff = FeedForward(D)
        if not self.last:
            self.ff_context = FeedForward(D)

    def forward(self, x, ctx, temb):
        # adaLN-Zero, chunks named as in DiT: shift / scale / gate of the attention (msa) and the MLP
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, *msa2 = self.norm1(temb)
        n = _ln(x)
        if self.last:  # context pre-only: AdaLayerNormContinuous, (scale, shift) order
            c_scale, c_shift = self.norm1_context(temb)
            a, _ = self.attn(_modulate(n, shift_msa, scale_msa), _modulate(_ln(ctx), c_shift, c_scale))
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
            a, ca = self.attn(_modulate(n, shift_msa, scale_msa), _modulate(_ln(ctx), c_shift_msa, c_scale_msa))
        x = x + gate_msa.unsqueeze(1) * a
        if self.dual:  # SD3.5: a second self-attention on the image tokens, from the same normalised input
            shift_msa2, scale_msa2, gate_msa2 = msa2
            x = x + gate_msa2.unsqueeze(1) * self.attn2(_modulate(n, shift_msa2, scale_msa2))
        x = x + gate_mlp.unsqueeze(1) * self.ff(_modulate(_ln(x), shift_mlp, scale_mlp))
        if self.last:
            return x, None
        ctx = ctx + c_gate_msa.unsqueeze(1) * ca
        ctx = ctx + c_gate_mlp.unsqueeze(1) * self.ff_context(_modulate(_ln(ctx), c_shift_mlp, c_scale_mlp))
        return x, ctx


def resample_condition(cond: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """(B, gh*gw, Dc) on grid src -> (B, h*w, Dc) on grid dst: bicubic, align_corners False (any aspect ratio)."""
    B, S, C = cond.shape
    assert src[0] * src[1] == S, ("condition tokens", S, "grid", src)
    x = cond.reshape(B, src[0], src[1], C).permute(0, 3, 1, 2)  # (B, Dc, gh, gw)
    x = F.interpolate(x, size=tuple(dst), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(B, dst[0] * dst[1], C)


class MMDiT(nn.Module):
    """SD3Transformer2DModelWithSigLIP: state-dict keys == `sd3_transformer/diffusion_pytorch_model.safetensors`."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.inner_dim
        self.pos_embed = PatchEmbed(cfg)
        self.time_text_embed = TimeTextEmbed(cfg)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList([JointBlock(cfg, i) for i in range(cfg.num_layers)])
        self.norm_out = AdaNorm(D, 2)
        self.proj_out = nn.Linear(D, cfg.patch_size ** 2 * cfg.out_channels)
        if cfg.add_siglip_tensor_to_latent:
            self.siglip_embed_add_latent = nn.Linear(cfg.siglip_channels, D, bias=False)
            nn.init.zeros_(self.siglip_embed_add_latent.weight)  # starts as the unconditioned SD3, as released

    def condition(self, cond: torch.Tensor, grid: tuple[int, int], cond_grid: tuple[int, int] | None):
        """BSQ features (B, gh*gw, Dc) -> (B, h*w, D) added after the position embedding."""
        cfg = self.cfg
        cond = cond * cfg.image_token_scale_factor
        if cfg.drop_image_token_prob_for_cfg > 0 and self.training:  # condition dropout for guidance training
            keep = cond.new_empty(cond.shape[0], 1, 1).bernoulli_(1 - cfg.drop_image_token_prob_for_cfg)
            cond = cond * keep
        S = cond.shape[1]
        if cond_grid is None:  # infer like the official code, but refuse instead of guessing a wrong grid
            side = math.isqrt(S)
            cond_grid = tuple(grid) if grid[0] * grid[1] == S else (side, side)
            assert cond_grid[0] * cond_grid[1] == S, f"cannot infer the grid of a {S}-token condition; pass cond_grid"
        assert cfg.super_resolution or tuple(cond_grid) == tuple(grid), ("condition grid", cond_grid, "grid", grid)
        if cfg.super_resolution:
            cond = resample_condition(cond, cond_grid, grid)
        return self.siglip_embed_add_latent(cond)

    def forward(self, x, prompt_embeds, pooled, timestep, cond=None, cond_grid=None):
        """x (B, c, H', W') latents, prompt_embeds (B, S, joint_dim), pooled (B, pooled_dim), timestep (B,) on the
        0..1000 scale, cond (B, gh*gw, Dc) or None. Returns the velocity (B, c_out, H', W')."""
        B, _, Hl, Wl = x.shape
        P = self.cfg.patch_size
        assert Hl % P == 0 and Wl % P == 0, ("latent size", Hl, Wl, "patch size", P)
        h, w = Hl // P, Wl // P
        hs = self.pos_embed(x)  # (B, h*w, D)
        temb = self.time_text_embed(timestep.expand(B) if timestep.dim() == 0 else timestep, pooled)
        ctx = self.context_embedder(prompt_embeds)  # (B, S, D)
        if cond is not None and self.cfg.add_siglip_tensor_to_latent:
            hs = hs + self.condition(cond, (h, w), cond_grid)
        for block in self.transformer_blocks:
            hs, ctx = block(hs, ctx, temb)
        scale, shift = self.norm_out(temb)
        hs = self.proj_out(_modulate(_ln(hs), shift, scale))  # (B, h*w, P*P*c)
        hs = hs.reshape(B, h, w, P, P, -1).permute(0, 5, 1, 3, 2, 4)  # (B, c, h, P, w, P)
        return hs.reshape(B, -1, h * P, w * P)


# ---------------------------------------------------------------------------------------------------------------------
# Conditioning: bits -> (B, gh*gw, Dc)
# ---------------------------------------------------------------------------------------------------------------------

def bits_to_condition(vision: "bsq.VisionModel", bits: torch.Tensor, ar_height: int, ar_width: int) -> torch.Tensor:
    """Bits (B, N, L, U, d) {0,1} or int64 indices (B, N, L, U) -> the decoder condition (B, gh*gw, C*L).

    The `bsq_encoder` output projections re-embed every level (levels interleaved per channel); the 2x2 blocks of
    the AR token order are then unfolded to raster order at 16 px.
    """
    vc = vision.cfg
    bits = as_bits(bits, vc)
    assert tuple(bits.shape[1:]) == bits_shape(vc, ar_height, ar_width), (bits.shape, ar_height, ar_width)
    gh, gw = ar_height // vc.patch_size, ar_width // vc.patch_size
    return blocks_to_raster(vision.bits_to_decoder_features(bits), gh, gw, vc.spatial_merge_size)


def as_bits(bits: torch.Tensor, vc: "bsq.VisionConfig") -> torch.Tensor:
    """int64 indices (B, N, L, U) -> bits (B, N, L, U, d) by the released conventions; bits pass unchanged."""
    if bits.dim() == 4 and not bits.dtype.is_floating_point and tuple(bits.shape[2:]) == (vc.levels, vc.merge_unit):
        return bsq.indexes_to_bits(bits, vc.bsq_dim)
    return bits


def bits_shape(vc: "bsq.VisionConfig", ar_height: int, ar_width: int) -> tuple[int, int, int, int]:
    """(N, L, U, d): the bits of one ar_height x ar_width image (sides multiples of the merged patch)."""
    unit = vc.patch_size * vc.spatial_merge_size
    return (ar_height // unit) * (ar_width // unit), vc.levels, vc.merge_unit, vc.bsq_dim


def blocks_to_raster(feats: torch.Tensor, gh: int, gw: int, m: int) -> torch.Tensor:
    """Per-token features in AR order with the m x m block inside, (B, N, U, Dc) -> raster order at patch
    resolution (B, gh*gw, Dc)."""
    B = feats.shape[0]
    feats = feats.reshape(B, gh // m, gw // m, m, m, -1).permute(0, 1, 3, 2, 4, 5)  # (B, gh/2, 2, gw/2, 2, Dc)
    return feats.reshape(B, gh * gw, -1)


# ---------------------------------------------------------------------------------------------------------------------
# Flow matching: sigmas, Euler sampler, training loss
# ---------------------------------------------------------------------------------------------------------------------

def flow_sigmas(cfg: SchedulerConfig, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas (steps+1,) float32 ending in 0, timesteps (steps,) = 1000 sigma) exactly as the scheduler's
    set_timesteps: linspace between the shifted train sigmas, then the shift applied again (as diffusers'
    FlowMatchEulerDiscreteScheduler does)."""
    assert steps >= 1, steps
    T, s = cfg.num_train_timesteps, cfg.shift
    train = torch.linspace(1, T, T, dtype=torch.float32).flip(0) / T
    train = s * train / (1 + (s - 1) * train)  # float32, as the scheduler's __init__
    t = torch.linspace(train[0].item() * T, train[-1].item() * T, steps, dtype=torch.float64) / T
    sig = (s * t / (1 + (s - 1) * t)).to(torch.float32)
    return torch.cat([sig, sig.new_zeros(1)]), sig * T


def euler_sample(velocity: Callable, x: torch.Tensor, sigmas: torch.Tensor, timesteps: torch.Tensor,
                 progress: bool = False) -> torch.Tensor:
    """Rectified-flow Euler: x <- x + (sigma_{i+1} - sigma_i) v(x, t_i), stepped in float32 (x_1 = noise)."""
    for i in tqdm(range(len(timesteps)), desc="denoising", unit="step", disable=not progress):
        v = velocity(x, timesteps[i])
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v).to(v.dtype)
    return x


def flow_matching_loss(net: Callable, x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor,
                       num_train_timesteps: int = 1000, prediction_type: str = "velocity") -> torch.Tensor:
    """Rectified-flow loss: x_s = (1 - s) x0 + s eps; sigma (B,) in [0, 1]. The network predicts the velocity
    eps - x0 (SD3), or with prediction_type="sample" the clean sample x0 (then v = (x_s - x0_hat) / s)."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    x_t = (1 - s) * x0 + s * eps
    return F.mse_loss(net(x_t, sigma * num_train_timesteps), x0 if prediction_type == "sample" else eps - x0)


# ---------------------------------------------------------------------------------------------------------------------
# VAE decoder (diffusers AutoencoderKL names)
# ---------------------------------------------------------------------------------------------------------------------

class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in, eps=1e-6), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c_out, eps=1e-6), nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.conv_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else x) + h


class VAEAttention(nn.Module):
    """Single-head spatial self-attention of the VAE mid block."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Identity()])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x.view(B, C, H * W)).transpose(1, 2)  # (B, HW, C)
        o = F.scaled_dot_product_attention(self.to_q(h)[:, None], self.to_k(h)[:, None], self.to_v(h)[:, None])
        o = self.to_out[0](o[:, 0])
        return x + o.transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([VAEAttention(c, groups)] if attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Upsampler(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, n: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n)])
        if upsample:
            self.upsamplers = nn.ModuleList([Upsampler(c_out)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if hasattr(self, "upsamplers") else x


class VAEDecoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, i < len(ch) - 1)
                                        for i in range(len(ch))])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for up in self.up_blocks:
            x = up(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    """The decoding half of the SD3 AutoencoderKL: keys `decoder.*` (load_hf drops the encoder half of the file)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.decoder = VAEDecoder(cfg)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampler latents (B, c, h, w) -> image (B, 3, 8h, 8w) in [0, 1]: undo the latent scaling and shift."""
        x = self.decoder(latents / self.cfg.scaling_factor + self.cfg.shift_factor)
        return (x / 2 + 0.5).clamp(0, 1)


# ---------------------------------------------------------------------------------------------------------------------
# Decoder: bits -> images; loading; toy configuration
# ---------------------------------------------------------------------------------------------------------------------

class LearnedContext(nn.Module):
    """The toy decoder's constant text context: learned prompt embeddings and pooled vector (no text encoders)."""

    def __init__(self, cfg: MMDiTConfig, tokens: int = 4):
        super().__init__()
        self.prompt_embeds = nn.Parameter(torch.randn(1, tokens, cfg.joint_attention_dim) * 0.02)
        self.pooled = nn.Parameter(torch.randn(1, cfg.pooled_projection_dim) * 0.02)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prompt_embeds, self.pooled


def output_size(ar_height: int, ar_width: int, upsampling_ratio: float) -> tuple[int, int]:
    """The decoder's output size (H, W) for an AR size and upsampling ratio (which ones a decoder takes:
    pipeline.output_size)."""
    return int(round(ar_height * upsampling_ratio)), int(round(ar_width * upsampling_ratio))


class Decoder(nn.Module):
    """bits -> images. Parts: the BSQ vision model (output projections), the MMDiT, the VAE (None = pixel space),
    the scheduler config and a context (prompt embeddings + pooled, fixed tensors or a LearnedContext)."""

    def __init__(self, vision: "bsq.VisionModel", transformer: MMDiT, vae: VAE | None, scheduler: SchedulerConfig,
                 prompt_embeds: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                 context: LearnedContext | None = None):
        super().__init__()
        assert (context is None) != (prompt_embeds is None or pooled is None), "prompt_embeds and pooled, or a context"
        self.vision, self.transformer, self.vae, self.scheduler, self.context = vision, transformer, vae, scheduler, \
            context
        if context is None:
            self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)
            self.register_buffer("pooled", pooled, persistent=False)
        assert transformer.cfg.siglip_channels == vision.cfg.hidden_size * vision.cfg.levels, "the condition's width"

    @property
    def scale(self) -> int:
        """Pixels per latent cell (8 with the SD3 VAE, 1 in pixel space)."""
        return self.vae.cfg.scale if self.vae is not None else 1

    @property
    def unit(self) -> int:
        """Pixels per transformer token (latent cell x patch size): output sides are multiples of it."""
        return self.scale * self.transformer.cfg.patch_size

    def text(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        pe, pooled = self.context() if self.context is not None else (self.prompt_embeds, self.pooled)
        return pe.expand(batch, -1, -1), pooled.expand(batch, -1)

    def velocity_fn(self, cond: torch.Tensor, cond_grid, guidance: float) -> Callable:
        """v(x, t) with guidance over the visual condition: rows [zeros; features], the same prompt on both."""
        B = cond.shape[0]

        def v(x, t):
            if guidance <= 1.0:
                pe, pooled = self.text(B)
                out = self.transformer(x, pe, pooled, t.expand(B), cond, cond_grid)
            else:
                pe, pooled = self.text(2 * B)
                u, c = self.transformer(torch.cat([x, x]), pe, pooled, t.expand(2 * B),
                                        torch.cat([torch.zeros_like(cond), cond]), cond_grid).chunk(2)
                out = guide(c, u, guidance)
            if self.transformer.cfg.prediction_type == "sample":  # x0 -> velocity (guidance commutes: linear)
                sigma = t.to(torch.float32) / self.scheduler.num_train_timesteps
                out = ((x.float() - out.float()) / sigma).to(out.dtype)
            return out
        return v

    @torch.no_grad()
    def sample_latents(self, cond, cond_grid, size: tuple[int, int], *, steps: int = 28, guidance: float = 1.5,
                       seed: int | list | None = 0, noise: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
        """Flow-matching Euler from noise (drawn on CPU with torch.Generator().manual_seed(seed); with a list of seeds,
        each row's noise from its own, so a row does not depend on its batch)."""
        B, dev, dt = cond.shape[0], cond.device, self.transformer.proj_out.weight.dtype
        shape = (B, self.transformer.cfg.in_channels, size[0] // self.scale, size[1] // self.scale)
        if noise is None and isinstance(seed, (list, tuple)):
            noise = torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(int(s)), dtype=dt)
                               for s in seed])
        elif noise is None:
            g = torch.Generator().manual_seed(seed) if seed is not None else None
            noise = torch.randn(shape, generator=g, dtype=dt)  # drawn on CPU in the model dtype, like diffusers
        assert tuple(noise.shape) == shape, ("noise", noise.shape, shape)
        sigmas, timesteps = flow_sigmas(self.scheduler, steps)
        return euler_sample(self.velocity_fn(cond.to(dt), cond_grid, guidance), noise.to(dev, dt), sigmas.to(dev),
                            timesteps.to(dev), progress)

    def latents_to_image(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> float image (B, 3, H, W) in [0, 1] (pixel space: the latents are the image in [-1, 1])."""
        if self.vae is None:
            return (latents.float() / 2 + 0.5).clamp(0, 1)
        return self.vae.decode(latents.to(self.vae.decoder.conv_in.weight.dtype)).float()

    @torch.no_grad()
    def decode(self, bits: torch.Tensor, ar_height: int, ar_width: int, *, upsampling_ratio: float = 2.0,
               steps: int = 28, guidance: float = 1.5, seed: int | list | None = 0, noise: torch.Tensor | None = None,
               output: str = "uint8", progress: bool = False) -> torch.Tensor:
        """Bits (B, N, L, U, d) or int64 indices (B, N, L, U) of an ar_height x ar_width image -> images
        (B, H, W, 3) uint8 (output="uint8") or (B, 3, H, W) float in [0, 1] (output="float"). The arguments a
        person gives are checked in pipeline.decode_bits."""
        if isinstance(seed, (list, tuple)) and len(seed) > 1 and noise is None:
            # one image at a time: batched matrix products round differently, and a pixel on a rounding boundary
            # would otherwise depend on the batch; with its own seed, each image depends on its bits and seed only
            return torch.cat([self.decode(bits[i:i + 1], ar_height, ar_width, upsampling_ratio=upsampling_ratio,
                                          steps=steps, guidance=guidance, seed=seed[i:i + 1], output=output,
                                          progress=progress) for i in range(len(seed))])
        bits = as_bits(bits, self.vision.cfg)
        unit = self.vision.cfg.patch_size * self.vision.cfg.spatial_merge_size  # pixels per AR token
        assert ar_height % unit == ar_width % unit == 0, ("AR size", ar_height, ar_width)
        H, W = output_size(ar_height, ar_width, upsampling_ratio)
        assert H % self.unit == W % self.unit == 0 and output in ("uint8", "float"), (H, W, output)
        vdev = self.vision.bsq_output_proj.linear_fc1.weight.device  # the only part of the tower used here
        cond = bits_to_condition(self.vision, bits.to(vdev), ar_height, ar_width)
        cond = cond.to(self.transformer.proj_out.weight.device)
        grid = (ar_height // self.vision.cfg.patch_size, ar_width // self.vision.cfg.patch_size)
        img = self.latents_to_image(self.sample_latents(cond, grid, (H, W), steps=steps, guidance=guidance, seed=seed,
                                                        noise=noise, progress=progress))
        return img if output == "float" else (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1)

    @classmethod
    def toy(cls, vision: "bsq.VisionModel", cfg: MMDiTConfig | None = None) -> "Decoder":
        """Pixel-space decoder with a learned context, for toy training (train.py)."""
        cfg = cfg or MMDiTConfig.toy(vision.cfg.hidden_size * vision.cfg.levels)
        return cls(vision, MMDiT(cfg), None, SchedulerConfig(), context=LearnedContext(cfg))
