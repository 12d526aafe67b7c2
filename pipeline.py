"""The boundary between people and the model: the checkpoint's tokenizer, the chat templates, pictures in (image
files and the checkpoint's preprocessor_config.json), and the high-level calls (`generate_bits`, `answer`,
`Conversation`, `decode_bits`) that sample.py, train.py and rl.py use. Everything a person types or hands over is
checked here (with a ValueError naming it) and becomes token ids, bits and tensors for the math in `bsq.py`,
`model.py` and `decoder.py`, which only assert what these checks make sure of.

Departures from the official code:
    - Prompts are rendered by plain string templates (the official code renders them with Jinja chat templates:
      UniAR's own for generation, the checkpoint processor's Qwen3-VL one for understanding) to the same strings;
      the generation strings are checked against the fixtures' renderings.
    - User text in those templates is tokenized without the tokenizer's added tokens (`Prompt`, `Tokenizer`): a
      special-token string typed into a prompt or question stays text. The official processor tokenizes the whole
      rendered string, so there such a string becomes a control token; without one the ids are the same.
    - `generate_bits(seed=s)` draws from its own `torch.Generator` seeded with s instead of reseeding the global
      generator; on CPU that is the same stream as `torch.manual_seed(s)` right before the official call.
    - The official inference scripts are single-turn; `Conversation` holds several turns in one context.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tokenizers import Tokenizer as HFTokenizer

import bsq
import decoder as D
from model import (Context, MultinomialSampler, KernelSampler, UniAR, draw, generate_image, generate_text,
                   row_positions, text_step)

# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer and prompt templates
# ---------------------------------------------------------------------------------------------------------------------

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"


class Prompt(str):
    """A rendered prompt: a template with `{}` where the user's texts go. As a str it is the whole text, equal to the
    official rendering; `Tokenizer.encode` reads the user's parts as plain text (a special-token string typed there,
    such as "<|im_end|>", stays text) and only the template's own special tokens as control tokens.

    Adding anything to a Prompt gives a plain str, which the tokenizer reads whole as template text (every
    special-token string in it a control token): build prompts that hold user text with the render_* functions."""

    def __new__(cls, template: str, *user: str):
        pieces = template.split("{}")
        if len(pieces) != len(user) + 1 or not all(isinstance(u, str) for u in user):
            raise ValueError(f"template {template!r} has {len(pieces) - 1} places for user text, got {user!r}")
        self = super().__new__(cls, pieces[0] + "".join(u + p for u, p in zip(user, pieces[1:])))
        self.template, self.user = template, user
        segments = [(pieces[0], False)]
        for u, p in zip(user, pieces[1:]):
            segments += [(u, True), (p, False)]
        self.segments = tuple(segments)  # (text, is user text) in order
        return self

    def __getnewargs__(self):  # copy / pickle rebuild it from the template and the user texts
        return (self.template, *self.user)


class Tokenizer:
    """The checkpoint's tokenizer (`tokenizer.json`: the released byte-level BPE, or the toy's word level) with the
    special tokens read from its config files.

    User text is tokenized as text: `text_tk` is the same tokenizer without its added tokens (the special and other
    added tokens: <|im_start|>, <|vision_start|>, <|image_pad|>, ...), so what a user types can never become a
    control token. A Prompt is encoded by splitting the template's parts at the added tokens (those become their
    ids) and tokenizing the text between two of them, template and user text joined, with `text_tk`. Without
    special-token strings in the user's text this is exactly what the whole string gives (the tokenizers library
    also splits at the added tokens first and tokenizes each stretch between them on its own)."""

    def __init__(self, folder):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"no tokenizer.json in {folder}")
        self.tk = HFTokenizer.from_file(str(path))
        # the same normalizer, pre-tokenizer and model (shared, not copied), without the added vocabulary
        self.text_tk = HFTokenizer(self.tk.model)
        self.text_tk.normalizer, self.text_tk.pre_tokenizer = self.tk.normalizer, self.tk.pre_tokenizer
        added_here = [t.content for t in self.tk.get_added_tokens_decoder().values()]
        specials = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # tokenizer_config wins, like HF
            p = folder / name
            if p.is_file():
                with open(p) as f:
                    d = json.load(f)
                specials.update({k: d[k]["content"] if isinstance(d[k], dict) else d[k]
                                 for k in ("pad_token", "eos_token") if d.get(k)})
        self._added = {}
        if (folder / "added_tokens.json").is_file():
            with open(folder / "added_tokens.json") as f:
                self._added = json.load(f)
        if "pad_token" not in specials or "eos_token" not in specials:
            raise ValueError(f"{folder}: pad_token / eos_token not found in tokenizer_config.json or "
                             "special_tokens_map.json")
        self.pad_token, self.eos_token = specials["pad_token"], specials["eos_token"]
        self.pad_id, self.eos_id = self.token_id(self.pad_token), self.token_id(self.eos_token)
        for t in (IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD):
            self.token_id(t)
        # The template's control tokens: every added token (longest first, so that one which is a prefix of another
        # never cuts it, as the library's leftmost-longest match).
        added = sorted(set(added_here) | set(self._added), key=len, reverse=True)
        self._control = re.compile("(" + "|".join(map(re.escape, added)) + ")") if added else None
        self.control_ids = {self.token_id(t) for t in added}
        # where an answer ends: the eos token, the chat turn's end and generation_config.json's eos_token_id (int or
        # list; Qwen3-VL lists <|im_end|> and <|endoftext|>)
        gen_eos = None
        if (folder / "generation_config.json").is_file():
            with open(folder / "generation_config.json") as f:
                gen_eos = json.load(f).get("eos_token_id")
        gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else gen_eos
        self.end_ids = sorted({self.eos_id, self.token_id(IM_END), *(int(i) for i in gen_eos)})

    def token_id(self, token: str) -> int:
        i = self._added.get(token, self.tk.token_to_id(token))
        if i is None:
            raise ValueError(f"token {token!r} is not in the tokenizer")
        return int(i)

    def encode_text(self, text: str) -> list[int]:
        """Text as text: special-token strings in it are spelled out, never control tokens."""
        return self.text_tk.encode(text, add_special_tokens=False).ids if text else []

    def encode(self, text: str) -> list[int]:
        """A Prompt: template tokens as control tokens, user text as text (see the class). A plain str is read whole
        as template text: every special-token string in it becomes its control token (the official tokenization
        of a rendered template, as the fixtures store them)."""
        segments = getattr(text, "segments", None)
        if segments is None:
            return self.tk.encode(text, add_special_tokens=False).ids
        ids, stretch = [], []  # stretch: the text since the last control token, template and user parts
        for part, user in segments:
            pieces = [part] if user or self._control is None else self._control.split(part)
            for i, piece in enumerate(pieces):  # split() with a group: text, token, text, token, ..., text
                if i % 2:
                    ids += self.encode_text("".join(stretch)) + [self.token_id(piece)]
                    stretch = []
                else:
                    stretch.append(piece)
        return ids + self.encode_text("".join(stretch))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize (`encode`) and LEFT pad with the pad token -> ids, attention_mask (B, T) int64."""
        seqs = [self.encode(t) for t in texts]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(seqs), T), dtype=torch.int64)
        for b, s in enumerate(seqs):
            if s:
                ids[b, T - len(s):] = torch.tensor(s)
                mask[b, T - len(s):] = 1
        return ids, mask


def image_placeholder(n_tokens: int) -> str:
    return VISION_START + IMAGE_PAD * n_tokens + VISION_END


def join(*parts) -> Prompt:
    """Prompts and template strings one after the other, as one Prompt (user texts stay user text)."""
    assert not any("{}" in p for p in parts if not isinstance(p, Prompt))
    return Prompt("".join(p.template if isinstance(p, Prompt) else p for p in parts),
                  *(u for p in parts if isinstance(p, Prompt) for u in p.user))


def render_user_turn(text: str, image_tokens: Optional[int] = None, draw: Optional[tuple] = None) -> Prompt:
    """A user turn of the chat format (Qwen's <|im_start|>user ... <|im_end|>). Before a drawing (draw = the token
    grid (h, w) to generate) it is UniAR's generation turn: the text, the picture, then '<image_gen> generate image
    h w' (no separators); before an answer, Qwen's understanding turn: the picture, then the text."""
    image = "" if image_tokens is None else image_placeholder(image_tokens)
    if draw is None:
        return Prompt(f"{IM_START}user\n{image}{{}}{IM_END}\n", text)
    return Prompt(f"{IM_START}user\n{{}}{image}<image_gen> generate image {draw[0]} {draw[1]}{IM_END}\n", text)


MODEL_TURN = f"{IM_START}assistant\n"  # opens the model's turn: an answer follows, or <|vision_start|> and an image


def render_model_text(text: str) -> Prompt:
    """A model answer turn, closed."""
    return Prompt(f"{MODEL_TURN}{{}}{IM_END}\n", text)


def render_model_image(image_tokens: int) -> str:
    """A model turn holding a drawn image, as the chat template writes an image: <|vision_start|> pads <|vision_end|>."""
    return f"{MODEL_TURN}{image_placeholder(image_tokens)}{IM_END}\n"


def render_generation_prompt(prompt: str, grid_h: int, grid_w: int, input_image_tokens: Optional[int] = None) -> Prompt:
    """UniAR's generation template: the user's generation turn, the model's turn opened, then <|vision_start|>
    announces the image to generate."""
    return join(render_user_turn(prompt, input_image_tokens, (grid_h, grid_w)), MODEL_TURN + VISION_START)


def render_chat_prompt(question: str, image_tokens: Optional[int] = None, answer: Optional[str] = None) -> Prompt:
    """Understanding: one user turn with the image first, then the question; the model's turn opened. `answer`
    (training): the model's reply and the <|im_end|> that closes it follow."""
    turn = join(render_user_turn(question, image_tokens), MODEL_TURN)
    return turn if answer is None else join(turn, Prompt(f"{{}}{IM_END}", answer))


# ---------------------------------------------------------------------------------------------------------------------
# Pictures in: image files, PIL images and arrays -> the tokenizer's patch rows; the checkpoint's preprocessing
# ---------------------------------------------------------------------------------------------------------------------


def load_image(image) -> np.ndarray:
    """A path, PIL image or array -> uint8 (H, W, 3) RGB. Grayscale and RGBA are converted (alpha over white),
    16-bit grayscale scaled to 8 bits; an image over PIL's decompression-bomb limit is refused (ValueError)."""
    if isinstance(image, (str, Path)):
        image = _read_image_file(image)
    if isinstance(image, Image.Image) and image.mode.startswith("I"):
        # 16-bit grayscale (PNG: mode I;16, or I in older Pillow): scale 0..65535 to 0..255 (convert("RGB") clips)
        image = np.clip(np.round(np.asarray(image, np.float64) * (255 / 65535)), 0, 255).astype(np.uint8)
    if isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "P") and ("A" in image.mode or "transparency" in image.info):
            bg = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(bg, image.convert("RGBA"))
        image = np.asarray(image.convert("RGB"))
    return _array_to_rgb_uint8(np.asarray(image))


def _read_image_file(path) -> Image.Image:
    """An image file, read whole; a missing, unreadable or oversized file is a ValueError naming it."""
    try:
        with warnings.catch_warnings():  # PIL only warns between MAX_IMAGE_PIXELS and twice that: refuse both
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return im.copy()
    except FileNotFoundError:
        raise ValueError(f"image file not found: {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{path} is over PIL's decompression-bomb limit of Image.MAX_IMAGE_PIXELS = "
                         f"{Image.MAX_IMAGE_PIXELS} pixels ({e}); downscale the image first") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image file ({e})") from None


def _array_to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1 / 3 / 4) uint8 or float ([0, 1] or [0, 255]) -> uint8 (H, W, 3), alpha over white."""
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] == 4:
        a = arr[..., 3:].astype(np.float64) / 255 if arr.dtype == np.uint8 else arr[..., 3:]
        out = arr[..., :3] * a + (255 if arr.dtype == np.uint8 else 1.0) * (1 - a)
        # uint8 stays uint8: a dark composite (all values <= 1) must not be taken for a [0, 1] float image below
        arr = np.clip(np.round(out), 0, 255).astype(np.uint8) if arr.dtype == np.uint8 else out
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image has zero size ({arr.shape[0]}x{arr.shape[1]})")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise ValueError("image contains NaN or inf pixels")
        if arr.max() <= 1.0:  # float images in [0, 1]
            arr = arr * 255.0
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def preprocess_image(image, *, size: tuple[int, int] | None = None, resize: bool = True,
                     min_pixels: int = bsq.MIN_PIXELS, max_pixels: int = bsq.MAX_PIXELS, patch_size: int = 16,
                     merge_size: int = 2, temporal_patch_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Image -> (pixel_values (Np, 3 * T * P * P) float32, grid_thw (1, 3) int64), rows in 2x2-merge block order.

    `size=(H, W)` forces a resize (the edit input image is resized to the AR size); otherwise the image is resized to
    the nearest multiple of 32 px within [min_pixels, max_pixels] (`resize=False` keeps it as it is, then its sides
    must already be multiples of 32). Resampling is PIL bicubic, then x / 255, then (x - 0.5) / 0.5 (bsq.smart_resize,
    bsq.patch_rows: the tokenizer's input math; here the image is read and the sizes are checked).
    """
    arr = load_image(image)
    h, w = arr.shape[:2]
    factor = patch_size * merge_size
    if size is not None:
        th, tw = int(size[0]), int(size[1])
        if th <= 0 or tw <= 0 or th % factor or tw % factor:
            raise ValueError(f"size {size} must be positive multiples of {factor}")
    elif resize:
        if h < factor or w < factor:
            raise ValueError(f"image {h}x{w} is smaller than one merged patch ({factor}x{factor} px)")
        if max(h, w) / min(h, w) > 200:
            raise ValueError(f"image aspect ratio {max(h, w) / min(h, w):.1f} exceeds 200 ({h}x{w})")
        th, tw = bsq.smart_resize(h, w, factor, min_pixels, max_pixels)
    else:
        if h % factor or w % factor:
            raise ValueError(f"image {h}x{w}: sides must be multiples of {factor} px when resize=False")
        th, tw = h, w
    if (th, tw) != (h, w):
        arr = np.asarray(Image.fromarray(arr).resize((tw, th), resample=Image.BICUBIC))
    return bsq.patch_rows(arr, patch_size, merge_size, temporal_patch_size)


# The checkpoint's image-preprocessing settings: its preprocessor_config.json (Qwen2-VL image processor fields)

PREPROCESSOR_CONFIG = "preprocessor_config.json"
_HF_MIN_PIXELS, _HF_MAX_PIXELS, _HF_PATCH_SIZE = 56 * 56, 28 * 28 * 1280, 14  # the transformers class defaults


@dataclass(frozen=True)
class ImageProcessorConfig:
    """How one checkpoint turns an understanding image into vision-tower inputs: resize to the nearest multiples of
    patch_size * merge_size px with H * W in [min_pixels, max_pixels] (aspect kept), then `preprocess_image`.
    Defaults: the released processor (Qwen3-VL's). A checkpoint states its own in `preprocessor_config.json`."""

    min_pixels: int = bsq.MIN_PIXELS
    max_pixels: int = bsq.MAX_PIXELS
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{f.name} must be a positive integer, got {v!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")

    def __call__(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (path, PIL image or array) -> (pixel_values, grid_thw), resized by these settings."""
        return preprocess_image(image, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                                patch_size=self.patch_size, merge_size=self.merge_size,
                                temporal_patch_size=self.temporal_patch_size)

    def check_vision(self, vcfg: "bsq.VisionConfig", where) -> None:
        """The patch geometry must be the vision tower's (ValueError naming `where` and the field)."""
        for mine, theirs in (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                             ("temporal_patch_size", "temporal_patch_size")):
            if getattr(self, mine) != getattr(vcfg, theirs):
                raise ValueError(f"{where}: {mine} {getattr(self, mine)} differs from the vision config's {theirs} "
                                 f"{getattr(vcfg, theirs)}")

    def to_dict(self) -> dict:
        """The preprocessor_config.json of a released checkpoint (Qwen2-VL image processor fields). min_pixels /
        max_pixels repeat `size`: transformers' slow Qwen2VLImageProcessor reads only those."""
        return {"image_processor_type": "Qwen2VLImageProcessorFast", "do_resize": True, "resample": 3,
                "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
                "min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "patch_size": self.patch_size,
                "temporal_patch_size": self.temporal_patch_size, "merge_size": self.merge_size,
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}

    @classmethod
    def from_dict(cls, d: dict, where) -> "ImageProcessorConfig":
        """A preprocessor_config.json's contents, read as transformers' Qwen2VLImageProcessorFast reads them:
        `size` {shortest_edge, longest_edge} in pixels, overridden by top-level min_pixels / max_pixels; a missing
        field takes that class's default (then patch_size is 14 and image_mean CLIP's: refused below). Fields this
        implementation does not follow (no resize, other rescaling or normalisation, non-bicubic resampling) are
        refused. ValueError naming `where` and the field."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        lo, hi = _pixel_bounds(d, where)
        _refuse_unsupported(d, where)
        return cls(min_pixels=lo, max_pixels=hi,
                   patch_size=_positive(where, "patch_size", d.get("patch_size", _HF_PATCH_SIZE)),
                   temporal_patch_size=_positive(where, "temporal_patch_size", d.get("temporal_patch_size", 2)),
                   merge_size=_positive(where, "merge_size", d.get("merge_size", 2)))


def _positive(where, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{where}: {name} must be a positive integer, got {v!r}")
    return v


def _pixel_bounds(d: dict, where) -> tuple[int, int]:
    """(min_pixels, max_pixels) of a preprocessor_config.json: `size`, overridden by the top-level fields."""
    size = d.get("size")
    lo, hi = _HF_MIN_PIXELS, _HF_MAX_PIXELS
    if size is not None:
        if not isinstance(size, dict) or "shortest_edge" not in size or "longest_edge" not in size:
            raise ValueError(f"{where}: size must be an object with shortest_edge and longest_edge (pixels), got "
                             f"{size!r}")
        lo = _positive(where, "size.shortest_edge", size["shortest_edge"])
        hi = _positive(where, "size.longest_edge", size["longest_edge"])
    if d.get("min_pixels") is not None:
        lo = _positive(where, "min_pixels", d["min_pixels"])
    if d.get("max_pixels") is not None:
        hi = _positive(where, "max_pixels", d["max_pixels"])
    if lo > hi:
        raise ValueError(f"{where}: min_pixels / size.shortest_edge {lo} > max_pixels / size.longest_edge {hi}")
    return lo, hi


def _refuse_unsupported(d: dict, where) -> None:
    """Resizing, rescaling and normalising other than the released processor's: ValueError naming the field."""
    supported = {"do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "resample": 3}
    for name, want in supported.items():
        if name in d and d[name] is not None and d[name] != want:
            raise ValueError(f"{where}: {name} {d[name]!r} is not supported (only {want!r})")
    if d.get("rescale_factor") is not None and (isinstance(d["rescale_factor"], bool) or not isinstance(
            d["rescale_factor"], (int, float)) or not math.isclose(d["rescale_factor"], 1 / 255)):
        raise ValueError(f"{where}: rescale_factor {d['rescale_factor']!r} is not supported (only 1/255)")
    for name in ("image_mean", "image_std"):
        v = d.get(name)
        if v is None:
            raise ValueError(f"{where}: {name} is missing (the image processor's default is CLIP's); only "
                             "[0.5, 0.5, 0.5] is supported")
        if not (v == 0.5 or (isinstance(v, list) and len(v) == 3 and all(x == 0.5 for x in v))):
            raise ValueError(f"{where}: {name} {v!r} is not supported (only [0.5, 0.5, 0.5])")


# ---------------------------------------------------------------------------------------------------------------------
# The arguments a person gives, checked (model.py and decoder.py only assert what these make sure of)
# ---------------------------------------------------------------------------------------------------------------------


def check_sampling(cfg_scale: float, temperature: float) -> None:
    if cfg_scale < 1.0 or not math.isfinite(cfg_scale):
        raise ValueError(f"cfg must be >= 1 (1 = no guidance), got {cfg_scale}")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be > 0, got {temperature}")


def check_generation_args(model: UniAR, prefix_len: int, ar_height: int, ar_width: int, cfg_scale: float,
                          temperature: float) -> tuple[int, int]:
    """The AR size (positive multiples of the token size), the sampling settings and the position budget of a
    prompt of prefix_len tokens -> the token grid (gh, gw)."""
    ds = model.cfg.downsample
    if ar_height <= 0 or ar_width <= 0 or ar_height % ds or ar_width % ds:
        raise ValueError(f"AR size {ar_height}x{ar_width} must be positive multiples of {ds} px")
    check_sampling(cfg_scale, temperature)
    gh, gw = ar_height // ds, ar_width // ds
    budget = model.cfg.text.max_position_embeddings
    if prefix_len + gh * gw > budget:
        raise ValueError(f"prompt of {prefix_len} tokens + {gh * gw} image tokens exceeds the position budget "
                         f"max_position_embeddings={budget}")
    return gh, gw


def check_prefix_images(model: UniAR, input_ids, pixel_values, image_grid_thw) -> int:
    """Placeholders and pixels must come together; returns the number of image placeholders."""
    n = int((input_ids == model.cfg.image_token_id).sum())
    if pixel_values is None:
        if n:
            raise ValueError(f"input_ids contain {n} image tokens (id {model.cfg.image_token_id}) "
                             "but no pixel_values were given")
        if image_grid_thw is not None:
            raise ValueError("image_grid_thw given without pixel_values")
    else:
        if image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw")
        if n == 0:
            raise ValueError("pixel_values given but input_ids hold no image placeholders (an image where "
                             "none is expected)")
    return n


def check_generation_batch(model: UniAR, ids, mask, ar_height: int, ar_width: int, cfg_scale: float,
                           pixel_values=None, image_grid_thw=None) -> None:
    """A tokenized generation batch (ids, mask (B_all, Lp), left padded; [cond; uncond] rows when cfg_scale > 1)
    fits the AR size, the position budget and its images: what model.generate_image assumes."""
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} != prefix_ids {tuple(ids.shape)}")
    check_generation_args(model, ids.shape[1], ar_height, ar_width, 1.0, 1.0)
    if cfg_scale > 1.0 and ids.shape[0] % 2:
        raise ValueError(f"with cfg > 1 the batch must be [cond; uncond] rows, got an odd {ids.shape[0]} rows")
    check_prefix_images(model, ids, pixel_values, image_grid_thw)


def check_answer_args(model: UniAR, prompt_len: int, max_new_tokens: int, temperature: float) -> None:
    """Understanding: a temperature >= 0 and room in the position budget for the prompt and the answer."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    budget = model.cfg.text.max_position_embeddings
    if prompt_len + max_new_tokens > budget:
        raise ValueError(f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the position budget "
                         f"max_position_embeddings={budget}")


def read_context(ctx: Context, ids: list, images: Sequence = ()) -> torch.Tensor:
    """Context.read, refused (ValueError) when the tokens would take positions beyond the position budget."""
    _, nxt = row_positions(ids, iter([g for _, g in images]), ctx.next_pos, ctx.model.cfg)
    budget = ctx.model.cfg.text.max_position_embeddings
    if nxt > budget:
        raise ValueError(f"the conversation needs position {nxt}, beyond max_position_embeddings={budget}")
    return ctx.read(ids, images)


def output_size(ar_height: int, ar_width: int, upsampling_ratio: float, unit: int,
                max_grid: int | None = None) -> tuple[int, int]:
    """The decoder's output size for an AR size and upsampling ratio, checked: ratio in [1, 2], sides multiples of
    16 and of `unit` (pixels per transformer token: VAE scale x patch size), at most `max_grid` tokens a side (the
    position table). Needs only the configs, so sample.py checks its flags with it before loading anything."""
    if not 1.0 <= upsampling_ratio <= 2.0:  # also rejects NaN
        raise ValueError(f"upsampling_ratio must be in [1, 2], got {upsampling_ratio}")
    H, W = D.output_size(ar_height, ar_width, upsampling_ratio)
    if H % 16 or W % 16 or H % unit or W % unit:
        raise ValueError(f"output size {H}x{W} (AR {ar_height}x{ar_width} x {upsampling_ratio}) must be a "
                         f"multiple of {math.lcm(16, unit)}")
    if max_grid is not None and max(H, W) > max_grid * unit:
        raise ValueError(f"output size {H}x{W} (AR {ar_height}x{ar_width} x {upsampling_ratio}) exceeds the "
                         f"decoder's largest side {max_grid * unit} px (pos_embed_max_size {max_grid} x {unit} px)")
    return H, W


def decoder_output_size(dec: "D.Decoder", ar_height: int, ar_width: int, upsampling_ratio: float) -> tuple[int, int]:
    """`output_size` for this decoder's token size and position table."""
    return output_size(ar_height, ar_width, upsampling_ratio, dec.unit, dec.transformer.cfg.pos_embed_max_size)


def check_decode_args(dec: "D.Decoder", bits: torch.Tensor, ar_height: int, ar_width: int, upsampling_ratio: float,
                      steps: int, noise: torch.Tensor | None, output: str) -> tuple[int, int]:
    """Decoder.decode's arguments checked before any work -> the output size (H, W); a ValueError naming the
    argument. bits: (B, N, L, U, d) bits or int64 indices (B, N, L, U)."""
    H, W = decoder_output_size(dec, ar_height, ar_width, upsampling_ratio)
    vc = dec.vision.cfg
    unit = vc.patch_size * vc.spatial_merge_size
    if ar_height <= 0 or ar_width <= 0 or ar_height % unit or ar_width % unit:
        raise ValueError(f"AR size {ar_height}x{ar_width} must be positive multiples of {unit}")
    bits = D.as_bits(bits, vc)
    N, L, U, d = D.bits_shape(vc, ar_height, ar_width)
    if bits.dim() != 5 or tuple(bits.shape[1:]) != (N, L, U, d):
        raise ValueError(f"bits must be (B, N={N}, levels={L}, merge_unit={U}, bsq_dim={d}) for a {ar_height}x"
                         f"{ar_width} AR image (or int64 indices (B, N, L, U)), got {tuple(bits.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    want = (bits.shape[0], dec.transformer.cfg.in_channels, H // dec.scale, W // dec.scale)
    if noise is not None and tuple(noise.shape) != want:
        raise ValueError(f"noise must be {want}, got {tuple(noise.shape)}")
    if output not in ("uint8", "float"):
        raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
    return H, W


def decode_bits(dec: "D.Decoder", bits: torch.Tensor, ar_height: int, ar_width: int, *, upsampling_ratio: float = 2.0,
                steps: int = 28, guidance: float = 1.5, seed=0, noise: torch.Tensor | None = None,
                output: str = "uint8", progress: bool = False) -> torch.Tensor:
    """Bits -> images with the diffusion decoder (`Decoder.decode`), its arguments checked first
    (`check_decode_args`)."""
    check_decode_args(dec, bits, ar_height, ar_width, upsampling_ratio, steps, noise, output)
    return dec.decode(bits, ar_height, ar_width, upsampling_ratio=upsampling_ratio, steps=steps, guidance=guidance,
                      seed=seed, noise=noise, output=output, progress=progress)


# ---------------------------------------------------------------------------------------------------------------------
# High-level API (sample.py)
# ---------------------------------------------------------------------------------------------------------------------


def sample_seed(seed: int, idx: int, k: int = 0) -> int:
    """The seed of sample k of prompt idx in a run seeded `seed` (generate_bits / Decoder.decode take a list of them):
    an image then depends on (seed, idx, k) only, not on its batch or process."""
    a, b = np.random.SeedSequence([seed, idx, k]).generate_state(2, np.uint32)
    return (int(a) << 32) | int(b)


def _generator(seed, device):
    """None, one generator (the same stream as torch.manual_seed(seed) right before the call), or with a list of
    seeds one generator per image."""
    if isinstance(seed, (list, tuple)):
        return [torch.Generator(device=device).manual_seed(int(s)) for s in seed]
    return None if seed is None else torch.Generator(device=device).manual_seed(int(seed))


def build_generation_batch(model: UniAR, tokenizer: Tokenizer, prompts: Sequence[str], ar_height: int, ar_width: int,
                           cfg_scale: float, input_images=None):
    """Render + tokenize [cond prompts; empty prompts (if cfg_scale > 1)], left padded. With input images (edit),
    every row carries its image (resized to the AR size), guidance drops the text only.
    Returns ids, mask, pixel_values or None, image_grid_thw or None."""
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    gh, gw = check_generation_args(model, 0, ar_height, ar_width, cfg_scale, 1.0)
    rows = list(prompts) + ([""] * len(prompts) if cfg_scale > 1.0 else [])
    if input_images is None:
        texts = [render_generation_prompt(p, gh, gw) for p in rows]
        ids, mask = tokenizer.batch(texts)
        return ids, mask, None, None
    if len(input_images) != len(prompts):
        raise ValueError(f"{len(input_images)} input images for {len(prompts)} prompts")
    v = model.cfg.vision
    pre = [preprocess_image(im, size=(ar_height, ar_width), patch_size=v.patch_size,
                            merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size)
           for im in input_images]
    pre = pre + (pre if cfg_scale > 1.0 else [])
    texts = [render_generation_prompt(p, gh, gw, int(g[0].prod()) // v.merge_unit) for p, (_, g) in zip(rows, pre)]
    ids, mask = tokenizer.batch(texts)
    return ids, mask, torch.cat([pv for pv, _ in pre]), torch.cat([g for _, g in pre])


def make_sampler(sampler: str, cfg_scale: float, temperature: float, seed, device):
    """"multinomial" (the official draw; seed: None, an int, or one per image) or "kernel" (one counter stream)."""
    if sampler == "multinomial":
        check_sampling(cfg_scale, temperature)
        return MultinomialSampler(cfg_scale, temperature, _generator(seed, device))
    if sampler == "kernel":
        if isinstance(seed, (list, tuple)):
            raise ValueError("per-image seeds need sampler='multinomial' (the kernel draws one counter stream)")
        check_sampling(cfg_scale, temperature)
        return KernelSampler(cfg_scale, temperature, int(torch.randint(2**31 - 1, (1,),
                                                                       generator=_generator(seed, device))))
    raise ValueError(f"sampler must be 'multinomial' or 'kernel', got {sampler!r}")


def generate_bits(model: UniAR, tokenizer: Tokenizer, prompts, *, ar_height: int = 512, ar_width: int = 512,
                  cfg_scale: float = 1.5, temperature: float = 1.0, seed=None, input_images=None,
                  progress: bool = False, sampler: str = "multinomial") -> torch.Tensor:
    """Prompts (strings, or a (ids, mask) pair already in [cond; uncond] layout) -> bits (B, N, L, U, d) int64.
    seed: one int for the batch, or a list of B ints (one stream per image: the same image in any batch)."""
    dev = next(model.parameters()).device
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, tuple) and len(prompts) == 2 and isinstance(prompts[0], torch.Tensor):
        ids, mask = prompts
        pv = grid = None
    else:
        ids, mask, pv, grid = build_generation_batch(model, tokenizer, prompts, ar_height, ar_width, cfg_scale,
                                                     input_images)
    bit_sampler = make_sampler(sampler, cfg_scale, temperature, seed, dev)
    check_generation_batch(model, ids, mask, ar_height, ar_width, cfg_scale, pv, grid)
    out = generate_image(model, ids.to(dev), mask.to(dev), ar_height, ar_width, bit_sampler,
                         pixel_values=None if pv is None else pv.to(dev), image_grid_thw=grid, progress=progress)
    return out.bits


NO_IMAGE_PROCESSOR = (f"has no {PREPROCESSOR_CONFIG} (the image processor's settings: size.shortest_edge / "
                      "longest_edge in pixels, patch_size, merge_size, temporal_patch_size), so it cannot preprocess "
                      "an image to answer about; add the file to the checkpoint folder")


def image_processor(model: UniAR) -> ImageProcessorConfig:
    """The model's understanding-image preprocessing (its checkpoint's preprocessor_config.json); ValueError when
    the checkpoint states none (the official loader then has no image processor either)."""
    proc = model.image_processor
    if proc is None:
        raise ValueError(f"this checkpoint {NO_IMAGE_PROCESSOR}")
    proc.check_vision(model.cfg.vision, PREPROCESSOR_CONFIG)
    return proc


def understanding_inputs(model: UniAR, images) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Images -> (pixel_values, grid_thw, image tokens per image), resized by the model's image_processor: the one
    preprocessing of answer(), train.py's evaluation and sample.py."""
    proc = image_processor(model)
    pre = [proc(im) for im in images]
    grid = torch.cat([g for _, g in pre])
    return torch.cat([pv for pv, _ in pre]), grid, [int(g.prod()) // model.cfg.vision.merge_unit for g in grid]


def answer(model: UniAR, tokenizer: Tokenizer, image, question: str, *, max_new_tokens: int = 256,
           temperature: float = 0.0, seed: Optional[int] = None) -> str:
    """Understanding: image (PIL / uint8 array / path, or None) + question -> answer text (greedy by default). The
    image is resized as the checkpoint's preprocessor_config.json says (`model.image_processor`)."""
    dev = next(model.parameters()).device
    pv = grid = n_img = None
    if image is not None:
        pv, grid, (n_img,) = understanding_inputs(model, [image])
        pv = pv.to(dev)
    ids, mask = tokenizer.batch([render_chat_prompt(question, n_img)])
    check_answer_args(model, ids.shape[1], max_new_tokens, temperature)
    new = generate_text(model, ids.to(dev), mask.to(dev), pv, grid, max_new_tokens=max_new_tokens,
                        stop_ids=tokenizer.end_ids, temperature=temperature,
                        generator=_generator(seed, dev))
    return tokenizer.decode(new[0])


class Conversation:
    """A chat with the model in one shared context (`Context`): user text and pictures in, answers and drawn images
    out. Every image stays in the context as bits, so a later turn reads the model's own drawing as it was sampled,
    without decoding it to pixels and encoding it again. Turns use the released chat format (render_user_turn,
    render_model_text, render_model_image): a drawing is the generation template's turn, an answer Qwen's.

    Guidance of a drawing reads an unconditional context: the conversation up to the start of the user's turn
    (every earlier turn and image), then that turn with its text removed and its picture kept, as the editing
    template's unconditional row. It is a copy of the context made for the drawing and dropped after it."""

    def __init__(self, model: UniAR, tokenizer: Tokenizer):
        self.model, self.tok = model, tokenizer
        self.ctx = Context(model)

    def picture(self, image, size=None) -> tuple:
        """A user's picture -> (bits (M, L, U, d), patch grid, tokens): resized by the checkpoint's image processor
        for a question, to the AR size for an edit (`size`), as the single-turn paths do."""
        v, dev = self.model.cfg.vision, self.ctx.dev
        if size is None:
            pv, grid, (n,) = understanding_inputs(self.model, [image])
        else:
            pv, grid = preprocess_image(image, size=size, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                        temporal_patch_size=v.temporal_patch_size)
            n = int(grid[0].prod()) // v.merge_unit
        with torch.no_grad():
            bits = self.model.visual.encode_bits(pv.to(dev, self.ctx.dtype), grid)
        return bits, tuple(int(x) for x in grid[0]), n

    def ask(self, text: str, image=None, *, max_new_tokens: int = 256, temperature: float = 0.0,
            seed: Optional[int] = None) -> str:
        """A user turn (text, and a picture if given), then the model's answer, read into the context as it is
        written. -> the answer text."""
        pic = [] if image is None else [self.picture(image)]
        ids = self.tok.encode(join(render_user_turn(text, pic[0][2] if pic else None), MODEL_TURN))
        h = read_context(self.ctx, ids, [(b, g) for b, g, _ in pic])
        gen, end = _generator(seed, self.ctx.dev), self.tok.token_id(IM_END)
        out = []
        for _ in range(max_new_tokens):
            out.append(int(text_step(self.model, h, temperature, gen)[0]))
            h = read_context(self.ctx, out[-1:])
            if out[-1] in self.tok.end_ids:
                break
        read_context(self.ctx, ([] if out and out[-1] == end else [end]) + self.tok.encode("\n"))  # the turn closed
        return self.tok.decode(out)

    def draw(self, text: str, image=None, *, ar_height: int = 512, ar_width: int = 512, cfg_scale: float = 1.5,
             temperature: float = 1.0, seed=None, progress: bool = False, sampler=None) -> torch.Tensor:
        """A user turn asking for an image (a prompt, or an instruction about the images before it and the picture
        if given), then the model draws it into the context. `sampler`: another sampler than the official
        multinomial draw with cfg_scale / temperature / seed. -> bits (1, N, L, U, d)."""
        gh, gw = check_generation_args(self.model, self.ctx.length, ar_height, ar_width, cfg_scale, temperature)
        pic = [] if image is None else [self.picture(image, (ar_height, ar_width))]
        images, n = [(b, g) for b, g, _ in pic], pic[0][2] if pic else None
        opened = MODEL_TURN + VISION_START
        contexts = [self.ctx]
        if cfg_scale > 1.0:
            contexts.append(self.ctx.fork(self.ctx.length))
            read_context(contexts[1], self.tok.encode(join(render_user_turn("", n, (gh, gw)), opened)), images)
        read_context(self.ctx, self.tok.encode(join(render_user_turn(text, n, (gh, gw)), opened)), images)
        if sampler is None:
            sampler = MultinomialSampler(cfg_scale, temperature, _generator(seed, self.ctx.dev))
        bits = draw(contexts, gh, gw, sampler, progress)
        read_context(self.ctx, self.tok.encode(VISION_END + IM_END + "\n"))  # the template's tokens: the turn closed
        return bits[None]


def to_pixels(images: np.ndarray, vcfg: bsq.VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, S, 3) uint8 -> pixel_values (B * Np, patch_dim), grid_thw (B, 3), the processor's layout."""
    out = [preprocess_image(im, resize=False, patch_size=vcfg.patch_size, merge_size=vcfg.spatial_merge_size,
                            temporal_patch_size=vcfg.temporal_patch_size) for im in images]
    return torch.cat([p for p, _ in out]), torch.cat([g for _, g in out])
