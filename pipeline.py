"""The boundary between people and the model: the checkpoint's tokenizer, the chat templates, pictures in, and the
high-level calls (`generate_bits`, `answer`, `Conversation`) that sample.py, train.py and rl.py use. Everything a
person types or hands over is checked here and becomes token ids, bits and tensors for the math in `model.py`.

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
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer

import bsq
from model import (Context, MultinomialSampler, KernelSampler, UniAR, check_generation_args, draw, generate_image,
                   generate_text, text_step)

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
    pre = [bsq.preprocess_image(im, size=(ar_height, ar_width), patch_size=v.patch_size,
                                merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size)
           for im in input_images]
    pre = pre + (pre if cfg_scale > 1.0 else [])
    texts = [render_generation_prompt(p, gh, gw, int(g[0].prod()) // v.merge_unit) for p, (_, g) in zip(rows, pre)]
    ids, mask = tokenizer.batch(texts)
    return ids, mask, torch.cat([pv for pv, _ in pre]), torch.cat([g for _, g in pre])


def make_sampler(sampler: str, cfg_scale: float, temperature: float, seed, device):
    """"multinomial" (the official draw; seed: None, an int, or one per image) or "kernel" (one counter stream)."""
    if sampler == "multinomial":
        return MultinomialSampler(cfg_scale, temperature, _generator(seed, device))
    if sampler == "kernel":
        if isinstance(seed, (list, tuple)):
            raise ValueError("per-image seeds need sampler='multinomial' (the kernel draws one counter stream)")
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
    out = generate_image(model, ids.to(dev), mask.to(dev), ar_height, ar_width,
                         make_sampler(sampler, cfg_scale, temperature, seed, dev),
                         pixel_values=None if pv is None else pv.to(dev), image_grid_thw=grid, progress=progress)
    return out.bits


NO_IMAGE_PROCESSOR = (f"has no {bsq.PREPROCESSOR_CONFIG} (the image processor's settings: size.shortest_edge / "
                      "longest_edge in pixels, patch_size, merge_size, temporal_patch_size), so it cannot preprocess "
                      "an image to answer about; add the file to the checkpoint folder")


def image_processor(model: UniAR) -> bsq.ImageProcessorConfig:
    """The model's understanding-image preprocessing (its checkpoint's preprocessor_config.json); ValueError when
    the checkpoint states none (the official loader then has no image processor either)."""
    proc = model.image_processor
    if proc is None:
        raise ValueError(f"this checkpoint {NO_IMAGE_PROCESSOR}")
    proc.check_vision(model.cfg.vision, bsq.PREPROCESSOR_CONFIG)
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
            pv, grid = bsq.preprocess_image(image, size=size, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
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
        h = self.ctx.read(ids, [(b, g) for b, g, _ in pic])
        gen, end = _generator(seed, self.ctx.dev), self.tok.token_id(IM_END)
        out = []
        for _ in range(max_new_tokens):
            out.append(int(text_step(self.model, h, temperature, gen)[0]))
            h = self.ctx.read(out[-1:])
            if out[-1] in self.tok.end_ids:
                break
        self.ctx.read(([] if out and out[-1] == end else [end]) + self.tok.encode("\n"))  # the turn closed
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
            contexts[1].read(self.tok.encode(join(render_user_turn("", n, (gh, gw)), opened)), images)
        self.ctx.read(self.tok.encode(join(render_user_turn(text, n, (gh, gw)), opened)), images)
        if sampler is None:
            sampler = MultinomialSampler(cfg_scale, temperature, _generator(seed, self.ctx.dev))
        bits = draw(contexts, gh, gw, sampler, progress)
        self.ctx.read(self.tok.encode(VISION_END + IM_END + "\n"))  # the template's tokens: the turn closed
        return bits[None]


def to_pixels(images: np.ndarray, vcfg: bsq.VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, S, 3) uint8 -> pixel_values (B * Np, patch_dim), grid_thw (B, 3), the processor's layout."""
    out = [bsq.preprocess_image(im, resize=False, patch_size=vcfg.patch_size, merge_size=vcfg.spatial_merge_size,
                                temporal_patch_size=vcfg.temporal_patch_size) for im in images]
    return torch.cat([p for p, _ in out]), torch.cat([g for _, g in out])
