"""Benchmarks, printed as ratios measured in one run.

    python bench.py rollout    # CFG image rollout: visual-decoder KV cache vs the official recompute-every-step loop

Each benchmark is a function `bench_<name>(args)`; `main()` dispatches on the first argument.
"""
from __future__ import annotations

import argparse
import time

import torch

import bsq
import model as M


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
        return M.generate_image(m, ids, mask, size, size, cfg=args.cfg, temperature=1.0,
                                visual_decoder_cache=vd_cache, generator=torch.Generator().manual_seed(args.seed),
                                return_step_logits=True)

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


BENCHES = {"rollout": bench_rollout}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", nargs="?", default="rollout", choices=sorted(BENCHES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--size", type=int, default=512, help="AR image side in px (512 -> 256 tokens)")
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=4, help="prompts (each with its uncond row)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--vd-depth", type=int, default=4, help="visual-decoder layers")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.no_grad():
        return BENCHES[args.bench](args)


if __name__ == "__main__":
    main()
