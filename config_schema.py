"""The config files of a UniAR checkpoint, field by field: which fields a file must state, the type and range of
each, and the default of the few it may leave out.

load_hf checks every config file against its schema before a config dataclass is built from it, so a missing,
mistyped or out-of-range value is one error naming the file and the field, never a silent default nor a traceback
from inside a model file. Rules that relate several fields (heads divide evenly, the mrope sections sum to half a
head, the vision tower's width is the text model's) are checked here too, once the fields are; the config
dataclasses only assert them, for configs built in code.

What is required. transformers and diffusers write every field of a config class when they save a model, and their
class defaults are not the released model's (Qwen3VLTextConfig's intermediate_size, T5Config's feed_forward_proj,
the Euler scheduler's shift, CLIPTextConfig's eos_token_id, ...), nor are this project's dataclass defaults those
classes' defaults. A field that sets a shape or a computation is therefore required: a file without it is damaged
or hand-edited, and guessing its value draws wrong images with no error. A field may be left out only where
  - one value is supported, and the default is that value (hidden_act, attention_bias, use_bsq, bsq_dim, the
    scheduler's options that the released scheduler has off, the VAE's act_fn);
  - the file's weights decide it (the bit-head flags: load_hf reads the variant from the keys; the VAE's
    mid_block_add_attention and use_post_quant_conv: a wrong value is reported as missing / unexpected keys);
  - the released format has no such field: `prediction_type` of a decoder with a VAE (the released decoder
    predicts the velocity; a pixel-space decoder, this project's own, must say), `vistok_mlp_dim` (hard-coded in
    the official head builder; a wrong value is a shape mismatch).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Callable

REQUIRED = object()  # Field.default for a field the file must state


class ConfigError(ValueError):
    """A config file that does not follow its schema; the message names the file and the field."""


@dataclass(frozen=True)
class Field:
    """One field of a config file. `name` is dotted for a field of a nested object ("text_config.rope_theta");
    `want` says what the value must be, null included when it may be null (the error messages end with it); `ok`
    tests a present, non-null value."""

    name: str
    want: str
    ok: Callable[[object], bool]
    default: object = REQUIRED
    nullable: bool = False


def _field(name, want, ok, default=REQUIRED, nullable=False) -> Field:
    return Field(name, want + (" or null" if nullable else ""), ok, default, nullable)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(name: str, lo: int = 1, **kw) -> Field:
    return _field(name, f"an integer >= {lo}", lambda v: _is_int(v) and v >= lo, **kw)


def number(name: str, *, positive: bool = False, lo: float | None = None, hi: float | None = None, **kw) -> Field:
    """A finite JSON number (an integer is accepted: 5000000 for 5e6); `positive`: > 0; `lo` / `hi`: inclusive."""
    if positive:
        want, test = "a finite number > 0", lambda v: v > 0
    elif lo is not None and hi is not None:
        want, test = f"a number in [{lo:g}, {hi:g}]", lambda v: lo <= v <= hi
    else:
        want, test = "a finite number", lambda v: True
    return _field(name, want, lambda v: _is_number(v) and test(v), **kw)


def flag(name: str, **kw) -> Field:
    return _field(name, "true or false", lambda v: isinstance(v, bool), **kw)


def only(name: str, value, why: str, **kw) -> Field:
    """A field with one supported value (JSON true / false / a string / an integer); `why` says why only that."""
    shown = json.dumps(value)
    return _field(name, f"{shown} ({why})", lambda v: type(v) is type(value) and v == value, **kw)


def choice(name: str, values: tuple, **kw) -> Field:
    shown = ", ".join(json.dumps(v) for v in values)
    return _field(name, f"one of {shown}", lambda v: isinstance(v, str) and v in values, **kw)


def integers(name: str, lo: int = 0, length: int | None = None, nonempty: bool = False, **kw) -> Field:
    """A JSON list of integers >= lo (of `length` items when given; at least one when `nonempty`)."""
    want = (f"a list of {length} integers >= {lo}" if length is not None else
            f"a non-empty list of integers >= {lo}" if nonempty else f"a list of integers >= {lo}")

    def ok(v):
        return (isinstance(v, list) and all(_is_int(x) and x >= lo for x in v)
                and (length is None or len(v) == length) and (not nonempty or len(v) > 0))

    return _field(name, want, ok, **kw)


def nested(prefix: str, fields: list[Field]) -> list[Field]:
    """The fields of a nested object, named from the file's top level."""
    return [Field(f"{prefix}.{f.name}", f.want, f.ok, f.default, f.nullable) for f in fields]


# ---------------------------------------------------------------------------------------------------------------------
# The schemas
# ---------------------------------------------------------------------------------------------------------------------

TEXT = [  # text_config of the root config.json (Qwen3VLTextConfig)
    integer("hidden_size"), integer("num_hidden_layers"), integer("num_attention_heads"),
    integer("num_key_value_heads"), integer("head_dim"), integer("intermediate_size"), integer("vocab_size"),
    number("rms_norm_eps", positive=True), number("rope_theta", positive=True), integer("max_position_embeddings"),
    integers("rope_scaling.mrope_section", length=3),
    only("rope_scaling.rope_type", "default", "the only RoPE supported: plain interleaved MRoPE", default="default"),
    only("hidden_act", "silu", "the only activation supported", default="silu"),
    only("attention_bias", False, "Qwen3-VL has bias-free projections", default=False),
]

VISION = [  # bsq_encoder/config.json, and vision_config of the root config.json (UniARVisionConfig)
    integer("depth"), integer("hidden_size"), integer("intermediate_size"), integer("num_heads"),
    integer("in_channels"), integer("patch_size"), integer("temporal_patch_size"), integer("spatial_merge_size"),
    integer("out_hidden_size"), integer("num_position_embeddings"), integers("deepstack_visual_indexes"),
    integer("bsq_hidden_dim"), flag("bsq_skip_final_layernorm"),
    only("hidden_act", "gelu_pytorch_tanh", "the only activation supported", default="gelu_pytorch_tanh"),
    only("use_bsq", True, "a UniAR tokenizer quantizes with BSQ", default=True),
    only("bsq_dim", 64, "the only size supported: a code is a 64-bit index", default=64),
]

AR = [  # the root config.json (UniARConfig)
    only("model_type", "uniar", "the root config of a UniAR checkpoint", default="uniar"),
    *(integer(n, lo=0) for n in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")),
    only("vistok_pred", True, "UniAR generation needs the bit head"),
    only("visual_transformer_decoder", True, "UniAR generation needs the visual-decoder stack"),
    integer("visual_transformer_decoder_depth"),
    flag("vistok_pred_layernorm", default=False), flag("vistok_pred_use_mlp", default=False),
    integer("vistok_mlp_dim", default=16 * 1024),
    *nested("text_config", TEXT), *nested("vision_config", VISION),
]


def mmdit(pixel_space: bool) -> list[Field]:
    """sd3_transformer/config.json (SD3Transformer2DModelWithSigLIP, plus this project's `prediction_type`, which a
    pixel-space decoder must state and a decoder with a VAE, the released layout, may leave at "velocity")."""
    return [
        *(integer(n) for n in ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                               "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
                               "pooled_projection_dim", "out_channels", "pos_embed_max_size", "siglip_channels",
                               "upscale_factor")),
        integers("dual_attention_layers"),
        Field("qk_norm", '"rms_norm" or null (the q/k norms supported)', lambda v: v == "rms_norm", nullable=True),
        number("image_token_scale_factor"), flag("add_siglip_tensor_to_latent"), flag("super_resolution"),
        number("drop_image_token_prob_for_cfg", lo=0, hi=1, default=0.0),
        _field("prediction_type", 'one of "velocity", "sample" (a pixel-space decoder, without sd3_pipeline/vae/, '
               "must say which)", lambda v: v in ("velocity", "sample")) if pixel_space else
        choice("prediction_type", ("velocity", "sample"), default="velocity"),
    ]


VAE = [  # sd3_pipeline/vae/config.json (AutoencoderKL; only its decoder half is built)
    integer("latent_channels"), integer("out_channels"), integers("block_out_channels", lo=1, nonempty=True),
    integer("layers_per_block"), integer("norm_num_groups"), number("scaling_factor", positive=True),
    number("shift_factor", nullable=True),
    only("act_fn", "silu", "the SD3 VAE's; the only activation supported", default="silu"),
    flag("mid_block_add_attention", default=True),
    only("use_post_quant_conv", False, "the SD3 VAE has none", default=False),
]

_OFF = "the released scheduler has it off; the only value supported"
SCHEDULER = [  # sd3_pipeline/scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler, static shift)
    integer("num_train_timesteps"), number("shift", positive=True),
    *(only(n, False, _OFF, default=False) for n in ("use_dynamic_shifting", "invert_sigmas", "use_karras_sigmas",
                                                      "use_exponential_sigmas", "use_beta_sigmas",
                                                      "stochastic_sampling")),
    Field("shift_terminal", f"null ({_OFF})", lambda v: False, default=None, nullable=True),
]

CLIP = [  # sd3_pipeline/text_encoder{,_2}/config.json (CLIPTextModelWithProjection)
    *(integer(n) for n in ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                           "num_attention_heads", "max_position_embeddings")),
    choice("hidden_act", ("quick_gelu", "gelu", "gelu_new")), number("layer_norm_eps", positive=True),
    integer("eos_token_id", lo=0),
]

T5 = [  # sd3_pipeline/text_encoder_3/config.json (T5EncoderModel)
    *(integer(n) for n in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                           "relative_attention_num_buckets", "relative_attention_max_distance")),
    number("layer_norm_epsilon", positive=True),
    only("feed_forward_proj", "gated-gelu", "T5 v1.1, the only feed-forward supported"),
]


# The AR model's tokenizer files (beside tokenizer.json, which the tokenizers library parses and checks): only the
# fields pipeline.Tokenizer reads are checked; every other field is kept as it is.
def _token(v) -> bool:
    return isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("content"), str))


_TOKEN = 'a token string or an object {"content": token string}'
SPECIAL_TOKENS = [  # special_tokens_map.json, tokenizer_config.json
    _field("pad_token", _TOKEN, _token, default=None, nullable=True),
    _field("eos_token", _TOKEN, _token, default=None, nullable=True),
]
GENERATION = [  # generation_config.json
    _field("eos_token_id", "a token id >= 0 or a list of them", lambda v: (_is_int(v) and v >= 0) or (
        isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v)), default=None, nullable=True),
]


def check_added_tokens(d, where) -> dict:
    """added_tokens.json: a JSON object {token string: id >= 0}."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must hold a JSON object {{token: id}}, got {_shown(d)}")
    for k, v in d.items():
        if not (_is_int(v) and v >= 0):
            raise ConfigError(f"{where}: the id of {json.dumps(k)} must be an integer >= 0, got {_shown(v)}")
    return d


def _text_rules(t: dict) -> str | None:
    """text_config: the heads share key/value heads evenly; the MRoPE sections cover half a head."""
    if t["num_attention_heads"] % t["num_key_value_heads"]:
        return (f"num_attention_heads {t['num_attention_heads']} is not a multiple of num_key_value_heads "
                f"{t['num_key_value_heads']}")
    section = tuple(t["rope_scaling"]["mrope_section"])
    if sum(section) != t["head_dim"] // 2:
        return f"mrope_section {section} must sum to head_dim / 2 = {t['head_dim'] // 2}"
    return None


def _vision_rules(v: dict) -> str | None:
    """A vision config: the heads divide the width; the learned position grid is square; the DeepStack taps are
    blocks of the tower."""
    if v["hidden_size"] % v["num_heads"]:
        return f"vision hidden_size {v['hidden_size']} is not a multiple of num_heads {v['num_heads']}"
    if math.isqrt(v["num_position_embeddings"]) ** 2 != v["num_position_embeddings"]:
        return f"num_position_embeddings {v['num_position_embeddings']} is not a square grid"
    taps = tuple(v["deepstack_visual_indexes"])
    if any(not 0 <= i < v["depth"] for i in taps):
        return f"deepstack_visual_indexes {taps} outside depth {v['depth']}"
    return None


def _invalid(message: str | None, what: str = "config") -> str | None:
    return None if message is None else f"invalid {what} ({message})"


def _ar_rules(d: dict) -> str | None:
    t, v = d["text_config"], d["vision_config"]
    vocab = t["vocab_size"]
    for n in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        if d[n] >= vocab:
            return f"field '{n}' must be a token id below text_config.vocab_size {vocab}, got {d[n]}"
    widths = (f"vision out_hidden_size {v['out_hidden_size']} != text hidden_size {t['hidden_size']}"
              if v["out_hidden_size"] != t["hidden_size"] else None)
    return _invalid(_text_rules(t) or _vision_rules(v) or widths)


def _mmdit_rules(d: dict) -> str | None:
    bad = [i for i in d["dual_attention_layers"] if i >= d["num_layers"]]
    if bad:
        return f"field 'dual_attention_layers' names layers {bad} beyond num_layers {d['num_layers']}"
    inner = d["num_attention_heads"] * d["attention_head_dim"]
    if d["caption_projection_dim"] != inner:
        return _invalid(f"caption_projection_dim {d['caption_projection_dim']} must equal heads * head_dim {inner}")
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------------------------------


ADD = "restore it from the checkpoint's original file"


def _shown(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 80 else s[:77] + "..."


def check(d, where, fields: list[Field], rules: Callable[[dict], str | None] | None = None) -> dict:
    """A config file's contents checked against its schema -> a copy with the defaults of absent optional fields
    filled in (fields outside the schema are kept as they are). ConfigError naming `where` and the field: the file
    is not a JSON object, a required field is missing, a value has the wrong type or range, or a rule fails."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must hold a JSON object (a config), got {_shown(d)}")
    out = copy.deepcopy(d)  # the defaults are written into the copy
    for f in fields:
        *parents, key = f.name.split(".")
        obj = out
        for depth, p in enumerate(parents):
            path = ".".join(parents[:depth + 1])
            if p not in obj:
                if f.default is REQUIRED:
                    raise ConfigError(f"{where}: required field '{path}' is missing: it must be a JSON object "
                                      f"holding '{f.name}'; {ADD}")
                obj[p] = {}
            if not isinstance(obj[p], dict):
                raise ConfigError(f"{where}: field '{path}' must be a JSON object, got {_shown(obj[p])}")
            obj = obj[p]
        if key not in obj:
            if f.default is REQUIRED:
                raise ConfigError(f"{where}: required field '{f.name}' is missing: it must be {f.want}; {ADD}")
            obj[key] = f.default
            continue
        v = obj[key]
        if not ((v is None and f.nullable) or (v is not None and f.ok(v))):
            raise ConfigError(f"{where}: field '{f.name}' must be {f.want}, got {_shown(v)}")
    message = rules(out) if rules is not None else None
    if message:
        raise ConfigError(f"{where}: {message}")
    return out


def known_fields(cls, d: dict) -> dict:
    """The entries of a config dict that name a field of the dataclass `cls`: a config.json also holds keys no
    config class here reads (_class_name, model_type, architectures, ...), and they are left out."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def check_ar(d, where) -> dict:
    return check(d, where, AR, _ar_rules)


def check_vision(d, where) -> dict:
    """bsq_encoder/config.json."""
    return check(d, where, VISION, lambda v: _invalid(_vision_rules(v), "vision config"))


def check_mmdit(d, where, pixel_space: bool) -> dict:
    return check(d, where, mmdit(pixel_space), _mmdit_rules)
