"""The toy evaluation: held-out scores of a checkpoint on the four tasks (generation, understanding, editing, and
conversation from the shared context), read by the toy evaluator in toy.py. train.py's --eval / --score and rl.py's
before / after figures both come from here, so every reported score is computed one way.
"""
from __future__ import annotations

import functools
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

import cli
import model as M
import pipeline as P
import toy


@torch.no_grad()
def generate(net, tok, dec, prompts, settings: dict, *, input_images=None, seed: int = 0, first: int = 0
             ) -> np.ndarray:
    """Prompts number first, first + 1, ... (+ input images for editing) -> decoded images (B, S, S, 3) uint8 with
    the checkpoint's settings; image i drawn from its own seed (pipeline.sample_seed(seed, first + i)), so it is the
    image `generate_batch.py --prompts` writes for that prompt index, whatever the batch."""
    S = settings["ar_size"][0]
    seeds = [P.sample_seed(seed, first + i) for i in range(len(prompts))]
    bits = P.generate_bits(net, tok, list(prompts), ar_height=S, ar_width=S, cfg_scale=settings["cfg"],
                           temperature=settings["temperature"], seed=seeds, input_images=input_images)
    imgs = dec.decode(bits, S, S, upsampling_ratio=settings["upsample"], steps=settings["steps"],
                      guidance=settings["decoder_cfg"], seed=seeds)
    return imgs.cpu().numpy()


@torch.no_grad()
def answers(net, tok, images, questions: list) -> list:
    """Greedy answers, one batch; images preprocessed as pipeline.answer does (the checkpoint's image_processor)."""
    dev = net.lm_head.weight.device
    pv, grid, n_img = P.understanding_inputs(net, images)
    ids, mask = tok.batch([P.render_chat_prompt(q, n) for q, n in zip(questions, n_img)])
    new = M.generate_text(net, ids.to(dev), mask.to(dev), pv.to(dev), grid, max_new_tokens=8,
                          stop_ids=tok.end_ids)
    return [tok.decode(t) for t in new]


def evaluate(net, tok, dec, *, settings: dict, n: int = 64, batch: int = 32, seed: int = 0) -> dict:
    """Held-out scores in [0, 1]: generation (images fully correct), understanding (exact answers), editing (edited
    image shows exactly the target scene), conversation (questions about the model's own drawing answered from the
    shared context, and after re-encoding it: `conversation_scores`), plus the per-attribute generation scores."""
    from tqdm import tqdm

    if n < 1:
        raise ValueError(f"evaluation needs n >= 1 examples per task, got {n}")
    was = net.training, dec.training
    net.eval(), dec.eval()
    bar = tqdm(total=4 * n, desc="evaluation", unit="ex", dynamic_ncols=True)  # stderr: stdout keeps the JSON line
    prompts = toy.heldout_prompts(n)
    gen = []
    bar.set_postfix(task="generation")
    for i in range(0, n, batch):
        imgs = generate(net, tok, dec, prompts[i:i + batch], settings, seed=seed, first=i)
        gen += [toy.score_image(im, p) for im, p in zip(imgs, prompts[i:i + batch])]
        bar.update(len(imgs))
    qa = toy.heldout_questions(n)
    und = []
    bar.set_postfix(task="understanding")
    for i in range(0, n, batch):
        chunk = qa[i:i + batch]
        preds = answers(net, tok, np.stack([e.image for e in chunk]), [e.question for e in chunk])
        und += [toy.score_answer(p, e.answer) for p, e in zip(preds, chunk)]
        bar.update(len(chunk))
    edits = toy.heldout_edits(n)
    ed = []
    bar.set_postfix(task="editing")
    for i in range(0, n, batch):
        chunk = edits[i:i + batch]
        imgs = generate(net, tok, dec, [e.instruction for e in chunk], settings,
                        input_images=[e.source for e in chunk], seed=seed, first=i)
        ed += [toy.score_edit(im, e.target_scene)["correct"] for im, e in zip(imgs, chunk)]
        bar.update(len(chunk))
    bar.set_postfix(task="conversation")
    conv = conversation_scores(net, tok, dec, settings, prompts, seed, bar)
    bar.close()
    net.train(was[0]), dec.train(was[1])
    out = {"generation": float(np.mean([s["correct"] for s in gen])), "understanding": float(np.mean(und)),
           "editing": float(np.mean(ed)), **conv, "n": n}
    out.update({f"generation_{k}": float(np.mean([s[k] for s in gen])) for k in gen[0] if k != "correct"})
    return out


@torch.no_grad()
def conversation_scores(net, tok, dec, settings: dict, prompts: list, seed: int, bar) -> dict:
    """Shared context: the model draws each held-out prompt in a conversation (the generation task's image: same
    seed), then answers a question about what it drew (the scene the evaluator reads from the decoded image) from
    the context, where the drawing sits as its sampled bits. The same question is also answered the way a model
    without a shared context must: the drawing decoded to pixels and read again through the tokenizer. -> both
    accuracies and the seconds each path spent on all questions (decoding included for the second)."""
    S = settings["ar_size"][0]
    hits, clock = {"context": [], "reencoded": []}, {"context": 0.0, "reencoded": 0.0}
    for i, prompt in enumerate(prompts):
        s = P.sample_seed(seed, i)
        chat = P.Conversation(net, tok)
        bits = chat.draw(prompt, ar_height=S, ar_width=S, cfg_scale=settings["cfg"],
                         temperature=settings["temperature"], seed=s)
        t0 = time.perf_counter()
        image = dec.decode(bits, S, S, upsampling_ratio=settings["upsample"], steps=settings["steps"],
                           guidance=settings["decoder_cfg"], seed=[s]).cpu().numpy()
        t_decode = time.perf_counter() - t0
        question, truth = toy.conversation_question(i, toy.read_scene(image[0]))
        t0 = time.perf_counter()
        hits["context"].append(toy.score_answer(chat.ask(question, max_new_tokens=8), truth))
        clock["context"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        hits["reencoded"].append(toy.score_answer(answers(net, tok, image, [question])[0], truth))
        clock["reencoded"] += time.perf_counter() - t0 + t_decode
        bar.update(1)
    return {"conversation": float(np.mean(hits["context"])),
            "conversation_reencoded": float(np.mean(hits["reencoded"])),
            "conversation_context_s": round(clock["context"], 2),
            "conversation_reencoded_s": round(clock["reencoded"], 2)}


@torch.no_grad()
def reconstruction_score(vision, dec, settings: dict, n: int = 32) -> float:
    """Tokenizer + decoder round trip on held-out images: fraction decoded back to exactly their scene."""
    S = settings["ar_size"][0]
    ex = [toy.t2i_example(i, "heldout", toy.EVAL_SEED, S) for i in range(n)]
    imgs = reconstruct(vision, dec, np.stack([e.image for e in ex]), settings)
    return float(np.mean([toy.read_scene(im) == e.scene for im, e in zip(imgs, ex)]))


@torch.no_grad()
def reconstruct(vision, dec, images: np.ndarray, settings: dict) -> np.ndarray:
    S = images.shape[1]
    dev = vision.pos_embed.weight.device
    pv, grid = P.to_pixels(images, vision.cfg)
    bits = vision.encode_bits(pv.to(dev), grid)
    bits = bits.view(len(images), -1, *bits.shape[1:])
    return dec.decode(bits, S, S, upsampling_ratio=1.0, steps=settings["steps"], guidance=settings["decoder_cfg"],
                      seed=0).cpu().numpy()


def score_run(run_dir: Path) -> dict:
    """A `generate_batch.py --prompts` run folder of toy prompts (<idx:05d>/metadata.json + samples/<k:04d>.png) read back by
    the toy evaluator: "overall" is the fraction of samples fully correct (what --eval's generation figure counts),
    "per_category" the same per the records' meta "tag", and the per-attribute fractions as --eval reports them."""
    from PIL import Image

    run_dir = Path(run_dir)
    rows = []
    for meta in sorted(run_dir.glob("*/metadata.json")):
        try:
            rec = json.loads(meta.read_text(encoding="utf-8"))
            prompt, tag = rec["prompt"], (rec.get("meta") or {}).get("tag", "all")
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise cli.UsageError(f"--score: {meta} is not a record with a 'prompt' ({type(e).__name__})") from None
        for png in sorted((meta.parent / "samples").glob("*.png")):
            try:
                scores = toy.score_image(np.asarray(Image.open(png).convert("RGB")), prompt)
            except ValueError as e:
                raise cli.UsageError(f"--score: {meta}: {e} (the toy evaluator reads toy prompts only)") from None
            rows.append((tag, scores))
    if not rows:
        raise cli.UsageError(f"--score {run_dir}: no samples (<idx:05d>/metadata.json + samples/<k:04d>.png, as "
                             "`generate_batch.py --prompts` writes)")
    out = {"overall": float(np.mean([s["correct"] for _, s in rows])), "samples": len(rows),
           "per_category": {t: float(np.mean([s["correct"] for u, s in rows if u == t]))
                            for t in sorted({t for t, _ in rows})}}
    out.update({f"generation_{k}": float(np.mean([s[k] for _, s in rows])) for k in rows[0][1] if k != "correct"})
    return out


@functools.lru_cache(maxsize=None)
def heldout_prompt_count() -> int:
    """How many held-out generation prompts toy.heldout_prompts can give (the largest evaluation n): every held-out
    object alone, then every distinct two-object scene with at least one held-out object."""
    objs = [(c, s, p) for c in toy.COLORS for s in toy.SHAPES for p in toy.POSITIONS]
    pairs = {toy.caption(sc) for sc in (toy.make_scene([a, b]) for a, b in itertools.permutations(objs, 2)
                                       if a[2] != b[2] and a[:2] != b[:2]) if toy.is_heldout(sc)}
    return len(toy.HELDOUT_OBJECTS) + len(pairs)
