"""The unified AR model: a Qwen3-VL text decoder that reads and writes images as BSQ bits in one shared context.

Paper sections: the unified model (shared context: images enter and leave the language model only through the BSQ
tokenizer's bits), parallel bitwise prediction (one AR step = one 32-px token = levels x 2x2 x 64 bits, predicted
at once by a small transformer stack + bit head), and the three tasks: text-to-image, editing, understanding.
The vision tower and the bit conventions live in `bsq.py`.

Sections of this file:
    config: TextConfig (Qwen3-VL-8B), UniARConfig (token ids, bit-head flags), head variants
    text decoder: RMSNorm, interleaved MRoPE, GQA attention with q/k norm, SwiGLU, DeepStack, static KV cache
    positions: row_positions / get_rope_index (3-D position ids for text and image grids)
    UniAR: the module tree of the released checkpoint, images read as bits, bit logits, teacher-forced logits
    generation: samplers, prefill, one decode step (bits or text), the loops; the shared context of a conversation
    (Context, draw)
The tokenizer, the chat templates and the high-level calls live in `pipeline.py`.

Letters in shape comments:
    B batch rows (with CFG: cond rows then uncond rows), T new tokens, S keys (cache length), D text width,
    H query heads, Hk key/value heads, hd head dim, N generated image tokens (32 px each), L levels (1 + DeepStack),
    U merge unit (2x2 = 4), d bsq_dim (64), V vocabulary, O bit-head width = L * U * d * 2.

Departures from the official code:
    - The visual-decoder stack (the layers between the backbone's pre-norm states and the bit head) keeps its own
      KV cache here: each AR step runs it on the one new state. The official loop re-runs it over the whole sequence
      at every step; bench.py keeps that loop as its baseline, and the tests check both give the same logits and bits.
    - The official visual-decoder stack receives a 2-D padding mask that only flash-attention-2 interprets (causal +
      key padding); here every attention gets that mask explicitly through `attention()`.
    - Padded query rows (left padding) attend to themselves only, so they stay finite; their outputs are never read.
    - The official image-generation path casts codes to bfloat16; codes are exact in any float dtype, so the
      weights' dtype is used.
    - An input image is read as its bits re-embedded (`UniAR.embed_bits`), the same computation as the official
      tower forward, written once for input and generated images.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import bsq
from config_schema import known_fields
from kernels import rotate_half
from kernels.attention import attention as kernel_attention
from kernels.attention import build_mask
from kernels.attention import use_kernel
from kernels import bitwise

# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------

HEAD_VARIANTS = ("linear", "rmsnorm_linear", "rmsnorm_mlp")


@dataclass
class TextConfig:
    """The language model. Defaults are Qwen3-VL-8B, the UniAR backbone."""

    hidden_size: int = 4096
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 12288
    vocab_size: int = 151936
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple = (24, 20, 20)
    max_position_embeddings: int = 262144
    hidden_act: str = "silu"
    attention_bias: bool = False

    def __post_init__(self):  # a config file is checked where it is read (config_schema.TEXT, _text_rules)
        self.mrope_section = tuple(int(s) for s in self.mrope_section)
        assert self.num_attention_heads % self.num_key_value_heads == 0, "query heads share key/value heads evenly"
        assert sum(self.mrope_section) == self.head_dim // 2, ("mrope_section", self.mrope_section, self.head_dim)

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        """Reads a `text_config` dict (Hugging Face format); unknown keys are ignored."""
        kw = known_fields(cls, d)
        rope = d.get("rope_scaling") or {}
        if "mrope_section" in rope:
            kw["mrope_section"] = rope["mrope_section"]
        return cls(**kw)

    @classmethod
    def tiny(cls) -> "TextConfig":
        return cls(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   intermediate_size=160, vocab_size=320, mrope_section=(6, 5, 5), max_position_embeddings=4096)


@dataclass
class UniARConfig:
    """The whole AR model. Defaults are the released UniAR (the bit head of the released manifest: RMSNorm + Linear)."""

    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vistok_pred: bool = True
    vistok_pred_layernorm: bool = True
    vistok_pred_use_mlp: bool = False
    vistok_mlp_dim: int = 16 * 1024  # hard-coded in the official head builder
    visual_transformer_decoder: bool = True
    visual_transformer_decoder_depth: int = 4
    text: TextConfig = field(default_factory=TextConfig)
    vision: bsq.VisionConfig = field(default_factory=bsq.VisionConfig)

    def __post_init__(self):  # a config file is checked where it is read (config_schema.AR, _ar_rules)
        assert self.vision.out_hidden_size == self.text.hidden_size, "the vision tower writes the text model's width"

    @property
    def head_variant(self) -> str:
        if self.vistok_pred_use_mlp:  # takes precedence over the layernorm flag, as in the official builder
            return "rmsnorm_mlp"
        return "rmsnorm_linear" if self.vistok_pred_layernorm else "linear"

    @property
    def head_out(self) -> int:
        v = self.vision
        return v.levels * v.merge_unit * v.bsq_dim * 2

    @property
    def downsample(self) -> int:
        """Pixels per generated token side (patch 16 x merge 2 = 32)."""
        return self.vision.patch_size * self.vision.spatial_merge_size

    def with_head_variant(self, variant: str) -> "UniARConfig":
        assert variant in HEAD_VARIANTS, variant
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["vistok_pred_use_mlp"] = variant == "rmsnorm_mlp"
        d["vistok_pred_layernorm"] = variant == "rmsnorm_linear"
        return UniARConfig(**d)

    @classmethod
    def from_dict(cls, d: dict) -> "UniARConfig":
        """Reads the root `config.json` dict of a checkpoint; unknown keys are ignored."""
        kw = {k: v for k, v in known_fields(cls, d).items() if k not in ("text", "vision")}
        return cls(text=TextConfig.from_dict(d["text_config"]), vision=bsq.VisionConfig.from_dict(d["vision_config"]),
                   **kw)

    @classmethod
    def from_file(cls, path) -> "UniARConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def tiny(cls) -> "UniARConfig":
        return cls(image_token_id=310, video_token_id=311, vision_start_token_id=312, vision_end_token_id=313,
                   visual_transformer_decoder_depth=2, text=TextConfig.tiny(), vision=bsq.VisionConfig.tiny())


# ---------------------------------------------------------------------------------------------------------------------
# Text decoder (Qwen3-VL)
# ---------------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the statistics in fp32, cast back to the input's dtype before the weight (Qwen3's order;
    decoder.RMSNorm casts to the weight's dtype, as diffusers and T5 do, so the two round differently under mixed
    dtypes and each follows its own reference)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32, cast back before the weight (Qwen3 order)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def mrope_inv_freq(cfg: TextConfig) -> torch.Tensor:
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))


def mrope_cos_sin(pos_ids: torch.Tensor, inv_freq: torch.Tensor, section: Sequence[int], dtype):
    """Interleaved multimodal RoPE. pos_ids (3, B, T) (t, h, w) -> cos, sin (B, T, hd).

    Frequency j uses the h position if j % 3 == 1 and j < 3 * section[1], the w position if j % 3 == 2 and
    j < 3 * section[2], the t position otherwise (Qwen3-VL's interleaved layout THWTHW...TT).
    """
    freqs = pos_ids.float()[..., None] * inv_freq.float().to(pos_ids.device)  # (3, B, T, hd/2)
    out = freqs[0].clone()
    for axis, offset in ((1, 1), (2, 2)):
        sl = slice(offset, section[axis] * 3, 3)
        out[..., sl] = freqs[axis, ..., sl]
    emb = torch.cat([out, out], dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class KernelMask(NamedTuple):
    """The causal + key-padding mask (kernels.attention.build_mask), described instead of materialised: the flash
    kernel builds it per tile."""
    key_valid: torch.Tensor  # (B, S) bool; queries are the last T of the S keys


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Every attention of the text model and the visual-decoder stack goes through here.

    q (B, H, T, hd), k/v (B, Hk, S, hd) (grouped-query: each kv head serves H / Hk query heads), mask (B, 1, T, S)
    bool, or a KernelMask for the Triton flash kernel (kernels/attention.py: on CUDA, or UNIAR_KERNELS=triton)
    -> (B, H, T, hd). Scale hd^-0.5.
    """
    if isinstance(mask, KernelMask):
        return kernel_attention(q, k, v, causal=True, key_padding_mask=mask.key_valid, backend="triton")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


class KVCache:
    """Static per-layer key/value cache with a length pointer (gpt-fast style).

    k, v: (n_layers, B, Hk, S_max, hd); `valid` (B, S_max) marks which cached keys are real tokens (left padding).
    A forward pass writes its T new keys at [length, length + T) in every layer, then advances `length`.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        self.k = torch.zeros(n_layers, batch, n_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0

    @classmethod
    def for_layers(cls, n_layers: int, cfg: TextConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        return cls(n_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim, device, dtype)

    def begin(self, key_valid: torch.Tensor) -> torch.Tensor:
        """Register the validity of T new tokens; returns the validity of all keys they attend to, (B, length + T)."""
        T = key_valid.shape[1]
        assert self.length + T <= self.k.shape[3], ("KV cache overflow", self.length, T, self.k.shape[3])
        self.valid[:, self.length:self.length + T] = key_valid
        return self.valid[:, :self.length + T]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        self.k[layer, :, :, self.length:self.length + T] = k
        self.v[layer, :, :, self.length:self.length + T] = v
        return self.k[layer, :, :, :self.length + T], self.v[layer, :, :, :self.length + T]

    def advance(self, T: int):
        self.length += T


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        H, Hk, hd, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.n_heads, self.n_kv, self.head_dim = H, Hk, hd
        self.q_proj = nn.Linear(D, H * hd, bias=False)
        self.k_proj = nn.Linear(D, Hk * hd, bias=False)
        self.v_proj = nn.Linear(D, Hk * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, D, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: Optional[KVCache] = None, layer: int = 0, keep=None):
        """-> (B, T, D); with `keep` (an index of the (B, T) positions) only the kept positions' outputs (*kept, D):
        every position is still a key, but the output projection runs on the kept queries alone."""
        B, T, _ = x.shape
        # per-head RMSNorm on q and k BEFORE RoPE (Qwen3)
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)  # (B, Hk, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        c, s = cos[:, None], sin[:, None]  # (B, 1, T, hd)
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hk, S, hd)
        y = attention(q, k, v, mask).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y if keep is None else y[keep])


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, keep=None):
        """`keep`: compute the output at these positions only (Attention.forward), e.g. the last layer of a stack
        whose other positions nobody reads."""
        x = (x if keep is None else x[keep]) + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer,
                                                               keep)
        return x + self.mlp(self.post_attention_layernorm(x))


def run_stack(layers, x, cos, sin, key_valid, cache: Optional[KVCache] = None, visual_mask=None, deepstack=None,
              mask=None, keep=None):
    """A causal stack of decoder layers over T new tokens. key_valid (B, T) bool marks real tokens; a prebuilt
    attention mask (B, 1, T, T) bool replaces the causal + padding one (rows packed with several contexts).
    `keep` (an index of the (B, T) positions): return the states there only (*kept, D), which the last layer then
    computes for those positions alone (a training forward reads the bit head at a few positions of each row).

    With a cache the new tokens attend to everything cached before them. DeepStack (Qwen3-VL): after layer i, for
    i < len(deepstack), the i-th extra visual feature is added at the visual positions (visual_mask (B, T) bool;
    deepstack[i] (n_visual, D) in order of the visual positions).
    """
    T = x.shape[1]
    if cache is not None:
        key_valid = cache.begin(key_valid)  # the new tokens are the last T of the keys
    if mask is not None:
        assert cache is None, "a prebuilt mask is for whole contexts, not cached decoding"
    elif use_kernel(x):
        mask = KernelMask(key_valid)
    else:
        mask = build_mask(T, key_valid.shape[1], causal=True, key_padding_mask=key_valid, device=x.device)
    assert keep is None or deepstack is None, "DeepStack adds to every visual position after its layers"
    for i, layer in enumerate(layers):
        x = layer(x, cos, sin, mask, cache, i, keep if i == len(layers) - 1 else None)
        if deepstack is not None and i < len(deepstack):
            x = x.clone()
            x[visual_mask] = x[visual_mask] + deepstack[i].to(x.dtype)
    if cache is not None:
        cache.advance(T)
    return x


class TextModel(nn.Module):
    """`model.language_model`: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def rope(self, pos_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # recomputed per call (hd/2 values) rather than a buffer, so a meta-built model loaded with assign=True
        # has nothing left on the meta device
        return mrope_cos_sin(pos_ids, mrope_inv_freq(self.cfg), self.cfg.mrope_section, dtype)

    def forward(self, x, pos_ids, key_valid, cache=None, visual_mask=None, deepstack=None, mask=None):
        """Embeddings x (B, T, D) -> last layer's states (B, T, D) BEFORE the final norm (the bit head's input)."""
        cos, sin = self.rope(pos_ids, x.dtype)
        return run_stack(self.layers, x, cos, sin, key_valid, cache, visual_mask, deepstack, mask)


# ---------------------------------------------------------------------------------------------------------------------
# 3-D position ids
# ---------------------------------------------------------------------------------------------------------------------


def image_positions(start: int, t: int, gh: int, gw: int) -> torch.Tensor:
    """MRoPE ids (3, t * gh * gw) of an image's token grid placed at `start`: (start + t_i, start + row, start + col)."""
    ti = torch.arange(t).view(-1, 1, 1).expand(t, gh, gw).flatten()
    hi = torch.arange(gh).view(1, -1, 1).expand(t, gh, gw).flatten()
    wi = torch.arange(gw).view(1, 1, -1).expand(t, gh, gw).flatten()
    return torch.stack([ti, hi, wi]) + start


def row_positions(toks: list, grids, start: int, cfg: UniARConfig) -> tuple[torch.Tensor, int]:
    """MRoPE ids (3, T) of one unpadded row of tokens whose first token sits at `start`; its images take their patch
    grids (t, h, w) from the iterator `grids` in order. -> (ids, the next free position).

    Text continues at (previous max + 1) on all three axes; an image becomes a (t, h/2, w/2) block of tokens with
    ids (s + t_i, s + r, s + c), s = the id right after the preceding text."""
    ms = cfg.vision.spatial_merge_size
    chunks, st, nxt = [], 0, start
    while cfg.image_token_id in toks[st:]:
        ed = toks.index(cfg.image_token_id, st)
        assert ed > 0 and toks[ed - 1] == cfg.vision_start_token_id, f"image token at {ed} not after <|vision_start|>"
        t, h, w = next(grids)  # StopIteration: more images in the ids than grids
        n = t * (h // ms) * (w // ms)
        assert toks[ed:ed + n] == [cfg.image_token_id] * n, f"image with grid {(t, h, w)} needs {n} image tokens"
        chunks.append((torch.arange(ed - st) + nxt).expand(3, -1))
        img = image_positions(nxt + ed - st, t, h // ms, w // ms)
        chunks.append(img)
        nxt, st = int(img.max()) + 1, ed + n
    chunks.append((torch.arange(len(toks) - st) + nxt).expand(3, -1))
    return torch.cat(chunks, dim=1), nxt + len(toks) - st


def get_rope_index(input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor], attention_mask: torch.Tensor,
                   cfg: UniARConfig) -> torch.Tensor:
    """MRoPE position ids (3, B, T) for text and images, left padding (padding positions get 1).
    image_grid_thw (n_images, 3) is consumed in order over the rows (edit mode: [input, output] per row)."""
    B, T = input_ids.shape
    pos = torch.ones(3, B, T, dtype=torch.int64, device=input_ids.device)
    grids = [] if image_grid_thw is None else [tuple(int(v) for v in g) for g in image_grid_thw.tolist()]
    it = iter(grids)
    for b in range(B):
        keep = attention_mask[b].bool()
        toks = input_ids[b][keep].tolist()
        assert cfg.video_token_id not in toks, f"row {b}: video tokens are not supported"
        pos[:, b, keep] = row_positions(toks, it, 0, cfg)[0].to(pos.device)
    assert next(it, None) is None, f"image_grid_thw has {len(grids)} rows, more than the images in input_ids"
    return pos


# ---------------------------------------------------------------------------------------------------------------------
# UniAR
# ---------------------------------------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """`model`: the vision tower (`visual`) and the language model (`language_model`)."""

    def __init__(self, cfg: UniARConfig):
        super().__init__()
        self.visual = bsq.VisionModel(cfg.vision)
        self.language_model = TextModel(cfg.text)


def build_vistok_head(cfg: UniARConfig) -> nn.Module:
    """The bit head: D -> O = L * U * d * 2 logits, in one of the three released variants (all bias-free)."""
    D, O, eps = cfg.text.hidden_size, cfg.head_out, cfg.text.rms_norm_eps
    if cfg.head_variant == "rmsnorm_mlp":
        return nn.Sequential(RMSNorm(D, eps), nn.Linear(D, cfg.vistok_mlp_dim, bias=False), nn.GELU(approximate="tanh"),
                             nn.Linear(cfg.vistok_mlp_dim, O, bias=False))
    if cfg.head_variant == "rmsnorm_linear":
        return nn.Sequential(RMSNorm(D, eps), nn.Linear(D, O, bias=False))
    return nn.Linear(D, O, bias=False)


class UniAR(nn.Module):
    """The released `UniARForConditionalGeneration` module tree: keys load with `load_state_dict(strict=True)`."""

    def __init__(self, cfg: UniARConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.output_layer_vistok = build_vistok_head(cfg)
        self.visual_decoder = nn.ModuleList(DecoderLayer(cfg.text) for _ in range(cfg.visual_transformer_decoder_depth))
        # how understanding images are resized: a pipeline.ImageProcessorConfig (the checkpoint's
        # preprocessor_config.json; set by load_hf.load_ar and train.build, written by load_hf.save_checkpoint);
        # None: the checkpoint states none
        self.image_processor = None

    @property
    def visual(self) -> bsq.VisionModel:
        return self.model.visual

    @property
    def language_model(self) -> TextModel:
        return self.model.language_model

    @property
    def bits_shape(self) -> tuple[int, int, int]:
        v = self.cfg.vision
        return v.levels, v.merge_unit, v.bsq_dim

    # ----- building blocks -----
    def embed_prefix(self, input_ids, pixel_values=None, image_grid_thw=None):
        """Token embeddings with input images spliced in at the image placeholders: an image enters as its BSQ bits,
        re-embedded (`embed_bits`), the same path as a generated image.

        Returns (x (B, T, D), visual_mask (B, T) bool or None, deepstack list or None).
        """
        assert self.images_match(input_ids, pixel_values, image_grid_thw), "image placeholders and pixels go together"
        bits = None if pixel_values is None else self.visual.encode_bits(
            pixel_values.to(self.language_model.embed_tokens.weight.dtype), image_grid_thw)
        return self.embed_bits(input_ids, bits)

    def embed_bits(self, input_ids, bits=None):
        """Token embeddings with images given as bits (M, L, U, d) (every image of the batch, in order of their
        placeholders, row by row) spliced in: the shared context reads every image, input or generated, this way.

        Returns (x (B, T, D), visual_mask (B, T) bool or None, deepstack list of L - 1 (M, D) or None).
        """
        x = self.language_model.embed_tokens(input_ids)
        if bits is None:
            return x, None, None
        img = input_ids == self.cfg.image_token_id
        main, deep = self.visual.bits_to_llm_features(bits)  # (M, D), (L-1) x (M, D)
        assert main.shape[0] == int(img.sum()), ("image tokens vs placeholders", main.shape[0], int(img.sum()))
        x = x.masked_scatter(img[..., None].expand_as(x), main.to(x.dtype))
        return x, img, deep

    def images_match(self, input_ids, pixel_values, image_grid_thw) -> bool:
        """Image placeholders in input_ids, pixel_values and image_grid_thw come together (or none of them);
        pipeline.check_prefix_images says which one is missing."""
        return (pixel_values is None) == (image_grid_thw is None) == (not (input_ids == self.cfg.image_token_id).any())

    def vistok_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Bit head on visual-decoder states (..., D) -> (..., L, U, d, 2)."""
        return self.output_layer_vistok(h).view(*h.shape[:-1], *self.bits_shape, 2)

    def text_logits(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
        """Understanding forward (no cache): final norm + lm_head on every position. -> (B, T, V)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x, vmask, deep = self.embed_prefix(input_ids, pixel_values, image_grid_thw)
        pos = get_rope_index(input_ids, image_grid_thw, attention_mask, self.cfg)
        return self.text_logits_of(self.language_model(x, pos, attention_mask.bool(), None, vmask, deep))

    def context_states(self, input_ids, attention_mask, bits=None, grids=None, pos=None, mask=None):
        """One forward over whole contexts (B, T), left padded, every image given as its bits (M, L, U, d) in the
        order of its placeholders, row by row, with its patch grid (one row of `grids` (n_images, 3) per image).
        -> pre-norm states (B, T, D) and MRoPE ids (3, B, T). Training and the exactness tests read contexts so.
        Rows packed with several contexts (train.pack_contexts) come with their MRoPE ids `pos` and their attention
        `mask` (B, 1, T, T) instead of `grids`."""
        if pos is None:
            pos = get_rope_index(input_ids, grids, attention_mask, self.cfg)
        x, vmask, deep = self.embed_bits(input_ids, bits)
        return self.language_model(x, pos, attention_mask.bool(), None, vmask, deep, mask), pos

    def text_logits_of(self, h: torch.Tensor) -> torch.Tensor:
        """Pre-norm states (..., D) -> next-token logits (..., V)."""
        return self.lm_head(self.language_model.norm(h))

    def bit_logits_of(self, h, pos, attention_mask, where, mask=None) -> torch.Tensor:
        """Pre-norm states (B, T, D) -> logits of the bits of the token after each position picked by `where` (an
        index of the (B, T) states: a slice tuple or a bool mask): the visual-decoder stack reads the whole sequence,
        the bit head the picked states. -> (*picked, L, U, d, 2). `mask`: as context_states'."""
        cos, sin = self.language_model.rope(pos, h.dtype)
        return self.vistok_logits(run_stack(self.visual_decoder, h, cos, sin, attention_mask.bool(), mask=mask,
                                            keep=where))

    def teacher_forced_logits(self, prefix_ids, attention_mask, bits, grid_hw, pixel_values=None,
                              image_grid_thw=None):
        """Per-bit logits of given image bits, the path training and GRPO use (official forward(is_vistok_pred)).

        prefix_ids (B, Lp) left padded, ending in <|vision_start|>; bits (B, N, L, U, d) of an image whose token
        grid is grid_hw = (h, w), h * w = N. -> (B, N, L, U, d, 2): position p predicts image token p (the
        <|vision_start|> state predicts token 0). Optional input images in the prefix (edit).
        """
        B, Lp = prefix_ids.shape
        gh, gw = grid_hw
        N = gh * gw
        assert self.images_match(prefix_ids, pixel_values, image_grid_thw), "image placeholders and pixels go together"
        assert tuple(bits.shape) == (B, N, *self.bits_shape), ("bits must be (B, N, L, U, d)", tuple(bits.shape))
        ids, mask, grids = self.append_image_placeholders(prefix_ids, attention_mask, N, gh, gw, image_grid_thw)
        if pixel_values is not None:  # per row: its input image(s), then the image being generated
            counts = (prefix_ids == self.cfg.image_token_id).sum(1).tolist()
            inputs = self.visual.encode_bits(pixel_values.to(self.language_model.embed_tokens.weight.dtype),
                                             image_grid_thw).split(counts)
            bits = torch.cat([t for b in range(B) for t in (inputs[b], bits[b])])
        h, pos = self.context_states(ids, mask, bits.reshape(-1, *self.bits_shape), grids)
        return self.bit_logits_of(h, pos, mask, (slice(None), slice(Lp - 1, Lp - 1 + N)))

    def append_image_placeholders(self, prefix_ids, attention_mask, N, gh, gw, input_grids=None):
        """prefix ⊕ N image placeholders, its mask, and the grid list for get_rope_index."""
        B = prefix_ids.shape[0]
        ids = torch.cat([prefix_ids, prefix_ids.new_full((B, N), self.cfg.image_token_id)], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(B, N)], dim=1)
        ms = self.cfg.vision.spatial_merge_size
        out = torch.tensor([[1, gh * ms, gw * ms]], dtype=torch.int64)
        if input_grids is None:
            return ids, mask, out.expand(B, 3)
        # per row: its input image grid(s) then its output grid (official edit-mode interleaving)
        img_per_row = ((prefix_ids == self.cfg.vision_start_token_id)
                       & (prefix_ids.roll(-1, 1) == self.cfg.image_token_id)).sum(1).tolist()
        rows, i = [], 0
        for b in range(B):
            rows.append(input_grids[i:i + img_per_row[b]].cpu())
            i += img_per_row[b]
            rows.append(out)
        return ids, mask, torch.cat(rows)


# ---------------------------------------------------------------------------------------------------------------------
# Generation: prefill, one decode step, the loop (gpt-fast's shape); the sampler is passed in
# ---------------------------------------------------------------------------------------------------------------------


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans, 2022): uncond + scale * (cond - uncond); scale 1 gives cond. The
    bit logits here, the decoder's velocity (decoder.Decoder.velocity_fn) and the bitwise kernel (kernels/bitwise.py,
    written out there) all guide with it."""
    return uncond + scale * (cond - uncond)


def cfg_guide(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: rows [cond; uncond] -> guided logits for both halves."""
    if cfg_scale <= 1.0:
        return logits
    g = guide(*logits.chunk(2, dim=0), cfg_scale)
    return torch.cat([g, g], dim=0)


def multinomial_bits(logits: torch.Tensor, temperature: float, generator=None) -> torch.Tensor:
    """Per-bit sampling, (B_all, ..., 2) logits -> (B_all, ...) int64 bits: one `torch.multinomial` over all bits of
    all rows, in the official order, so a seeded run reproduces the official draws. With a list of B generators (one
    per image of a batch whose rows are [cond; uncond] or [cond]), each image's rows draw from its own generator in
    that same order, so an image does not depend on the batch it is drawn in (and B = 1 equals the single stream)."""
    if isinstance(generator, (list, tuple)):
        B = len(generator)
        out = torch.empty(logits.shape[:-1], dtype=torch.long, device=logits.device)
        for b, g in enumerate(generator):
            rows = list(range(b, logits.shape[0], B))  # the image's conditional row, then its unconditional one
            out[rows] = multinomial_bits(logits[rows], temperature, g)
        return out
    probs = (logits / temperature).flatten(0, -2).softmax(-1)  # (n_bits, 2)
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])


@dataclass
class MultinomialSampler:
    """Guidance, then one multinomial draw per bit (`multinomial_bits`): the official sampler, seeded runs bit-identical."""
    cfg_scale: float = 1.0
    temperature: float = 1.0
    generator: object = None  # None, a torch.Generator, or one per image

    def __post_init__(self):  # user settings are checked in pipeline.check_sampling
        assert self.cfg_scale >= 1.0 and self.temperature > 0, (self.cfg_scale, self.temperature)

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """Bit logits (B_all, L, U, d, 2) of AR step `step`, rows [cond; uncond] -> bits (B_all, L, U, d)."""
        return multinomial_bits(cfg_guide(logits, self.cfg_scale), self.temperature, self.generator)


@dataclass
class KernelSampler:
    """The one-launch bitwise kernel (kernels/bitwise.py: Triton on CUDA, its PyTorch reference elsewhere): guidance,
    temperature and a counter-based draw per bit in one pass; another random stream than the official one."""
    cfg_scale: float = 1.0
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self):  # user settings are checked in pipeline.check_sampling
        assert self.cfg_scale >= 1.0 and self.temperature > 0, (self.cfg_scale, self.temperature)

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        B_all = logits.shape[0]
        bits = bitwise.sample_bits(logits.reshape(B_all, -1, 2), self.cfg_scale, self.temperature, seed=self.seed,
                                   step=step)[0]
        return bits.view(logits.shape[:-1])


def bit_logits_step(model: "UniAR", vd_cache: KVCache, h: torch.Tensor, pos: torch.Tensor,
                    valid: torch.Tensor) -> torch.Tensor:
    """Parallel bitwise prediction of one token: the visual-decoder stack reads the newest pre-norm states h (B, T, D)
    (at the first step the whole context, then the one new token) at positions pos (3, B, T), and the bit head maps
    the last state to the logits of all L x U x d bits of the next token: (B, L, U, d, 2)."""
    cos, sin = model.language_model.rope(pos, h.dtype)
    out = run_stack(model.visual_decoder, h, cos, sin, valid, vd_cache)
    return model.vistok_logits(out[:, -1])


def read_image_token(model: "UniAR", cache: KVCache, bits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Shared context: sampled bits (B, L, U, d) re-enter the text model through the tokenizer's output projections
    and mergers, exactly as an input image's bits do. pos (3, B, 1). -> the token's pre-norm state (B, 1, D)."""
    main, deep = model.visual.bits_to_llm_features(bits)  # (B, D), (L-1) x (B, D)
    B, dev = bits.shape[0], bits.device
    ones = torch.ones(B, 1, dtype=torch.bool, device=dev)
    return model.language_model(main.to(cache.k.dtype)[:, None], pos, ones, cache, ones, deep)


def image_rollout(model: "UniAR", cache: KVCache, vd_cache: KVCache, h, h_pos, h_valid, img_pos: torch.Tensor,
                  sampler, *, feed_last: bool = False, progress: bool = False) -> tuple[torch.Tensor, list]:
    """The AR loop of parallel bitwise prediction over N tokens: bit logits from the newest states, the sampler
    draws all bits of the token, the bits are read back as the next input. The caches hold the context so far;
    h / h_pos / h_valid are its states the visual-decoder cache has not seen yet, img_pos (3, B, N) the positions of
    the image tokens. feed_last: also read the last token (a conversation keeps the whole image in its context).
    Returns bits (B, N, L, U, d) and the pre-norm states of the tokens read."""
    N = img_pos.shape[2]
    steps, states = [], []
    bar = tqdm(total=N, desc="AR steps", unit="tok") if progress else None
    for i in range(N):
        bits = sampler(bit_logits_step(model, vd_cache, h, h_pos, h_valid), i)  # (B, L, U, d)
        steps.append(bits)
        if bar is not None:
            bar.update()
        if i < N - 1 or feed_last:
            h_pos = img_pos[:, :, i:i + 1]
            h = read_image_token(model, cache, bits, h_pos)
            h_valid = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
            states.append(h)
    if bar is not None:
        bar.close()
    return torch.stack(steps, dim=1), states


@dataclass
class ImageGeneration:
    bits: torch.Tensor  # (B, N, L, U, d) int64, the conditional rows
    indices: torch.Tensor  # (B, N, L, U) int64


def rows_per_image(sampler, batch_rows: int) -> int:
    """2 when the sampler guides ([cond; uncond] rows), else 1."""
    rows = 2 if getattr(sampler, "cfg_scale", 1.0) > 1.0 else 1
    assert batch_rows % rows == 0, ("with guidance the rows are [cond; uncond], got an odd number", batch_rows)
    return rows


def prefill(model: UniAR, ids, mask, pos, cache: KVCache, pixel_values=None, image_grid_thw=None) -> torch.Tensor:
    """Prefill: the prompt (B, T) (its input images as bits) into the KV cache in one forward -> pre-norm states
    (B, T, D)."""
    x, vmask, deep = model.embed_prefix(ids, pixel_values, image_grid_thw)
    return model.language_model(x, pos, mask.bool(), cache, vmask, deep)


@torch.no_grad()
def generate_image(model: UniAR, prefix_ids: torch.Tensor, attention_mask: torch.Tensor, ar_height: int,
                   ar_width: int, sampler, *, pixel_values=None, image_grid_thw=None,
                   progress: bool = False) -> ImageGeneration:
    """Parallel bitwise text-to-image (and editing): prefill the prompts, then one AR step per 32-px token, all its
    bits at once, drawn by `sampler` (`MultinomialSampler`, `KernelSampler`, or any fn(logits, step) -> bits).

    prefix_ids / attention_mask (B_all, Lp), left padded, each row ending in <|vision_start|>; with guidance the rows
    are [cond x B; uncond x B]. Edit mode: pixel_values / image_grid_thw of the input image of every row (in row
    order) whose placeholders are in the prefix. The arguments a person gives are checked in pipeline.generate_bits.
    """
    B_all, Lp = prefix_ids.shape
    ds = model.cfg.downsample
    gh, gw = ar_height // ds, ar_width // ds
    assert attention_mask.shape == prefix_ids.shape, (attention_mask.shape, prefix_ids.shape)
    assert gh > 0 and gw > 0 and ar_height % ds == ar_width % ds == 0, ("AR size", ar_height, ar_width, ds)
    assert Lp + gh * gw <= model.cfg.text.max_position_embeddings, ("position budget", Lp, gh * gw)
    rows = rows_per_image(sampler, B_all)
    N, lm, dev = gh * gw, model.language_model, prefix_ids.device
    dtype = lm.embed_tokens.weight.dtype
    ids_all, mask_all, grids = model.append_image_placeholders(prefix_ids, attention_mask, N, gh, gw, image_grid_thw)
    pos_all = get_rope_index(ids_all, grids, mask_all, model.cfg)  # (3, B_all, Lp + N)
    valid = mask_all.bool()[:, :Lp]
    cache = KVCache.for_layers(len(lm.layers), model.cfg.text, B_all, Lp + N, dev, dtype)
    vd_cache = KVCache.for_layers(len(model.visual_decoder), model.cfg.text, B_all, Lp + N, dev, dtype)
    h = prefill(model, prefix_ids, attention_mask, pos_all[:, :, :Lp], cache, pixel_values, image_grid_thw)
    bits, _ = image_rollout(model, cache, vd_cache, h, pos_all[:, :, :Lp], valid, pos_all[:, :, Lp:], sampler,
                            progress=progress)
    bits = bits[: B_all // rows]
    return ImageGeneration(bits=bits, indices=bsq.bits_to_indexes(bits))


def text_step(model: UniAR, h: torch.Tensor, temperature: float, generator=None) -> torch.Tensor:
    """The next token of every row from its last pre-norm state h (B, T, D): greedy at temperature 0, else drawn."""
    logits = model.lm_head(model.language_model.norm(h[:, -1])).float()  # (B, V)
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)[:, 0]


class Context:
    """One growing shared context (one conversation, one row): the text model's KV cache, the MRoPE position the next
    token takes, and every token read so far with its ids, positions and pre-norm states (the visual-decoder stack
    reads those states when an image is drawn). Images of every kind are read as bits: a user's picture through
    the tokenizer, a drawn image as it was sampled, so the model reads its own images without re-encoding."""

    def __init__(self, model: UniAR, capacity: int = 256):
        lm = model.language_model
        self.model, self.dev, self.dtype = model, lm.embed_tokens.weight.device, lm.embed_tokens.weight.dtype
        self.cache = KVCache.for_layers(len(lm.layers), model.cfg.text, 1, capacity, self.dev, self.dtype)
        self.ids: list = []  # every token id read
        self.images: list = []  # (bits (M, L, U, d), patch grid (t, h, w)) of every image read, in order
        self._pos = [torch.zeros(3, 0, dtype=torch.int64)]  # chunks of the (3, T) MRoPE ids of every token
        self._states = [torch.zeros(1, 0, lm.embed_tokens.weight.shape[1], device=self.dev, dtype=self.dtype)]
        self.next_pos = 0

    @property
    def length(self) -> int:
        return len(self.ids)

    def reserve(self, n: int) -> None:
        """Room for n more tokens: a full cache is copied into one of twice the size."""
        cap = self.cache.k.shape[3]
        if self.length + n <= cap:
            return
        old = self.cache
        self.cache = KVCache.for_layers(old.k.shape[0], self.model.cfg.text, 1, max(2 * cap, self.length + n),
                                        self.dev, self.dtype)
        self.cache.k[:, :, :, :cap], self.cache.v[:, :, :, :cap] = old.k, old.v
        self.cache.valid[:, :cap], self.cache.length = old.valid, old.length

    def record(self, ids: list, pos: torch.Tensor, h: torch.Tensor) -> None:
        """Keep the new tokens' ids, positions and states (as chunks: a token-by-token answer copies nothing)."""
        self.ids += ids
        self._pos.append(pos.cpu())
        self._states.append(h)

    @property
    def pos(self) -> torch.Tensor:
        """(3, T) MRoPE ids of every token read."""
        self._pos = [torch.cat(self._pos, dim=1)]
        return self._pos[0]

    @property
    def states(self) -> torch.Tensor:
        """(1, T, D) pre-norm states of every token read."""
        self._states = [torch.cat(self._states, dim=1)]
        return self._states[0]

    @torch.no_grad()
    def read(self, ids: list, images: Sequence = ()) -> torch.Tensor:
        """Read tokens into the context, its images' placeholders filled from `images` ((bits, grid) in order).
        -> their pre-norm states (1, T, D)."""
        pos, nxt = row_positions(ids, iter([g for _, g in images]), self.next_pos, self.model.cfg)
        assert nxt <= self.model.cfg.text.max_position_embeddings, ("position budget", nxt)  # pipeline.read_context
        self.reserve(len(ids))
        bits = torch.cat([b for b, _ in images]).to(self.dev) if images else None
        x, vmask, deep = self.model.embed_bits(torch.tensor([ids], device=self.dev), bits)
        ones = torch.ones(1, len(ids), dtype=torch.bool, device=self.dev)
        h = self.model.language_model(x, pos[:, None].to(self.dev), ones, self.cache, vmask, deep)
        self.record(ids, pos, h)
        self.images += list(images)
        self.next_pos = nxt
        return h

    def fork(self, upto: int) -> "Context":
        """A new context holding this one's first `upto` tokens (a copy: the two grow apart)."""
        c = Context(self.model, max(upto, 1))
        c.cache.k[:, :, :, :upto] = self.cache.k[:, :, :, :upto]
        c.cache.v[:, :, :, :upto] = self.cache.v[:, :, :, :upto]
        c.cache.valid[:, :upto], c.cache.length = True, upto
        c.ids, c._pos, c._states = self.ids[:upto], [self.pos[:, :upto]], [self.states[:, :upto]]
        n_img = sum(1 for i, t in enumerate(c.ids) if t == self.model.cfg.image_token_id
                    and c.ids[i - 1] == self.model.cfg.vision_start_token_id)
        c.images = self.images[:n_img]
        c.next_pos = int(c.pos.max()) + 1 if upto else 0
        return c


def stack_contexts(contexts: Sequence[Context], extra: int) -> tuple:
    """Contexts as the rows of one batch for a rollout, left padded (every row's newest token last): a KV cache of
    length max(lengths) + extra, the rows' pre-norm states, positions and validity (B, S)."""
    model, B = contexts[0].model, len(contexts)
    S = max(c.length for c in contexts)
    cache = KVCache.for_layers(contexts[0].cache.k.shape[0], model.cfg.text, B, S + extra, contexts[0].dev,
                               contexts[0].dtype)
    h = torch.zeros(B, S, contexts[0].states.shape[2], device=cache.k.device, dtype=cache.k.dtype)
    pos = torch.ones(3, B, S, dtype=torch.int64, device=cache.k.device)
    for r, c in enumerate(contexts):
        n = c.length
        cache.k[:, r, :, S - n:S], cache.v[:, r, :, S - n:S] = c.cache.k[:, 0, :, :n], c.cache.v[:, 0, :, :n]
        cache.valid[r, S - n:S] = True
        h[r, S - n:], pos[:, r, S - n:] = c.states[0], c.pos
    cache.length = S
    return cache, h, pos, cache.valid[:, :S].clone()


@torch.no_grad()
def draw(contexts: Sequence[Context], gh: int, gw: int, sampler, progress: bool = False) -> torch.Tensor:
    """A model image turn: parallel bitwise rollout of a gh x gw token image in the contexts [cond] or, with
    guidance, [cond, uncond], each ending in <|vision_start|>. The drawn bits stay in the first context, every token
    read back as it was sampled; the other context is left as it was. -> bits (N, L, U, d)."""
    model, N = contexts[0].model, gh * gw
    cache, h, pos, valid = stack_contexts(contexts, N)
    vd_cache = KVCache.for_layers(len(model.visual_decoder), model.cfg.text, len(contexts), cache.k.shape[3],
                                  cache.k.device, cache.k.dtype)
    img_pos = torch.stack([image_positions(c.next_pos, 1, gh, gw) for c in contexts], dim=1).to(cache.k.device)
    bits, states = image_rollout(model, cache, vd_cache, h, pos, valid, img_pos, sampler, feed_last=True,
                                 progress=progress)
    cond, S = contexts[0], h.shape[1]
    cond.reserve(N)
    at = cond.length
    cond.cache.k[:, :, :, at:at + N] = cache.k[:, :1, :, S:S + N]
    cond.cache.v[:, :, :, at:at + N] = cache.v[:, :1, :, S:S + N]
    cond.cache.valid[:, at:at + N], cond.cache.length = True, at + N
    cond.record([model.cfg.image_token_id] * N, img_pos[:, 0].cpu(), torch.cat(states, dim=1)[:1])
    cond.images.append((bits[0], (1, gh * model.cfg.vision.spatial_merge_size, gw * model.cfg.vision.spatial_merge_size)))
    cond.next_pos = int(img_pos[:, 0].max()) + 1
    return bits[0]


@torch.no_grad()
def generate_text(model: UniAR, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                  pixel_values=None, image_grid_thw=None, *, max_new_tokens: int = 64, stop_ids: Sequence[int] = (),
                  temperature: float = 0.0, generator=None) -> list[list[int]]:
    """Understanding: prefill the prompt, then greedy (temperature 0) or sampled decoding with a KV cache, each row
    stopping at one of `stop_ids` (kept in its output). Returns the new token ids of each row. The arguments a person
    gives are checked in pipeline.answer."""
    B, Lp = input_ids.shape
    assert temperature >= 0 and Lp + max_new_tokens <= model.cfg.text.max_position_embeddings, (temperature, Lp)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    lm, dev = model.language_model, input_ids.device
    pos = get_rope_index(input_ids, image_grid_thw, attention_mask, model.cfg)
    next_pos = pos.amax(dim=(0, 2)) + 1  # (B,) text after the prompt continues on all three axes
    cache = KVCache.for_layers(len(lm.layers), model.cfg.text, B, Lp + max_new_tokens, dev,
                               lm.embed_tokens.weight.dtype)
    h = prefill(model, input_ids, attention_mask, pos, cache, pixel_values, image_grid_thw)
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    stop = torch.tensor(list(stop_ids), dtype=torch.int64, device=dev)
    ones = torch.ones(B, 1, dtype=torch.bool, device=dev)
    for step in range(max_new_tokens):
        tok = text_step(model, h, temperature, generator)
        for b in range(B):
            if not done[b]:
                out[b].append(int(tok[b]))
        done = done | torch.isin(tok, stop)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        p = (next_pos + step).view(1, B, 1).expand(3, B, 1)
        h = lm(lm.embed_tokens(tok[:, None]), p, ones, cache)  # one decode step
    return out
