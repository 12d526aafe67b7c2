"""Generate, edit and answer with a UniAR checkpoint from the command line.

    python sample.py --ckpt CKPT --prompt "a red cube on a table"                 # text-to-image
    python sample.py --ckpt CKPT --image in.png --prompt "make the cube blue"     # editing
    python sample.py --ckpt CKPT --image in.png --question "what is on the table?"  # understanding

Two stages, loaded one after the other: the AR model writes bits (parallel bitwise prediction with classifier-free
guidance), is released, then the diffusion decoder turns the bits into pixels. So the released model runs on one
24 GB GPU. Defaults follow the official inference docs (AR 960x960, cfg 1.5, temperature 1.0, decoder x1.067,
28 steps, decoder guidance 1.5).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

DEFAULT_CKPT = Path(__file__).resolve().parent / "checkpoints" / "toy"


def parse_size(s: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ar-size must look like 512x512, got {s!r}") from None
    return h, w


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    with open("/proc/self/status") as f:
        hwm = next((int(l.split()[1]) for l in f if l.startswith("VmHWM:")), 0)
    return f"peak resident memory {hwm / 2**20:.2f} GiB"


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def save_grid(images: torch.Tensor, path: Path) -> None:
    """images (B, H, W, 3) uint8 -> one PNG, as square a grid as possible."""
    from PIL import Image

    B, H, W, _ = images.shape
    cols = int(B**0.5 + 0.999)
    rows = (B + cols - 1) // cols
    canvas = torch.full((rows * H, cols * W, 3), 255, dtype=torch.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * H:(r + 1) * H, c * W:(c + 1) * W] = im
    Image.fromarray(canvas.numpy()).save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=None, help="checkpoint folder (released layout); default: the "
                    "project's toy checkpoint")
    ap.add_argument("--prompt", help="text-to-image prompt, or the edit instruction with --image")
    ap.add_argument("--image", help="input image: edited with --prompt, or asked about with --question")
    ap.add_argument("--question", help="understanding: a question about --image")
    ap.add_argument("--cfg", type=float, default=None, help="classifier-free guidance of the AR model (1 = off; "
                    "default 1.5)")
    ap.add_argument("--temperature", type=float, default=None, help="bit sampling temperature (default 1.0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ar-size", type=parse_size, default=None, help="AR grid in pixels, HxW, multiples of 32 "
                    "(default 960x960)")
    ap.add_argument("--upsample", type=float, default=None, help="decoder output / AR size, in [1, 2] "
                    "(default 1.067)")
    ap.add_argument("--steps", type=int, default=None, help="decoder denoising steps (default 28)")
    ap.add_argument("--decoder-cfg", type=float, default=None, help="decoder guidance over the visual condition "
                    "(default 1.5)")
    ap.add_argument("--num-images", type=int, default=1)
    ap.add_argument("--sampler", default="multinomial", choices=["multinomial", "kernel"],
                    help="bit sampler: the official multinomial draw (bit-identical seeds), or the one-launch bitwise "
                    "kernel (Triton on GPU; another random stream)")
    ap.add_argument("--max-new-tokens", type=int, default=1024, help="understanding: answer length limit")
    ap.add_argument("--answer-temperature", type=float, default=0.0, help="understanding: 0 = greedy (official)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--out", type=Path, default=Path("out"), help="output folder")
    ap.add_argument("--save-bits", action="store_true", help="also save the generated bits (safetensors)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="where the decoder prompt embeddings are cached")
    args = ap.parse_args(argv)

    import load_hf
    import model as M

    ckpt = args.ckpt
    if ckpt is None:
        if not (DEFAULT_CKPT / "config.json").exists():
            print("No checkpoint given and the project's toy checkpoint does not exist yet "
                  f"({DEFAULT_CKPT}). Pass --ckpt PATH to a UniAR checkpoint folder, e.g. a download of "
                  "ShareLab-SII/UniAR-SFT or ShareLab-SII/UniAR-RL.", file=sys.stderr)
            return 2
        ckpt = DEFAULT_CKPT
    defaults = _checkpoint_defaults(ckpt)
    if args.question is None and args.prompt is None and args.image is None and defaults.get("prompt"):
        args.prompt = defaults["prompt"]  # `python sample.py` alone: the checkpoint's example prompt
        print(f"prompt: {args.prompt!r}", file=sys.stderr)
    for name in ("cfg", "temperature", "steps", "decoder_cfg"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.question is None and args.prompt is None:
        ap.error("give --prompt (text-to-image, or editing with --image) or --image with --question")
    if args.question is not None and args.image is None:
        ap.error("--question needs --image")
    if args.num_images < 1:
        ap.error(f"--num-images must be >= 1, got {args.num_images}")

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    ar_h, ar_w = args.ar_size or defaults["ar_size"]
    upsample = args.upsample if args.upsample is not None else defaults["upsample"]
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    # ----- stage 1: the AR model -----
    try:
        net, tok = load_hf.load_ar(ckpt, dtype=dtype, device=device)
    except load_hf.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_load = time.perf_counter()
    try:
        if args.question is not None:
            text = M.answer(net, tok, args.image, args.question, max_new_tokens=args.max_new_tokens,
                            temperature=args.answer_temperature, seed=args.seed)
            print(text)
            print(f"[load {t_load - t0:.1f}s, answer {time.perf_counter() - t_load:.1f}s, {peak_memory(device)}]",
                  file=sys.stderr)
            return 0
        prompts = [args.prompt] * args.num_images
        images_in = None if args.image is None else [args.image] * args.num_images
        bits = M.generate_bits(net, tok, prompts, ar_height=ar_h, ar_width=ar_w, cfg=args.cfg,
                               temperature=args.temperature, seed=args.seed, input_images=images_in, progress=True,
                               sampler=args.sampler)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_ar = time.perf_counter()
    if args.save_bits:
        from safetensors.torch import save_file

        import bsq
        save_file({"bits": bits.cpu().contiguous(), "indices": bsq.bits_to_indexes(bits).cpu().contiguous()},
                  str(args.out / "bits.safetensors"),
                  metadata={"prompt": args.prompt or "", "ar_size": f"{ar_h}x{ar_w}", "seed": str(args.seed)})
    del net
    release(device)

    # ----- stage 2: the diffusion decoder -----
    try:
        dec = load_hf.load_decoder(ckpt, dtype=dtype, device=device, cache_dir=args.cache_dir)
        t_dload = time.perf_counter()
        images = dec.decode(bits, ar_h, ar_w, upsampling_ratio=upsample, steps=args.steps,
                            guidance=args.decoder_cfg, seed=args.seed, progress=True)
    except (load_hf.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_dec = time.perf_counter()
    from PIL import Image

    paths = []
    for i, im in enumerate(images.cpu()):
        p = args.out / f"sample_{i:02d}.png"
        Image.fromarray(im.numpy()).save(p)
        paths.append(p)
    if len(images) > 1:
        save_grid(images.cpu(), args.out / "grid.png")
    print("\n".join(str(p) for p in paths))
    print(f"[AR: load {t_load - t0:.1f}s, {ar_h // 32 * (ar_w // 32)} steps {t_ar - t_load:.1f}s | decoder: load "
          f"{t_dload - t_ar:.1f}s, {args.steps} steps {t_dec - t_dload:.1f}s | {peak_memory(device)}]",
          file=sys.stderr)
    return 0


def _checkpoint_defaults(ckpt: Path) -> dict:
    """The official defaults, or those a project checkpoint records in `uniar_sample.json` (the toy model is
    trained at a small AR size and has an example prompt)."""
    d = {"ar_size": (960, 960), "upsample": 1.067, "cfg": 1.5, "temperature": 1.0, "steps": 28, "decoder_cfg": 1.5,
         "prompt": None}
    f = Path(ckpt) / "uniar_sample.json"
    if f.exists():
        with open(f) as fh:
            j = json.load(fh)
        d.update({k: j[k] for k in d if k in j})
        d["ar_size"] = tuple(d["ar_size"])
    return d


if __name__ == "__main__":
    sys.exit(main())
