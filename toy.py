"""The toy world: procedural scenes, captions, edits, questions, a GenEval-style evaluator and a word-level tokenizer.

This is the data and the measuring stick for training the whole system on a laptop (train.py, rl.py). It stands in
for the paper's web-scale image/text data (Sec. 4.1) and for GenEval (Sec. 4.2): the released model was never trained
on it. Everything is numpy drawing, deterministic by (seed, split, index), with no downloads.

Scene grammar (chosen so that the evaluator reads it exactly and the AR model learns it in minutes):
  - an S x S RGB image (S a multiple of 32, default 64 = a 2x2 grid of AR tokens, one token per 32x32 px) on a black
    background, split into four quadrants: top left, top right, bottom left, bottom right;
  - one or two objects, each filling the centre of its own quadrant (3/4 of the quadrant's side: 24 px at S=64);
  - colour from a palette of 5 well-separated colours, shape from {square, circle, triangle}; the two objects of a
    scene differ in (colour, shape).
  - HELDOUT_OBJECTS: (colour, shape, quadrant) combinations that no "train" image, caption, instruction or question
    ever contains: each of the 15 colour-shape pairs is held out in one quadrant (it is seen in the three others);
    the "heldout" split has at least one of them in every example. (Holding out whole colour-shape pairs instead is
    harder than this toy model learns in a laptop-sized run.)

Letters: S image side in px, N batch size, Q = S // 2 quadrant side.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------------------------------
# World
# ---------------------------------------------------------------------------------------------------------------------

PALETTE = {  # far apart in RGB and from the background: a blurred or noisy decode still lands nearest the right one
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 50),
    "purple": (170, 60, 210),
}
BACKGROUND = (0, 0, 0)
COLORS = tuple(PALETTE)
SHAPES = ("square", "circle", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
HELDOUT_OBJECTS = frozenset((c, s, POSITIONS[k % len(POSITIONS)])
                            for k, (c, s) in enumerate((c, s) for c in COLORS for s in SHAPES))
COUNT_WORDS = ("zero", "one", "two")
ANSWERS = COLORS + SHAPES + ("one", "two", "yes", "no")
SPLITS = ("train", "heldout")
OBJECT_FRACTION = 0.75  # object side / quadrant side


class Obj(NamedTuple):
    color: str
    shape: str
    pos: str


Scene = tuple  # tuple[Obj, ...] sorted by position index, so equal scenes compare equal


def make_scene(objs: Sequence) -> Scene:
    """Validate and canonicalise a list of (color, shape, pos) into a Scene."""
    out = []
    for o in objs:
        o = Obj(*o)
        if o.color not in PALETTE or o.shape not in SHAPES or o.pos not in POSITIONS:
            raise ValueError(f"bad object {tuple(o)}: color in {COLORS}, shape in {SHAPES}, pos in {POSITIONS}")
        out.append(o)
    if len({o.pos for o in out}) != len(out):
        raise ValueError(f"two objects share a quadrant in {out}")
    return tuple(sorted(out, key=lambda o: POSITIONS.index(o.pos)))


def is_heldout(scene: Scene) -> bool:
    return any(tuple(o) in HELDOUT_OBJECTS for o in scene)


def _check_size(size: int) -> int:
    if size % 32 or size < 64:
        raise ValueError(f"image size {size} must be a multiple of 32 and >= 64 (one AR token covers 32x32 px)")
    return int(size)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    return split


def _split_ok(scenes: Sequence[Scene], split: str) -> bool:
    held = any(is_heldout(s) for s in scenes)
    return held if split == "heldout" else not held


_MASKS: dict = {}


def shape_mask(shape: str, q: int) -> np.ndarray:
    """(Q, Q) bool: the shape centred in a quadrant of side Q (cached)."""
    key = (shape, q)
    if key not in _MASKS:
        s = OBJECT_FRACTION * q
        c = (q - 1) / 2
        yy, xx = np.mgrid[0:q, 0:q].astype(np.float64)
        if shape == "square":
            m = (np.abs(yy - c) <= s / 2 - 0.5) & (np.abs(xx - c) <= s / 2 - 0.5)
        elif shape == "circle":
            m = (yy - c) ** 2 + (xx - c) ** 2 <= (s / 2) ** 2
        elif shape == "triangle":  # apex up, base at the bottom
            top, bot = c - s / 2, c + s / 2
            half = (yy - top) / s * (s / 2)
            m = (yy >= top) & (yy <= bot) & (np.abs(xx - c) <= half)
        else:
            raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
        _MASKS[key] = m
    return _MASKS[key]


def _quadrant(pos: str, size: int) -> tuple:
    q = size // 2
    i = POSITIONS.index(pos)
    return slice((i // 2) * q, (i // 2 + 1) * q), slice((i % 2) * q, (i % 2 + 1) * q)


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """Scene -> (S, S, 3) uint8, a fresh array. The world has about 1400 scenes: each is drawn once and kept, up to
    64 MB of drawings (all of them at 64 px; the first hundred at 480 px)."""
    key = (tuple(scene), _check_size(size))
    img = _DRAWN.get(key)
    if img is None:
        img = _draw(*key)
        if sum(v.nbytes for v in _DRAWN.values()) + img.nbytes <= 64 << 20:
            _DRAWN[key] = img
    return img.copy()


_DRAWN: dict = {}


def _draw(scene: Scene, size: int) -> np.ndarray:
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    for o in scene:
        ys, xs = _quadrant(o.pos, size)
        img[ys, xs][shape_mask(o.shape, size // 2)] = PALETTE[o.color]
    return img


# ---------------------------------------------------------------------------------------------------------------------
# Text: captions, instructions, questions
# ---------------------------------------------------------------------------------------------------------------------

def caption(scene: Scene) -> str:
    """'a red circle at the top left and a blue square at the bottom right'."""
    return " and ".join(f"a {o.color} {o.shape} at the {o.pos}" for o in scene)


_OBJ_RE = r"a (\w+) (\w+) at the (top left|top right|bottom left|bottom right)"


def parse_caption(text: str) -> Scene:
    """Inverse of caption(); raises ValueError on text outside the grammar."""
    parts = text.strip().rstrip(".").lower().split(" and ")
    objs = []
    for p in parts:
        m = re.fullmatch(_OBJ_RE, p.strip())
        if m is None:
            raise ValueError(f"caption {text!r}: {p!r} is not 'a <color> <shape> at the <position>'")
        objs.append(m.groups())
    return make_scene(objs)


def _others(scene: Scene, obj: Obj) -> list:
    return [o for o in scene if o != obj]


def apply_edit(scene: Scene, instruction: str) -> Scene:
    """Parse an editing instruction and apply it to a scene (the ground truth the edit scorer compares against)."""
    t = instruction.strip().rstrip(".").lower()
    refs = {f"{o.color} {o.shape}": o for o in scene}

    def ref(name):
        if name not in refs:
            raise ValueError(f"instruction {instruction!r}: no {name} in the scene {caption(scene)!r}")
        return refs[name]

    if m := re.fullmatch(r"make the (\w+ \w+) (\w+)", t):
        o = ref(m[1])
        return make_scene(_others(scene, o) + [o._replace(color=m[2])])
    if m := re.fullmatch(r"move the (\w+ \w+) to the (top left|top right|bottom left|bottom right)", t):
        o = ref(m[1])
        return make_scene(_others(scene, o) + [o._replace(pos=m[2])])
    if m := re.fullmatch(r"remove the (\w+ \w+)", t):
        return make_scene(_others(scene, ref(m[1])))
    if m := re.fullmatch(_OBJ_RE.replace("a (", "add a (", 1), t):
        return make_scene(list(scene) + [m.groups()])
    raise ValueError(f"instruction {instruction!r} is not one of: make the <c> <s> <color> | move the <c> <s> to the "
                     "<position> | remove the <c> <s> | add a <color> <shape> at the <position>")


# ---------------------------------------------------------------------------------------------------------------------
# Samplers (deterministic by seed, split, index)
# ---------------------------------------------------------------------------------------------------------------------

_KIND = {"t2i": 1, "edit": 2, "qa": 3, "eval": 4, "conv": 5, "convq": 6}


def _rng(kind: str, split: str, index: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _KIND[kind], SPLITS.index(_check_split(split)), int(index)])


def _random_scene(rng: np.random.Generator, n: Optional[int] = None) -> Scene:
    n = int(rng.integers(1, 3)) if n is None else n
    pos = rng.choice(4, n, replace=False)
    while True:
        pairs = [(COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]) for _ in range(n)]
        if len(set(pairs)) == n:
            return make_scene([(c, s, POSITIONS[p]) for (c, s), p in zip(pairs, pos)])


def sample_scene(rng: np.random.Generator, split: str = "train", n_objects: Optional[int] = None) -> Scene:
    """A scene of the split: 'train' has no held-out pair, 'heldout' at least one (rejection sampling)."""
    _check_split(split)
    while True:
        s = _random_scene(rng, n_objects)
        if _split_ok([s], split):
            return s


def sample_edit(rng: np.random.Generator, split: str = "train", source: Optional[Scene] = None) -> tuple:
    """-> (source scene, instruction, target scene); both scenes (and the text) respect the split. `source`: edit this
    scene instead of a random one."""
    _check_split(split)
    while True:
        src = _random_scene(rng) if source is None else source
        op = ("recolor", "move", "remove", "add")[rng.integers(4)]
        o = src[rng.integers(len(src))]
        name = f"{o.color} {o.shape}"
        free = [p for p in POSITIONS if p not in {x.pos for x in src}]
        if op == "recolor":
            instr = f"make the {name} {COLORS[rng.integers(len(COLORS))]}"
        elif op == "move":
            instr = f"move the {name} to the {free[rng.integers(len(free))]}"
        elif op == "remove":
            if len(src) < 2:
                continue
            instr = f"remove the {name}"
        else:
            if len(src) > 1:
                continue
            instr = (f"add a {COLORS[rng.integers(len(COLORS))]} {SHAPES[rng.integers(len(SHAPES))]} at the "
                     f"{free[rng.integers(len(free))]}")
        try:
            tgt = apply_edit(src, instr)
        except ValueError:  # e.g. two objects share a quadrant
            continue
        if tgt == src or len({(x.color, x.shape) for x in tgt}) != len(tgt):
            continue
        if _split_ok([src, tgt], split):
            return src, instr, tgt


# Question kinds: colour at a position, shape at a position, count, colour of a shape, is there. Training asks about
# positions more often: binding a position word to the right image token is the skill the toy model learns last, and
# conversations (images at varying places in the context) make it harder. "Is there a <colour> <shape>?" comes next:
# binding a colour to a shape in a held-out combination; half its "no" questions (where the scene has two shapes) pair
# one object's colour with the other's shape. The held-out sets draw kinds, colours and shapes uniformly.
TRAIN_QUESTION_KINDS = (0.3, 0.3, 0.1, 0.1, 0.2)


def sample_question(rng: np.random.Generator, scene: Scene, split: str = "train") -> tuple:
    """-> (question, one-word answer) about a scene; in 'train' the text never names a held-out pair."""
    while True:
        kind = rng.choice(5, p=TRAIN_QUESTION_KINDS) if split == "train" else rng.integers(5)
        o = scene[rng.integers(len(scene))]
        if kind == 0:
            return f"what color is the object at the {o.pos}?", o.color
        if kind == 1:
            return f"what shape is at the {o.pos}?", o.shape
        if kind == 2:
            if len(scene) >= len(COUNT_WORDS):  # a drawing read back with more objects than any toy scene holds
                continue
            return "how many objects?", COUNT_WORDS[len(scene)]
        if kind == 3:
            if sum(x.shape == o.shape for x in scene) > 1:
                continue
            return f"what color is the {o.shape}?", o.color
        if rng.integers(2):
            return f"is there a {o.color} {o.shape}?", "yes"
        others = [x for x in scene if x.shape != o.shape]
        if split == "train" and others and rng.integers(2):  # its colour with another object's shape
            c, s = o.color, others[rng.integers(len(others))].shape
        else:
            c, s = COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
        if any((x.color, x.shape) == (c, s) for x in scene):
            continue
        return f"is there a {c} {s}?", "no"


def empty_scene_question(scene: Scene, rng: np.random.Generator, split: str) -> tuple:
    """sample_question, and for an empty scene (an image the evaluator reads no object in) the count question."""
    return sample_question(rng, scene, split) if scene else ("how many objects?", "zero")


class Turn(NamedTuple):
    """One turn of a toy conversation. A user turn has text and maybe a picture; a model turn is an answer (text) or
    a drawn image (image + the scene it shows)."""
    role: str  # "user" or "model"
    text: str = ""
    image: Optional[np.ndarray] = None  # (S, S, 3) uint8
    scene: Optional[Scene] = None


def conversation_example(index: int, split: str = "train", seed: int = 0, size: int = 64) -> list:
    """A conversation in one shared context: it opens with a drawing (caption -> image) or an edit of the user's
    picture (picture + instruction -> image), then one or two turns about the latest image: a question and its
    answer, or an instruction and the edited image (so draw -> ask -> edit occurs). -> list of Turn."""
    rng = _rng("conv", split, index, seed)
    if rng.integers(2):
        scene = sample_scene(rng, split)
        turns = [Turn("user", caption(scene))]
    else:
        src, instruction, scene = sample_edit(rng, split)
        turns = [Turn("user", instruction, render(src, size), src)]
    turns.append(Turn("model", image=render(scene, size), scene=scene))
    for _ in range(int(rng.integers(1, 3))):
        if rng.integers(2):
            question, answer = sample_question(rng, scene, split)
            turns += [Turn("user", question), Turn("model", answer)]
        else:
            _, instruction, scene = sample_edit(rng, split, source=scene)
            turns += [Turn("user", instruction), Turn("model", image=render(scene, size), scene=scene)]
    return turns


class T2I(NamedTuple):
    image: np.ndarray  # (S, S, 3) uint8
    caption: str
    scene: Scene


class Edit(NamedTuple):
    source: np.ndarray
    instruction: str
    target: np.ndarray
    source_scene: Scene
    target_scene: Scene


class QA(NamedTuple):
    image: np.ndarray
    question: str
    answer: str
    scene: Scene


def t2i_example(index: int, split: str = "train", seed: int = 0, size: int = 64) -> T2I:
    s = sample_scene(_rng("t2i", split, index, seed), split)
    return T2I(render(s, size), caption(s), s)


def edit_example(index: int, split: str = "train", seed: int = 0, size: int = 64) -> Edit:
    src, instr, tgt = sample_edit(_rng("edit", split, index, seed), split)
    return Edit(render(src, size), instr, render(tgt, size), src, tgt)


def qa_example(index: int, split: str = "train", seed: int = 0, size: int = 64) -> QA:
    rng = _rng("qa", split, index, seed)
    s = sample_scene(rng, split)
    q, a = sample_question(rng, s, split)
    return QA(render(s, size), q, a, s)


def t2i_batch(start: int, n: int, split: str = "train", seed: int = 0, size: int = 64) -> tuple:
    """Examples start..start+n-1 -> (images (N, S, S, 3) uint8, captions list[str])."""
    ex = [t2i_example(i, split, seed, size) for i in range(start, start + n)]
    return np.stack([e.image for e in ex]), [e.caption for e in ex]


def edit_batch(start: int, n: int, split: str = "train", seed: int = 0, size: int = 64) -> tuple:
    """-> (sources (N, S, S, 3) uint8, instructions list[str], targets (N, S, S, 3) uint8)."""
    ex = [edit_example(i, split, seed, size) for i in range(start, start + n)]
    return np.stack([e.source for e in ex]), [e.instruction for e in ex], np.stack([e.target for e in ex])


def qa_batch(start: int, n: int, split: str = "train", seed: int = 0, size: int = 64) -> tuple:
    """-> (images (N, S, S, 3) uint8, questions list[str], answers list[str])."""
    ex = [qa_example(i, split, seed, size) for i in range(start, start + n)]
    return np.stack([e.image for e in ex]), [e.question for e in ex], [e.answer for e in ex]


EVAL_SEED = 1234


def heldout_prompts(n: int = 64, seed: int = EVAL_SEED) -> list:
    """The generation prompts of the evaluation: every held-out object alone (15), then two-object held-out scenes
    drawn by seed, n in all. Captions; parse_caption() gives their scenes."""
    singles = [caption(make_scene([o])) for o in sorted(HELDOUT_OBJECTS)]
    out = singles[:n]
    i = 0
    while len(out) < n:
        c = caption(sample_scene(_rng("eval", "heldout", i, seed), "heldout", 2))
        i += 1
        if c not in out:
            out.append(c)
    return out


def conversation_question(index: int, scene: Scene, seed: int = EVAL_SEED) -> tuple:
    """The evaluation's question about the scene the model drew for held-out prompt `index` (read back from its
    decoded image): -> (question, answer)."""
    return empty_scene_question(scene, _rng("convq", "heldout", index, seed), "heldout")


def heldout_edits(n: int = 64, seed: int = EVAL_SEED, size: int = 64) -> list:
    """Editing evaluation set: list of Edit examples of the held-out split."""
    return [edit_example(i, "heldout", seed, size) for i in range(n)]


def heldout_questions(n: int = 64, seed: int = EVAL_SEED, size: int = 64) -> list:
    """Understanding evaluation set: list of QA examples of the held-out split."""
    return [qa_example(i, "heldout", seed, size) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# Evaluator (GenEval-style: read the image back into a scene, compare attribute by attribute)
# ---------------------------------------------------------------------------------------------------------------------

COLOR_TOLERANCE = 0.45  # max RGB distance (in [0,1] units) from a palette colour for a pixel to count as that colour
PRESENCE = 0.12  # min fraction of a quadrant a colour must cover to count as an object (a triangle covers 0.28)


def _to_float(image) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {a.shape}")
    if a.shape[0] != a.shape[1]:
        raise ValueError(f"image must be square, got {a.shape[:2]}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if np.issubdtype(a.dtype, np.floating):
        if a.size and float(a.max()) > 1.5:  # a decoder may overshoot 1 a little; 0..255 floats are a mistake
            raise ValueError(f"float image has max {float(a.max()):.1f}; expected values in [0, 1] (or pass uint8)")
        return np.clip(a.astype(np.float32), 0.0, 1.0)
    raise ValueError(f"image dtype {a.dtype} must be uint8 or float in [0, 1]")


_REF = np.array([BACKGROUND] + [PALETTE[c] for c in COLORS], np.float32) / 255.0  # (1 + colours, 3)


def read_scene(image) -> Scene:
    """Image (S, S, 3) uint8 or float [0,1] -> the scene it shows.

    Per quadrant: each pixel takes the nearest palette colour (or none beyond COLOR_TOLERANCE); the most frequent
    object colour is the object if it covers PRESENCE of the quadrant; its shape is the template (centred on the
    mask's centroid) with the highest IoU."""
    x = _to_float(image)
    q = x.shape[0] // 2
    d = np.linalg.norm(x[:, :, None, :] - _REF[None, None], axis=-1)  # (S, S, 1 + colours)
    lab = d.argmin(-1)
    lab[d.min(-1) > COLOR_TOLERANCE] = -1
    objs = []
    for pos in POSITIONS:
        ys, xs = _quadrant(pos, 2 * q)
        ql = lab[ys, xs]
        counts = np.bincount(ql[ql > 0], minlength=len(_REF))
        k = int(counts.argmax())
        if counts[k] < PRESENCE * q * q:
            continue
        m = ql == k
        best, shape = -1.0, None
        for s in SHAPES:
            t = shape_mask(s, q)
            dy = int(round(np.nonzero(m)[0].mean() - np.nonzero(t)[0].mean()))
            dx = int(round(np.nonzero(m)[1].mean() - np.nonzero(t)[1].mean()))
            t = np.roll(t, (dy, dx), axis=(0, 1))
            iou = (m & t).sum() / max((m | t).sum(), 1)
            if iou > best:
                best, shape = iou, s
        objs.append((COLORS[k - 1], shape, pos))
    return make_scene(objs)


def score_scene(detected: Scene, spec: Scene) -> dict:
    """Per-attribute booleans of a detected scene against the requested one (each over all requested objects):
    object: the requested shape is somewhere in the image; color / shape: the object found in the requested
    quadrant has the requested colour / shape; position: the requested (colour, shape) is in its quadrant;
    count: as many objects as requested; correct: exactly the requested scene (nothing missing, wrong or extra)."""
    at = {d.pos: d for d in detected}
    return {
        "object": all(any(d.shape == o.shape for d in detected) for o in spec),
        "color": all(o.pos in at and at[o.pos].color == o.color for o in spec),
        "shape": all(o.pos in at and at[o.pos].shape == o.shape for o in spec),
        "position": all(o in detected for o in spec),
        "count": len(detected) == len(spec),
        "correct": tuple(detected) == tuple(spec),
    }


def score_image(image, spec) -> dict:
    """Generation score: spec is a Scene or a caption string."""
    spec = parse_caption(spec) if isinstance(spec, str) else make_scene(spec)
    return score_scene(read_scene(image), spec)


def score_edit(generated, target) -> dict:
    """Editing score: the generated image must show the target scene (target: Scene, caption, or target image)."""
    if not isinstance(target, (str, tuple, list)):
        target = read_scene(target)
    return score_image(generated, target)


def normalize_answer(text: str) -> str:
    return re.sub(r"[^a-z ]", "", text.lower()).strip()


def score_answer(prediction: str, answer: str) -> bool:
    """Understanding score: exact match after lower-casing and stripping punctuation and spaces."""
    return normalize_answer(prediction) == normalize_answer(answer)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer: word level over the toy world's words, Qwen special tokens laid out as in the released files
# ---------------------------------------------------------------------------------------------------------------------

UNK = "<unk>"
WORDS = (
    ("\n", "user", "assistant", "system", "<image_gen>", "generate", "image", "?", ".", ",")
    + tuple(str(d) for d in range(10))
    + COLORS + SHAPES + tuple(sorted({w for p in POSITIONS for w in p.split()}))
    + ("a", "the", "at", "and", "of", "to", "is", "in", "there", "what", "color", "shape", "object", "objects",
       "how", "many", "make", "move", "remove", "add", "zero", "one", "two", "yes", "no", "it")
)
# order and offsets of the released tokenizer's added tokens (ids = word-vocab size + index)
SPECIAL_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_pad|>",
                  "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
PRE_TOKEN_PATTERN = r"<image_gen>|\n|[A-Za-z]+|\d|[^\sA-Za-z0-9]"


def build_tokenizer():
    """tokenizers.Tokenizer: WordLevel over UNK + WORDS (words, digits, '\\n', '?', '<image_gen>'), then the
    special tokens; whitespace other than '\\n' only separates."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate((UNK,) + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(PRE_TOKEN_PATTERN), behavior="removed", invert=True)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tk


def save_tokenizer(folder) -> Path:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json, added_tokens.json (released layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tk = build_tokenizer()
    tk.save(str(folder / "tokenizer.json"))
    ids = {t: tk.token_to_id(t) for t in SPECIAL_TOKENS}
    # the released order: im_start, im_end, then the rest as added (pad <|endoftext|> is not "additional")
    extra = ["<|im_start|>", "<|im_end|>"] + [t for t in SPECIAL_TOKENS if t not in
                                              ("<|im_start|>", "<|im_end|>", "<|endoftext|>")]

    def tok(t):
        return {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(ids[t]): {**tok(t), "special": True} for t in SPECIAL_TOKENS},
        "additional_special_tokens": extra,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "extra_special_tokens": {},
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": UNK,
    }
    special_map = {"additional_special_tokens": extra, "eos_token": tok("<|im_end|>"),
                   "pad_token": tok("<|endoftext|>"), "unk_token": tok(UNK)}
    for name, d in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map),
                    ("added_tokens.json", dict(sorted(ids.items())))):
        with open(folder / name, "w") as f:
            json.dump(d, f, indent=2, ensure_ascii=False)
    return folder


def vocabulary_words() -> list:
    """The words of the toy vocabulary, sorted (digits, punctuation and <image_gen> left out): README.md's list."""
    return sorted(w for w in WORDS if w.isalpha())


def unknown_words(text: str) -> list:
    """Pieces of text outside the toy vocabulary (empty list = the toy tokenizer covers it)."""
    tk = build_tokenizer()
    enc = tk.encode(text, add_special_tokens=False)
    unk = tk.token_to_id(UNK)
    return [text[a:b] for (a, b), i in zip(enc.offsets, enc.ids) if i == unk]


if __name__ == "__main__":  # throughput and evaluator accuracy, one run
    import time

    t0 = time.perf_counter()
    n = 2000
    for i in range(n):
        t2i_example(i)
    dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(n):
        edit_example(i)
    de = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(200):
        read_scene(t2i_example(i).image)
    dr = time.perf_counter() - t0
    print(f"t2i examples/s {n / dt:.0f}  edit examples/s {n / de:.0f}  evaluator images/s {200 / dr:.0f}")
