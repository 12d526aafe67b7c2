"""Draw, edit or answer with a UniAR checkpoint: one prompt, one run.

    python sample.py --ckpt CKPT --prompt "a blue circle at the bottom right"             # text-to-image
    python sample.py --ckpt CKPT --image in.png --prompt "make the red square blue"       # editing
    python sample.py --ckpt CKPT --image in.png --question "what color is the square?"    # understanding
    python sample.py --prompt "a blue triangle at the top right"  # the toy checkpoint (no --ckpt): toy words only

A conversation is chat.py; a prompt file (the official batch launcher's format) is generate_batch.py.

Two stages, loaded one after the other: the AR model writes bits (parallel bitwise prediction with classifier-free
guidance), is released, then the diffusion decoder turns the bits into pixels. So the released model runs on one
24 GB GPU. Defaults are the checkpoint's: a released checkpoint gets the official inference docs' (AR 960x960, cfg
1.5, temperature 1.0, decoder x1.067, 28 steps, decoder guidance 1.5), a project checkpoint those of its
uniar_sample.json (--help shows those of the checkpoint --ckpt names). Every flag is checked before anything loads.
"""
from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

# Apple's GPU: an operation the installed torch lacks on MPS runs on the CPU instead of stopping the run (torch reads
# this when it is imported, so it is set first; a value the user set is kept).
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
import torch
from PIL import Image
from safetensors.torch import save_file

import bsq
import cli
import files
import load_hf
import pipeline as P

OUTPUTS = ".uniar-outputs.json"  # in --out: the files the last run wrote (the next run replaces exactly those)
MOVED = {"--chat": "chat.py: python chat.py ...", "--chat-file": "chat.py: python chat.py --file FILE ...",
         "--prompts": "generate_batch.py: python generate_batch.py --prompts FILE ..."}  # sample.py's former modes


def build_parser(ckpt: Path, d: dict) -> cli.Parser:
    """The parser; `d` are the defaults of checkpoint `ckpt`."""
    ap = cli.script_parser(__doc__, ckpt, d)
    ap.add_argument("--prompt", help="text-to-image prompt, or the edit instruction with --image" +
                    (f" (default without --image / --question: {d['prompt']!r})" if d.get("prompt") else ""))
    ap.add_argument("--image", help="input image: edited with --prompt, or asked about with --question")
    ap.add_argument("--question", help="understanding: a question about --image")
    cli.add_image_flags(ap, d)
    ap.add_argument("--num-images", type=int, default=1, help="images per prompt, drawn as one batch from the "
                    "seeded stream (each differs), written as sample_00.png, sample_01.png, ... and grid.png "
                    "(default 1)")
    cli.add_answer_flags(ap)
    cli.add_output_flags(ap)
    ap.add_argument("--save-bits", action="store_true", help="also save the generated bits (safetensors)")
    return ap


def main(argv=None) -> int:
    """Exit code 0; 2 with one `error: ...` line for bad input (checked before anything loads) or an output folder
    that cannot be written; 130 / 143 with one line after Ctrl-C / SIGTERM."""
    return cli.run_script(run, argv)


def run(argv: list, status: dict) -> int:
    for flag in (arg.split("=", 1)[0] for arg in argv):  # a former mode: the command that runs it now, first
        if flag in MOVED:
            raise cli.UsageError(f"{flag} moved to {MOVED[flag]}")
    ckpt, defaults = cli.checkpoint_settings(argv, load_hf.resolve_checkpoint)
    ap = build_parser(ckpt, defaults)
    args = ap.parse_args(argv)
    cli.apply_defaults(args, defaults)
    for flag, what in (("prompt", "the text to draw (or, with --image, the edit instruction)"),
                       ("question", "a question about --image")):
        if getattr(args, flag) is not None and not getattr(args, flag).strip():
            raise cli.UsageError(f"--{flag} is empty; give {what}")
    default_prompt = args.question is None and args.prompt is None and args.image is None and defaults["prompt"]
    if default_prompt:
        args.prompt = defaults["prompt"]  # `python sample.py` alone: the checkpoint's example prompt
    if args.question is None and args.prompt is None:
        ap.error("give --prompt (text-to-image, or editing with --image) or --image with --question")
    if args.question is not None and args.image is None:
        ap.error("--question needs --image")

    # ----- every flag checked, against the checkpoint's configs (load_hf.Plan), before anything loads -----
    cli.check_int_range(args.num_images, "--num-images", 1)
    cli.check_seed(args.seed)
    if args.question is None:
        cli.check_image_flags(args)
    cli.check_answer_flags(args)
    device = cli.check_device_and_out(args, writes=args.question is None)  # an answer writes nothing
    dtype = cli.DTYPES[args.dtype] or load_hf.default_dtype(device)
    plan = load_hf.Plan(ckpt)
    try:
        if args.question is None:
            cli.check_generation(plan, *args.ar_size, args.upsample, [args.prompt], image=args.image)
        else:
            args.max_new_tokens = cli.check_understanding(plan, args.image, args.question, args.max_new_tokens)
    except ValueError as e:  # load_hf.CheckpointError too
        return cli.fail(e)
    if default_prompt:
        print(f"prompt: {args.prompt!r}", file=sys.stderr)
    return generate(args, ckpt, device, dtype)


def generate(args, ckpt: Path, device: torch.device, dtype: torch.dtype) -> int:
    """Stage 1, the AR model: the answer (printed), or the bits; stage 2, the decoder: the images, written to --out."""
    ar_h, ar_w = args.ar_size
    t0 = time.perf_counter()
    try:
        net, tok = load_hf.load_ar(ckpt, dtype=dtype, device=device)
    except load_hf.CheckpointError as e:
        return cli.fail(e)
    t_load = time.perf_counter()
    try:
        if args.question is not None:
            print(P.answer(net, tok, args.image, args.question, max_new_tokens=args.max_new_tokens,
                           temperature=args.answer_temperature, seed=args.seed))
            print(f"[load {t_load - t0:.1f}s, answer {time.perf_counter() - t_load:.1f}s, {peak_memory(device)}]",
                  file=sys.stderr)
            return 0
        bits = P.generate_bits(net, tok, [args.prompt] * args.num_images, ar_height=ar_h, ar_width=ar_w,
                               cfg_scale=args.cfg, temperature=args.temperature, seed=args.seed,
                               input_images=None if args.image is None else [args.image] * args.num_images,
                               progress=True, sampler=args.sampler)
    except ValueError as e:
        return cli.fail(e)
    except RuntimeError as e:  # torch.multinomial on NaN / inf: logits overflowed (half precision at the edges)
        if "probability tensor contains" not in str(e):
            raise
        return cli.fail(f"bit sampling got non-finite probabilities (--temperature {args.temperature}, --cfg "
                        f"{args.cfg}, dtype {str(dtype).replace('torch.', '')}): the logits overflowed; use a larger "
                        "--temperature, a smaller --cfg or --dtype float32")
    t_ar = time.perf_counter()
    del net
    release(device)  # the AR model's memory back to the device before the decoder loads

    try:
        dec = load_hf.load_decoder(ckpt, dtype=dtype, device=device, cache_dir=args.cache_dir)
        t_dload = time.perf_counter()
        images = P.decode_bits(dec, bits, ar_h, ar_w, upsampling_ratio=args.upsample, steps=args.steps,
                               guidance=args.decoder_cfg, seed=args.seed, progress=True)
    except ValueError as e:  # load_hf.CheckpointError too
        return cli.fail(e)
    t_dec = time.perf_counter()
    with cli.writing(args.out):
        paths = write_outputs(args.out, images.cpu(), bits if args.save_bits else None,
                              {"prompt": args.prompt or "", "ar_size": f"{ar_h}x{ar_w}", "seed": str(args.seed)})
    print("\n".join(str(p) for p in paths))
    print(f"[AR: load {t_load - t0:.1f}s, {ar_h // 32 * (ar_w // 32)} steps {t_ar - t_load:.1f}s | decoder: load "
          f"{t_dload - t_ar:.1f}s, {args.steps} steps {t_dec - t_dload:.1f}s | {peak_memory(device)}]",
          file=sys.stderr)
    return 0


def write_outputs(out: Path, images: torch.Tensor, bits, metadata: dict) -> list:
    """The run's files (sample_XX.png, grid.png with several images, bits.safetensors with --save-bits) written as
    one set: staged completely, then switched in under a lock (files.replace_folder), replacing exactly the files the
    previous run wrote there. Concurrent runs with the same --out never leave a mix, a killed run leaves the
    previous set, and the user's other files in --out are never touched."""
    names = [f"sample_{i:02d}.png" for i in range(len(images))]

    def write(folder: Path) -> None:
        for name, im in zip(names, images):
            Image.fromarray(im.numpy()).save(folder / name, format="PNG")
        if len(images) > 1:
            files.save_grid(images, folder / "grid.png")
        if bits is not None:
            save_file({"bits": bits.cpu().contiguous(), "indices": bsq.bits_to_indexes(bits).cpu().contiguous()},
                      str(folder / "bits.safetensors"), metadata=metadata)

    files.replace_folder(out, write, owned=OUTPUTS)
    return [out / n for n in names]


def release(device: torch.device) -> None:
    """Hand the released model's memory back to the device before the next stage loads."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory in bytes, from getrusage (Linux, macOS and the BSDs; no /proc), or None
    where the system has no `resource` module (Windows). ru_maxrss is in bytes on macOS and in KiB elsewhere."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_memory(device: torch.device) -> str:
    """The memory part of the closing line: peak allocated GPU memory on CUDA, else the process's peak resident
    memory (on MPS with the Metal driver's allocation at the end, which unified memory need not count as resident);
    'peak memory not measured' where the system reports neither."""
    if device.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    rss = peak_rss_bytes()
    out = "peak memory not measured on this system" if rss is None else f"peak resident memory {rss / 2**30:.2f} GiB"
    if device.type == "mps":
        out += f", Metal driver memory at the end {torch.mps.driver_allocated_memory() / 2**30:.2f} GiB"
    return out


if __name__ == "__main__":
    sys.exit(main())
