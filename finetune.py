"""Fine-tune a checkpoint (a released folder / hub id, or a project checkpoint such as checkpoints/toy) on your own
records, with the teacher-forced context loss of stage 2 (train.py). `python train.py --init CKPT --data FILE.jsonl`
dispatches here.

    python train.py --init checkpoints/toy --data my.jsonl --steps 300            # full fine-tune -> runs/finetune/checkpoint
    python train.py --init checkpoints/toy --data my.jsonl --lora 8 --merge       # LoRA, merged into released-layout weights
    torchrun --nproc_per_node 8 train.py --init UniAR-RL --data my.jsonl          # FSDP (fully_shard) over 8 GPUs
    python train.py --eval checkpoints/toy --data heldout.jsonl                   # the toy evaluator on records: one JSON line
    python train.py --plan-memory [--init CKPT] --gpus 1,8                        # memory per GPU of a full-size fine-tune
    python train.py --init checkpoints/toy --toy-data DIR                         # the README's toy demonstration's data

Records, one JSON object a line; image paths are relative to the .jsonl file's folder:
    text-to-image   {"prompt": "...", "image": "a.png"}
    editing         {"image": "in.png", "instruction": "...", "output_image": "out.png"}
    understanding   {"image": "a.png", "question": "...", "answer": "..."}
    conversation    {"messages": [{"role": "user", "text": "...", "image": "a.png"}, {"role": "assistant", "image":
                     "b.png"}, {"role": "user", "text": "..."}, {"role": "assistant", "text": "..."}, ...]}
A conversation alternates user and assistant turns, starting with the user and ending with the assistant; a user
turn has text and / or an image, an assistant turn text (an answer) or an image (a drawing). They are the chat format
the model already reads (pipeline.render_user_turn / render_model_text / render_model_image): an image the model
draws is resized to the generation size (--size; default: the checkpoint's uniar_sample.json, else the official
960x960), a user's picture before a drawing too (an edit's input, as pipeline.Conversation.draw), a user's picture
before an answer goes through the checkpoint's image processor (as pipeline.answer). User text stays text: a
special-token string typed into it never becomes a control token (pipeline.Prompt). Every problem with a line is one
`error: FILE:LINE: ...` and exit code 2, before anything trains.

The loss is stage 2's: per-bit cross-entropy of parallel bitwise prediction on the images the model draws, next-token
cross-entropy on its answers (and the <|im_end|> closing each), every record one teacher-forced context; the bits the
model reads are flipped with probability --read-flip-prob (train.read_flips) and the text before a drawing is dropped
with probability --cfg-drop (classifier-free guidance), as in stage 2. Each task's loss is its mean over the global
batch (its drawn bits, its answer tokens), weighted by --task-weights. The images' bits come from the checkpoint's
own tokenizer (the vision tower and BSQ projections, frozen); full fine-tuning trains the rest of the AR model (the
language model, the visual-decoder stack, the bit head and the mergers, as stage 2), --lora R trains rank-R adapters
on the attention and MLP projections of the language model and the visual-decoder stack with everything else frozen.

Departures from the issue / from stage 2:
    - The tokenizer is always frozen (its bits are the targets, and bsq_encoder/, the decoder's copy, is copied
      unchanged into the output).
    - Records of one batch share one forward (left padded, each image with its own grid); stage 2 runs one forward
      per task. The loss is the same sum (tests/training/test_finetune.py compares it with train.ARLoss.context_loss).
    - A LoRA layer in eval mode computes with its merged weight W + s B A (the same tensor --merge writes), so the
      adapted model's outputs and the merged checkpoint's are equal exactly; in training mode it computes W x + s B (A x),
      the usual memory-light form, equal up to float rounding (tests: exact in eval, 1e-12 in float64 in training).

Letters: B records in a batch, T context length, M image tokens, L levels, U merge unit, d bsq_dim.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import shutil
import sys
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import models as tk_models

import cli
import evaluate as E
import files
import load_hf
import model as M
import pipeline as P
import toy

ROOT = Path(__file__).resolve().parent
TASKS = ("t2i", "edit", "understanding", "conversation")
KEYS = {"t2i": ("prompt", "image"), "edit": ("image", "instruction", "output_image"),
        "understanding": ("image", "question", "answer"), "conversation": ("messages",)}
MESSAGE_KEYS = ("role", "text", "image")
ROLES = {"user": "user", "assistant": "model"}
MERGERS = ("model.visual.merger.", "model.visual.deepstack_merger_list.")  # the LLM side of the tokenizer (stage 2's)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# ---------------------------------------------------------------------------------------------------------------------
# Records: one jsonl line each -> a conversation of turns, checked at the boundary
# ---------------------------------------------------------------------------------------------------------------------


class Picture(NamedTuple):
    """An image of a record: its file, how it is resized (`gen`: to the generation size, an image the model draws or
    an edit's input; `proc`: by the checkpoint's image processor, a picture the model answers about) and its patch
    grid (t, h, w) after resizing."""
    path: Path
    gen: bool
    grid: tuple


class Turn(NamedTuple):
    role: str  # "user" or "model"
    text: str = ""
    image: Picture | None = None


class Record(NamedTuple):
    """One line of the data file: its task, its turns, and the chat-format tokens they make (`encode`)."""
    task: str
    turns: tuple
    line: int


class Encoded(NamedTuple):
    """A record as one context row: token ids, its images in order, which of them the model draws, which tokens
    are answer tokens (the targets of the next-token loss)."""
    ids: list
    images: list  # Picture per image placeholder run, in order
    drawn: list  # bool per image
    answer: list  # bool per token


class DataError(cli.UsageError):
    """A problem with one line of the data file: `error: FILE:LINE: what is wrong and what to do`."""

    def __init__(self, path: Path, line: int, what: str):
        super().__init__(f"{path}:{line}: {what}")


class Reader:
    """Checks the records of one data file against one checkpoint: the keys, the texts, the image files (read
    through pipeline.load_image) and the position budget of the context each record makes."""

    def __init__(self, path: Path, net: M.UniAR, tok: P.Tokenizer, size: tuple):
        self.path, self.net, self.tok, self.size = Path(path), net, tok, size
        self.folder = self.path.parent
        self.grids = {}  # (resolved image path, gen) -> grid, each file read once

    def fail(self, line: int, what: str):
        raise DataError(self.path, line, what)

    def text(self, line: int, rec: dict, key: str, where: str = "") -> str:
        v = rec[key]
        if not isinstance(v, str):
            self.fail(line, f"{where}{key!r} must be a string, got {json.dumps(v)[:60]}")
        if not v.strip():
            self.fail(line, f"{where}{key!r} is empty; give the text, or remove the record")
        return v

    def picture(self, line: int, rel, gen: bool, key: str) -> Picture:
        """An image path of the record, relative to the data file's folder, read and resized as the model will."""
        if not isinstance(rel, str) or not rel.strip():
            self.fail(line, f"{key!r} must be an image path relative to {self.folder}, got {json.dumps(rel)[:60]}")
        if Path(rel).is_absolute() or Path(os.path.normpath(rel)).parts[:1] == ("..",):
            self.fail(line, f"{key!r}: {rel} is outside {self.folder}; image paths are relative to the data file's "
                      "folder and stay inside it (copy or link the image there)")
        path = self.folder / rel
        got = self.grids.get((path, gen))
        if got is None:
            if not path.is_file():
                self.fail(line, f"{key!r}: image file not found: {path} (paths are relative to {self.folder})")
            try:
                got = self.grids[(path, gen)] = tuple(int(v) for v in self.pixels(path, gen)[1][0])
            except ValueError as e:
                self.fail(line, f"{key!r}: {e}")
        return Picture(path, gen, got)

    def pixels(self, path: Path, gen: bool) -> tuple:
        """pixel_values, grid of one image: resized to the generation size, or by the checkpoint's image processor."""
        v = self.net.cfg.vision
        if gen:
            return P.preprocess_image(path, size=self.size, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                      temporal_patch_size=v.temporal_patch_size)
        return P.image_processor(self.net)(path)  # ValueError: the checkpoint states no image processing

    def record(self, line: int, raw: str) -> Record:
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            self.fail(line, f"not valid JSON ({e.msg} at column {e.colno}); one JSON object a line")
        if not isinstance(rec, dict):
            self.fail(line, f"a record is a JSON object, got {type(rec).__name__}")
        task = task_of(rec)
        if task is None:
            self.fail(line, f"cannot tell the task from the keys {sorted(rec)}; a record is one of " +
                      "; ".join(f"{t}: {{{', '.join(k)}}}" for t, k in KEYS.items()))
        unknown = sorted(set(rec) - set(KEYS[task]))
        if unknown:
            self.fail(line, f"unknown keys {unknown} in a {task} record; its keys are {list(KEYS[task])}")
        missing = [k for k in KEYS[task] if k not in rec]
        if missing:
            self.fail(line, f"missing keys {missing} in a {task} record; its keys are {list(KEYS[task])}")
        turns = self.turns(line, task, rec)
        r = Record(task, tuple(turns), line)
        self.check_budget(r)
        return r

    def turns(self, line: int, task: str, rec: dict) -> list:
        if task == "t2i":
            return [Turn("user", self.text(line, rec, "prompt")), Turn("model", image=self.picture(line, rec["image"],
                                                                                                 True, "image"))]
        if task == "edit":
            return [Turn("user", self.text(line, rec, "instruction"), self.picture(line, rec["image"], True, "image")),
                    Turn("model", image=self.picture(line, rec["output_image"], True, "output_image"))]
        if task == "understanding":
            return [Turn("user", self.text(line, rec, "question"), self.picture(line, rec["image"], False, "image")),
                    Turn("model", self.text(line, rec, "answer"))]
        return self.messages(line, rec["messages"])

    def messages(self, line: int, msgs) -> list:
        if not isinstance(msgs, list) or not msgs:
            self.fail(line, "'messages' must be a non-empty list of turns {\"role\": \"user\" | \"assistant\", "
                      "\"text\": ..., \"image\": ...}")
        turns = []
        for i, m in enumerate(msgs):
            where = f"messages[{i}]: "
            if not isinstance(m, dict):
                self.fail(line, f"{where}a turn is a JSON object, got {type(m).__name__}")
            unknown = sorted(set(m) - set(MESSAGE_KEYS))
            if unknown:
                self.fail(line, f"{where}unknown keys {unknown}; a turn's keys are {list(MESSAGE_KEYS)}")
            want = "user" if i % 2 == 0 else "assistant"
            if m.get("role") != want:
                self.fail(line, f"{where}role must be {want!r} (turns alternate, starting with the user), got "
                          f"{json.dumps(m.get('role'))}")
            turns.append(m)
        if len(turns) % 2:
            self.fail(line, "the last turn must be the assistant's (the model's answer or drawing)")
        out = []
        for i, m in enumerate(turns):
            where = f"messages[{i}]: "
            if m["role"] == "assistant":
                if ("text" in m) == ("image" in m):
                    self.fail(line, f"{where}an assistant turn has either 'text' (an answer) or 'image' (a drawing)")
                out.append(Turn("model", self.text(line, m, "text", where)) if "text" in m else
                           Turn("model", image=self.picture(line, m["image"], True, where + "image")))
            else:
                if "text" not in m and "image" not in m:
                    self.fail(line, f"{where}a user turn has 'text', 'image' or both")
                text = self.text(line, m, "text", where) if "text" in m else ""
                draws = "image" in turns[i + 1]
                pic = self.picture(line, m["image"], draws, where + "image") if "image" in m else None
                out.append(Turn("user", text, pic))
        return out

    def check_budget(self, r: Record) -> None:
        """The record's context must fit the model's positions (max_position_embeddings), as pipeline.read_context
        refuses a conversation that outgrows them."""
        enc = encode(self.tok, r.turns, self.net.cfg)
        _, nxt = M.row_positions(enc.ids, iter([p.grid for p in enc.images]), 0, self.net.cfg)
        budget = self.net.cfg.text.max_position_embeddings
        if nxt > budget:
            self.fail(r.line, f"the record needs {nxt} positions ({len(enc.ids)} tokens), more than the model's "
                      f"max_position_embeddings={budget}; shorten its texts, use fewer or smaller images (--size), or "
                      "split the conversation")


def task_of(rec: dict) -> str | None:
    """The task a record's keys name (the others are checked after): messages, prompt, instruction / output_image,
    question / answer."""
    for task, marks in (("conversation", ("messages",)), ("t2i", ("prompt",)), ("edit", ("instruction", "output_image")),
                        ("understanding", ("question", "answer"))):
        if any(k in rec for k in marks):
            return task
    return None


def read_records(path: Path, net: M.UniAR, tok: P.Tokenizer, size: tuple) -> list:
    """Every record of a .jsonl data file, checked (DataError naming the file and line); blank lines are skipped."""
    path = Path(path)
    try:
        raw = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise cli.UsageError(f"--data {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise cli.UsageError(f"--data {path}: cannot read it as UTF-8 text ({e})") from None
    reader = Reader(path, net, tok, size)
    out = [reader.record(i, s) for i, s in enumerate(raw.splitlines(), 1) if s.strip()]
    if not out:
        raise cli.UsageError(f"--data {path} holds no records (one JSON object a line)")
    warn_unknown_words(path, tok, out)
    return out


def warn_unknown_words(path: Path, tok: P.Tokenizer, records: list) -> None:
    """A word-level tokenizer (the toy's) reads words outside its vocabulary as <unk>: one warning line, naming the
    first such line and how many records have any."""
    model = tok.tk.model
    if not isinstance(model, tk_models.WordLevel):
        return
    unk = tok.tk.token_to_id(model.unk_token)
    bad = [r for r in records if any(unk in tok.encode_text(t.text) for t in r.turns)]
    if bad:
        print(f"warning: {path}:{bad[0].line}: {len(bad)} record(s) have words the checkpoint's word-level tokenizer "
              f"reads as {model.unk_token} (README.md: Toy vocabulary)", file=sys.stderr)


def image_tokens(p: Picture, cfg: M.UniARConfig) -> int:
    t, h, w = p.grid
    return t * h * w // cfg.vision.merge_unit


def encode(tok: P.Tokenizer, turns, cfg: M.UniARConfig) -> Encoded:
    """A conversation in the chat format -> one context row (train.encode_turns, with each image's own grid)."""
    ids, images, drawn, answer = [], [], [], []
    head, tail = len(tok.encode(P.MODEL_TURN)), len(tok.encode_text("\n"))
    ms = cfg.vision.spatial_merge_size
    for i, t in enumerate(turns):
        if t.role == "user":
            nxt = turns[i + 1].image if i + 1 < len(turns) and turns[i + 1].role == "model" else None
            draw = None if nxt is None else (nxt.grid[1] // ms, nxt.grid[2] // ms)
            piece = tok.encode(P.render_user_turn(t.text, None if t.image is None else image_tokens(t.image, cfg),
                                                  draw))
            flags = [False] * len(piece)
        elif t.image is not None:
            piece = tok.encode(P.render_model_image(image_tokens(t.image, cfg)))
            flags = [False] * len(piece)
        else:
            piece = tok.encode(P.render_model_text(t.text))
            flags = [False] * head + [True] * (len(piece) - head - tail) + [False] * tail
        if t.image is not None:
            images.append(t.image)
            drawn.append(t.role == "model")
        ids += piece
        answer += flags
    return Encoded(ids, images, drawn, answer)


def drop_text(turns, p: float, g: torch.Generator) -> tuple:
    """Classifier-free guidance: the text of each user turn before a drawing is dropped with probability p (stage 2's
    train.drop_instructions)."""
    out = list(turns)
    for i, t in enumerate(turns[:-1]):
        if t.role == "user" and turns[i + 1].image is not None and float(torch.rand(1, generator=g)) < p:
            out[i] = t._replace(text="")
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------------------
# Batches: records -> one left-padded context, its images' pixels, the per-token weights of the loss
# ---------------------------------------------------------------------------------------------------------------------


def pixels(net: M.UniAR, size: tuple, pic: Picture) -> tuple:
    """pixel_values, grid of one record image, resized as Reader.pixels checked it would be."""
    v = net.cfg.vision
    if pic.gen:
        return P.preprocess_image(pic.path, size=size, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                  temporal_patch_size=v.temporal_patch_size)
    return P.image_processor(net)(pic.path)


class Targets(NamedTuple):
    """How many targets each task has in a whole (global) batch: drawn bits and answer tokens. Each task's loss is
    its sum of cross-entropies divided by these, so it does not depend on how the batch is split into chunks."""
    bits: list
    answers: list


def count_targets(encs: list, tasks: list, cfg: M.UniARConfig) -> Targets:
    bits, answers = [0] * len(TASKS), [0] * len(TASKS)
    per_token = cfg.vision.levels * cfg.vision.merge_unit * cfg.vision.bsq_dim
    for enc, task in zip(encs, tasks):
        k = TASKS.index(task)
        bits[k] += per_token * sum(image_tokens(p, cfg) for p, d in zip(enc.images, enc.drawn) if d)
        answers[k] += sum(enc.answer)
    return Targets(bits, answers)


class Batch(NamedTuple):
    """One chunk of records as model inputs (CPU tensors; the loss module moves them)."""
    ids: torch.Tensor  # (B, T) left padded
    mask: torch.Tensor  # (B, T)
    pixel_values: torch.Tensor | None  # every image's patch rows, in order
    grids: torch.Tensor | None  # (n_images, 3)
    flips: torch.Tensor | None  # (M, L, U, d) bool: the bits read flipped
    drawn: torch.Tensor  # (M,) bool: image tokens the model draws (their bits are targets)
    answers: torch.Tensor  # (B, T) bool
    task: torch.Tensor  # (B,) task index
    inv_bits: torch.Tensor  # (len(TASKS),) 1 / global drawn bits per task (0 when none)
    inv_answers: torch.Tensor  # (len(TASKS),) 1 / global answer tokens per task


def make_batch(net: M.UniAR, tok: P.Tokenizer, size: tuple, records: list, gens: list, totals: Targets,
               read_flip: float, cfg_drop: float) -> Batch:
    """Records (and one generator per record: its text dropout, then its read flips; None: neither) -> Batch."""
    cfg, v = net.cfg, net.cfg.vision
    encs = [encode(tok, r.turns if g is None else drop_text(r.turns, cfg_drop, g), cfg) for r, g in zip(records, gens)]
    T = max(len(e.ids) for e in encs)
    ids = torch.full((len(encs), T), tok.pad_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    answers = torch.zeros(len(encs), T, dtype=torch.bool)
    for b, e in enumerate(encs):
        ids[b, T - len(e.ids):], mask[b, T - len(e.ids):] = torch.tensor(e.ids), 1
        answers[b, T - len(e.ids):] = torch.tensor(e.answer)
    pics = [(p, d, g) for e, g in zip(encs, gens) for p, d in zip(e.images, e.drawn)]
    pv = grids = flips = None
    counts = [image_tokens(p, cfg) for p, _, _ in pics]
    if pics:
        pre = [pixels(net, size, p) for p, _, _ in pics]
        pv, grids = torch.cat([x for x, _ in pre]), torch.cat([g for _, g in pre])
        shape = (v.levels, v.merge_unit, v.bsq_dim)
        flips = torch.cat([torch.rand((n, *shape), generator=g) < read_flip if g is not None and read_flip > 0
                           else torch.zeros((n, *shape), dtype=torch.bool) for n, (_, _, g) in zip(counts, pics)])
    drawn = torch.tensor([d for _, d, _ in pics], dtype=torch.bool).repeat_interleave(torch.tensor(counts, dtype=torch.int64))
    inv = lambda n: torch.tensor([1.0 / c if c else 0.0 for c in n], dtype=torch.float64)  # noqa: E731
    task = torch.tensor([TASKS.index(r.task) for r in records])
    return Batch(ids, mask, pv, grids, flips, drawn, answers, task, inv(totals.bits), inv(totals.answers))


# ---------------------------------------------------------------------------------------------------------------------
# The loss: stage 2's teacher-forced context loss over a chunk of records (train.ARLoss.context_loss), per task
# ---------------------------------------------------------------------------------------------------------------------


class ContextLoss(nn.Module):
    """One forward = one chunk -> (the weighted loss, each task's loss in it). Every task's terms are sums of
    cross-entropies divided by the task's global target count (Batch.inv_*), so the chunks' and the processes'
    gradients add up to the gradient of the global batch's loss. It is the FSDP root: the model's methods run inside
    its forward. Every trainable parameter takes part in every forward (a zero-weighted term where a chunk has no
    drawn image, no answer or no image), so every process reduces the same gradients."""

    def __init__(self, net: M.UniAR, weights: dict, autocast=nullcontext):
        super().__init__()
        self.net, self.autocast = net, autocast
        self.register_buffer("weights", torch.tensor([float(weights[t]) for t in TASKS], dtype=torch.float64),
                             persistent=False)

    def forward(self, b: Batch) -> tuple:
        net = self.net
        dev = net.lm_head.weight.device
        ids, mask, answers = b.ids.to(dev), b.mask.to(dev), b.answers.to(dev)
        v = net.cfg.vision
        with self.autocast():
            if b.pixel_values is not None:
                with torch.no_grad():  # the checkpoint's own tokenizer, frozen: its bits are the targets
                    bits = net.visual.encode_bits(b.pixel_values.to(dev, net.model.visual.pos_embed.weight.dtype),
                                                  b.grids)  # (M, L, U, d)
                read = torch.where(b.flips.to(dev), 1 - bits, bits)  # what the model reads (train.read_flips)
            else:
                bits = read = torch.zeros((0, v.levels, v.merge_unit, v.bsq_dim), dtype=torch.int64, device=dev)
            h, pos = net.context_states(ids, mask, read if len(read) else None, b.grids)
            per_task = torch.zeros(len(TASKS), dtype=torch.float64, device=dev)
            row_task = b.task.to(dev)[:, None].expand_as(ids)
            # zero-weighted: the mergers read one code (the deepstack ones too, whatever the depth)
            main, deep = net.visual.bits_to_llm_features(torch.zeros((1, v.levels, v.merge_unit, v.bsq_dim),
                                                                     dtype=torch.int64, device=dev))
            zero = 0 * (main.float().sum() + sum(x.float().sum() for x in deep))
            drawn_tok = torch.zeros_like(mask, dtype=torch.bool)  # (B, T): tokens of images the model draws
            drawn_tok[ids == net.cfg.image_token_id] = b.drawn.to(dev)
            if drawn_tok.any():  # position t predicts image token t + 1: all its L x U x d bits at once
                where = F.pad(drawn_tok[:, 1:], (0, 1))
                logits = net.bit_logits_of(h, pos, mask, where)  # (n, L, U, d, 2)
                target = bits[b.drawn.to(dev)]
                ce = F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), reduction="none")
                ce = ce.view(len(target), -1).sum(1).double()  # per drawn token
                tt = row_task[where]
                per_task = per_task.index_add(0, tt, ce * b.inv_bits.to(dev)[tt])
            else:
                last = (slice(None), slice(-1, None))
                zero = zero + 0 * net.bit_logits_of(h[last], pos[(slice(None), *last)], mask[last],
                                                    (slice(None), slice(0, 1))).float().sum()
            if answers.any():
                where = answers[:, 1:]
                t_logits = net.text_logits_of(h[:, :-1][where]).float()
                ce = F.cross_entropy(t_logits, ids[:, 1:][where], reduction="none").double()
                tt = row_task[:, 1:][where]
                per_task = per_task.index_add(0, tt, ce * b.inv_answers.to(dev)[tt])
            else:
                zero = zero + 0 * net.text_logits_of(h[:, -1]).float().sum()
        return (per_task * self.weights).sum() + zero, per_task.detach()


# ---------------------------------------------------------------------------------------------------------------------
# LoRA: rank-R adapters on the attention and MLP projections, written in plain PyTorch
# ---------------------------------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """y = x W^T + s x A^T B^T (Hu et al., LoRA): W frozen, A (R, in) and B (out, R) trained, s = alpha / R; B starts
    at zero, so the adapted model starts as the base model. In eval mode the layer computes with its merged weight
    W + s B A (`merged_weight`, the tensor --merge writes), so the adapted model and the merged checkpoint give the
    same outputs exactly; training uses the factored form, which keeps only x and A x for the backward pass."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        assert base.bias is None, "the model's projections have no bias"
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.scale = alpha / rank
        a = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # nn.Linear's init, as LoRA's reference code
        self.lora_A = nn.Parameter(a.to(device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def merged_weight(self) -> torch.Tensor:
        """W + s B A, computed in float32 (at least) and cast to W's dtype."""
        dt = torch.promote_types(self.weight.dtype, torch.float32)
        return (self.weight.to(dt) + self.scale * (self.lora_B.to(dt) @ self.lora_A.to(dt))).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(x, self.merged_weight())
        return F.linear(x, self.weight) + self.scale * F.linear(F.linear(x, self.lora_A.to(x.dtype)),
                                                                self.lora_B.to(x.dtype))


def lora_layers(net: M.UniAR) -> list:
    """The decoder layers that get adapters: the language model's and the visual-decoder stack's."""
    return list(net.language_model.layers) + list(net.visual_decoder)


def add_lora(net: M.UniAR, rank: int, alpha: float, seed: int) -> None:
    """Every attention and MLP projection of lora_layers becomes a LoRALinear (its weight the same tensor)."""
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(net):
        for parent in (layer.self_attn, layer.mlp):
            for name in LORA_TARGETS:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, g))


def merge_lora(net: M.UniAR) -> None:
    """Each LoRALinear back to a plain nn.Linear holding W + s B A: the released module tree (and keys) again."""
    for layer in lora_layers(net):
        for parent in (layer.self_attn, layer.mlp):
            for name in LORA_TARGETS:
                m = getattr(parent, name, None)
                if isinstance(m, LoRALinear):
                    lin = nn.Linear(m.weight.shape[1], m.weight.shape[0], bias=False, device="meta")
                    with torch.no_grad():
                        lin.weight = nn.Parameter(m.merged_weight().detach(), requires_grad=False)
                    setattr(parent, name, lin)


def trainable(net: M.UniAR, lora: int) -> list:
    """(name, parameter) pairs trained, everything else frozen: the adapters (LoRA), or stage 2's set (the AR model
    and the mergers; the vision tower and its BSQ projections stay the frozen tokenizer)."""
    for p in net.parameters():
        p.requires_grad_(False)
    if lora:
        named = [(n, p) for n, p in net.named_parameters() if n.endswith((".lora_A", ".lora_B"))]
    else:
        named = [(n, p) for n, p in net.named_parameters() if not n.startswith("model.visual.") or n.startswith(MERGERS)]
    for _, p in named:
        p.requires_grad_(True)
    return named


def checkpoint_layers(net: M.UniAR) -> None:
    """Gradient checkpointing: each decoder layer keeps only its input for the backward pass and runs its forward
    again there (torch.utils.checkpoint, non-reentrant). The layer's own forward is replaced on the instance, so its
    parameters keep their names (and FSDP's hooks stay around it)."""
    from torch.utils.checkpoint import checkpoint

    for layer in lora_layers(net):
        plain = layer.forward
        layer.forward = functools.partial(checkpoint, plain, use_reentrant=False)


# ---------------------------------------------------------------------------------------------------------------------
# FSDP: torch.distributed.fsdp.fully_shard, one unit per decoder layer, the embeddings, the LM head and the tower
# ---------------------------------------------------------------------------------------------------------------------


def fsdp_units(net: M.UniAR) -> list:
    """The modules sharded as units of their own (the rest, small, belongs to the root: the ContextLoss)."""
    return lora_layers(net) + [net.language_model.embed_tokens, net.lm_head, net.model.visual]


def shard(loss: ContextLoss) -> None:
    """fully_shard every unit, then the root. Gradients are summed over processes, not averaged: the loss is already
    the global batch's (ContextLoss). The tower's methods called outside its forward are registered with FSDP."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    net = loss.net
    mods = []
    for m in fsdp_units(net):
        mods.append(fully_shard(m))
    for method in ("encode_bits", "bits_to_llm_features"):
        register_fsdp_forward_method(net.model.visual, method)
    mods.append(fully_shard(loss))
    for m in mods:
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-multiplied sum)


def local(t: torch.Tensor) -> torch.Tensor:
    """A parameter's or gradient's shard on this process (the tensor itself without FSDP)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from every process under FSDP (a collective: every process calls it)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A whole tensor sharded as parameter p is (for the optimizer's moments of a resumed run)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        return distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements)
    return value.to(p.device, p.dtype)


def clip_gradients(params: list, max_norm: float, world: int) -> float:
    """Scale the gradients to a total norm of at most max_norm; the squares are summed in float64 (per shard, then
    across processes), so 1 and 2 processes find the same factor. -> the norm before clipping."""
    sq = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is not None:
            sq += local(p.grad).detach().double().pow(2).sum().cpu()
    if world > 1:
        dist.all_reduce(sq)
    norm = float(sq.sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1:
        for p in params:
            if p.grad is not None:
                local(p.grad).mul_(coef)
    return norm


# ---------------------------------------------------------------------------------------------------------------------
# The run: settings, the order of the records, a step, the held-out loss, the state
# ---------------------------------------------------------------------------------------------------------------------

# Settings a resumed run may change: they do not change the weights.
BOOKKEEPING = ("save_every", "eval_every", "merge")


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% (stage 2's schedule, train.lr_at)."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * p)))


def split(n: int, fraction: float, seed: int) -> tuple:
    """Record indices -> (train, held out): a seeded choice of round(fraction * n) records (at least one when the
    fraction is > 0 and there are two records or more) held out for the evaluation loss."""
    k = min(n - 1, max(1 if fraction > 0 and n > 1 else 0, round(fraction * n)))
    order = np.random.default_rng([seed, 7]).permutation(n)
    return sorted(order[k:].tolist()), sorted(order[:k].tolist())


class Order:
    """Which training records step s reads: epochs of seeded permutations, `batch` records a step, the same on every
    process and after a resume."""

    def __init__(self, train: list, batch: int, seed: int):
        self.train, self.batch, self.seed = train, batch, seed

    @functools.lru_cache(maxsize=4)
    def perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 11, epoch]).permutation(len(self.train))

    def rows(self, step: int) -> list:
        """-> [(global row j, record index)] of the step's batch."""
        n = len(self.train)
        return [(j, self.train[int(self.perm(j // n)[j % n])]) for j in range(step * self.batch, (step + 1) * self.batch)]


def chunks(rows: list, pieces: int) -> list:
    """A batch cut into `pieces` consecutive chunks (processes x accumulation steps): piece c of process r at
    accumulation step a is c = r * accumulation + a, so one process with 2 accumulation steps and two processes with
    one step each compute on the same chunks."""
    n = len(rows)
    return [rows[c * n // pieces:(c + 1) * n // pieces] for c in range(pieces)]


class Job(NamedTuple):
    """What a step needs: the model inside its loss, the tokenizer, the records, the settings, this process."""
    loss: ContextLoss
    tok: P.Tokenizer
    records: list
    s: dict
    rank: int
    world: int


def batch_of(job: Job, rows: list, totals: Targets, step: int | None) -> Batch:
    """Rows [(j, record index)] -> Batch; in training (step given) each row's text dropout and read flips draw from
    its own generator, seeded by (seed, step, j): the same whatever process or chunk computes it."""
    s = job.s
    gens = [None if step is None else torch.Generator().manual_seed(P.sample_seed(s["seed"], step, j)) for j, _ in rows]
    return make_batch(job.loss.net, job.tok, tuple(s["size"]), [job.records[i] for _, i in rows], gens, totals,
                      s["read_flip_prob"], s["cfg_drop"])


def totals_of(job: Job, indices: list) -> Targets:
    cfg = job.loss.net.cfg
    recs = [job.records[i] for i in indices]
    return count_targets([encode(job.tok, r.turns, cfg) for r in recs], [r.task for r in recs], cfg)


def train_step(job: Job, module: nn.Module, opt, params: list, rows: list, step: int) -> dict:
    """One optimizer step on the global batch `rows`: this process's chunks forward and backward (gradients add up),
    the clipped gradient, the learning rate of the step, AdamW. -> the step's losses (whole batch)."""
    s = job.s
    accum = s["batch"] // (s["micro_batch"] * job.world)
    totals = totals_of(job, [i for _, i in rows])
    per_task = torch.zeros(len(TASKS), dtype=torch.float64)
    opt.zero_grad(set_to_none=True)
    mine = chunks(rows, accum * job.world)[job.rank * accum:(job.rank + 1) * accum]
    for part in mine:
        loss, got = module(batch_of(job, part, totals, step))
        loss.backward()
        per_task += got.cpu()
    if job.world > 1:
        dist.all_reduce(per_task)
    norm = clip_gradients(params, s["grad_clip"], job.world)
    lr = lr_at(step, s["steps"], s["lr"], s["warmup"])
    for grp in opt.param_groups:
        grp["lr"] = lr
    opt.step()
    w = job.loss.weights.cpu()
    out = {"loss": float((per_task * w).sum()), "grad_norm": norm, "lr": lr}
    out.update({f"loss_{t}": float(per_task[k]) for k, t in enumerate(TASKS) if totals.bits[k] or totals.answers[k]})
    return out


@torch.no_grad()
def heldout_loss(job: Job, module: nn.Module, heldout: list) -> dict:
    """The loss on the held-out records (no read flips, no text dropout): every task's mean over all its targets
    there, and their weighted sum. Every process computes it on all of them."""
    net = job.loss.net
    was = net.training
    net.eval()
    totals = totals_of(job, heldout)
    per_task = torch.zeros(len(TASKS), dtype=torch.float64)
    rows = [(None, i) for i in heldout]
    for c in range(0, len(rows), job.s["micro_batch"]):
        per_task += module(batch_of(job, rows[c:c + job.s["micro_batch"]], totals, None))[1].cpu()
    net.train(was)
    out = {"eval_loss": float((per_task * job.loss.weights.cpu()).sum())}
    out.update({f"eval_{t}": float(per_task[k]) for k, t in enumerate(TASKS) if totals.bits[k] or totals.answers[k]})
    return out


def state_tensors(named: list, opt) -> dict:
    """The trained parameters and the optimizer's moments, whole (gathered under FSDP), keyed by parameter name."""
    out = {f"param.{n}": full(p.detach()) for n, p in named}
    for n, p in named:
        for k, v in opt.state.get(p, {}).items():
            out[f"opt.{n}.{k}"] = full(v) if torch.is_tensor(v) else torch.tensor(v)
    return out


def load_params(named: list, tensors: dict) -> None:
    with torch.no_grad():
        for n, p in named:
            p.copy_(tensors[f"param.{n}"].to(p.dtype))


def load_moments(named: list, opt, tensors: dict) -> None:
    """A resumed run's optimizer moments, sharded as their parameters are."""
    for n, p in named:
        st = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(f"opt.{n}.")}
        if st:
            opt.state[p] = {k: (v.clone() if k == "step" else like(v, p)) for k, v in st.items()}


def where(meta: dict) -> str:
    return f"step {meta['step']}"


# ---------------------------------------------------------------------------------------------------------------------
# The output: the released layout (full, or LoRA merged), or the adapter alone
# ---------------------------------------------------------------------------------------------------------------------

ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def file_dtype(root: Path) -> torch.dtype:
    """The floating dtype the checkpoint's AR weights are stored in (the released ones: bf16; the toy's: fp32)."""
    for info in load_hf.tensor_index(load_hf.weight_files(root)).values():
        if info.dtype in _DTYPES:
            return _DTYPES[info.dtype]
    return torch.float32


def write_output(out: Path, net: M.UniAR, root: Path, s: dict, run_id: str, merge: bool) -> str:
    """Rank 0, after training. Full fine-tuning, or LoRA with --merge: the released layout (load_hf.save_checkpoint;
    weights in the base checkpoint's dtype, the tokenizer copy and the decoder carried over unchanged), which
    `sample.py --ckpt` and `load_hf.load_ar` read as they read the base. LoRA without --merge: the adapters
    (adapter.safetensors) and what they adapt (adapter_config.json). -> what was written, in words."""
    if s["lora"] and not merge:
        tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()
                   if k.endswith((".lora_A", ".lora_B"))}
        config = {"base": str(root), "rank": s["lora"], "alpha": s["lora_alpha"], "targets": list(LORA_TARGETS),
                  "layers": ["model.language_model.layers", "visual_decoder"], "size": s["size"]}

        def write(tmp: Path) -> None:
            files.atomic_save_file(tmp / ADAPTER_FILE, tensors)
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
            (tmp / files.RUN_MARK).write_text(json.dumps({"run_id": run_id}))

        files.replace_folder(out, write)
        return (f"LoRA adapters (rank {s['lora']}) in {out}; sample.py reads merged weights: run the same command with "
                "--resume --merge")
    if s["lora"]:
        merge_lora(net)
    net.to(file_dtype(root))
    sample = None
    if (root / cli.SAMPLE_JSON).is_file():
        sample = {**cli.read_sample_settings(root, required=True), "ar_size": list(s["size"])}
    load_hf.save_checkpoint(out, ar=net, tokenizer_dir=root, sample_defaults=sample, run_id=run_id, copy_from=root)
    return f"checkpoint in {out} (released layout{', LoRA merged' if s['lora'] else ''})"


# ---------------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------------


def parse_weights(text: str) -> dict:
    """'t2i=1,edit=3' -> every task's weight (the ones not named: 1)."""
    out = dict.fromkeys(TASKS, 1.0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in TASKS:
            raise cli.UsageError(f"--task-weights: unknown task {name!r}; the tasks are {', '.join(TASKS)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise cli.UsageError(f"--task-weights: {part!r} must be TASK=NUMBER, e.g. edit=3") from None
        cli.check_number(out[name], f"--task-weights {name}", 0)
    return out


def parser() -> cli.Parser:
    ap = cli.Parser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", help="the checkpoint to fine-tune: a folder in the released layout or a hub id")
    ap.add_argument("--data", type=Path, help="the records, a .jsonl file (image paths relative to it)")
    cli.add_run_flags(ap, ROOT / "runs" / "finetune", "training state, metrics", "fine-tuned checkpoint")
    ap.add_argument("--lora", type=int, default=0, metavar="R", help="train rank-R adapters (0: full fine-tuning)")
    ap.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale alpha / R (default alpha = R)")
    ap.add_argument("--merge", action="store_true", help="LoRA: write the merged weights in the released layout "
                    "(what sample.py reads) instead of the adapters alone")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=16, help="records per optimizer step, over all processes")
    ap.add_argument("--micro-batch", type=int, default=None, help="records per forward on one process (default: "
                    "--batch / processes); the rest is gradient accumulation. The same --micro-batch on 1 or 2 "
                    "processes gives the same weights")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-5 full, 1e-4 LoRA)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--task-weights", default="", help="e.g. 'edit=3,understanding=0.5' (others 1): "
                    f"tasks {', '.join(TASKS)}")
    ap.add_argument("--heldout", type=float, default=0.05, help="fraction of the records held out for the "
                    "evaluation loss (default 0.05)")
    ap.add_argument("--eval-every", type=int, default=50, help="steps between evaluation losses")
    ap.add_argument("--read-flip-prob", type=float, default=0.1, help="each bit the model reads flipped with this "
                    "probability (stage 2's 0.1)")
    ap.add_argument("--cfg-drop", type=float, default=0.1, help="probability of dropping the text before a drawing "
                    "(classifier-free guidance; stage 2's 0.1)")
    ap.add_argument("--size", type=cli.parse_size, default=None, help="generation size HxW, multiples of 32 "
                    "(default: the checkpoint's uniar_sample.json, else 960x960)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--stop-after", type=int, default=None, help="stop (saving the state) after this many steps")
    ap.add_argument("--grad-checkpointing", action="store_true", help="recompute each decoder layer in the "
                    "backward pass instead of keeping its activations")
    ap.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:1, mps")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: bf16 autocast on CUDA, fp32 elsewhere")
    ap.add_argument("--eval", type=Path, metavar="CKPT", help="with --data: the toy evaluator on the records (one "
                    "JSON line), no training")
    ap.add_argument("--toy-data", type=Path, metavar="DIR", help="write the README's toy demonstration data "
                    "(train.jsonl, heldout.jsonl, images/) into DIR and exit")
    ap.add_argument("--plan-memory", action="store_true", help="print the memory a fine-tune of --init (default: "
                    "the released 9.6B AR model) needs per GPU, and exit")
    ap.add_argument("--gpus", default="1,8", help="--plan-memory: GPU counts to plan for, e.g. 1,8")
    ap.add_argument("--plan-tokens", type=int, default=None, help="--plan-memory: tokens of one record (default: "
                    "an edit at the generation size)")
    return ap


def check_args(args, world: int) -> dict:
    """The flags in range (UsageError naming the flag) -> the run's settings, before anything loads."""
    c = cli.check_number
    c(args.lora, "--lora", 0, integer=True, hint="0: full fine-tuning")
    if args.lora_alpha is not None:
        c(args.lora_alpha, "--lora-alpha", 0, lo_open=True)
    c(args.steps, "--steps", 1, integer=True)
    c(args.batch, "--batch", 1, integer=True)
    micro = args.micro_batch or max(1, args.batch // world)
    c(micro, "--micro-batch", 1, integer=True)
    if args.batch % (micro * world):
        raise cli.UsageError(f"--batch {args.batch} must be a multiple of --micro-batch {micro} x {world} "
                             "process(es): each process takes the same number of records per step")
    lr = args.lr if args.lr is not None else (1e-4 if args.lora else 1e-5)
    c(lr, "--lr", 0, 1, lo_open=True)
    c(args.warmup, "--warmup", 0, integer=True)
    c(args.weight_decay, "--weight-decay", 0, 1)
    c(args.grad_clip, "--grad-clip", 0, lo_open=True, hint="the largest gradient norm")
    c(args.heldout, "--heldout", 0, 1, hi_open=True)
    c(args.eval_every, "--eval-every", 1, integer=True)
    c(args.read_flip_prob, "--read-flip-prob", 0, 0.5, hi_open=True, hint="at 0.5 the model reads noise")
    c(args.cfg_drop, "--cfg-drop", 0, 1, hi_open=True)
    cli.check_seed(args.seed, hi=2**32 - 1)
    c(args.save_every, "--save-every", 1, integer=True)
    if args.stop_after is not None:
        c(args.stop_after, "--stop-after", 1, integer=True)
    return {"init": None, "data": None, "data_sha256": None, "lora": args.lora,
            "lora_alpha": float(args.lora_alpha if args.lora_alpha is not None else args.lora), "steps": args.steps,
            "batch": args.batch, "micro_batch": micro, "lr": lr, "warmup": min(args.warmup, args.steps),
            "weight_decay": args.weight_decay, "grad_clip": args.grad_clip,
            "task_weights": parse_weights(args.task_weights), "heldout": args.heldout,
            "read_flip_prob": args.read_flip_prob, "cfg_drop": args.cfg_drop, "size": None, "seed": args.seed,
            "grad_checkpointing": args.grad_checkpointing, "save_every": args.save_every,
            "eval_every": args.eval_every, "merge": args.merge}


def resolve_init(name) -> Path:
    """--init -> the AR root of the checkpoint (a folder, or a hub id through the local hub cache)."""
    try:
        return load_hf.resolve_part(load_hf.resolve_checkpoint(name), "ar_model")
    except ValueError as e:
        raise cli.UsageError(f"--init: {e}") from None


def generation_size(args, root: Path, cfg: M.UniARConfig) -> tuple:
    size = tuple(args.size) if args.size else tuple(cli.read_sample_settings(root)["ar_size"])
    ds = cfg.downsample
    if size[0] <= 0 or size[1] <= 0 or size[0] % ds or size[1] % ds:
        raise cli.UsageError(f"--size {size[0]}x{size[1]} must be positive multiples of {ds} px (one generated "
                             "token)")
    return size


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def open_run(args, s: dict, locks: ExitStack) -> tuple:
    """The run's record (new, or the saved one to resume: the same settings and the same data file) and its output
    folder, both checked; rank 0 holds the run and output folders' locks (train.py's rules)."""
    run_dir = args.run_dir
    out_flag = cli.check_run_folders(run_dir, args.out)

    def begin():
        meta = cli.check_run_start(run_dir, args.resume, args.overwrite)
        if meta is not None:
            diff = sorted(k for k in set(meta["settings"]) | set(s) if k not in BOOKKEEPING
                          and meta["settings"].get(k) != s.get(k))
            if diff:
                what = "the data file's contents" if diff == ["data_sha256"] else ", ".join(diff)
                raise cli.UsageError(f"--resume: the state in {run_dir / files.STATE_FILE} was written with other "
                                     f"settings (different: {what}); pass the same flags and data")
        else:
            meta = {"step": 0, "history": [], "run_id": cli.new_run_id()}
        meta["settings"] = s
        return meta, cli.check_checkpoint_out(out_flag, meta["run_id"], args.overwrite)

    lead = int(os.environ.get("RANK", "0")) == 0
    held = lead and run_dir.is_dir()
    if held:
        locks.enter_context(files.run_lock(run_dir, "--run-dir"))
    meta, out = begin()
    if lead:
        if not held:
            locks.enter_context(files.run_lock(run_dir, "--run-dir"))
        locks.enter_context(files.run_lock(out, "--out"))
        meta, out = begin()
    return meta, out


def launched() -> bool:
    """Started by torchrun (any number of processes, one included): the run is sharded with FSDP."""
    return "WORLD_SIZE" in os.environ


def setup_distributed(device: torch.device) -> tuple:
    """-> (rank, world); under torchrun the process group is made first (NCCL on GPUs, gloo on the CPU)."""
    if not launched():
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def main(argv=None) -> int:
    """Exit code 0; 2 with one `error: ...` line for bad input; 130 / 143 after Ctrl-C / SIGTERM (state saved)."""
    with cli.SignalGuard() as guard, ExitStack() as locks:
        try:
            return _main(sys.argv[1:] if argv is None else list(argv), guard, locks)
        except cli.UsageError as e:
            return cli.fail(e)
        except cli.Interrupted as e:
            return cli.report_interrupted(e, getattr(guard, "run_dir", None), "fine-tuning")


def _main(argv: list, guard: cli.SignalGuard, locks: ExitStack) -> int:
    guard.run_dir = None
    args = parser().parse_args(argv)
    if args.toy_data is not None:
        return write_toy_data(args.toy_data)
    if args.plan_memory:
        return plan_main(args)
    if args.eval is not None:
        if args.data is None:
            raise cli.UsageError("--eval with --data scores the records of a data file; without --data, "
                                 "`python train.py --eval CKPT` scores the toy world's held-out sets")
        return eval_records_main(args)
    if args.init is None or args.data is None:
        raise cli.UsageError("fine-tuning needs --init CKPT (the checkpoint to start from) and --data FILE.jsonl")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    s = check_args(args, world)
    device = cli.resolve_device(args.device)
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    if bf16 and device.type != "cuda":
        raise cli.UsageError("--dtype bfloat16 needs a CUDA GPU (fine-tuning on the CPU or Apple's MPS runs in "
                             "float32); use --dtype float32 or auto")
    root = resolve_init(args.init)
    if launched() and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    # frozen weights in bf16 on a GPU for LoRA (only the adapters train); fp32 master weights otherwise
    dtype = torch.bfloat16 if (bf16 and s["lora"]) else torch.float32
    try:
        net, tok = load_hf.load_ar(root, dtype=dtype, device=device)
    except ValueError as e:
        raise cli.UsageError(f"--init: {e}") from None
    s.update(init=str(root.resolve()), data=str(Path(args.data).resolve()), size=list(generation_size(args, root,
                                                                                                      net.cfg)))
    records = read_records(args.data, net, tok, tuple(s["size"]))
    s["data_sha256"] = sha256(args.data)
    meta, out = open_run(args, s, locks)
    rank, world = setup_distributed(device)
    if rank == 0:
        with files.writing(args.run_dir, functools.partial(cli.resume_advice, args.run_dir)):
            files.clean_run_dir(args.run_dir)
            if args.overwrite and not args.resume:
                (args.run_dir / files.STATE_FILE).unlink(missing_ok=True)
    tensors = files.load_run_state(args.run_dir)[1] if args.resume else None
    train_idx, held = split(len(records), s["heldout"], s["seed"])
    if not train_idx:
        raise cli.UsageError(f"--data {args.data}: no records left to train on after holding out {len(held)}; "
                             "lower --heldout")
    if s["lora"]:
        add_lora(net, s["lora"], s["lora_alpha"], s["seed"])
    named = trainable(net, s["lora"])
    if tensors is not None:
        load_params(named, tensors)
    if s["grad_checkpointing"]:
        checkpoint_layers(net)
    net.train()
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if bf16 else nullcontext
    loss = ContextLoss(net, s["task_weights"], autocast).to(device)
    if launched():
        shard(loss)
        named = [(n[len("net."):], p) for n, p in loss.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=s["lr"], betas=(0.9, 0.95), weight_decay=s["weight_decay"], foreach=False)
    if tensors is not None:
        load_moments(named, opt, tensors)
    job = Job(loss, tok, records, s, rank, world)
    order = Order(train_idx, s["batch"], s["seed"])
    clock = cli.RunClock(guard, args.run_dir, meta, save_every=s["save_every"], stop_after=args.stop_after,
                         where=where, rank=rank, world=world)
    if rank == 0:
        print(f"fine-tuning {root} ({'LoRA rank ' + str(s['lora']) if s['lora'] else 'full'}: "
              f"{sum(p.numel() for p in params):,} trained parameters) on {len(train_idx)} records of {args.data} "
              f"({len(held)} held out), {world} process(es)", file=sys.stderr)
    history = meta["history"]
    with clock.loop(s["steps"], "fine-tune", state=lambda: state_tensors(named, opt),
                    seconds=(meta.setdefault("time_s", {}), "train"), save_last=True) as loop:
        for step in loop:
            row = {"step": step, **train_step(job, loss, opt, params, order.rows(step), step)}
            if held and ((step + 1) % s["eval_every"] == 0 or step + 1 == s["steps"]):
                row.update(heldout_loss(job, loss, held))
            history.append(row)
            loop.show({k: f"{v:.3g}" for k, v in row.items() if k in ("loss", "eval_loss")})
        if loop.stopped:
            return 0
    return finish(args, job, named, out, root, meta, clock)


def finish(args, job: Job, named: list, out: Path, root: Path, meta: dict, clock) -> int:
    """After the last step: the output (rank 0; under FSDP the trained tensors are gathered first into a plain
    copy of the model), metrics.json in the run folder."""
    s, world = job.s, job.world
    trained = {f"param.{n}": full(p.detach()).cpu() for n, p in named}
    if job.rank == 0:
        if launched():
            net, _ = load_hf.load_ar(root, dtype=torch.float32)
            if s["lora"]:
                add_lora(net, s["lora"], s["lora_alpha"], s["seed"])
            load_params(trainable(net, s["lora"]), trained)
        else:
            net = job.loss.net
            net.cpu()
        net.eval()
        advice = functools.partial(cli.resume_advice, args.run_dir)
        with files.writing(out, advice):
            said = write_output(out, net, root, s, meta["run_id"], args.merge)
        last = meta["history"][-1] if meta["history"] else {}
        metrics = {"settings": s, "world": world, "time_s": round(meta.get("time_s", {}).get("train", 0.0), 1),
                   "final": last, "eval": [{k: v for k, v in r.items() if k == "step" or k.startswith("eval")}
                                          for r in meta["history"] if "eval_loss" in r]}
        with files.writing(args.run_dir, advice):
            files.atomic_write(args.run_dir / "metrics.json",
                               lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
        print(said + f"; run folder: {args.run_dir}", file=sys.stderr)
    if launched():
        dist.barrier()
        dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# The toy evaluator on records (train.py --eval CKPT --data FILE), and the README's toy demonstration data
# ---------------------------------------------------------------------------------------------------------------------


def square(path: Path, side: int) -> np.ndarray:
    """A record's image as the toy evaluator reads it: uint8 (side, side, 3)."""
    from PIL import Image

    arr = P.load_image(path)
    if arr.shape[:2] != (side, side):
        arr = np.asarray(Image.fromarray(arr).resize((side, side), Image.BICUBIC))
    return arr


def score_records(net, tok, dec, records: list, settings: dict, batch: int = 32) -> dict:
    """Single-turn records scored by the toy evaluator (toy.py), drawn with the checkpoint's sampling settings and
    per-image seeds as the evaluation draws them: text-to-image, the drawn image shows exactly the scene of the
    record's image; editing, exactly the scene of its output image; understanding, the exact answer. Conversations
    are not scored. -> the fraction right per task and the counts."""
    side = settings["ar_size"][0]
    got = {t: [] for t in ("generation", "editing", "understanding")}
    t2i = [r for r in records if r.task == "t2i"]
    for i in range(0, len(t2i), batch):
        chunk = t2i[i:i + batch]
        imgs = E.generate(net, tok, dec, [r.turns[0].text for r in chunk], settings, first=i)
        got["generation"] += [toy.score_image(im, toy.read_scene(square(r.turns[1].image.path, side)))["correct"]
                              for im, r in zip(imgs, chunk)]
    edits = [r for r in records if r.task == "edit"]
    for i in range(0, len(edits), batch):
        chunk = edits[i:i + batch]
        imgs = E.generate(net, tok, dec, [r.turns[0].text for r in chunk], settings, first=i,
                          input_images=[square(r.turns[0].image.path, side) for r in chunk])
        got["editing"] += [toy.score_edit(im, square(r.turns[1].image.path, side))["correct"]
                           for im, r in zip(imgs, chunk)]
    qa = [r for r in records if r.task == "understanding"]
    for i in range(0, len(qa), batch):
        chunk = qa[i:i + batch]
        preds = E.answers(net, tok, np.stack([square(r.turns[0].image.path, side) for r in chunk]),
                          [r.turns[0].text for r in chunk])
        got["understanding"] += [toy.score_answer(p, r.turns[1].text) for p, r in zip(preds, chunk)]
    return {**{k: float(np.mean(v)) for k, v in got.items() if v}, **{f"n_{k}": len(v) for k, v in got.items()}}


def eval_records_main(args) -> int:
    ckpt = args.eval
    try:
        root = load_hf.resolve_part(ckpt, "ar_model")
        settings = cli.read_sample_settings(ckpt, required=True)
        net, tok = load_hf.load_ar(root)
        dec = load_hf.load_decoder(ckpt)
    except ValueError as e:
        raise cli.UsageError(f"--eval: {e}") from None
    size = tuple(settings["ar_size"])
    records = read_records(args.data, net, tok, size)
    print(json.dumps(score_records(net, tok, dec, records, settings)))
    return 0


def three_objects(rng: np.random.Generator) -> toy.Scene:
    """A scene of three objects of the training split's combinations: what the shipped toy checkpoint never saw."""
    return toy.sample_scene(rng, "train", 3)


def add_to_two(rng: np.random.Generator) -> tuple:
    """An edit adding a third object to a two-object scene (the toy world only adds to one-object scenes)."""
    while True:
        src = toy.sample_scene(rng, "train", 2)
        free = [p for p in toy.POSITIONS if p not in {o.pos for o in src}]
        c, sh = toy.COLORS[rng.integers(len(toy.COLORS))], toy.SHAPES[rng.integers(len(toy.SHAPES))]
        instr = f"add a {c} {sh} at the {free[rng.integers(len(free))]}"
        if (c, sh) not in {(o.color, o.shape) for o in src}:
            return src, instr, toy.apply_edit(src, instr)


def toy_records(n: int, seed: int, images: Path, prefix: str, replay: bool, avoid: set = frozenset()) -> list:
    """n rounds of: a three-object text-to-image record, an edit adding a third object, a question about a
    three-object scene, and with `replay` one ordinary toy record (so the fine-tune keeps what the checkpoint knew).
    Images are written as PNG into `images`; `avoid`: captions that must not appear (the training scenes)."""
    from PIL import Image

    rng = np.random.default_rng([seed, 31])
    out, k = [], 0

    def png(arr) -> str:
        nonlocal k
        name = f"{prefix}_{k:05d}.png"
        k += 1
        files.atomic_write(images / name, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))
        return f"{images.name}/{name}"

    for i in range(n):
        scene = three_objects(rng)
        while toy.caption(scene) in avoid:
            scene = three_objects(rng)
        out.append({"prompt": toy.caption(scene), "image": png(toy.render(scene))})
        src, instr, tgt = add_to_two(rng)
        while toy.caption(tgt) in avoid:
            src, instr, tgt = add_to_two(rng)
        out.append({"image": png(toy.render(src)), "instruction": instr, "output_image": png(toy.render(tgt))})
        scene = three_objects(rng)
        q, a = toy.sample_question(rng, scene, "train" if replay else "heldout")
        out.append({"image": png(toy.render(scene)), "question": q, "answer": a})
        if replay:
            kind = i % 3
            if kind == 0:
                e = toy.t2i_example(i, "train", seed)
                out.append({"prompt": e.caption, "image": png(e.image)})
            elif kind == 1:
                e = toy.edit_example(i, "train", seed)
                out.append({"image": png(e.source), "instruction": e.instruction, "output_image": png(e.target)})
            else:
                e = toy.qa_example(i, "train", seed)
                out.append({"image": png(e.image), "question": e.question, "answer": e.answer})
    return out


def write_toy_data(folder: Path, n_train: int = 400, n_heldout: int = 64) -> int:
    """The README's demonstration: three-object scenes, which the shipped toy checkpoint draws badly. train.jsonl
    (n_train rounds, with replay of the ordinary toy tasks) and heldout.jsonl (n_heldout rounds of three-object
    records whose scenes training never shows), images in images/. Refuses a folder that holds either file."""
    folder = Path(folder)
    for name in ("train.jsonl", "heldout.jsonl"):
        if (folder / name).exists():
            raise cli.UsageError(f"--toy-data {folder}: {folder / name} exists; pass an empty or new folder")
    cli.check_out_writable(cli.check_out_folder(folder, "--toy-data"), "--toy-data")
    images = folder / "images"
    with files.writing(folder, "free some space or pass another --toy-data"):
        images.mkdir(parents=True, exist_ok=True)
        train = toy_records(n_train, 0, images, "train", replay=True)
        seen = {r["prompt"] for r in train if "prompt" in r}
        held = toy_records(n_heldout, 1, images, "heldout", replay=False, avoid=seen)
        for name, recs in (("train.jsonl", train), ("heldout.jsonl", held)):
            files.atomic_write(folder / name, lambda tmp, recs=recs: Path(tmp).write_text(
                "".join(json.dumps(r) + "\n" for r in recs)))
    print(f"{folder / 'train.jsonl'}: {len(train)} records; {folder / 'heldout.jsonl'}: {len(held)} records",
          file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# The memory plan: bytes per GPU of a fine-tune, from the checkpoint's config built on the meta device
# ---------------------------------------------------------------------------------------------------------------------

GiB = 2**30


def layer_activation_bytes(cfg: M.TextConfig, act: int, res: int, casts: bool) -> int:
    """Bytes one decoder layer keeps for the backward pass, per token (flash attention: nothing quadratic).
    act: bytes of a matmul output (2 under bf16 autocast, 4 in fp32); res: bytes of the residual stream and the
    norms' float32 statistics (4); casts: autocast keeps the bf16 copy of each matmul's input too.
    Counted from model.DecoderLayer: two RMSNorms (input and normalised output each), q and k through their norm
    and the rotary embedding (4 copies each), v, the attention output and o_proj's input, the MLP's gate, up, silu
    and product (4 x intermediate), and with casts the five projections' bf16 inputs (q, k, v, gate, up)."""
    D, q, kv, inter = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
        cfg.intermediate_size
    return res * 4 * D + (act * 5 * D if casts else 0) + res * 4 * (q + kv) + act * (kv + 2 * q) + act * 4 * inter


def count(module: nn.Module, only=lambda n: True) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if only(n))


def lora_count(net: M.UniAR, rank: int) -> int:
    """Adapter parameters: rank x (in + out) per adapted projection."""
    return sum(rank * (lin.in_features + lin.out_features) for layer in lora_layers(net)
               for parent in (layer.self_attn, layer.mlp) for name in LORA_TARGETS
               if isinstance(lin := getattr(parent, name, None), nn.Linear))


def memory_plan(cfg: M.UniARConfig, *, lora: int, gpus: int, checkpointing: bool, tokens: int,
                image_tokens_: int, gpu: bool = True) -> dict:
    """Bytes per GPU of one fine-tune step with one record of `tokens` tokens (`image_tokens_` of them image
    tokens) per GPU, built on the meta device (no memory). gpu: bf16 autocast, fp32 master weights for full
    fine-tuning, bf16 frozen weights for LoRA; else everything fp32 (the CPU measurement).
      weights: every parameter (sharded over the GPUs under FSDP);  grads / optimizer: the trained ones (fp32 grads,
      AdamW's two fp32 moments; sharded);  fsdp: what FSDP holds unsharded at once (the two largest units' weights:
      the one computing and the one prefetched, and for full fine-tuning the largest unit's fp32 gradient before its
      reduce-scatter);  activations: what the backward pass needs, per layer and token (layer_activation_bytes) over
      the language model's and the visual-decoder stack's layers, plus the embeddings and, for full fine-tuning, the
      mergers' features of the image tokens; with checkpointing each layer keeps only its input, and one layer's
      activations exist at a time."""
    with torch.device("meta"):
        net = M.UniAR(cfg)
    p_all = count(net)
    p_train = lora_count(net, lora) if lora else count(
        net, lambda n: not n.startswith("model.visual.") or n.startswith(MERGERS))
    w_bytes = 2 if (gpu and lora) else 4
    units = [count(u) for u in fsdp_units(net)]
    sharded = 1 if gpus == 1 else gpus
    out = {"weights": p_all * w_bytes / sharded + (p_train * 4 / sharded if lora else 0),
           "grads": p_train * 4 / sharded, "optimizer": p_train * 8 / sharded, "fsdp": 0.0}
    if gpus > 1:
        big = sorted(units)[-2:]
        out["fsdp"] = sum(big) * w_bytes + (0 if lora else max(units) * 4)
    act, res = (2, 4) if gpu else (4, 4)
    per_layer = layer_activation_bytes(cfg.text, act, res, casts=gpu)
    layers = cfg.text.num_hidden_layers + cfg.visual_transformer_decoder_depth
    D = cfg.text.hidden_size
    if checkpointing:
        a = layers * tokens * D * res + per_layer * tokens
    else:
        a = layers * per_layer * tokens
    a += tokens * D * res  # the embeddings (the stack's input)
    if not lora:  # the mergers read every image token's codes with gradients: norm, fc1, gelu, fc2 per level
        v = cfg.vision
        width = v.hidden_size * v.merge_unit
        a += image_tokens_ * v.levels * (3 * width + D) * res
    out["activations"] = a
    out["total"] = sum(out.values())
    return {"params": p_all, "trained": p_train, **out}


def plan_config(args) -> tuple:
    """The config to plan for: --init's config.json (read alone, no weights), else the released AR model's
    (model.UniARConfig's defaults, which tests/training/test_finetune.py checks against the released key manifest)."""
    if args.init is None:
        return M.UniARConfig(), "the released UniAR AR model (model.UniARConfig defaults)", (960, 960)
    root = resolve_init(args.init)
    path = root / "config.json"
    try:
        d = load_hf.checked_config(load_hf.read_config(path), path, load_hf.schema.check_ar)
        cfg = M.UniARConfig.from_dict(d)
    except ValueError as e:
        raise cli.UsageError(f"--init: {e}") from None
    return cfg, str(root), tuple(cli.read_sample_settings(root)["ar_size"])


def plan_main(args) -> int:
    cfg, what, size = plan_config(args)
    if args.size:
        size = tuple(args.size)
    try:
        gpus = sorted({int(g) for g in args.gpus.split(",")})
    except ValueError:
        raise cli.UsageError(f"--gpus must be GPU counts separated by commas, e.g. 1,8, got {args.gpus!r}") from None
    for g in gpus:
        cli.check_number(g, "--gpus", 1, integer=True)
    ds = cfg.downsample
    n_img = (size[0] // ds) * (size[1] // ds)
    tokens = args.plan_tokens or 2 * n_img + 64
    cli.check_number(tokens, "--plan-tokens", 1, integer=True)
    rank = args.lora or 16
    rows = [(mode, g, ck, memory_plan(cfg, lora=0 if mode == "full" else rank, gpus=g, checkpointing=ck,
                                      tokens=tokens, image_tokens_=min(tokens, 2 * n_img)))
            for mode in ("full", f"LoRA r={rank}") for g in gpus for ck in (False, True)]
    first = rows[0][3]
    print(f"memory per GPU of one fine-tune step of {what}: {first['params'] / 1e6:,.1f} M parameters; "
          f"one record of {tokens} tokens per GPU (an edit at {size[0]}x{size[1]}: 2 x {n_img} image tokens + 64 of "
          f"text); bf16 autocast; AdamW; GiB")
    print("| fine-tune | GPUs (FSDP) | checkpointing | trained params | weights | grads | AdamW | FSDP unsharded | "
          "activations | total |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, g, ck, r in rows:
        print(f"| {mode} | {g}{' (FSDP)' if g > 1 else ''} | {'yes' if ck else 'no'} | {r['trained'] / 1e6:,.1f} M | "
              + " | ".join(f"{r[k] / GiB:.1f}" for k in ("weights", "grads", "optimizer", "fsdp", "activations",
                                                          "total")) + " |")
    return 0
