"""Benchmarks, printed as ratios measured in one run.

    python bench.py rollout    # CFG image rollout: visual-decoder KV cache vs the official recompute-every-step loop
    python bench.py throughput --size 256   # images per second at batch 1, 4, 16 (toy checkpoint; mid-size AR)
    python bench.py step       # one full-size AR step (released config, random bf16 weights, batch 2) vs its
                               # physical limit, weight bytes / memory bandwidth (meant for a GPU)
    python bench.py load-memory --gib 1   # peak resident memory while load_hf loads a synthetic checkpoint, and
                                          # the cost of its finiteness check (Linux: reads /proc)
    python bench.py train-step --steps 20  # where a step of `python train.py` (defaults) goes: toy rendering,
                                           # context building, tower calls, forward, backward, optimizer; per stage
    python bench.py finetune-memory --size 512   # one fine-tune step of the mid-size model (an edit record) on the
                                                 # CPU, full / LoRA x checkpointing: measured peak memory vs
                                                 # finetune.memory_plan (Linux: reads /proc)

Each benchmark is a function `bench_<name>(args)`; `main()` dispatches on the first argument.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

import bsq
import cli
import load_hf
import model as M
import pipeline as P
import toy


# ---------------------------------------------------------------------------------------------------------------------
# The baseline the product's cached loop is measured (bench_rollout) and tested (tests/parity/test_model.py) against:
# the official generation loop, which re-runs the visual-decoder stack over the whole sequence at every step
# ---------------------------------------------------------------------------------------------------------------------


class Recorder:
    """Wraps a sampler: records the bit logits (B_all, O) of every step, before guidance."""

    def __init__(self, sampler):
        self.sampler, self.steps = sampler, []
        self.cfg_scale = getattr(sampler, "cfg_scale", 1.0)

    def __call__(self, logits, step):
        self.steps.append(logits.flatten(1))
        return self.sampler(logits, step)

    @property
    def step_logits(self) -> torch.Tensor:
        return torch.stack(self.steps, dim=1)  # (B_all, N, O)


@torch.no_grad()
def generate_image_recompute(model, prefix_ids, attention_mask, ar_height, ar_width, sampler, pixel_values=None,
                             image_grid_thw=None) -> torch.Tensor:
    """The official loop: the backbone keeps its KV cache, the visual-decoder stack re-reads every state of the
    sequence at every step. -> bits of every row (B_all, N, L, U, d)."""
    B_all, Lp = prefix_ids.shape
    gh, gw = ar_height // model.cfg.downsample, ar_width // model.cfg.downsample
    N, lm = gh * gw, model.language_model
    ids_all, mask_all, grids = model.append_image_placeholders(prefix_ids, attention_mask, N, gh, gw, image_grid_thw)
    pos = M.get_rope_index(ids_all, grids, mask_all, model.cfg)
    valid = mask_all.bool()
    cache = M.KVCache.for_layers(len(lm.layers), model.cfg.text, B_all, Lp + N)
    seq = M.prefill(model, prefix_ids, attention_mask, pos[:, :, :Lp], cache, pixel_values, image_grid_thw)
    out = []
    for i in range(N):
        T = seq.shape[1]
        cos, sin = lm.rope(pos[:, :, :T], seq.dtype)
        h = M.run_stack(model.visual_decoder, seq, cos, sin, valid[:, :T])
        bits = sampler(model.vistok_logits(h[:, -1]), i)
        out.append(bits)
        if i < N - 1:
            seq = torch.cat([seq, M.read_image_token(model, cache, bits, pos[:, :, Lp + i:Lp + i + 1])], dim=1)
    return torch.stack(out, dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------------------------------



def mid_config(vd_depth: int = 4) -> M.UniARConfig:
    """A mid-size UniAR for CPU timing: the released proportions scaled down (text width 512, 8 layers, GQA 8/4,
    a visual-decoder stack of 4 layers, the released bit head of 4 levels x 2x2 x 64 bits)."""
    text = M.TextConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=64, intermediate_size=1536, vocab_size=2048, mrope_section=(12, 10, 10),
                        max_position_embeddings=8192)
    vision = bsq.VisionConfig(depth=3, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=512,
                              num_position_embeddings=64, deepstack_visual_indexes=(0, 1, 2), bsq_hidden_dim=256)
    return M.UniARConfig(image_token_id=2000, video_token_id=2001, vision_start_token_id=2002,
                         vision_end_token_id=2003, visual_transformer_decoder_depth=vd_depth, text=text, vision=vision)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_rollout(args) -> dict:
    """One CFG rollout of a `size` x `size` image (size 512: 16 x 16 = 256 tokens) with and without the
    visual-decoder KV cache, same seed. Prints times, the speed-up and the max |logit difference| (over the steps
    before the first differing bit, if a float-level difference ever flips a draw)."""
    torch.manual_seed(0)
    cfg = mid_config(args.vd_depth)
    m = M.UniAR(cfg).to(args.device).eval()
    vs = cfg.vision_start_token_id
    g = torch.Generator().manual_seed(1)
    B = args.batch
    ids = torch.randint(0, 1000, (2 * B, args.prompt_len), generator=g)
    ids[:, -1] = vs
    mask = torch.ones_like(ids)
    ids[B:, : args.prompt_len // 2] = 0  # uncond rows: shorter, left padded
    mask[B:, : args.prompt_len // 2] = 0
    ids, mask = ids.to(args.device), mask.to(args.device)

    def run(vd_cache: bool, size: int = args.size):
        rec = Recorder(M.MultinomialSampler(args.cfg, 1.0, torch.Generator().manual_seed(args.seed)))
        if vd_cache:
            bits = M.generate_image(m, ids, mask, size, size, rec).bits
        else:
            bits = generate_image_recompute(m, ids, mask, size, size, rec)[:B]
        return SimpleNamespace(bits=bits, step_logits=rec.step_logits)

    ds = cfg.downsample
    run(True, 2 * ds), run(False, 2 * ds)  # warm-up (allocator, kernels) on a 2 x 2 token image
    fast, t_fast = _timed(lambda: run(True))
    ref, t_ref = _timed(lambda: run(False))
    N = fast.bits.shape[1]
    same = (fast.bits == ref.bits).flatten(2).all(-1).all(0)  # (N,) step identical in every row
    k = N if bool(same.all()) else int((~same).nonzero()[0])
    upto = min(k + 1, N)  # logits of the first differing step are still computed from identical contexts
    diff = (fast.step_logits[:, :upto] - ref.step_logits[:, :upto]).abs().max().item()
    n_params = sum(p.numel() for p in m.parameters())
    print(f"rollout: {N} tokens, CFG {args.cfg}, batch {B} (+{B} uncond), prompt {args.prompt_len}, "
          f"mid-size config ({n_params / 1e6:.1f} M params: text {cfg.text.hidden_size}x{cfg.text.num_hidden_layers}, "
          f"visual decoder {cfg.visual_transformer_decoder_depth} layers), {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"  visual-decoder cache    {t_fast:8.2f} s  ({1e3 * t_fast / N:.1f} ms/token)")
    print(f"  recompute every step    {t_ref:8.2f} s  ({1e3 * t_ref / N:.1f} ms/token)")
    print(f"  speed-up                {t_ref / t_fast:8.2f} x")
    print(f"  bits identical          {k == N} ({k}/{N} steps)")
    print(f"  max |logit diff|        {diff:.3e} (over {upto} steps)")
    return {"speedup": t_ref / t_fast, "max_logit_diff": diff, "identical_steps": k, "tokens": N}


# HBM bandwidth (GB/s) by device name, for the physical limit of a memory-bound decode step
BANDWIDTH_GBS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0}


def step_weight_bytes(m: M.UniAR) -> int:
    """Bytes of the weights one image AR step must read: every text layer, the visual-decoder stack, the bit head,
    and the re-embedding of the sampled bits (BSQ output projections + mergers). Not read: token embeddings,
    lm_head, the ViT blocks."""
    v = m.visual
    parts = [m.language_model.layers, m.visual_decoder, m.output_layer_vistok, v.merger, v.deepstack_merger_list]
    parts += [v.output_proj(lvl) for lvl in range(m.cfg.vision.levels)]
    return sum(p.numel() * p.element_size() for part in parts for p in part.parameters())


def bench_step(args) -> dict:
    """Per-step time of image generation at the released size: rollouts of 1 and of 1 + k tokens (same prompt,
    batch = 1 prompt + its unconditional row), the difference divided by k, beside weight bytes / bandwidth."""
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = M.UniARConfig()
    if args.text_layers:
        cfg.text.num_hidden_layers = args.text_layers  # scaled-down smoke run (CPU)
    with torch.device("meta"):
        m = M.UniAR(cfg)
    m = m.to_empty(device=dev).to(dtype).eval()
    g = torch.Generator(device=dev).manual_seed(0)
    for p in m.parameters():
        p.normal_(0, 0.02, generator=g)
    for mod in m.modules():  # norms at 1 like a trained model's scale
        if isinstance(mod, (M.RMSNorm, torch.nn.LayerNorm)):
            mod.weight.data.fill_(1.0)
            if getattr(mod, "bias", None) is not None:
                mod.bias.data.zero_()
    ids = torch.randint(0, 1000, (2, args.prompt_len), device=dev)
    ids[:, -1] = cfg.vision_start_token_id
    mask = torch.ones_like(ids)
    ds, k = cfg.downsample, args.steps

    def rollout(n_tok: int) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        M.generate_image(m, ids, mask, ds, ds * n_tok,
                         M.MultinomialSampler(args.cfg, 1.0, torch.Generator(device=dev).manual_seed(0)))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    rollout(2)  # warm-up
    t1 = min(rollout(1) for _ in range(2))
    tk = min(rollout(1 + k) for _ in range(2))
    per_step = (tk - t1) / k
    nbytes = step_weight_bytes(m)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    bw = args.bandwidth or next((v for key, v in BANDWIDTH_GBS.items() if key in name), None)
    print(f"full-size AR step ({sum(p.numel() for p in m.parameters()) / 1e9:.2f} B params, {dtype}, batch 1 prompt "
          f"+ 1 uncond, CFG {args.cfg}) on {name}")
    print(f"  measured            {1e3 * per_step:8.2f} ms/step  (({tk:.3f} s - {t1:.3f} s) / {k} steps)")
    out = {"ms_per_step": 1e3 * per_step, "weight_bytes": nbytes}
    if bw:
        limit = nbytes / (bw * 1e9)
        print(f"  physical limit      {1e3 * limit:8.2f} ms/step  ({nbytes / 1e9:.2f} GB of weights / {bw:.0f} GB/s)")
        print(f"  fraction of limit   {limit / per_step:8.2f}")
        out["limit_ms"] = 1e3 * limit
    else:
        print(f"  weights read / step {nbytes / 1e9:8.2f} GB (pass --bandwidth GB/s for the physical limit)")
    return out


def bench_throughput(args) -> dict:
    """Images per second at batch 1, 4 and 16, 16 images each, as `generate_batch.py --prompts` draws them (per-image
    seeds): the toy checkpoint end to end (AR rollout + decoder, the decoder one image at a time), and the mid-size
    model's AR rollout alone (random weights, `--size` px). Printed as ratios to batch 1."""
    ckpt = Path(__file__).resolve().parent / "checkpoints" / "toy"
    net, tok = load_hf.load_ar(ckpt, device=args.device)
    dec = load_hf.load_decoder(ckpt, device=args.device)
    prompts, seeds = toy.heldout_prompts(16), [P.sample_seed(0, i) for i in range(16)]
    torch.manual_seed(0)
    mid = M.UniAR(mid_config(args.vd_depth)).to(args.device).eval()
    ids = torch.randint(0, 1000, (16, args.prompt_len), generator=torch.Generator().manual_seed(1))
    ids[:, -1] = mid.cfg.vision_start_token_id

    def toy_run(b):
        for i in range(0, 16, b):
            bits = P.generate_bits(net, tok, prompts[i:i + b], ar_height=64, ar_width=64, cfg_scale=1.5, seed=seeds[i:i + b])
            dec.decode(bits, 64, 64, upsampling_ratio=1.0, steps=10, guidance=1.5, seed=seeds[i:i + b])

    def mid_run(b):
        for i in range(0, 16, b):
            rows = torch.cat([ids[i:i + b], torch.zeros_like(ids[i:i + b])]).to(args.device)  # [cond; uncond]
            rows[b:, -1] = mid.cfg.vision_start_token_id
            gens = [torch.Generator(args.device).manual_seed(s) for s in seeds[i:i + b]]
            M.generate_image(mid, rows, torch.ones_like(rows), args.size, args.size,
                             M.MultinomialSampler(args.cfg, 1.0, gens))

    out = {}
    for name, fn in (("toy checkpoint, AR + decoder", toy_run), (f"mid-size AR, {args.size} px", mid_run)):
        fn(1)  # warm-up
        rate = {b: 16 / _timed(lambda: fn(b))[1] for b in (1, 4, 16)}
        print(f"{name}: " + ", ".join(f"batch {b}: {r:.2f} img/s ({r / rate[1]:.2f}x)" for b, r in rate.items()))
        out[name] = rate
    return out


def _proc_status_bytes(field: str) -> int:
    """A memory line of /proc/self/status (VmRSS: resident now, VmHWM: the peak) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class _Synthetic(nn.Module):
    def __init__(self, n: int, width: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n))


def _load_memory_child(path: str, n: int, width: int, dtype: str, device: str) -> None:
    """Runs in a fresh process: build on meta, load, report (baseline RSS, peak RSS) as JSON; then the load time
    with and without the finiteness check onto `device` (alternating, best of 3 each; the file is in the page cache
    by then)."""
    base = _proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    model = load_hf.build_on_meta(lambda: _Synthetic(n, width))
    load_hf.load_weights(model, [Path(path)], dtype=getattr(torch, dtype))
    peak = _proc_status_bytes("VmHWM")
    s = sum(p.float().sum().item() for p in model.parameters())  # touch every weight
    del model
    times = {(check, touch): [] for check in (False, True) for touch in (False, True)}
    for _ in range(3):
        for check, touch in times:
            model = load_hf.build_on_meta(lambda: _Synthetic(n, width))
            t0 = time.perf_counter()
            load_hf.load_weights(model, [Path(path)], dtype=getattr(torch, dtype), device=device, check_finite=check)
            if touch:  # one pass over every weight, as a first forward makes: a kept float32 map is read only here
                for p in model.parameters():
                    p.sum()
            if device != "cpu":
                torch.cuda.synchronize()
            times[check, touch].append(time.perf_counter() - t0)
            del model
    print(json.dumps({"base": base, "peak": peak, "checksum": s,
                      **{f"{'checked' if c else 'plain'}_{'touched' if t else 'load'}": min(v)
                         for (c, t), v in times.items()}}))


def load_memory(gib: float = 1.0, dtype: str = "float32", folder: str | None = None, device: str = "cpu") -> float:
    """Write a synthetic float32 checkpoint of about `gib` GiB, load it in a fresh process, print peak RSS / size
    (loading to the CPU) and the load time onto `device` with and without the finiteness check."""
    width = 4096
    n = max(1, round(gib * 2**30 / (4 * (width * width + width))))
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = Path(tmp) / "model.safetensors"
        save_file({f"layers.{i}.{k}": v for i in range(n)
                   for k, v in (("weight", torch.randn(width, width)), ("bias", torch.randn(width)))}, str(path))
        size = path.stat().st_size
        out = subprocess.run([sys.executable, __file__, _CHILD, str(path), str(n), str(width), dtype, device],
                             capture_output=True, text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    ratio = (r["peak"] - r["base"]) / size
    print(f"synthetic checkpoint {size / 2**30:.2f} GiB ({n} x Linear({width}, {width}), float32) loaded as {dtype}: "
          f"peak RSS above baseline {(r['peak'] - r['base']) / 2**30:.2f} GiB = {ratio:.3f} x file size "
          f"(baseline after imports {r['base'] / 2**30:.2f} GiB)")
    for what, key in (("load", "load"), ("load + one pass over every weight", "touched")):
        plain, checked = r[f"plain_{key}"], r[f"checked_{key}"]
        print(f"  {what} onto {device} (best of 3): {plain:.3f} s without the finiteness check, {checked:.3f} s with "
              f"it ({100 * (checked / plain - 1):+.0f}%)")
    return ratio


def bench_load_memory(args) -> dict:
    """load_memory for `--dtype`, or for float32 and bfloat16 when it is float32 (the default)."""
    dtypes = [args.dtype] if args.dtype != "float32" else ["float32", "bfloat16"]
    return {dt: load_memory(args.gib, dt, device=args.device or "cpu") for dt in dtypes}


_CHILD = "_load-memory-child"  # the first argument of the fresh process load_memory starts


class Split:
    """Wall time spent inside named functions during a block (wrapped in place, restored after), so one training
    step's time can be split without touching the training code. Nested wrapped calls are not subtracted: each
    name is the inclusive time of its calls."""

    def __init__(self):
        self.seconds, self.calls, self._undo = {}, {}, []

    def wrap(self, owner, attr: str, name: str) -> None:
        real = getattr(owner, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                self.calls[name] = self.calls.get(name, 0) + 1

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, owner.__dict__.get(attr) if isinstance(owner, type) else real))

    def restore(self) -> None:
        for owner, attr, real in reversed(self._undo):
            setattr(owner, attr, real)
        self._undo.clear()


def bench_train_step(args) -> dict:
    """Where a training step of `python train.py` (default TrainConfig, fresh weights, this machine's threads) goes.
    For each stage, `--steps` steps after warm-up steps (stage 1: 2; stage 2: `--warm-steps`, which also fill
    ARLoss's cache of the frozen tokenizer's bits, as most of a real run's steps find it), split into: toy rendering
    (toy.*_example), context building (tokenize + pack, stage 2), tower calls (the frozen tokenizer's bits in stage 2;
    the straight-through tower in stage 1), the rest of the forward, backward, optimizer (clip + the run's optimizer
    step). Prints seconds per step and shares; the stage's projected time is steps-per-stage x seconds per step."""
    import train

    tc = train.TrainConfig()
    tok = P.Tokenizer(toy.save_tokenizer(Path(tempfile.mkdtemp(prefix="uniar-bench-"))))
    vision, net, dec = train.build(tc, tok, torch.device(args.device))
    out = {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}
    dev_type = torch.device(args.device).type
    autocast = ((lambda: torch.autocast(dev_type, torch.bfloat16)) if args.dtype == "bfloat16"
                else contextlib.nullcontext)
    print(f"train-step: default TrainConfig, {args.device}, {args.dtype}, {out['threads']} intra-op threads, "
          f"{out['interop_threads']} inter-op threads; {args.steps} steps per stage after 2 (stage 1) and "
          f"{args.warm_steps} (stage 2) warm-up steps")
    for stage in (1, 2):
        params = train.stage_params(stage, vision, net, dec)
        lr, total = (tc.stage1_lr, tc.stage1_steps) if stage == 1 else (tc.stage2_lr, tc.stage2_steps)
        opt = train.optimizer(stage, params, (vision, net, dec), lr, tc)  # the run's: AdamW, or Muon + AdamW
        if stage == 1:
            vision.train(), dec.train()
            loss_fn = train.TokenizerLoss(vision, dec, tc.bsq_weight, tc.flip_prob)

            def batch(step, g):
                idx = [train.example_index(step, i, tc.stage1_batch, 0, 1) for i in range(tc.stage1_batch)]
                return np.stack([toy.t2i_example(i, "train", tc.seed, tc.size).image for i in idx]), g
        else:
            net.train()
            loss_fn = train.ARLoss(net, tok, tc)

            def batch(step, g):
                return step, 0, 1, g
        split = Split()
        for fn in ("t2i_example", "edit_example", "qa_example", "conversation_example"):
            split.wrap(toy, fn, "toy rendering")
        split.wrap(train.ARLoss, "layout", "context building")
        split.wrap(train, "pack_contexts", "context building")
        split.wrap(train.ARLoss, "image_bits", "tower calls")
        split.wrap(bsq.VisionModel, "training_forward", "tower calls")
        phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        try:
            warm = 2 if stage == 1 else max(2, args.warm_steps)
            for step in range(args.steps + warm):
                if step == warm:  # warm-up done
                    split.seconds, split.calls = {}, {}
                    phases = dict.fromkeys(phases, 0.0)
                g = torch.Generator().manual_seed(step)
                torch.manual_seed(step)
                t0 = time.perf_counter()
                with autocast():
                    loss, _ = loss_fn(*batch(step, g))
                t1 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                t2 = time.perf_counter()
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                opt.step()
                t3 = time.perf_counter()
                for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                    phases[k] += dt
        finally:
            split.restore()
        n = args.steps
        per_step = sum(phases.values()) / n
        parts = {k: v / n for k, v in split.seconds.items()}
        parts["rest of the forward"] = phases["forward"] / n - sum(parts.values())
        parts["backward"], parts["optimizer"] = phases["backward"] / n, phases["optimizer"] / n
        print(f"  stage {stage}: {per_step:.3f} s/step -> {per_step * total / 60:.1f} min for its {total} steps")
        for k, v in parts.items():
            calls = f" ({split.calls[k] / n:.0f} calls/step)" if k in split.calls else ""
            print(f"    {k:22s} {v:7.3f} s  {100 * v / per_step:5.1f}%{calls}")
        out[f"stage{stage}"] = {"s_per_step": per_step, **parts}
    return out


BENCHES = {"rollout": bench_rollout, "step": bench_step, "throughput": bench_throughput,
           "load-memory": bench_load_memory, "train-step": bench_train_step}


# ---------------------------------------------------------------------------------------------------------------------
# Fine-tuning memory: finetune.memory_plan against one measured step of the mid-size model
# ---------------------------------------------------------------------------------------------------------------------

_FT_CHILD = "_finetune-memory-child"


def edit_batch(cfg: M.UniARConfig, size: int):
    """One edit record as finetune.Batch (no files, no tokenizer): 24 text tokens, the input image, the instruction's
    8 tokens, the drawn image (its bits the targets). -> (Batch, tokens, image tokens)."""
    import finetune as F

    g = torch.Generator().manual_seed(0)
    n = (size // cfg.downsample) ** 2
    img = lambda: [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]  # noqa: E731
    text = lambda k: torch.randint(0, 1000, (k,), generator=g).tolist()  # noqa: E731
    ids = torch.tensor([text(24) + img() + text(8) + img() + text(4)])
    v = cfg.vision
    pre = [P.preprocess_image(np.asarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)),
                              resize=False, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                              temporal_patch_size=v.temporal_patch_size) for _ in range(2)]
    k = F.TASKS.index("edit")
    inv_bits = torch.zeros(len(F.TASKS), dtype=torch.float64)
    inv_bits[k] = 1.0 / (n * v.levels * v.merge_unit * v.bsq_dim)
    batch = F.Batch(ids, torch.ones_like(ids), torch.cat([p for p, _ in pre]), torch.cat([gr for _, gr in pre]),
                    torch.zeros((2 * n, v.levels, v.merge_unit, v.bsq_dim), dtype=torch.bool),
                    torch.tensor([False] * n + [True] * n), torch.zeros_like(ids, dtype=torch.bool), torch.tensor([k]),
                    inv_bits, torch.zeros(len(F.TASKS), dtype=torch.float64))
    return batch, ids.shape[1], 2 * n


def _finetune_memory_child(lora: int, checkpointing: bool, size: int) -> None:
    """Runs in a fresh process: the mid-size model (fp32, CPU), one fine-tune step on one edit record; prints the
    baseline and peak RSS and the bytes autograd saved for the backward pass (unique storages, parameters aside)."""
    import finetune as F

    torch.manual_seed(0)
    batch, _, _ = edit_batch(mid_config(), size)
    base = _proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    net = M.UniAR(mid_config())
    if lora:
        F.add_lora(net, lora, float(lora), 0)
    params = [p for _, p in F.trainable(net, lora)]
    if checkpointing:
        F.checkpoint_layers(net)
    net.train()
    loss = F.ContextLoss(net, dict.fromkeys(F.TASKS, 1.0))
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total, _ = loss(batch)
    total.backward()
    opt.step()
    for _ in range(2):  # steady state: AdamW's moments exist while the next step's activations do
        opt.zero_grad(set_to_none=True)
        loss(batch)[0].backward()
        opt.step()
    print(json.dumps({"base": base, "peak": _proc_status_bytes("VmHWM"), "saved": sum(saved.values())}))


def bench_finetune_memory(args) -> dict:
    """Each of full / LoRA (rank 16) x without / with gradient checkpointing in a fresh process: the measured peak
    resident memory above the baseline and the bytes saved for the backward pass, next to finetune.memory_plan for
    the same model and record (CPU: fp32 everywhere, one process)."""
    import finetune as F

    cfg = mid_config()
    _, tokens, n_img = edit_batch(cfg, args.size)
    out = {}
    print(f"mid-size model ({sum(p.numel() for p in M.UniAR(cfg).parameters()) / 1e6:.1f} M parameters), one edit "
          f"record of {tokens} tokens ({n_img} image tokens) at {args.size}x{args.size}, fp32 on the CPU; MiB")
    print("| fine-tune | checkpointing | planned total | measured peak above baseline | planned activations | "
          "measured saved for backward |")
    print("|---|---|---|---|---|---|")
    for lora in (0, 16):
        for ck in (False, True):
            # large blocks straight from mmap, so that freed memory leaves the resident set and the peak is real
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            r = json.loads(subprocess.run([sys.executable, __file__, _FT_CHILD, str(lora), str(int(ck)),
                                           str(args.size)], capture_output=True, text=True, check=True, env=env
                                          ).stdout.strip().splitlines()[-1])
            plan = F.memory_plan(cfg, lora=lora, gpus=1, checkpointing=ck, tokens=tokens, image_tokens_=n_img,
                                 gpu=False)
            name = "full" if not lora else f"LoRA r={lora}"
            mib = 2**20
            print(f"| {name} | {'yes' if ck else 'no'} | {plan['total'] / mib:.0f} | {(r['peak'] - r['base']) / mib:.0f}"
                  f" | {plan['activations'] / mib:.0f} | {r['saved'] / mib:.0f}" + (" (checkpointed layers not seen)"
                                                                                   if ck else "") + " |")
            out[(name, ck)] = {"plan": plan, **r}
    return out


BENCHES["finetune-memory"] = bench_finetune_memory


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [_CHILD]:
        return _load_memory_child(argv[1], int(argv[2]), int(argv[3]), argv[4], argv[5])
    if argv[:1] == [_FT_CHILD]:
        return _finetune_memory_child(int(argv[1]), bool(int(argv[2])), int(argv[3]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", nargs="?", default="rollout", choices=sorted(BENCHES))
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu (load-memory: cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--size", type=int, default=512, help="AR image side in px (512 -> 256 tokens)")
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=4, help="prompts (each with its uncond row)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--vd-depth", type=int, default=4, help="visual-decoder layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=16, help="step: AR steps timed beyond the first; train-step: steps "
                   "timed per stage")
    p.add_argument("--warm-steps", type=int, default=100, help="train-step: stage-2 steps run before timing (they "
                   "fill the cache of the toy images' bits)")
    p.add_argument("--text-layers", type=int, default=0, help="step: override the 36 text layers (CPU smoke runs)")
    p.add_argument("--bandwidth", type=float, default=0.0, help="step: memory bandwidth in GB/s (default: by GPU name)")
    p.add_argument("--gib", type=float, default=1.0, help="load-memory: size of the synthetic checkpoint")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="load-memory: the dtype loaded (float32: both float32 and bfloat16); train-step: bfloat16 "
                        "runs each step's forward under autocast, as train.py does on a GPU")
    args = p.parse_args(argv)
    if args.bench != "load-memory":
        args.device = str(cli.resolve_device(args.device or "auto"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bench == "train-step":  # trains: gradients on
        return BENCHES[args.bench](args)
    with torch.no_grad():
        return BENCHES[args.bench](args)


if __name__ == "__main__":
    main()
