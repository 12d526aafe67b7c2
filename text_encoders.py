"""The decoder's text conditioning: CLIP-L, CLIP-bigG and T5-XXL encoders, their tokenizers, and SD3's prompt assembly.

The diffusion decoder (decoder.py) is conditioned on a fixed prompt, "Please reconstruct this image and restore all
the details.", so these encoders run once per machine: `load_hf.cached_prompt_embeds` stores the result on disk and later
decodes read the file. Modules mirror the transformers keys (CLIPTextModelWithProjection, T5EncoderModel) so the
released `sd3_pipeline/text_encoder*/` files load strictly; tokenizers run on the `tokenizers` library.

Letters in shape comments: B batch, S tokens, D width, heads x hd.

Departures from the reference libraries:
    - T5's fp16 inf-clamping is omitted (float32 / bfloat16 only here).
    - CLIP tokenizer folders without a tokenizer.json are rebuilt from vocab.json + merges.txt with the `tokenizers`
      library, as transformers' fast converter does.
    - The prompt embeddings are computed in float32 by default (the official pipeline encodes in bfloat16) and cached.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer as _Tok, models, normalizers, pre_tokenizers, processors

from decoder import JsonConfig, RMSNorm  # T5's layer norm is the decoder's RMSNorm (same order)

# ---------------------------------------------------------------------------------------------------------------------
# Text encoders (transformers CLIPTextModelWithProjection / T5EncoderModel names) and the prompt cache
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class CLIPTextConfig(JsonConfig):
    """`text_encoder*/config.json` (CLIPTextModelWithProjection). Defaults: CLIP-L/14; `bigg()` for text_encoder_2."""
    vocab_size: int = 49408; hidden_size: int = 768; intermediate_size: int = 3072; projection_dim: int = 768
    num_hidden_layers: int = 12; num_attention_heads: int = 12; max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"; layer_norm_eps: float = 1e-5
    eos_token_id: int = 2  # 2 = legacy conversions: the pooled token is argmax(ids) (the EOS has the largest id)

    @classmethod
    def bigg(cls) -> "CLIPTextConfig":
        return cls(hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
                   num_attention_heads=20, hidden_act="gelu")

    @classmethod
    def tiny(cls) -> "CLIPTextConfig":
        return cls(vocab_size=64, hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=3,
                   num_attention_heads=2)


@dataclass
class T5Config(JsonConfig):
    """`text_encoder_3/config.json` (T5EncoderModel). Defaults: T5 v1.1 XXL."""
    vocab_size: int = 32128; d_model: int = 4096; d_kv: int = 64; d_ff: int = 10240; num_layers: int = 24
    num_heads: int = 64; relative_attention_num_buckets: int = 32; relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6; feed_forward_proj: str = "gated-gelu"

    def __post_init__(self):
        if self.feed_forward_proj != "gated-gelu":
            raise ValueError(f"only feed_forward_proj 'gated-gelu' (T5 v1.1) is supported, got "
                             f"{self.feed_forward_proj!r}")

    @classmethod
    def tiny(cls) -> "T5Config":
        return cls(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)


_ACT = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


class CLIPLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        D = cfg.hidden_size
        self.heads, self.act = cfg.num_attention_heads, _ACT[cfg.hidden_act]
        self.self_attn = nn.Module()
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, n, nn.Linear(D, D))
        self.layer_norm1 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(D, cfg.intermediate_size), nn.Linear(cfg.intermediate_size, D)
        self.layer_norm2 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)

    def forward(self, x):
        B, S, D = x.shape
        a, h = self.self_attn, self.layer_norm1(x)
        q, k, v = (p(h).view(B, S, self.heads, -1).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, D)
        x = x + a.out_proj(o)
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))


class CLIPTextModel(nn.Module):
    """CLIPTextModelWithProjection. forward -> (penultimate hidden states (B, S, D), text_embeds (B, proj))."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        t = self.text_model = nn.Module()
        t.embeddings = nn.Module()
        t.embeddings.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        t.embeddings.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        t.encoder = nn.Module()
        t.encoder.layers = nn.ModuleList([CLIPLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        t.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, S = self.text_model, ids.shape[1]
        x = t.embeddings.token_embedding(ids) + t.embeddings.position_embedding(torch.arange(S, device=ids.device))
        layers = t.encoder.layers
        for layer in layers[:-1]:
            x = layer(x)
        penultimate = x
        x = t.final_layer_norm(layers[-1](x))
        # pooled = the EOS position; configs with eos_token_id 2 (pre-2023 CLIP conversions) use argmax of the ids
        eos = ids.argmax(-1) if self.cfg.eos_token_id == 2 else (ids == self.cfg.eos_token_id).int().argmax(-1)
        pooled = x[torch.arange(ids.shape[0], device=ids.device), eos]
        return penultimate, self.text_projection(pooled)


def t5_relative_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """T5's bidirectional relative-position buckets (q_len, k_len): half the buckets per direction, exact below
    num_buckets/4, logarithmic up to max_distance."""
    rel = torch.arange(k_len, device=device)[None] - torch.arange(q_len, device=device)[:, None]
    half = num_buckets // 2
    out = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    big = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    return out + torch.where(rel < exact, rel, big.clamp(max=half - 1))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, relative_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        att = nn.Module()
        att.q, att.k, att.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        att.o = nn.Linear(inner, cfg.d_model, bias=False)
        if relative_bias:
            att.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
        l0, l1 = nn.Module(), nn.Module()
        l0.SelfAttention, l0.layer_norm = att, RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        ff = l1.DenseReluDense = nn.Module()
        ff.wi_0, ff.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False), nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        ff.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        l1.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.layer = nn.ModuleList([l0, l1])
        self.heads = cfg.num_heads

    def forward(self, x, bias):
        B, S, _ = x.shape
        a = self.layer[0].SelfAttention
        h = self.layer[0].layer_norm(x)
        q, k, v = (p(h).view(B, S, self.heads, -1).transpose(1, 2) for p in (a.q, a.k, a.v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # T5: no 1/sqrt(d)
        x = x + a.o(o.transpose(1, 2).reshape(B, S, -1))
        ff, h = self.layer[1].DenseReluDense, self.layer[1].layer_norm(x)
        return x + ff.wo(F.gelu(ff.wi_0(h), approximate="tanh") * ff.wi_1(h))


class T5Encoder(nn.Module):
    """T5EncoderModel (`shared` and `encoder.embed_tokens` are one tied table). forward -> last hidden states."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = nn.Module()
        self.encoder.embed_tokens = self.shared
        self.encoder.block = nn.ModuleList([T5Block(cfg, i == 0) for i in range(cfg.num_layers)])
        self.encoder.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        S, c = ids.shape[1], self.cfg
        x = self.shared(ids)
        buckets = t5_relative_buckets(S, S, c.relative_attention_num_buckets, c.relative_attention_max_distance,
                                      ids.device)
        bias = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias(buckets)  # (S, S, heads)
        bias = bias.permute(2, 0, 1)[None]  # (1, heads, S, S), shared by every layer
        for blk in self.encoder.block:
            x = blk(x, bias)
        return self.encoder.final_layer_norm(x)


def read_json(path) -> dict:
    if not Path(path).is_file():
        raise ValueError(f"config file not found: {path}")
    with open(path) as f:
        return json.load(f)


def _json_object(path: Path) -> dict:
    """A tokenizer folder's JSON file -> its object (ValueError naming the file when it is not one)."""
    try:
        d = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object, got {json.dumps(d)[:80]}")
    return d


def _clip_bpe(folder: Path, special: Callable):
    """CLIP's byte-level BPE built from vocab.json + merges.txt (folders saved without tokenizer.json), the same
    pipeline transformers' CLIPTokenizerFast conversion builds."""
    try:
        with open(folder / "merges.txt", encoding="utf-8") as f:
            merges = [tuple(m.split()) for m in f.read().strip().split("\n")[1:49152 - 256 - 2 + 1]]  # as CLIPTokenizer
    except UnicodeDecodeError as e:
        raise ValueError(f"{folder / 'merges.txt'} is not a text file ({e})") from None
    vocab = _json_object(folder / "vocab.json")
    try:
        model = models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False,
                           unk_token=special("unk_token"))
    except Exception as e:  # the tokenizers library: a merge of tokens outside the vocabulary, a wrong id type
        if type(e) is not Exception and not isinstance(e, TypeError):
            raise
        raise ValueError(f"{folder / 'vocab.json'} and {folder / 'merges.txt'} do not make a BPE tokenizer "
                         f"({' '.join(str(e).split())})") from None
    tok = _Tok(model)
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bos, eos = special("bos_token"), special("eos_token")
    # transformers registers these as special (added) tokens, so they are split out before BPE (SD3's CLIP-G pads
    # with "!", which therefore never merges with neighbours)
    tok.add_special_tokens(list(dict.fromkeys(t for t in (bos, eos, special("unk_token"), special("pad_token")) if t)))
    tok.post_processor = processors.RobertaProcessing(sep=(eos, tok.token_to_id(eos)), cls=(bos, tok.token_to_id(bos)),
                                                      add_prefix_space=False, trim_offsets=False)
    return tok


class Tokenizer:
    """A pipeline tokenizer folder (tokenizer.json, or CLIP's vocab.json + merges.txt) through the `tokenizers`
    library, padded and truncated to a fixed length like the pipeline's tokenizer calls."""

    def __init__(self, folder, max_length: int | None = None):
        """ValueError naming the file for a file that is missing, not JSON, of the wrong shape or truncated."""
        folder = Path(folder)
        conf = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                conf.update(_json_object(folder / name))

        def special(key):
            t = conf.get(key)
            return t.get("content") if isinstance(t, dict) else t

        if (folder / "tokenizer.json").is_file():
            try:
                self.tok = _Tok.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # the tokenizers library: one plain Exception for every unreadable file
                if type(e) is not Exception:
                    raise
                raise ValueError(f"{folder / 'tokenizer.json'} is not a readable tokenizer file "
                                 f"({' '.join(str(e).split())})") from None
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            self.tok = _clip_bpe(folder, special)
        else:
            raise ValueError(f"{folder}: needs tokenizer.json (or vocab.json + merges.txt for CLIP)")
        pad = special("pad_token")
        if not isinstance(pad, str) or self.tok.token_to_id(pad) is None:
            raise ValueError(f"{folder}: pad token {pad!r} missing from tokenizer_config.json or the vocabulary")
        length = max_length or conf.get("model_max_length", 77)
        if not (isinstance(length, (int, float)) and not isinstance(length, bool) and 1 <= length < 2**31):
            raise ValueError(f"{folder / 'tokenizer_config.json'}: field 'model_max_length' must be an integer >= 1, "
                             f"got {json.dumps(length)}")
        self.max_length = int(length)
        self.tok.enable_truncation(self.max_length)
        self.tok.enable_padding(length=self.max_length, pad_id=self.tok.token_to_id(pad), pad_token=pad)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([e.ids for e in self.tok.encode_batch(list(texts))], dtype=torch.long)


@torch.no_grad()
def encode_prompt(encoders: dict, prompts: Sequence[str], joint_dim: int, max_sequence_length: int = 256):
    """SD3's encode_prompt: CLIP-L/G penultimate states concatenated (zero-padded to joint_dim) then the T5 states
    (zeros when T5 is absent) along the sequence; pooled = [CLIP-L text_embeds, CLIP-G text_embeds].
    Returns (prompt_embeds (B, 77 + T, joint_dim), pooled (B, proj_L + proj_G)); T = the T5 tokenizer's length, or
    max_sequence_length when T5 is absent."""
    hs, pooled = [], []
    for name in ("clip_l", "clip_g"):
        model, tok = encoders[name]
        h, p = model(tok(prompts).to(model.text_projection.weight.device))
        hs.append(h)
        pooled.append(p)
    clip = torch.cat(hs, dim=-1)
    if clip.shape[-1] > joint_dim:
        raise ValueError(f"CLIP widths sum to {clip.shape[-1]}, more than the joint dim {joint_dim}")
    clip = F.pad(clip, (0, joint_dim - clip.shape[-1]))  # zero channels up to the T5 / joint width
    if encoders.get("t5") is None:
        t5 = clip.new_zeros(len(prompts), max_sequence_length, joint_dim)
    else:
        model, tok = encoders["t5"]
        t5 = model(tok(prompts).to(model.shared.weight.device)).to(clip.dtype)
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)
