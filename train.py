"""Train the whole UniAR system from scratch on the toy world (toy.py), on a laptop.

    python train.py                          # both stages with defaults -> runs/toy/checkpoint, plots in runs/toy
    python train.py --resume                 # continue an interrupted run from runs/toy/state.safetensors
                                             # (Ctrl-C or SIGTERM saves the state after the current step, exit 130/143;
                                             # after a kill, the last state saved; the same final weights either way)
    torchrun --nproc_per_node 2 train.py     # data-parallel (gloo on CPU, nccl on GPU)
    python train.py --stage1-from checkpoints/toy --stage2-steps 2000   # stage 2 only, on that checkpoint's
                                             # tokenizer and decoder (fresh AR model): try a stage-2 recipe
    python train.py --eval checkpoints/toy   # held-out scores of a checkpoint, one JSON line
    python train.py --score out/toy_heldout  # a `generate_batch.py` run of toy prompts, scored: one JSON line
    python train.py --init CKPT --data FILE.jsonl   # fine-tune a checkpoint on your records (finetune.py; its flags:
                                             # python train.py --init CKPT --help); also --plan-memory, --toy-data DIR

The stages follow the paper's recipe at toy scale, with the released model's classes:
  stage 1, the shared tokenizer (paper: "Visual Tokenizer is Key to Unification"): the vision tower and its four BSQ
    levels (bsq.VisionModel.training_forward: straight-through codes + the BSQ entropy loss) trained jointly with
    the diffusion decoder (decoder.MMDiT, rectified-flow loss conditioned on the codes' output projections), so the
    bits are whatever the decoder needs to redraw the image;
  stage 2, the unified AR model (model.UniAR) on one shared context with the tokenizer frozen: every task is a
    teacher-forced context in the chat format (ARLoss.context_loss): text-to-image and editing with the per-bit
    cross-entropy of parallel bitwise prediction (all L x U x d bits of a 32-px token predicted at one step),
    understanding with the next-token loss on answers, and toy conversations (toy.conversation_example: a drawing
    or an edit of the user's picture, then questions about it and further edits) with both, in every batch.

Departures from the paper / official code (whose tokenizer, decoder and SFT training code are not released):
    - The decoder works in pixel space (no VAE, 8-px patches) with a learned constant text context
      (decoder.LearnedContext) instead of SD3's frozen text encoders; it outputs the AR size (upsampling 1.0), and
      predicts the clean image (prediction_type "sample", turned into a velocity for the same Euler sampler)
      because flat toy images are learned far faster that way than through the velocity target.
    - Stage 1 flips each code bit of the decoder's condition with probability `flip_prob` (bsq.VisionModel.
      training_forward), so the decoder tolerates the few wrong bits an AR model samples.
    - The tokenizer and the decoder are trained jointly from scratch (the released tower starts from Qwen3-VL and
      the decoder from SD3); the mergers (the LLM side of the tokenizer) are trained in stage 2 with the AR model.
    - Stage 2 trains every AR task at once from scratch; the official recipe has pre-training and SFT stages.
    - Stage 2 flips each bit the AR model reads (input images, and the teacher-forced tokens of the image being
      generated) with probability `read_flip_prob` (read_flips); the targets stay clean. The model thereby learns
      to read codes near the ones it was trained on, which is what it meets at inference (its own sampled bits, and
      the held-out objects' codes, which no training image contains). Without read flips held-out editing
      collapses (docs/training.md has the table).
    - Stage 2 weighs the single-turn editing loss by `edit_weight` (3), and its questions are about a position
      60% of the time and ask whether a colour-shape pair is there 20% of the time (toy.TRAIN_QUESTION_KINDS): with
      conversations in the mix, binding a position word, an instruction or a colour to the right image token is
      what the toy model learns last (docs/training.md has the runs).
    - Stage 2 trains the matrices of the AR model's transformer blocks with Muon (Muon: momentum orthogonalised by
      Newton-Schulz iterations) and the rest with AdamW; the official RL recipe uses AdamW. With Muon, 2000 steps
      reach the held-out scores AdamW needed 4500 steps for (docs/training.md has the runs).
    - Classifier-free guidance is learned by dropping the prompt text (edit: the instruction only) with
      probability `cfg_drop`, the AR analogue of the decoder's condition dropout.

Letters: B batch, S image side (px), N AR tokens per image, L levels, U merge unit, d bsq_dim, V vocabulary.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, NamedTuple

# Apple's GPU: an operation the installed torch lacks on MPS runs on the CPU instead of stopping the run (read when
# torch is imported; a value the user set is kept).
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import bsq
import cli
import decoder as D
import evaluate as E
import files
import finetune
import load_hf
import model as M
import pipeline as P
import toy

ROOT = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Defaults: the recipe docs/training.md measures; the shipped toy checkpoint is what they wrote (its training
    time and scores are there too)."""

    seed: int = 0
    size: int = 64  # image side: a 2x2 grid of AR tokens, one per quadrant of the toy world
    # stage 1: tokenizer + decoder
    stage1_steps: int = 1000
    stage1_batch: int = 32
    stage1_lr: float = 2e-3
    stage1_muon_lr: float = 0.0  # > 0: Muon at this rate (AdamW's scale) for the tower's and decoder's block matrices
    bsq_weight: float = 0.1  # weight of the BSQ entropy penalty next to the flow-matching loss
    flip_prob: float = 0.05  # bit flips in the decoder's condition: robustness to the AR model's bit errors
    # stage 2: AR model (per step: this many examples of each task)
    stage2_steps: int = 1600
    stage2_batch: int = 16
    stage2_lr: float = 1e-3
    stage2_muon_lr: float = 2e-3  # > 0: Muon at this rate (AdamW's scale) for the AR blocks' matrices; 0: AdamW alone
    cfg_drop: float = 0.1
    read_flip_prob: float = 0.1  # bit flips in what the AR model reads (input images, teacher-forced tokens)
    edit_weight: float = 3.0  # weight of the single-turn editing loss in the sum of the task losses
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # model sizes
    vit_width: int = 64
    vit_depth: int = 4
    lm_width: int = 128
    lm_layers: int = 4
    lm_mlp: int = 384
    visual_decoder_depth: int = 2
    dit_width: int = 128
    dit_layers: int = 3
    dit_patch: int = 8  # pixel-space patches: (S / 8)^2 = 64 decoder tokens at S = 64
    # sampling (evaluation, sample grids, the checkpoint's uniar_sample.json)
    cfg: float = 1.5
    temperature: float = 1.0
    decoder_steps: int = 10
    decoder_cfg: float = 1.5
    eval_n: int = 32  # held-out examples per task in the evaluation after training (`--eval CKPT`: HELDOUT_N)
    save_every: int = 250

    @classmethod
    def smoke(cls) -> "TrainConfig":
        """A run of a minute or two that the tests use: tiny widths, a few dozen steps."""
        return cls(stage1_steps=30, stage1_batch=8, stage2_steps=30, stage2_batch=4, warmup=5, vit_width=32,
                   vit_depth=3, lm_width=64, lm_layers=2, lm_mlp=128, visual_decoder_depth=1, dit_width=64,
                   dit_layers=1, decoder_steps=4, eval_n=8, save_every=10)


def vision_config(tc: TrainConfig) -> bsq.VisionConfig:
    side = tc.size // 16
    return bsq.VisionConfig(depth=tc.vit_depth, hidden_size=tc.vit_width, intermediate_size=2 * tc.vit_width,
                            num_heads=4, out_hidden_size=tc.lm_width, num_position_embeddings=side * side,
                            deepstack_visual_indexes=tuple(range(3)), bsq_hidden_dim=2 * tc.vit_width)


def ar_config(tc: TrainConfig, tk) -> M.UniARConfig:
    head_dim = 32
    heads = tc.lm_width // head_dim
    text = M.TextConfig(hidden_size=tc.lm_width, num_hidden_layers=tc.lm_layers, num_attention_heads=heads,
                        num_key_value_heads=max(1, heads // 2), head_dim=head_dim, intermediate_size=tc.lm_mlp,
                        vocab_size=tk.tk.get_vocab_size(with_added_tokens=True), mrope_section=(6, 5, 5),
                        max_position_embeddings=512, rope_theta=10000.0)
    return M.UniARConfig(image_token_id=tk.token_id(P.IMAGE_PAD), video_token_id=tk.token_id("<|video_pad|>"),
                         vision_start_token_id=tk.token_id(P.VISION_START),
                         vision_end_token_id=tk.token_id(P.VISION_END),
                         visual_transformer_decoder_depth=tc.visual_decoder_depth, text=text,
                         vision=vision_config(tc))


def image_processor(tc: TrainConfig) -> P.ImageProcessorConfig:
    """The checkpoint's preprocessor_config.json: an understanding image is resized to about tc.size x tc.size
    pixels, the size the model is trained at (a toy image of that size stays as it is, 2x2 tokens)."""
    vc = vision_config(tc)
    return P.ImageProcessorConfig(min_pixels=tc.size * tc.size, max_pixels=tc.size * tc.size,
                                  patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
                                  merge_size=vc.spatial_merge_size)


def dit_config(tc: TrainConfig, vcfg: bsq.VisionConfig) -> D.MMDiTConfig:
    heads = tc.dit_width // 32
    return D.MMDiTConfig(sample_size=tc.size // tc.dit_patch, patch_size=tc.dit_patch, in_channels=3, out_channels=3,
                         num_layers=tc.dit_layers, attention_head_dim=32, num_attention_heads=heads,
                         joint_attention_dim=64, caption_projection_dim=tc.dit_width, pooled_projection_dim=32,
                         pos_embed_max_size=tc.size // tc.dit_patch, dual_attention_layers=(), qk_norm="rms_norm",
                         siglip_channels=vcfg.hidden_size * vcfg.levels, drop_image_token_prob_for_cfg=0.1,
                         prediction_type="sample")


def sample_defaults(tc: TrainConfig) -> dict:
    """uniar_sample.json: how sample.py and rl.py sample this checkpoint."""
    return {"ar_size": [tc.size, tc.size], "upsample": 1.0, "cfg": tc.cfg, "temperature": tc.temperature,
            "steps": tc.decoder_steps, "decoder_cfg": tc.decoder_cfg,
            "prompt": "a red circle at the top left and a blue square at the bottom right"}


# ---------------------------------------------------------------------------------------------------------------------
# Data: toy examples -> model inputs
# ---------------------------------------------------------------------------------------------------------------------


def to_signed(images: np.ndarray) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float in [-1, 1], the pixel-space decoder's x0."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def example_index(step: int, i: int, batch: int, rank: int, world: int) -> int:
    """Global example index of row i of this rank's batch at this step: ranks read disjoint slices."""
    return (step * world + rank) * batch + i


def drop_text(texts: list, p: float, g: torch.Generator) -> list:
    keep = torch.rand(len(texts), generator=g) >= p
    return [t if k else "" for t, k in zip(texts, keep.tolist())]


# ---------------------------------------------------------------------------------------------------------------------
# Losses (nn.Modules, so DistributedDataParallel sees one forward per step)
# ---------------------------------------------------------------------------------------------------------------------


class TokenizerLoss(nn.Module):
    """Stage 1: images -> straight-through BSQ codes -> decoder condition; flow matching + BSQ entropy penalty."""

    def __init__(self, vision: bsq.VisionModel, dec: D.Decoder, bsq_weight: float, flip_prob: float):
        super().__init__()
        self.vision, self.dec, self.bsq_weight, self.flip_prob = vision, dec, bsq_weight, flip_prob

    def forward(self, images: np.ndarray, g: torch.Generator):
        vc = self.vision.cfg
        B, S = images.shape[0], images.shape[1]
        dev = self.vision.pos_embed.weight.device
        pv, grid = P.to_pixels(images, vc)
        _, _, feats, bsq_loss, bits = self.vision.training_forward(pv.to(dev), grid, self.flip_prob, g)  # feats (B * N, U, C * L)
        gh = S // vc.patch_size
        cond = D.blocks_to_raster(feats.view(B, -1, *feats.shape[1:]), gh, gh, vc.spatial_merge_size)
        x0 = to_signed(images).to(dev)
        u = torch.rand(B, generator=g)
        s = self.dec.scheduler.shift
        sigma = (s * u / (1 + (s - 1) * u)).to(dev)  # the inference schedule's shift, applied to uniform times
        eps = torch.randn(x0.shape, generator=g).to(dev)
        pe, pooled = self.dec.text(B)
        fm = D.flow_matching_loss(lambda x, t: self.dec.transformer(x, pe, pooled, t, cond, (gh, gh)), x0, sigma, eps,
                                  prediction_type=self.dec.transformer.cfg.prediction_type)
        loss = fm + self.bsq_weight * bsq_loss
        return loss, {"flow": fm.detach(), "bsq": bsq_loss.detach()}


def bit_metrics(logits: torch.Tensor, bits: torch.Tensor) -> dict:
    """Per level: bit accuracy, and token accuracy (a 64-bit code of one 16-px patch entirely right), of
    (B, N, L, U, d, 2) logits."""
    hit = (logits.argmax(-1) == bits).detach()
    bit_acc = hit.float().mean(dim=(0, 1, 3, 4))  # (L,)
    tok_acc = hit.all(-1).float().mean(dim=(0, 1, 3))  # (L,)
    return {**{f"bit_acc_l{i}": a for i, a in enumerate(bit_acc)},
            **{f"code_acc_l{i}": a for i, a in enumerate(tok_acc)}}


def read_flips(bits: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """What the AR model reads: each bit flipped with probability p (the targets stay the clean bits). The official
    tokenizer has a knob of its own, `bsq_flip_prob`, that flips the projected codes before normalisation with a
    strength drawn uniformly in [0, p] at every call; a fixed p on the bits is what the toy recipe needs."""
    if p <= 0:
        return bits
    flip = (torch.rand(bits.shape, generator=g) < p).to(bits.device)
    return torch.where(flip, 1 - bits, bits)


class Context(NamedTuple):
    """A batch of toy conversations as one left-padded context, ready for one teacher-forced forward."""
    ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T)
    images: np.ndarray  # (n_images, S, S, 3): every picture and drawn image, in order of appearance, row by row
    drawn: list  # per image: True if the model draws it (its bits are targets), False for a user's picture
    answers: torch.Tensor  # (B, T) bool: tokens of the model's answers (and the <|im_end|> closing each)


def encode_turns(tok: P.Tokenizer, turns: list, gh: int, gw: int, n_picture: int) -> tuple:
    """One conversation (toy.Turn list) in the chat format -> (ids, images, drawn flags, answer-token flags)."""
    ids, images, drawn, answer = [], [], [], []
    head, tail = len(tok.encode(P.MODEL_TURN)), len(tok.encode_text("\n"))
    for i, t in enumerate(turns):
        if t.role == "user":
            draws = i + 1 < len(turns) and turns[i + 1].image is not None
            piece = tok.encode(P.render_user_turn(t.text, None if t.image is None else n_picture,
                                                  (gh, gw) if draws else None))
            flags = [False] * len(piece)
        elif t.image is not None:
            piece = tok.encode(P.render_model_image(gh * gw))
            flags = [False] * len(piece)
        else:
            piece = tok.encode(P.render_model_text(t.text))
            flags = [False] * head + [True] * (len(piece) - head - tail) + [False] * tail
        if t.image is not None:
            images.append(t.image)
            drawn.append(t.role == "model")
        ids += piece
        answer += flags
    return ids, images, drawn, answer


def drop_instructions(turns: list, p: float, g: torch.Generator) -> list:
    """Classifier-free guidance: the text of each user turn that asks for an image is dropped with probability p."""
    out = list(turns)
    for i, t in enumerate(turns[:-1]):
        if t.role == "user" and turns[i + 1].image is not None and float(torch.rand(1, generator=g)) < p:
            out[i] = t._replace(text="")
    return out


def build_context(tok: P.Tokenizer, conversations: list, gh: int, gw: int, n_picture: int) -> Context:
    rows = [encode_turns(tok, c, gh, gw, n_picture) for c in conversations]
    T = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    answers = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, (r, _, _, a) in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = torch.tensor(r), 1
        answers[b, T - len(r):] = torch.tensor(a)
    images = np.stack([im for r in rows for im in r[1]])
    return Context(ids, mask, images, [d for r in rows for d in r[2]], answers)


class Packed(NamedTuple):
    """Contexts packed into rows, several to a row, each attending only to itself: one forward for a whole step.
    A context's tokens, positions and attention are what they would be in a row of its own."""
    ids: torch.Tensor  # (R, C)
    valid: torch.Tensor  # (R, C) 1 = a context's token, 0 = padding (at a row's end)
    pos: torch.Tensor  # (3, R, C) MRoPE ids, each context's own
    mask: torch.Tensor  # (R, 1, C, C) bool: causal within each context
    answers: torch.Tensor  # (R, C) bool: answer tokens (encode_turns)
    context: torch.Tensor  # (R, C) int64: the index of the context each token belongs to, -1 for padding
    image_order: torch.Tensor  # (n_images,): the packed images, in order of appearance, as indices into the contexts'


def first_fit(lengths: list, capacity: int) -> list:
    """Indices into rows of `capacity` tokens: longest first, each into the first row with room (first-fit
    decreasing)."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if r is None:
            rows.append([]), room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def pack_contexts(encoded: list, groups: list, pad_id: int) -> Packed:
    """ARLoss.layout outputs (encode_turns' with each context's MRoPE ids) -> Packed rows as long as the longest
    context. Contexts of different `groups` never share a row (rows without a drawn image then skip the visual
    decoder)."""
    C = max(len(e[0]) for e in encoded)
    rows = []
    for group in dict.fromkeys(groups):
        members = [i for i, g in enumerate(groups) if g == group]
        rows += [[members[j] for j in row] for row in first_fit([len(encoded[i][0]) for i in members], C)]
    first_image = np.cumsum([0] + [len(e[1]) for e in encoded])
    ids = torch.full((len(rows), C), pad_id, dtype=torch.int64)
    context = torch.full_like(ids, -1)
    answers = torch.zeros(ids.shape, dtype=torch.bool)
    pos = torch.ones(3, *ids.shape, dtype=torch.int64)
    order = []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            toks, _, _, answer, positions = encoded[i]
            span = slice(at, at + len(toks))
            ids[r, span], context[r, span], answers[r, span] = torch.tensor(toks), i, torch.tensor(answer)
            pos[:, r, span] = positions
            order += range(first_image[i], first_image[i + 1])
            at += len(toks)
    same = context[:, :, None] == context[:, None, :]
    mask = (same & torch.ones(C, C, dtype=torch.bool).tril()) | torch.eye(C, dtype=torch.bool)  # padding sees itself
    return Packed(ids, (context >= 0).long(), pos, mask[:, None], answers, context, torch.tensor(order, dtype=torch.int64))


class ARLoss(nn.Module):
    """Stage 2: text-to-image, editing, understanding and conversations, all as teacher-forced contexts: per-bit
    cross-entropy on the images the model draws (parallel bitwise prediction), next-token loss on its answers."""

    def __init__(self, net: M.UniAR, tok: P.Tokenizer, tc: TrainConfig):
        super().__init__()
        self.net, self.tok, self.tc = net, tok, tc
        self.codes = {}  # image digest -> its bits (N, L, U, d): the tokenizer is frozen, an image's bits never change
        self.layouts = {}  # a conversation's text -> its tokens, flags and MRoPE ids (layout)

    def image_bits(self, images: np.ndarray) -> torch.Tensor:
        """The frozen tokenizer's bits (B, N, L, U, d): the targets of parallel bitwise prediction. The toy world
        draws from a finite set of scenes, so each distinct image goes through the tower once per run, alone (its
        bits then do not depend on which batch it first came in, and a resumed run gets the same ones)."""
        keys = [hashlib.blake2b(im.tobytes(), digest_size=16).digest() for im in images]
        for k, im in zip(keys, images):
            if k not in self.codes:
                pv, grid = P.to_pixels(im[None], self.net.cfg.vision)
                with torch.no_grad():
                    bits = self.net.visual.encode_bits(pv.to(self.device), grid)
                self.codes[k] = bits.view(-1, *bits.shape[1:])
        return torch.stack([self.codes[k] for k in keys])

    @property
    def device(self):
        return self.net.lm_head.weight.device

    def layout(self, turns: list) -> tuple:
        """encode_turns of a toy conversation and its MRoPE ids -> (ids, images, drawn, answer flags, ids (3, T)),
        without the tokens after its last answer or image token: no loss reads them, and under causal attention no
        earlier position sees them. Remembered by the conversation's text,
        which is all they depend on: the toy world repeats its captions, instructions and questions."""
        key = tuple((t.role, t.text, t.image is None) for t in turns)
        if key not in self.layouts:
            if len(self.layouts) >= 20_000:  # conversations rarely repeat: bounded memory
                self.layouts.clear()
            cfg, gh = self.net.cfg, self.tc.size // self.net.cfg.downsample
            ids, images, drawn, answer = encode_turns(self.tok, turns, gh, gh, gh * gh)
            side = self.tc.size // cfg.vision.patch_size  # every toy image is S x S: one patch grid for all
            pos = M.row_positions(ids, iter([(1, side, side)] * len(images)), 0, cfg)[0]
            n = len(ids)
            while n > 1 and not answer[n - 1] and ids[n - 1] != cfg.image_token_id:
                n -= 1
            self.layouts[key] = ids[:n], drawn, answer[:n], pos[:, :n]
        ids, drawn, answer, pos = self.layouts[key]
        return ids, [t.image for t in turns if t.image is not None], drawn, answer, pos

    def context_loss(self, conversations: list, g: torch.Generator) -> tuple:
        """One teacher-forced forward over a batch of conversations. -> (bit loss or None, answer loss or None,
        bit logits (n_drawn_tokens, L, U, d, 2), their clean bits, answer metrics)."""
        net, S = self.net, self.tc.size
        gh = S // net.cfg.downsample
        ctx = build_context(self.tok, conversations, gh, gh, gh * gh)
        bits = self.image_bits(ctx.images)  # (n_images, N, L, U, d), clean
        side = S // net.cfg.vision.patch_size  # every toy image is S x S: one patch grid for all
        grids = torch.tensor([[1, side, side]]).expand(len(ctx.images), 3)
        ids, mask = ctx.ids.to(self.device), ctx.mask.to(self.device)
        read = read_flips(bits, self.tc.read_flip_prob, g)
        h, pos = net.context_states(ids, mask, read.flatten(0, 1), grids)
        img = ids == net.cfg.image_token_id  # image tokens, row by row: the images' tokens in order
        drawn = torch.zeros_like(img)  # the image tokens the model draws
        drawn[img] = torch.tensor(ctx.drawn, device=ids.device).repeat_interleave(bits.shape[1])
        out = {}
        bit_loss = text_loss = h.sum() * 0  # a batch without drawn images or answers adds nothing
        logits = target = None
        if drawn.any():  # position t predicts token t + 1
            logits = net.bit_logits_of(h, pos, mask, F.pad(drawn[:, 1:], (0, 1)))
            target = bits[torch.tensor(ctx.drawn)].flatten(0, 1)
            bit_loss = F.cross_entropy(logits.flatten(0, -2).float(), target.flatten())
        answers = ctx.answers.to(self.device)
        if answers.any():
            t_logits = net.text_logits_of(h[:, :-1][answers[:, 1:]]).float()
            t_target = ids[:, 1:][answers[:, 1:]]
            text_loss = F.cross_entropy(t_logits, t_target)
            hit = torch.zeros_like(answers[:, 1:])
            hit[answers[:, 1:]] = t_logits.argmax(-1) == t_target
            out = {"token_acc": (t_logits.argmax(-1) == t_target).float().mean().detach(),
                   "answer_acc": (hit | ~answers[:, 1:]).all(1).float().mean().detach()}
        return bit_loss, text_loss, logits, target, out

    def forward(self, step: int, rank: int, world: int, g: torch.Generator):
        """One step: 16 examples of each single-turn task and 8 conversations (stage2_batch = 16), in one forward of
        packed rows (step_loss). Each task's random draws (text dropping, then read flips) come in the order
        text-to-image, editing, understanding, conversation."""
        tc, B = self.tc, self.tc.stage2_batch
        idx = [example_index(step, i, B, rank, world) for i in range(B)]
        t2i = [toy.t2i_example(i, "train", tc.seed, tc.size) for i in idx]
        ed = [toy.edit_example(i, "train", tc.seed, tc.size) for i in idx]
        qa = [toy.qa_example(i, "train", tc.seed, tc.size) for i in idx]
        nc = max(1, B // 2)
        conv = [toy.conversation_example(i, "train", tc.seed, tc.size)
                for i in (example_index(step, j, nc, rank, world) for j in range(nc))]
        T = toy.Turn
        tasks = (lambda: [[T("user", c), T("model", image=e.image)]
                          for c, e in zip(drop_text([e.caption for e in t2i], tc.cfg_drop, g), t2i)],
                 lambda: [[T("user", c, e.source), T("model", image=e.target)]
                          for c, e in zip(drop_text([e.instruction for e in ed], tc.cfg_drop, g), ed)],
                 lambda: [[T("user", e.question, e.image), T("model", e.answer)] for e in qa],
                 lambda: [drop_instructions(c, tc.cfg_drop, g) for c in conv])
        (l_gen, _, lg, bg, _), (l_edit, _, le, be, _), (_, l_und, _, _, m_und), (l_cb, l_ct, _, _, _) = \
            self.step_loss(tasks, g)
        metrics = {"t2i": l_gen.detach(), "edit": l_edit.detach(), "understanding": l_und.detach(),
                   "conversation": (l_cb + l_ct).detach(), **bit_metrics(lg.view(B, -1, *lg.shape[1:]),
                                                                         bg.view(B, -1, *bg.shape[1:])),
                   **{f"edit_{k}": v for k, v in bit_metrics(le.view(B, -1, *le.shape[1:]),
                                                             be.view(B, -1, *be.shape[1:])).items()},
                   **m_und}  # the same keys on every rank and step (averaged across ranks)
        return l_gen + tc.edit_weight * l_edit + l_und + l_cb + l_ct, metrics

    def step_loss(self, tasks, g: torch.Generator) -> list:
        """context_loss of several batches of conversations, in one forward over packed rows (pack_contexts).
        `tasks`: functions that build each batch, called in order, each batch's read flips drawn right after it (the
        random draws of context_loss called batch by batch). -> one context_loss tuple per batch, its logits and
        answers in the batch's order."""
        net = self.net
        encoded, task, bits, read = [], [], [], []
        for k, build in enumerate(tasks):
            rows = [self.layout(c) for c in build()]
            b = self.image_bits(np.stack([im for r in rows for im in r[1]]))  # (n_images, N, L, U, d), clean
            bits.append(b), read.append(read_flips(b, self.tc.read_flip_prob, g))
            encoded += rows
            task += [k] * len(rows)
        pk = pack_contexts(encoded, [any(r[2]) for r in encoded], self.tok.pad_id)
        bits, read, dev = torch.cat(bits), torch.cat(read), self.device
        drawn = torch.tensor([d for r in encoded for d in r[2]])  # per image, in the contexts' order
        image_task = torch.tensor([k for k, r in zip(task, encoded) for _ in r[1]])
        ids, valid, mask = pk.ids.to(dev), pk.valid.to(dev), pk.mask.to(dev)
        h, pos = net.context_states(ids, valid, read[pk.image_order.to(dev)].flatten(0, 1), pos=pk.pos.to(dev),
                                    mask=mask)
        zero = h.sum() * 0  # a batch without drawn images or answers adds nothing
        # bits: position t predicts image token t + 1; rows without a drawn image skip the visual decoder
        N = bits.shape[1]
        drawn_tok = torch.zeros_like(ids, dtype=torch.bool)
        drawn_tok[ids == net.cfg.image_token_id] = drawn[pk.image_order].to(dev).repeat_interleave(N)
        where = F.pad(drawn_tok[:, 1:], (0, 1))
        rows = where.any(1)
        logits = net.bit_logits_of(h[rows], pos[:, rows], valid[rows], where[rows], mask[rows])
        packed_drawn = pk.image_order[drawn[pk.image_order]]  # the drawn images, packed order -> contexts' order
        key = (packed_drawn[:, None] * N + torch.arange(N)).flatten()
        counts = (image_task[drawn].bincount(minlength=len(tasks)) * N).tolist()
        logits = logits[key.argsort().to(dev)].split(counts)
        targets = bits[drawn.to(dev)].flatten(0, 1).split(counts)
        # answers: position t predicts answer token t + 1, in the contexts' order
        answers = pk.answers.to(dev)[:, 1:]
        context = pk.context.to(dev)[:, 1:][answers]
        order = context.argsort(stable=True)
        context = context[order]
        t_logits = net.text_logits_of(h[:, :-1][answers][order]).float()
        t_target = ids[:, 1:][answers][order]
        hit = t_logits.argmax(-1) == t_target
        wrong = torch.zeros(len(encoded), device=dev).index_add(0, context, (~hit).float())
        t_task, c_task = torch.tensor(task, device=dev)[context], torch.tensor(task, device=dev)
        out = []
        for k in range(len(tasks)):
            lg, tg = (logits[k], targets[k]) if counts[k] else (None, None)
            bit_loss = zero if lg is None else F.cross_entropy(lg.flatten(0, -2).float(), tg.flatten())
            sel, metrics, text_loss = t_task == k, {}, zero
            if sel.any():
                text_loss = F.cross_entropy(t_logits[sel], t_target[sel])
                metrics = {"token_acc": hit[sel].float().mean().detach(),
                           "answer_acc": (wrong[c_task == k] == 0).float().mean().detach()}
            out.append((bit_loss, text_loss, lg, tg, metrics))
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def build(tc: TrainConfig, tok: P.Tokenizer, device) -> tuple[bsq.VisionModel, M.UniAR, D.Decoder]:
    """The three parts, sharing one vision tower (the AR model's `model.visual` is the tokenizer)."""
    torch.manual_seed(tc.seed)
    cfg = ar_config(tc, tok)
    net = M.UniAR(cfg)
    net.image_processor = image_processor(tc)
    vision = net.model.visual
    dit = dit_config(tc, cfg.vision)
    dec = D.Decoder(vision, D.MMDiT(dit), None, D.SchedulerConfig(shift=1.0), context=D.LearnedContext(dit))
    return vision, net.to(device), dec.to(device)


MERGERS = ("merger.", "deepstack_merger_list.")


def stage_params(stage: int, vision, net, dec) -> list:
    """Stage 1: the tower, BSQ projections and the decoder; stage 2: the AR model and the mergers (tower frozen)."""
    for p in list(net.parameters()) + list(dec.parameters()):
        p.requires_grad_(False)
    if stage == 1:
        named = [(n, p) for n, p in vision.named_parameters() if not n.startswith(MERGERS)]
        named += list(dec.transformer.named_parameters()) + list(dec.context.named_parameters())
    else:
        named = [(n, p) for n, p in net.named_parameters()
                 if not n.startswith("model.visual.") or n.startswith(tuple("model.visual." + m for m in MERGERS))]
    for _, p in named:
        p.requires_grad_(True)
    return [p for _, p in named]


# ---------------------------------------------------------------------------------------------------------------------
# Training state: one file in the run folder (files.save_run_state), switched in atomically; resume gives the same
# losses and the same final weights as an uninterrupted run
# ---------------------------------------------------------------------------------------------------------------------


def model_state(vision, net, dec) -> dict:
    out = {f"vision.{k}": v for k, v in vision.state_dict().items()}
    out.update({f"net.{k}": v for k, v in net.state_dict().items() if not k.startswith("model.visual.")})
    out.update({f"dit.{k}": v for k, v in dec.transformer.state_dict().items()})
    out.update({f"ctx.{k}": v for k, v in dec.context.state_dict().items()})
    return out


def stage1_from(ckpt: Path, tc: TrainConfig) -> dict:
    """--stage1-from: a checkpoint's stage-1 weights (the tower without its mergers, which stage 2 trains; the
    decoder's transformer and context), named as model_state names them, checked against this run's settings."""
    try:
        net, _ = load_hf.load_ar(ckpt)
        dec = load_hf.load_decoder(ckpt)
    except (load_hf.CheckpointError, ValueError) as e:
        raise cli.UsageError(f"--stage1-from: {e}") from None
    vcfg = vision_config(tc)
    differ = [f"vision {k}" for k, v in asdict(vcfg).items()
              if k != "out_hidden_size" and getattr(net.cfg.vision, k) != v]  # the mergers' width: stage 2's
    differ += [f"decoder {k}" for k, v in asdict(dit_config(tc, vcfg)).items() if getattr(dec.transformer.cfg, k) != v]
    differ += ["image size"] * (net.image_processor != image_processor(tc))
    if differ or dec.vae is not None:
        raise cli.UsageError(f"--stage1-from {ckpt}: not the tokenizer and decoder of this run's settings (different: "
                             f"{', '.join(differ) or 'a latent-space decoder'}); give a checkpoint train.py wrote, with "
                             "the --size, --vit-* and --dit-* flags it was trained with")
    out = {f"vision.{k}": v for k, v in net.model.visual.state_dict().items() if not k.startswith(MERGERS)}
    out.update({f"dit.{k}": v for k, v in dec.transformer.state_dict().items()})
    out.update({"ctx.prompt_embeds": dec.prompt_embeds, "ctx.pooled": dec.pooled})
    return out


def part(state: dict, prefix: str) -> dict:
    """The tensors of `state` under `prefix`, without it."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_stage1(state: dict, vision, dec) -> None:
    """Stage-1 weights (stage1_from) into a freshly built run: its mergers and AR model stay as built."""
    mergers = {k: v for k, v in vision.state_dict().items() if k.startswith(MERGERS)}
    vision.load_state_dict({**mergers, **part(state, "vision.")})
    dec.transformer.load_state_dict(part(state, "dit."))
    dec.context.load_state_dict(part(state, "ctx."))


def load_model_state(state: dict, vision, net, dec) -> None:
    vision.load_state_dict(part(state, "vision."))
    net_sd = part(state, "net.")
    net_sd.update({f"model.visual.{k}": v for k, v in vision.state_dict().items()})
    net.load_state_dict(net_sd)
    dec.transformer.load_state_dict(part(state, "dit."))
    dec.context.load_state_dict(part(state, "ctx."))


def state_tensors(vision, net, dec, opt) -> dict:
    """The model weights and (mid-stage) the optimizer's moments, as one flat dict of tensors."""
    return {**model_state(vision, net, dec), **(files.optimizer_tensors(opt) if opt is not None else {})}


# ---------------------------------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------------------------------


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * p)))


def step_seed(seed: int, stage: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + stage * 100_003 + step) * 64 + rank


def step_generator(seed: int, stage: int, step: int, rank: int) -> torch.Generator:
    """The step's random numbers, the same after a resume: its own generator (batch, noise, flips), and the global
    one seeded alike (the decoder's condition dropout draws from it)."""
    s = step_seed(seed, stage, step, rank)
    g = torch.Generator().manual_seed(s)
    torch.manual_seed(s)
    return g


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for grp in opt.param_groups:
        grp["lr"] = lr * grp.get("lr_scale", 1.0)


NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # the quintic Newton-Schulz iteration of Muon's authors


def orthogonalise(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """A stack of matrices (n, rows, cols), each made roughly semi-orthogonal (singular values pushed towards 1, not
    exactly onto it) by Newton-Schulz iterations in bfloat16, as torch.optim.Muon does one matrix at a time."""
    a, b, c = NS_COEFFICIENTS
    tall = g.shape[1] > g.shape[2]
    x = (g.mT if tall else g).bfloat16()
    x = x / x.flatten(1).norm(dim=1).clamp(min=1e-7)[:, None, None]  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al., 2024): SGD with Nesterov momentum whose update of each matrix is orthogonalised, scaled to
    an AdamW update's size (0.2 sqrt(max(rows, cols)), so the learning rate reads on AdamW's scale), with decoupled
    weight decay: what torch.optim.Muon (torch 2.9+) computes with adjust_lr_fn="match_rms_adamw", up to rounding.
    Matrices of one shape are orthogonalised together, in one batched product per iteration: at the toy's sizes most
    of the cost of one-by-one products is their overhead (docs/training.md has the timings)."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float = 0.95):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))

    @torch.no_grad()
    def step(self) -> None:
        for grp in self.param_groups:
            same_shape = {}
            for p in grp["params"]:
                if p.grad is not None:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.lerp_(p.grad, 1 - grp["momentum"])
                    same_shape.setdefault(p.shape, []).append((p, p.grad.lerp(buf, grp["momentum"])))  # Nesterov
            for shape, pairs in same_shape.items():
                updates = orthogonalise(torch.stack([u for _, u in pairs]))
                for (p, _), u in zip(pairs, updates):
                    p.mul_(1 - grp["lr"] * grp["weight_decay"])
                    p.add_(u, alpha=-grp["lr"] * 0.2 * math.sqrt(max(shape)))


class Optimizers:
    """Several optimizers stepped as one. Their parameters are numbered one after the other in state_dict, so the run
    state keeps them as it keeps one optimizer (files.optimizer_tensors)."""

    def __init__(self, *opts: torch.optim.Optimizer):
        self.opts = opts

    @property
    def param_groups(self) -> list:
        return [g for o in self.opts for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def _sizes(self) -> list:
        return [sum(len(g["params"]) for g in o.param_groups) for o in self.opts]

    def state_dict(self) -> dict:
        state, at = {}, 0
        for o, n in zip(self.opts, self._sizes()):
            state.update({at + i: st for i, st in o.state_dict()["state"].items()})
            at += n
        return {"state": state, "param_groups": [{"params": list(range(at))}]}

    def load_state_dict(self, sd: dict) -> None:
        at = 0
        for o, n in zip(self.opts, self._sizes()):
            own = o.state_dict()
            o.load_state_dict({"state": {i - at: st for i, st in sd["state"].items() if at <= i < at + n},
                               "param_groups": own["param_groups"]})
            at += n


def optimizer(stage: int, params: list, models: tuple, lr: float, tc: TrainConfig):
    """AdamW, or with the stage's Muon rate > 0, Muon for the matrices of the stage's transformer blocks (what Muon is
    for: hidden layers; stage 1: the tower's and the decoder's, stage 2: the text model's and the visual decoder's) and
    AdamW for the rest (embeddings, heads, norms, mergers, BSQ projections). With Muon a stage 2 of 2000 steps edits
    held-out scenes as well as one of 4500 with AdamW (docs/training.md has the runs)."""
    vision, net, dec = models
    muon_lr = tc.stage1_muon_lr if stage == 1 else tc.stage2_muon_lr
    # the fused kernel: one pass over all parameters instead of a dozen small ops per tensor (CPU and CUDA have it)
    fused = params[0].device.type in ("cpu", "cuda")
    adamw = functools.partial(torch.optim.AdamW, lr=lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay, fused=fused)
    if muon_lr == 0:
        return adamw(params)
    stacks = (vision.blocks, dec.transformer.transformer_blocks) if stage == 1 else (
        net.model.language_model.layers, net.visual_decoder)
    blocks = {id(p) for stack in stacks for p in stack.parameters() if p.ndim == 2}
    muon = Muon([{"params": [p for p in params if id(p) in blocks], "lr_scale": muon_lr / lr}], lr=muon_lr,
                weight_decay=tc.weight_decay)
    return Optimizers(adamw([p for p in params if id(p) not in blocks]), muon)


def reduce_metrics(metrics: dict, world: int) -> dict:
    keys = sorted(metrics)
    v = torch.stack([metrics[k].float().cpu() for k in keys])
    if world > 1:
        dist.all_reduce(v)
        v = v / world
    return {k: float(x) for k, x in zip(keys, v)}


def data_parallel(loss_fn: nn.Module, stage: int, tc: TrainConfig, world: int) -> nn.Module:
    """The loss module as a step calls it: wrapped in DistributedDataParallel when several processes train."""
    if world == 1:
        return loss_fn
    # a text stack shallower than the deepstack taps leaves the last mergers without gradient
    unused = stage == 2 and tc.lm_layers < len(vision_config(tc).deepstack_visual_indexes)
    return nn.parallel.DistributedDataParallel(loss_fn, find_unused_parameters=unused)


class Run(NamedTuple):
    """What both stages share: the run's clock (its record, state file, signals and stop; cli.RunClock), the three
    models (their weights are the state), and the autocast context of a step's forward."""
    clock: cli.RunClock
    models: tuple
    autocast: Callable


SHOWN = ("loss", "flow", "bsq", "t2i", "edit", "understanding", "bit_acc_l0", "answer_acc")  # in the progress bar


def train_stage(stage: int, loss_fn, params, batch_fn, tc: TrainConfig, run: Run, opt_tensors=None) -> bool:
    """Runs one stage from meta['step']; returns False when --stop-after interrupted it (state saved). The state is
    saved every tc.save_every steps and at Ctrl-C / SIGTERM (run.clock), and, without the optimizer, once the stage
    is done."""
    steps, lr = (tc.stage1_steps, tc.stage1_lr) if stage == 1 else (tc.stage2_steps, tc.stage2_lr)
    clock, meta = run.clock, run.clock.meta
    module = data_parallel(loss_fn, stage, tc, clock.world)
    opt = optimizer(stage, params, run.models, lr, tc)
    if opt_tensors:
        files.load_optimizer(opt, opt_tensors)
    history = meta["history"].setdefault(f"stage{stage}", [])
    with clock.loop(steps, f"stage {stage}", state=lambda: state_tensors(*run.models, opt),
                    seconds=(meta.setdefault("time_s", {}), f"stage{stage}")) as loop:
        for step in loop:
            g = step_generator(tc.seed, stage, step, clock.rank)
            with run.autocast():
                loss, metrics = module(*batch_fn(step, g))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            set_lr(opt, lr_at(step, steps, lr, tc.warmup))
            opt.step()
            metrics["loss"] = loss.detach()
            history.append(reduce_metrics(metrics, clock.world))
            loop.show({k: f"{history[-1][k]:.3g}" for k in SHOWN if k in history[-1]})
        if loop.stopped:
            return False
        meta["stage"], meta["step"] = stage + 1, 0
        clock.save(lambda: state_tensors(*run.models, None))
    return True


def where(meta: dict) -> str:
    return f"stage {meta['stage']} step {meta['step']}" if meta["stage"] <= 2 else "both stages done"


# ---------------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------------


def plot_history(meta: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h1, h2 = meta["history"].get("stage1", []), meta["history"].get("stage2", [])
    fig, ax = plt.subplots(1, 4, figsize=(20, 4))
    for k in ("flow", "bsq"):
        ax[0].plot([r[k] for r in h1], label=k)
    ax[0].set_title("stage 1: tokenizer + decoder")
    for k in ("t2i", "edit", "understanding"):
        ax[1].plot([r[k] for r in h2], label=k)
    ax[1].set_title("stage 2: AR losses")
    ax[1].set_yscale("log")
    for k in sorted(k for k in (h2[0] if h2 else {}) if k.startswith("bit_acc_l")):
        ax[2].plot([r[k] for r in h2], label=f"t2i {k}")
    ax[2].set_title("stage 2: text-to-image bit accuracy per level")
    for k in sorted(k for k in (h2[0] if h2 else {}) if k.startswith("code_acc_l")):
        ax[3].plot([r[k] for r in h2], label=f"t2i {k}")
    for k in ("token_acc", "answer_acc"):
        ax[3].plot([r[k] for r in h2], label=f"understanding {k}")
    ax[3].set_title("stage 2: token accuracy (64-bit codes per level; answer tokens)")
    for a in ax:
        a.set_xlabel("step")
        a.legend()
    fig.tight_layout()
    files.atomic_write(folder / "losses.png", lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def setup_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def eval_main(ckpt: Path, device, n: int) -> int:
    try:
        load_hf.resolve_part(ckpt, "ar_model")  # a missing folder first, as it is the likelier mistake
        settings = {**sample_defaults(TrainConfig()), **cli.read_sample_settings(ckpt, required=True, defaults={})}
        net, tok = load_hf.load_ar(ckpt, device=device)
        P.image_processor(net)  # understanding needs the checkpoint's preprocessor_config.json
        dec = load_hf.load_decoder(ckpt, device=device)
    except (load_hf.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(E.evaluate(net, tok, dec, settings=settings, n=n)))
    return 0


HELDOUT_N = 256  # `--eval CKPT`: held-out examples per task, the figures the docs quote (1 example = 0.4 points)
SEED_MAX = 2**32 - 1  # step_seed multiplies the seed by ~6.4e7: this keeps every step's seed within manual_seed's range
# The largest image side: the evaluation edits at it, and an edit's context (the input image's (S / 32)^2 tokens, the
# instruction, the drawn image's (S / 32)^2 tokens) must fit the model's max_position_embeddings = 512 (at 480: 476
# positions for the longest held-out instruction; at 512: 538). tests/training/test_train.py checks both.
SIZE_MAX = 480
PROBABILITY_HALF = dict(lo=0, hi=0.5, hi_open=True)


def _lm_width(w: int, flag: str) -> None:
    heads = w // 32  # ar_config: 32-dim heads, half as many key/value heads (at least 1), which must divide them
    if w < 32 or w % 32 or (heads > 3 and heads % 2):
        raise cli.UsageError(f"{flag} must be a multiple of 32 giving 1, 2, 3 or an even number of 32-dim attention "
                             f"heads (32, 64, 96, 128, 192, 256, ...), got {w} (half as many key/value heads must "
                             "divide the heads)")


def _dit_patch(tc: "TrainConfig"):
    def check(p: int, flag: str) -> None:
        if p < 1 or tc.size % p:
            divisors = ", ".join(str(d) for d in range(1, tc.size + 1) if tc.size % d == 0)
            raise cli.UsageError(f"{flag} must be one of {divisors}, got {p} (the decoder's pixel patches must tile "
                                 f"the {tc.size}-px image of --size)")
    return check


def config_limits(tc: "TrainConfig") -> dict:
    """The range of every TrainConfig setting: keyword arguments of cli.check_number, or a check(value, flag)."""
    return {
        "seed": dict(lo=0, hi=SEED_MAX, integer=True),
        "size": dict(lo=64, hi=SIZE_MAX, multiple=32, hint="one AR token covers 32x32 px, the toy world needs 2x2 of "
                     "them, and the evaluation's edits must fit the model's 512 positions"),
        "stage1_steps": dict(lo=1, integer=True),
        "stage1_batch": dict(lo=1, integer=True),
        "stage1_lr": dict(lo=0, hi=1, lo_open=True),
        "stage1_muon_lr": dict(lo=0, hi=1, hint="0 trains stage 1 with AdamW alone"),
        "bsq_weight": dict(lo=0),
        "flip_prob": dict(**PROBABILITY_HALF, hint="each bit of the decoder's condition flipped with this probability; "
                          "at 0.5 the condition carries nothing"),
        "stage2_steps": dict(lo=1, integer=True),
        "stage2_batch": dict(lo=1, integer=True),
        "stage2_lr": dict(lo=0, hi=1, lo_open=True),
        "stage2_muon_lr": dict(lo=0, hi=1, hint="0 trains stage 2 with AdamW alone"),
        "cfg_drop": dict(lo=0, hi=1, hi_open=True, hint="the probability of dropping a prompt's text; at 1 the model "
                         "never sees one"),
        "read_flip_prob": dict(**PROBABILITY_HALF, hint="each bit the AR model reads flipped with this probability; "
                               "at 0.5 it reads noise"),
        "edit_weight": dict(lo=0),
        "warmup": dict(lo=0, integer=True),
        "weight_decay": dict(lo=0, hi=1),
        "grad_clip": dict(lo=0, lo_open=True, hint="the largest gradient norm"),
        "vit_width": dict(lo=16, multiple=16, hint="4 attention heads, each a multiple of 4 wide for the 2-D rotary "
                          "embedding"),
        "vit_depth": dict(lo=3, integer=True, hint="the DeepStack levels tap blocks 0, 1 and 2"),
        "lm_width": _lm_width,
        "lm_layers": dict(lo=1, integer=True),
        "lm_mlp": dict(lo=1, integer=True),
        "visual_decoder_depth": dict(lo=1, integer=True),
        "dit_width": dict(lo=32, multiple=32, hint="attention heads of 32 dims"),
        "dit_layers": dict(lo=1, integer=True),
        "dit_patch": _dit_patch(tc),
        "cfg": dict(lo=cli.CFG_RANGE[0], hi=cli.CFG_RANGE[1]),
        "temperature": dict(lo=cli.TEMPERATURE_RANGE[0], hi=cli.TEMPERATURE_RANGE[1]),
        "decoder_steps": dict(lo=1, integer=True, hint="denoising steps"),
        "decoder_cfg": dict(lo=cli.CFG_RANGE[0], hi=cli.CFG_RANGE[1]),
        "eval_n": dict(lo=1, hi=E.heldout_prompt_count(), integer=True, hint="held-out examples per task; the toy "
                       f"world has {E.heldout_prompt_count()} held-out generation prompts"),
        "save_every": dict(lo=1, integer=True),
    }


def check_config(tc: "TrainConfig") -> None:
    """Every setting within its range (UsageError naming the flag and what is valid), before anything is built."""
    for name, limit in config_limits(tc).items():
        flag, value = "--" + name.replace("_", "-"), getattr(tc, name)
        if callable(limit):
            limit(value, flag)
        else:
            cli.check_number(value, flag, **limit)


FINETUNE_FLAGS = ("--init", "--data", "--plan-memory", "--toy-data")  # these run finetune.py's command line


def main(argv=None) -> int:
    """Exit code 0; 2 with one `error: ...` line for bad input; 130 / 143 after Ctrl-C / SIGTERM (state saved)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a.split("=")[0] in FINETUNE_FLAGS for a in argv):
        return finetune.main(argv)
    with cli.SignalGuard() as guard, ExitStack() as locks:  # the run's folder locks go when it ends, however
        try:
            return _main(argv, guard, locks)
        except cli.UsageError as e:
            return cli.fail(e)
        except cli.Interrupted as e:
            return cli.report_interrupted(e, getattr(guard, "run_dir", None))


def stage1_report(vision, dec, settings: dict, meta: dict, run_dir: Path, size: int) -> None:
    """After stage 1: how many held-out images decode back to their scene, and a grid of reconstructions."""
    rec = E.reconstruction_score(vision, dec, settings)
    meta["reconstruction_heldout"] = rec
    ex = [toy.t2i_example(i, "heldout", toy.EVAL_SEED, size).image for i in range(8)]
    files.save_grid(np.concatenate([np.stack(ex), E.reconstruct(vision, dec, np.stack(ex), settings)]),
                  run_dir / "stage1_reconstructions.png", 8, 2, 2)
    print(f"stage 1: held-out images decoded back to their scene: {rec:.1%}", file=sys.stderr)


# Settings a resumed run may change: they do not change the weights. The sampling settings are used only by the
# evaluation, the sample grids and the checkpoint's uniar_sample.json.
BOOKKEEPING = ("save_every", "eval_n", "cfg", "temperature", "decoder_steps", "decoder_cfg")


def changed(saved: dict, now: dict) -> list:
    """The settings that differ between a saved run and this one, bookkeeping aside."""
    return sorted(k for k in set(saved) | set(now) if k not in BOOKKEEPING and saved.get(k) != now.get(k))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def parse_args(argv) -> tuple[argparse.Namespace, TrainConfig]:
    """The command line -> (flags, TrainConfig), every value checked (cli.UsageError naming the flag)."""
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_run_flags(ap, ROOT / "runs" / "toy", "plots, metrics, training state", "final checkpoint")
    ap.add_argument("--smoke", action="store_true", help="the tests' tiny, one-minute configuration")
    ap.add_argument("--eval", type=Path, metavar="CKPT", help="only evaluate a checkpoint; print one JSON line")
    ap.add_argument("--score", type=Path, metavar="RUN_DIR", help="only score a `generate_batch.py` run of toy "
                    "prompts with the toy evaluator; print one JSON line")
    ap.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    ap.add_argument("--stage1-from", type=Path, metavar="CKPT", help="skip stage 1: start from the tokenizer and "
                    "decoder of a checkpoint train.py wrote with the same tokenizer and decoder settings (the AR model "
                    "and the mergers start fresh, as after stage 1); a run from the checkpoint of a run with the same "
                    "flags trains the same stage 2")
    ap.add_argument("--stop-after", type=int, default=None, help="stop (saving the state) after this many steps "
                    "in total, as if interrupted")
    ap.add_argument("--device", default="auto", help="auto (CUDA, else Apple's MPS, else CPU), cpu, cuda, cuda:1, "
                    "mps")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: bf16 autocast on CUDA, fp32 on Apple's MPS and on the CPU")
    for f in fields(TrainConfig):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                        help=f"default {f.default}" + (f" (held-out examples per task; {HELDOUT_N} with --eval)"
                                                       if f.name == "eval_n" else ""))
    args = ap.parse_args(argv)
    tc = TrainConfig.smoke() if args.smoke else TrainConfig()
    tc = TrainConfig(**{**asdict(tc), **{f.name: getattr(args, f.name) for f in fields(TrainConfig)
                                         if getattr(args, f.name) is not None}})
    check_config(tc)  # every setting in its range before anything runs
    if args.stop_after is not None:
        cli.check_number(args.stop_after, "--stop-after", 1, integer=True, hint="steps in total")
    if args.stage1_from is not None and args.resume:
        raise cli.UsageError("--stage1-from starts a new run; --resume continues the saved one (its stage 1 is "
                             "in its state): pass one of them")
    return args, tc


def open_run(args, tc: TrainConfig, locks: ExitStack) -> tuple[dict, Path]:
    """The run's record (new, or the saved one to resume) and its checkpoint folder, both checked; rank 0 holds the
    run and checkpoint folders' locks in `locks`."""
    run_dir = args.run_dir
    out_flag = cli.check_run_folders(run_dir, args.out)

    def begin() -> tuple[dict, Path]:
        meta = cli.check_run_start(run_dir, args.resume, args.overwrite)
        if meta is not None and (meta.get("world") != world_size() or changed(meta["config"], asdict(tc))):
            raise cli.UsageError(f"--resume: the state in {run_dir / files.STATE_FILE} was written with other settings "
                                 f"(different: {', '.join(changed(meta['config'], asdict(tc))) or 'world size'}); "
                                 "pass the same flags")
        if meta is None:
            meta = {"stage": 1, "step": 0, "history": {}, "config": asdict(tc), "world": world_size(),
                    "run_id": cli.new_run_id()}
        meta["config"] = asdict(tc)  # bookkeeping settings may change on resume
        return meta, cli.check_checkpoint_out(out_flag, meta.setdefault("run_id", cli.new_run_id()), args.overwrite)

    # One run at a time per run folder and per checkpoint folder (rank 0 holds them for a data-parallel run): a run
    # folder in use is refused first; the checks are made again once both are held, as the folders may have changed.
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


def prepare_run_dir(args, rank: int, world: int) -> P.Tokenizer:
    """The run folder (rank 0): made, cleared of what a killed write left, without the earlier state when starting
    over, with the toy tokenizer saved in it. -> the tokenizer, once every rank can read it."""
    run_dir, tok_dir = args.run_dir, args.run_dir / "tokenizer"
    if rank == 0:
        with files.writing(run_dir, functools.partial(cli.resume_advice, run_dir)):
            run_dir.mkdir(parents=True, exist_ok=True)
            files.clean_run_dir(run_dir)
            if args.overwrite and not args.resume:  # starting over, as the user asked: the earlier state goes
                (run_dir / files.STATE_FILE).unlink(missing_ok=True)
            toy.save_tokenizer(tok_dir)
    if world > 1:
        dist.barrier()
    return P.Tokenizer(tok_dir)


def train(tc: TrainConfig, tok: P.Tokenizer, run: Run, opt_tensors: dict | None) -> bool:
    """Both stages from where the run's record says (the optimizer's moments of a resumed stage in `opt_tensors`),
    with the stage-1 report in between. -> False when --stop-after stopped it (state saved)."""
    vision, net, dec = run.models
    rank, world, meta = run.clock.rank, run.clock.world, run.clock.meta
    if meta["stage"] == 1:
        vision.train(), dec.train()
        params, B1 = stage_params(1, *run.models), tc.stage1_batch

        def batch1(step, g):
            idx = [example_index(step, i, B1, rank, world) for i in range(B1)]
            return np.stack([toy.t2i_example(i, "train", tc.seed, tc.size).image for i in idx]), g

        if not train_stage(1, TokenizerLoss(vision, dec, tc.bsq_weight, tc.flip_prob), params, batch1, tc, run,
                           opt_tensors):
            return False
        opt_tensors = None
    if rank == 0 and "reconstruction_heldout" not in meta:  # also after a resume that skipped the stage-1 report
        with files.writing(run.clock.run_dir, functools.partial(cli.resume_advice, run.clock.run_dir)):
            stage1_report(vision, dec, sample_defaults(tc), meta, run.clock.run_dir, tc.size)
    if meta["stage"] == 2:
        net.train()
        params = stage_params(2, *run.models)
        if not train_stage(2, ARLoss(net, tok, tc), params, lambda step, g: (step, rank, world, g), tc, run,
                           opt_tensors):
            return False
    return True


def finish(tc: TrainConfig, tok: P.Tokenizer, run: Run, out: Path, no_eval: bool) -> None:
    """After training (rank 0): the checkpoint, a grid of samples, the evaluation, metrics.json and the plots."""
    vision, net, dec = run.models
    meta, run_dir = run.clock.meta, run.clock.run_dir
    advice = functools.partial(cli.resume_advice, run_dir)  # after a failed write: where the last state is
    settings = sample_defaults(tc)
    net.eval(), dec.eval()
    with files.writing(out, advice):
        load_hf.save_checkpoint(out, ar=net, tokenizer_dir=run_dir / "tokenizer", vision=vision, decoder=dec,
                                sample_defaults=settings, run_id=meta["run_id"])
    prompts = toy.heldout_prompts(16)
    samples = E.generate(net, tok, dec, prompts, settings)
    with files.writing(run_dir, advice):
        files.save_grid(samples, run_dir / "stage2_samples.png", 8, 2, 2)
    seconds = meta.get("time_s", {})
    metrics = {"config": asdict(tc), "world": run.clock.world, "time_stage1_s": round(seconds.get("stage1", 0.0), 1),
               "time_stage2_s": round(seconds.get("stage2", 0.0), 1),
               "reconstruction_heldout": meta.get("reconstruction_heldout"),
               "final": {k: v for k, v in meta["history"].get("stage2", [{}])[-1].items()}}
    if not no_eval:
        metrics["eval"] = E.evaluate(net, tok, dec, settings=settings, n=tc.eval_n)
        print(json.dumps(metrics["eval"]))
    with files.writing(run_dir, advice):
        files.atomic_write(run_dir / "metrics.json",
                           lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
        plot_history(meta, run_dir)
    print(f"checkpoint: {out}  run folder: {run_dir}  (training time: stage 1 {metrics['time_stage1_s']:.0f}s, "
          f"stage 2 {metrics['time_stage2_s']:.0f}s)", file=sys.stderr)


def _main(argv, guard: cli.SignalGuard, locks: ExitStack) -> int:
    guard.run_dir = None
    args, tc = parse_args(argv)
    if args.score is not None:
        print(json.dumps(E.score_run(args.score)))
        return 0
    device = cli.resolve_device(args.device)
    if args.eval is not None:
        return eval_main(args.eval, device, args.eval_n or HELDOUT_N)
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    if bf16 and device.type != "cuda":
        raise cli.UsageError("--dtype bfloat16 needs a CUDA GPU (training on the CPU or Apple's MPS runs in float32); "
                             "use --dtype float32 or auto")
    stage1 = stage1_from(args.stage1_from, tc) if args.stage1_from is not None else None
    meta, out = open_run(args, tc, locks)
    rank, world = setup_distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    tok = prepare_run_dir(args, rank, world)
    tensors = files.load_run_state(args.run_dir)[1] if args.resume else None
    models = build(tc, tok, device)
    if tensors is not None:
        load_model_state(tensors, *models)
    if stage1 is not None:  # a new run (--resume refused): stage 1 is the checkpoint's
        load_stage1(stage1, models[0], models[2])
        meta["stage"], meta["step"], meta["stage1_from"] = 2, 0, str(args.stage1_from.resolve())
    clock = cli.RunClock(guard, args.run_dir, meta, save_every=tc.save_every, stop_after=args.stop_after,
                         where=where, rank=rank, world=world)
    run = Run(clock, models, (lambda: torch.autocast("cuda", torch.bfloat16)) if bf16 else nullcontext)
    if not train(tc, tok, run, tensors):
        return 0
    if world > 1:  # every rank must hold the same weights (DDP keeps them in sync)
        flat = torch.cat([p.detach().flatten().cpu() for p in models[1].parameters()])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        if not torch.equal(flat, ref):
            raise RuntimeError(f"rank {rank}: weights diverged from rank 0")
    if rank == 0:
        finish(tc, tok, run, out, args.no_eval)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
