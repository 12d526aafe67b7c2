"""Generate, edit and answer with a UniAR checkpoint from the command line.

    python sample.py --ckpt CKPT --prompt "a blue circle at the bottom right"             # text-to-image
    python sample.py --ckpt CKPT --image in.png --prompt "make the red square blue"       # editing
    python sample.py --ckpt CKPT --image in.png --question "what color is the square?"    # understanding
    python sample.py --prompt "a blue triangle at the top right"  # the toy checkpoint (no --ckpt): toy words only
    python sample.py --ckpt CKPT --prompts prompts.jsonl --samples-per-prompt 4         # a prompt file (below)

Two stages, loaded one after the other: the AR model writes bits (parallel bitwise prediction with classifier-free
guidance), is released, then the diffusion decoder turns the bits into pixels. So the released model runs on one
24 GB GPU. Defaults are the checkpoint's: a released checkpoint gets the official inference docs' (AR 960x960, cfg
1.5, temperature 1.0, decoder x1.067, 28 steps, decoder guidance 1.5), a project checkpoint those of its
uniar_sample.json (--help shows those of the checkpoint --ckpt names). Every flag is checked before anything loads.
"""
from __future__ import annotations

import argparse
import errno
import gc
import itertools
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

# Apple's GPU: an operation the installed torch lacks on MPS runs on the CPU instead of stopping the run (torch reads
# this when it is imported, so it is set first; a value the user set is kept).
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
import torch
import torch.distributed as dist
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import save_file
from tokenizers import models
from tqdm import tqdm

import bsq
import cli
import load_hf
import pipeline as P

DEFAULT_CKPT = Path(__file__).resolve().parent / "checkpoints" / "toy"
MAX_NEW_TOKENS = 1024  # understanding: the default answer limit, lowered to what the position budget leaves


def parse_size(s: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like HxW, e.g. 512x512, got {s!r}") from None
    return h, w


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype: 'auto' is the device's default (load_hf.default_dtype: bf16 on CUDA, fp32 on MPS and CPU)."""
    if name == "auto":
        return load_hf.default_dtype(device)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


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


def release(device: torch.device) -> None:
    """Hand the released model's memory back to the device before the next stage loads."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def _ckpt_from_argv(argv: list) -> Path | None:
    """--ckpt read ahead of the full parser, so that --help can show the defaults of the checkpoint it will use."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--ckpt", type=Path, default=None)
    try:
        return pre.parse_known_args(argv)[0].ckpt
    except SystemExit:  # e.g. `--ckpt` without a value: the full parser reports it
        return None


def build_parser(d: dict, ckpt: Path, has_json: bool) -> argparse.ArgumentParser:
    """The parser; `d` are the defaults of checkpoint `ckpt` (read from its uniar_sample.json when `has_json`)."""
    t_lo, t_hi = cli.TEMPERATURE_RANGE
    g_lo, g_hi = cli.CFG_RANGE
    where = f"its {cli.SAMPLE_JSON}" if has_json else "the official inference defaults"
    ap = cli.Parser(description=f"{__doc__}\nDefaults below: those of {ckpt} ({where}).",
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=None, help="checkpoint folder (released layout); default: the "
                    f"project's toy checkpoint ({DEFAULT_CKPT})")
    ap.add_argument("--prompt", help="text-to-image prompt, or the edit instruction with --image" +
                    (f" (default without --image / --question: {d['prompt']!r})" if d.get("prompt") else ""))
    ap.add_argument("--image", help="input image: edited with --prompt, or asked about with --question")
    ap.add_argument("--question", help="understanding: a question about --image")
    ap.add_argument("--cfg", type=float, default=None, help=f"classifier-free guidance of the AR model, in "
                    f"[{g_lo:g}, {g_hi:g}] (1 = off; default {d['cfg']})")
    ap.add_argument("--temperature", type=float, default=None, help=f"bit sampling temperature, in [{t_lo:g}, "
                    f"{t_hi:g}] ({t_lo:g} is already near-greedy, smaller values overflow the logits; default "
                    f"{d['temperature']})")
    ap.add_argument("--seed", type=int, default=0, help="seed of the AR bit sampling and the decoder noise, an "
                    "integer in [0, 2**64 - 1]: the same seed, flags and checkpoint give the same image (default 0)")
    ap.add_argument("--ar-size", type=parse_size, default=None, help="AR grid in pixels, HxW, multiples of 32 "
                    f"(default {d['ar_size'][0]}x{d['ar_size'][1]})")
    ap.add_argument("--upsample", type=float, default=None, help="decoder output / AR size, in [1, 2] "
                    f"(default {d['upsample']})")
    ap.add_argument("--steps", type=int, default=None, help=f"decoder denoising steps, >= 1 (default {d['steps']})")
    ap.add_argument("--decoder-cfg", type=float, default=None, help="decoder guidance over the visual condition, in "
                    f"[{g_lo:g}, {g_hi:g}] (1 = off; default {d['decoder_cfg']})")
    ap.add_argument("--num-images", type=int, default=1, help="images per prompt, drawn as one batch from the "
                    "seeded stream (each differs), written as sample_00.png, sample_01.png, ... and grid.png "
                    "(default 1)")
    ap.add_argument("--sampler", default="multinomial", choices=["multinomial", "kernel"],
                    help="bit sampler: the official multinomial draw (bit-identical seeds), or the one-launch bitwise "
                    "kernel (Triton on GPU; another random stream)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help=f"understanding: answer length limit (default "
                    f"min({MAX_NEW_TOKENS}, what the checkpoint's position budget text_config.max_position_embeddings "
                    "leaves after the prompt), decided at run time)")
    ap.add_argument("--answer-temperature", type=float, default=0.0, help="understanding: 0 = greedy (official)")
    ap.add_argument("--device", default="auto", help="auto (CUDA, else Apple's MPS, else CPU), cpu, cuda, "
                    "cuda:1, mps")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: bfloat16 on CUDA, float32 on Apple's MPS and on the CPU")
    ap.add_argument("--out", type=Path, default=Path("out"), help="output folder")
    ap.add_argument("--save-bits", action="store_true", help="also save the generated bits (safetensors)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="where the decoder prompt embeddings are cached")
    c = ap.add_argument_group("conversations (one shared context: the model reads its own drawings as bits)")
    c.add_argument("--chat", action="store_true", help="chat on stdin: '/image PATH' attaches a picture to your next "
                   "line, '/draw TEXT' asks for an image (a prompt, or an edit of what came before), '/reset' starts "
                   "over, anything else is a question or an instruction answered in text; drawn images go to --out")
    c.add_argument("--chat-file", type=Path, default=None, help="the same, scripted: one line per turn")
    g = ap.add_argument_group("prompt files (the official batch launcher's format and output layout)")
    g.add_argument("--prompts", type=Path, default=None, help="a .jsonl of {\"idx\", \"prompt\", \"meta\"} records, "
                   "or a text file with one prompt per line; writes <out>/<run-name>/<idx:05d>/samples/<k:04d>.png "
                   "and <idx:05d>/metadata.json. Under torchrun each process takes its share")
    g.add_argument("--samples-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    g.add_argument("--batch-size", type=int, default=8, help="images per AR rollout and decoder batch (default 8)")
    g.add_argument("--run-name", default=None, help="the run's folder under --out (default: the prompt file's name)")
    g.add_argument("--resume", action="store_true", help="skip the samples already written")
    g.add_argument("--image-root", type=Path, default=None, help="editing records: the input image is "
                   "<image-root>/<meta[image-key]> (with --image-key)")
    g.add_argument("--image-key", default=None, help="editing records: the field holding the input image's path")
    return ap


def main(argv=None) -> int:
    """Exit code 0; 2 with one `error: ...` line for bad input (checked before anything loads) or an output folder
    that cannot be written; 130 / 143 with one line after Ctrl-C / SIGTERM (every file written so far is kept)."""
    status = {"note": ""}  # what the interrupted line adds: where the finished files are, how to continue
    with cli.SignalGuard():
        try:
            return _main(sys.argv[1:] if argv is None else list(argv), status)
        except cli.UsageError as e:
            return cli.fail(e)
        except cli.Interrupted as e:
            print(f"interrupted by {e.name}{status['note']}", file=sys.stderr)
            return e.exit_code


@contextmanager
def writing(folder: Path, resume: bool = False):
    """A write into an output folder that fails (disk full, read-only, no permission) becomes one error line naming
    the folder; the files are written atomically, so nothing finished before is lost."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        if cli.io_failure(e) is None:
            raise
        raise cli.UsageError(cli.cannot_write(e, folder, resume=resume)) from None


def _main(argv: list, status: dict) -> int:
    named = _ckpt_from_argv(argv)
    if named is not None:
        try:
            named = load_hf.resolve_checkpoint(named)  # a folder, or a hub id through the local hub cache
        except load_hf.CheckpointError as e:
            raise cli.UsageError(f"--ckpt: {e}") from None
    ckpt = named or DEFAULT_CKPT
    defaults = _checkpoint_defaults(ckpt)
    ap = build_parser(defaults, ckpt, (Path(ckpt) / cli.SAMPLE_JSON).is_file())
    args = ap.parse_args(argv)


    if args.ckpt is None and not (DEFAULT_CKPT / "config.json").exists():
        raise cli.UsageError(f"no --ckpt given and the project's toy checkpoint does not exist yet ({DEFAULT_CKPT}); "
                             "pass --ckpt PATH to a UniAR checkpoint folder, e.g. a download of ShareLab-SII/UniAR-RL "
                             "(README: Released checkpoints)")
    for name in ("cfg", "temperature", "steps", "decoder_cfg"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    for flag, what in (("prompt", "the text to draw (or, with --image, the edit instruction)"),
                       ("question", "a question about --image")):
        if getattr(args, flag) is not None and not getattr(args, flag).strip():
            raise cli.UsageError(f"--{flag} is empty; give {what}")
    if args.prompts is not None:
        return run_prompts(args, ckpt, defaults, status)
    if args.chat or args.chat_file is not None:
        return run_chat(args, ckpt, defaults, status)
    default_prompt = False
    if args.question is None and args.prompt is None and args.image is None and defaults.get("prompt"):
        args.prompt = defaults["prompt"]  # `python sample.py` alone: the checkpoint's example prompt
        default_prompt = True
    if args.question is None and args.prompt is None:
        ap.error("give --prompt (text-to-image, or editing with --image) or --image with --question")
    if args.question is not None and args.image is None:
        ap.error("--question needs --image")
    ar_h, ar_w = args.ar_size or defaults["ar_size"]
    upsample = args.upsample if args.upsample is not None else defaults["upsample"]
    device, dtype = check_flags(args, upsample)
    try:
        if args.question is None:
            check_generation_plan(ckpt, args, ar_h, ar_w, upsample)
        else:
            check_understanding_plan(ckpt, args)
    except (load_hf.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if default_prompt:
        print(f"prompt: {args.prompt!r}", file=sys.stderr)
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
            text = P.answer(net, tok, args.image, args.question, max_new_tokens=args.max_new_tokens,
                            temperature=args.answer_temperature, seed=args.seed)
            print(text)
            print(f"[load {t_load - t0:.1f}s, answer {time.perf_counter() - t_load:.1f}s, {peak_memory(device)}]",
                  file=sys.stderr)
            return 0
        prompts = [args.prompt] * args.num_images
        images_in = None if args.image is None else [args.image] * args.num_images
        bits = P.generate_bits(net, tok, prompts, ar_height=ar_h, ar_width=ar_w, cfg_scale=args.cfg,
                               temperature=args.temperature, seed=args.seed, input_images=images_in, progress=True,
                               sampler=args.sampler)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # torch.multinomial on NaN / inf: logits overflowed (half precision at the edges)
        if "probability tensor contains" not in str(e):
            raise
        return cli.fail(f"bit sampling got non-finite probabilities (--temperature {args.temperature}, --cfg "
                        f"{args.cfg}, dtype {str(dtype).replace('torch.', '')}): the logits overflowed; use a larger "
                        "--temperature, a smaller --cfg or --dtype float32")
    t_ar = time.perf_counter()
    del net
    release(device)

    # ----- stage 2: the diffusion decoder -----
    try:
        dec = load_hf.load_decoder(ckpt, dtype=dtype, device=device, cache_dir=args.cache_dir)
        t_dload = time.perf_counter()
        images = P.decode_bits(dec, bits, ar_h, ar_w, upsampling_ratio=upsample, steps=args.steps,
                               guidance=args.decoder_cfg, seed=args.seed, progress=True)
    except (load_hf.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_dec = time.perf_counter()
    with writing(args.out):
        paths = write_outputs(args.out, images.cpu(), bits if args.save_bits else None,
                              {"prompt": args.prompt or "", "ar_size": f"{ar_h}x{ar_w}", "seed": str(args.seed)})
    print("\n".join(str(p) for p in paths))
    print(f"[AR: load {t_load - t0:.1f}s, {ar_h // 32 * (ar_w // 32)} steps {t_ar - t_load:.1f}s | decoder: load "
          f"{t_dload - t_ar:.1f}s, {args.steps} steps {t_dec - t_dload:.1f}s | {peak_memory(device)}]",
          file=sys.stderr)
    return 0


OUTPUTS = ".uniar-outputs.json"  # in --out: the files the last run wrote (the next run replaces exactly those)


def write_outputs(out: Path, images: torch.Tensor, bits, metadata: dict) -> list:
    """The run's files (sample_XX.png, grid.png with several images, bits.safetensors with --save-bits) written as
    one set: staged completely, then switched in under a lock (cli.replace_folder), replacing exactly the files the
    previous run wrote there. Concurrent runs with the same --out never leave a mix, a killed run leaves the
    previous set, and the user's other files in --out are never touched."""
    names = [f"sample_{i:02d}.png" for i in range(len(images))]

    def write(folder: Path) -> None:
        for name, im in zip(names, images):
            Image.fromarray(im.numpy()).save(folder / name, format="PNG")
        if len(images) > 1:
            cli.save_grid(images, folder / "grid.png")
        if bits is not None:
            save_file({"bits": bits.cpu().contiguous(), "indices": bsq.bits_to_indexes(bits).cpu().contiguous()},
                      str(folder / "bits.safetensors"), metadata=metadata)

    cli.replace_folder(out, write, owned=OUTPUTS)
    return [out / n for n in names]


def _checkpoint_defaults(ckpt: Path) -> dict:
    """The official defaults, or those a project checkpoint records in `uniar_sample.json` (the toy model is
    trained at a small AR size and has an example prompt); an invalid file is a UsageError naming file and field."""
    return cli.read_sample_settings(ckpt)


# ---------------------------------------------------------------------------------------------------------------------
# Checks before anything loads: flags, then what the checkpoint's configs and tokenizer say of them
# ---------------------------------------------------------------------------------------------------------------------


def check_flags(args, upsample: float) -> tuple[torch.device, torch.dtype]:
    """Ranges of the numeric flags, device, dtype and the output folder; -> (device, dtype)."""
    cli.check_int_range(args.num_images, "--num-images", 1)
    cli.check_seed(args.seed)
    if args.question is None:
        cli.check_float_range(args.cfg, "--cfg", *cli.CFG_RANGE, "cfg must be >= 1, 1 = no guidance; larger "
                              "guidance overflows the guided logits")
        cli.check_float_range(args.temperature, "--temperature", *cli.TEMPERATURE_RANGE, "temperature must be > 0; "
                              "0.01 is already near-greedy, below it logits / temperature overflows")
        cli.check_float_range(upsample, "--upsample", 1.0, 2.0, "decoder output size / AR size")
        cli.check_int_range(args.steps, "--steps", 1, hint="decoder denoising steps")
        cli.check_float_range(args.decoder_cfg, "--decoder-cfg", *cli.CFG_RANGE, "1 = no guidance")
    # the answer flags: used by --question and by the conversations (--chat / --chat-file), checked whenever given
    cli.check_float_range(args.answer_temperature, "--answer-temperature", 0.0, cli.TEMPERATURE_RANGE[1],
                          "0 = greedy")
    if args.max_new_tokens is not None:
        cli.check_int_range(args.max_new_tokens, "--max-new-tokens", 1)
    device = cli.resolve_device(args.device)
    cli.check_out_folder(args.out)
    if args.question is None:  # an answer writes nothing
        cli.check_out_writable(args.out)
    return device, resolve_dtype(args.dtype, device)


def _ar_parts(ckpt: Path):
    """(config, tokenizer, folder) of the AR part: configs, safetensors headers and tokenizer files only."""
    root = load_hf.resolve_part(ckpt, "ar_model")
    cfg = load_hf.ar_config(root)
    try:
        tok = P.Tokenizer(root)
    except ValueError as e:
        raise load_hf.CheckpointError(f"{root}: tokenizer files: {e}") from None
    return cfg, tok, root


def decoder_geometry(ckpt: Path) -> tuple[int, int]:
    """(pixels per decoder token = VAE scale x patch size, pos_embed_max_size) from the decoder's configs."""
    tcfg, vcfg = load_hf.transformer_config(ckpt), load_hf.vae_config(ckpt)
    return (1 if vcfg is None else vcfg.scale) * tcfg.patch_size, tcfg.pos_embed_max_size


def warn_unknown_words(tok, text: str, flag: str, root: Path) -> None:
    """A word-level tokenizer (the toy's) reads words outside its vocabulary as <unk>, which the model never saw in
    a meaningful place: say so, with the vocabulary, instead of drawing something else silently."""
    model = tok.tk.model
    if not isinstance(model, models.WordLevel) or not text:
        return
    unk_id = tok.tk.token_to_id(model.unk_token)
    enc = tok.text_tk.encode(text, add_special_tokens=False)  # as the model will read it: text, never control tokens
    unknown = [text[a:b] for (a, b), i in zip(enc.offsets, enc.ids) if i == unk_id]
    if unknown:
        known = sorted(w for w, i in tok.tk.get_vocab(with_added_tokens=False).items()
                       if i != unk_id and w.isalpha())
        print(f"warning: {flag}: the word-level tokenizer of {root} does not know {', '.join(map(repr, unknown))} "
              f"(read as {model.unk_token}); it knows: {' '.join(known)} (README.md: Toy vocabulary)",
              file=sys.stderr)


def check_image(path, flag: str = "--image") -> None:
    """A readable image file, within PIL's decompression-bomb limit (ValueError naming the flag)."""
    try:
        P.load_image(path)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None


def check_generation_plan(ckpt: Path, args, ar_h: int, ar_w: int, upsample: float, prompts=None,
                          editing: bool | None = None) -> None:
    """--ar-size / --upsample against the AR grid, the position budget and the decoder, for --prompt or every prompt
    of a file (ValueError naming the flag)."""
    cfg, tok, root = _ar_parts(ckpt)
    if prompts is None:
        prompts, editing = [args.prompt], args.image is not None
        if editing:
            check_image(args.image)
    ds = cfg.downsample
    if ar_h <= 0 or ar_w <= 0 or ar_h % ds or ar_w % ds:
        raise ValueError(f"--ar-size: AR size {ar_h}x{ar_w} must be positive multiples of {ds} px")
    unit, max_grid = decoder_geometry(ckpt)
    try:
        P.output_size(ar_h, ar_w, upsample, unit, max_grid)
    except ValueError as e:
        raise ValueError(f"--ar-size {ar_h}x{ar_w} / --upsample {upsample}: {e}") from None
    n_img = None
    if editing:  # an input image is resized to the AR size, so its token count depends on that size only
        v = cfg.vision
        n_img = (ar_h // v.patch_size) * (ar_w // v.patch_size) // v.merge_unit
    warn_unknown_words(tok, "\n".join(dict.fromkeys(prompts)), "--prompts" if len(prompts) > 1 else "--prompt", root)
    gh, gw = ar_h // ds, ar_w // ds
    n_prompt = max(len(tok.encode(P.render_generation_prompt(p, gh, gw, n_img))) for p in prompts)
    budget = cfg.text.max_position_embeddings
    if n_prompt + gh * gw > budget:
        raise ValueError(f"--ar-size {ar_h}x{ar_w}: prompt of {n_prompt} tokens + {gh * gw} image tokens exceeds the "
                         f"position budget max_position_embeddings={budget} of {root / 'config.json'}; use a smaller "
                         "--ar-size")


def check_understanding_plan(ckpt: Path, args) -> None:
    """--image readable, and --max-new-tokens within what the position budget leaves after the prompt (default:
    min(MAX_NEW_TOKENS, that room))."""
    cfg, tok, root = _ar_parts(ckpt)
    check_image(args.image)
    v = cfg.vision
    proc = load_hf.image_processor_config(root, v)  # the preprocessing pipeline.answer will use
    if proc is None:
        raise ValueError(f"{root}: the checkpoint {P.NO_IMAGE_PROCESSOR}")
    _, grid = proc(args.image)
    warn_unknown_words(tok, args.question, "--question", root)
    n_prompt = len(tok.encode(P.render_chat_prompt(args.question, int(grid[0].prod()) // v.merge_unit)))
    budget = cfg.text.max_position_embeddings
    room = budget - n_prompt
    if room < 1:
        raise ValueError(f"--question: the prompt (question + image) takes {n_prompt} tokens, the whole position "
                         f"budget max_position_embeddings={budget} of {root / 'config.json'}; use a shorter question "
                         "or a smaller image")
    if args.max_new_tokens is None:
        args.max_new_tokens = min(MAX_NEW_TOKENS, room)
    elif args.max_new_tokens > room:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: the prompt takes {n_prompt} of the "
                         f"max_position_embeddings={budget} positions of {root / 'config.json'}; use at most {room}")


# ---------------------------------------------------------------------------------------------------------------------
# Prompt files (--prompts): the official batch launcher's format and output layout, resumable, data parallel
# ---------------------------------------------------------------------------------------------------------------------


SAMPLES_MAX = 10000  # --samples-per-prompt: samples are named <k:04d>.png, k < 10000
IDX_MAX = 2**63 - 1  # a record's idx (its folder <idx:05d>: at most 19 digits)
DEPTH_MAX = 100  # how deeply a record may nest lists / objects (its meta is copied to metadata.json)
RUN_SETTINGS = ".uniar-settings.json"  # in a run folder: the settings of its samples (--resume checks them)
SETTING_FLAGS = {"ckpt": "--ckpt", "seed": "--seed", "cfg": "--cfg", "temperature": "--temperature",
                 "ar_size": "--ar-size", "upsample": "--upsample", "steps": "--steps", "decoder_cfg": "--decoder-cfg",
                 "dtype": "--dtype", "image_key": "--image-key"}
SAMPLE_NAME = re.compile(r"(\d{4})\.png")


def split_lines(text: str) -> list:
    """Lines ended by \\n, \\r\\n or \\r only: str.splitlines would also split a prompt at the Unicode line and
    paragraph separators (U+2028, U+0085, ...), which JSON strings and prompts may hold as text."""
    return re.split(r"\r\n|\r|\n", text)


def _depth(value) -> int:
    """How deeply `value` nests lists / objects (1 for a flat object), counted without recursion; stops past
    DEPTH_MAX."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= DEPTH_MAX:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _shown(value) -> str:
    s = json.dumps(value)
    return s if len(s) <= 40 else f"{s[:20]}... ({len(s)} characters)"


def read_prompts(path: Path) -> tuple[list, list]:
    """A .jsonl of {"idx", "prompt", "meta"} records (the official format; idx defaults to the record's position),
    or a text file with one prompt per line -> (records, the line number of each). UsageError naming the file and
    line."""
    try:
        lines = split_lines(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise cli.UsageError(f"--prompts {path}: cannot read it ({e})") from None
    records, numbers, seen = [], [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--prompts {path} line {n}"
        if Path(path).suffix != ".jsonl":
            rec = {"idx": len(records), "prompt": line.strip()}
        else:
            too_deep = (f"{where}: the record nests lists / objects more than {DEPTH_MAX} levels deep; flatten it "
                        "(its meta is copied to metadata.json)")
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise cli.UsageError(f"{where}: not JSON ({e.msg})") from None
            except RecursionError:  # deeper than the JSON reader goes
                raise cli.UsageError(too_deep) from None
            except ValueError as e:  # an integer of more than sys.get_int_max_str_digits() digits
                raise cli.UsageError(f"{where}: not JSON the reader takes ({str(e).split(':')[0]})") from None
            if _depth(rec) > DEPTH_MAX:
                raise cli.UsageError(too_deep)
            if not isinstance(rec, dict):
                raise cli.UsageError(f"{where}: a record must be a JSON object")
            rec = {"idx": len(records), **rec}
        idx, prompt = rec["idx"], rec.get("prompt")
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx <= IDX_MAX:
            raise cli.UsageError(f"{where}: 'idx' must be an integer in [0, {IDX_MAX}], got {_shown(idx)}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise cli.UsageError(f"{where}: 'prompt' must be a non-empty string")
        if idx in seen:
            raise cli.UsageError(f"{where}: idx {idx} appears twice")
        seen.add(idx)
        records.append(rec)
        numbers.append(n)
    if not records:
        raise cli.UsageError(f"--prompts {path}: no prompt in it")
    return records, numbers


def input_image_path(rec: dict, root: Path, key: str) -> Path:
    """An editing record's input image: <root>/<meta[key]> (meta may nest the upstream row as meta.meta; the record's
    top level is the fallback), as the official launcher looks it up."""
    meta = rec.get("meta", {})
    if isinstance(meta, dict) and isinstance(meta.get("meta"), dict):
        meta = meta["meta"]
    rel = (meta.get(key) if isinstance(meta, dict) else None) or rec.get(key)
    if not isinstance(rel, str) or not rel:
        raise cli.UsageError(f"--image-key {key!r}: record idx {rec['idx']} has no such field (looked in meta and at "
                             "the top level)")
    return Path(root) / rel


def input_images(args, records: list, numbers: list) -> dict:
    """Editing records: {idx: input image}, each checked to be a readable image before anything loads (a
    UsageError naming the prompt file's line)."""
    images, bad = {}, {}
    for rec, n in zip(records, numbers):
        f = images[rec["idx"]] = input_image_path(rec, args.image_root, args.image_key)
        where = f"--prompts {args.prompts} line {n}: the input image of record idx {rec['idx']}"
        if not f.is_file():
            raise cli.UsageError(f"{where} does not exist: {f} (--image-root {args.image_root})")
        if f not in bad:
            try:
                P.load_image(f)
                bad[f] = None
            except ValueError as e:
                bad[f] = str(e)
        if bad[f] is not None:
            raise cli.UsageError(f"{where}: {bad[f]}")
    return images


def run_name(args) -> str:
    """The run's folder under --out: --run-name, else the prompt file's name; one plain folder name, so that
    nothing is ever written outside --out."""
    name = args.run_name if args.run_name is not None else Path(args.prompts).stem
    if (name and name not in (".", "..") and not name.startswith(".") and not re.search(r"[/\\\x00-\x1f\x7f]", name)
            and (os.altsep is None or os.altsep not in name)):
        return name
    rule = "one plain folder name: not empty, no '/' or '\\', no control characters, not starting with '.'"
    if args.run_name is not None:
        raise cli.UsageError(f"--run-name {name!r} must be {rule} (the run is written to <out>/<run-name>)")
    raise cli.UsageError(f"--prompts {args.prompts}: its name gives the run folder {name!r}, which is not {rule}; "
                         "pass --run-name NAME")


def sample_path(run_dir: Path, idx: int, k: int) -> Path:
    return run_dir / f"{idx:05d}" / "samples" / f"{k:04d}.png"


def finished_samples(run_dir: Path, records: list, per_prompt: int) -> dict:
    """{idx: {k, ...}} of the samples the run folder already holds (each PNG is written atomically, so a file there
    is a finished sample), read from the folders' listings: time and memory follow the files present, not the
    number of samples asked for."""
    done = {}
    if not run_dir.is_dir():
        return done
    for rec in records:
        folder = run_dir / f"{rec['idx']:05d}" / "samples"
        try:
            with os.scandir(folder) as entries:
                ks = {int(m[1]) for e in entries if (m := SAMPLE_NAME.fullmatch(e.name)) and int(m[1]) < per_prompt
                      and e.is_file()}
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise cli.UsageError(f"--out: cannot read {folder} ({e.strerror or e})") from None
        if ks:
            done[rec["idx"]] = ks
    return done


def pending_samples(records: list, per_prompt: int, done: dict):
    """(record, k) of every sample not in `done`, in file order, generated one at a time (never a list of them
    all: --samples-per-prompt times the records may be large)."""
    for rec in records:
        got = done.get(rec["idx"], ())
        for k in range(per_prompt):
            if k not in got:
                yield rec, k


def check_run_folder(args, run_dir: Path, records: list, numbers: list, settings: dict, n_done: int) -> set:
    """What the run folder already holds must be what this run would write: samples drawn with other settings
    (--resume) or another record in an <idx:05d>/metadata.json are refused, never mixed with new ones or renamed under
    new metadata. -> the idx of the records whose metadata.json is already there."""
    if not run_dir.is_dir():
        return set()
    f = run_dir / RUN_SETTINGS
    saved = None
    if f.is_file():
        try:
            saved = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            saved = e
        if not isinstance(saved, dict):
            raise cli.UsageError(f"{f} is damaged ({type(saved).__name__}); it records the settings the samples in "
                                 f"{run_dir} were drawn with: pass another --run-name / --out") from None
    if n_done and args.resume:
        if saved is None:
            print(f"warning: {run_dir} has no {RUN_SETTINGS} (an earlier sample.py wrote the run): --resume cannot "
                  "check that its samples were drawn with this run's settings, and continues with them",
                  file=sys.stderr)
        else:
            diff = [k for k in SETTING_FLAGS if saved.get(k) != settings.get(k)]
            if diff:
                def show(s: dict) -> str:
                    return ", ".join(f"{SETTING_FLAGS[k]} " + ("x".join(map(str, s[k])) if k == "ar_size" and
                                                               isinstance(s.get(k), list) else str(s.get(k)))
                                     for k in diff)

                raise cli.UsageError(f"--resume: the {n_done} samples in {run_dir} were drawn with {show(saved)}; this "
                                     f"run has {show(settings)}; resume with the settings they were drawn with, or "
                                     "pass another --run-name / --out")
    have = set()
    for rec, n in zip(records, numbers):
        meta = run_dir / f"{rec['idx']:05d}" / "metadata.json"
        if not meta.exists():
            continue
        try:
            same = json.loads(meta.read_text(encoding="utf-8")) == rec
        except (OSError, ValueError):
            same = False
        if not same:
            raise cli.UsageError(f"--prompts {args.prompts} line {n}: {meta} holds another record than this line "
                                 f"(idx {rec['idx']}), the one the samples in its folder belong to; run the prompt "
                                 "file the run was drawn from, or pass another --run-name / --out")
        have.add(rec["idx"])
    return have


def setup_ranks(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world, device) under torchrun (gloo on CPU, NCCL on GPUs; one GPU per process), else (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def run_prompts(args, ckpt: Path, defaults: dict, status: dict) -> int:
    """--prompts: every (prompt, sample) of the file, batched; each process of a torchrun takes every world-th
    pending sample; a record's metadata.json is written as its first sample starts, each PNG atomically, so --resume
    skips exactly the finished ones (after checking the folder holds this file's records, drawn with these
    settings)."""
    for flag in ("prompt", "image", "question"):
        if getattr(args, flag) is not None:
            raise cli.UsageError(f"--prompts runs a prompt file; drop --{flag}")
    if args.sampler != "multinomial":
        raise cli.UsageError(f"--sampler {args.sampler}: --prompts draws each image from its own seeds (the same image "
                             "in any batch), which takes --sampler multinomial")
    cli.check_int_range(args.samples_per_prompt, "--samples-per-prompt", 1, SAMPLES_MAX,
                        "samples are named <k:04d>.png")
    cli.check_int_range(args.batch_size, "--batch-size", 1)
    if (args.image_root is None) != (args.image_key is None):
        raise cli.UsageError("--image-root and --image-key go together (editing records)")
    name = run_name(args)
    ar_h, ar_w = args.ar_size or defaults["ar_size"]
    upsample = args.upsample if args.upsample is not None else defaults["upsample"]
    records, numbers = read_prompts(args.prompts)
    editing = args.image_root is not None
    images = input_images(args, records, numbers) if editing else {}
    device, dtype = check_flags(args, upsample)

    try:
        check_generation_plan(ckpt, args, ar_h, ar_w, upsample, [r["prompt"] for r in records], editing)
    except (load_hf.CheckpointError, ValueError) as e:
        raise cli.UsageError(str(e)) from None
    run_dir = args.out / name
    settings = json.loads(json.dumps({
        "ckpt": str(Path(ckpt).resolve()), "seed": args.seed, "cfg": args.cfg, "temperature": args.temperature,
        "ar_size": [ar_h, ar_w], "upsample": upsample, "steps": args.steps, "decoder_cfg": args.decoder_cfg,
        "dtype": str(dtype).removeprefix("torch."), "image_key": args.image_key}))
    per_prompt = args.samples_per_prompt
    done = finished_samples(run_dir, records, per_prompt)
    n_done = sum(map(len, done.values()))
    if n_done and not args.resume:
        raise cli.UsageError(f"{run_dir} already holds {n_done} of this file's samples; pass --resume to skip them, or "
                             "another --run-name / --out")
    have_meta = check_run_folder(args, run_dir, records, numbers, settings, n_done)
    rank, world, device = setup_ranks(device)
    status["note"] = f": the finished samples are kept in {run_dir}; continue with the same flags and --resume"
    if rank == 0:
        with writing(run_dir, resume=True):
            if run_dir.is_dir():
                cli.remove_temp_files(run_dir, recursive=True)  # left by a killed run
            run_dir.mkdir(parents=True, exist_ok=True)
            f = run_dir / RUN_SETTINGS
            if not f.is_file() or json.loads(f.read_text(encoding="utf-8")) != settings:
                cli.atomic_write(f, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2), encoding="utf-8"))
    barrier(world)  # every process has listed the finished samples before any is written
    n_pending = len(records) * per_prompt - n_done
    mine = itertools.islice(pending_samples(records, per_prompt, done), rank, None, world)
    net, tok = load_hf.load_ar(ckpt, dtype=dtype, device=device)
    dec = load_hf.load_decoder(ckpt, dtype=dtype, device=device, cache_dir=args.cache_dir)

    bar = tqdm(total=len(range(rank, n_pending, world)), desc="samples", unit="img",
               disable=rank != 0 and world > 1)
    try:
        while batch := list(itertools.islice(mine, args.batch_size)):
            with writing(run_dir, resume=True):
                for r, _ in batch:  # a record's metadata.json as its first sample starts
                    if r["idx"] not in have_meta:
                        folder = run_dir / f"{r['idx']:05d}"
                        folder.mkdir(exist_ok=True)
                        cli.atomic_write(folder / "metadata.json", lambda tmp: Path(tmp).write_text(
                            json.dumps(r, indent=2, ensure_ascii=False), encoding="utf-8"))
                        have_meta.add(r["idx"])
            seeds = [P.sample_seed(args.seed, r["idx"], k) for r, k in batch]
            inputs = [images[r["idx"]] for r, _ in batch] if editing else None
            bits = P.generate_bits(net, tok, [r["prompt"] for r, _ in batch], ar_height=ar_h, ar_width=ar_w,
                                   cfg_scale=args.cfg, temperature=args.temperature, seed=seeds, input_images=inputs)
            out = P.decode_bits(dec, bits, ar_h, ar_w, upsampling_ratio=upsample, steps=args.steps,
                                guidance=args.decoder_cfg, seed=seeds).cpu()
            for (r, k), im in zip(batch, out):
                path = sample_path(run_dir, r["idx"], k)
                with writing(run_dir, resume=True):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    cli.atomic_write(path, lambda tmp: Image.fromarray(im.numpy()).save(tmp, format="PNG"))
                print(path, flush=True)
            bar.update(len(batch))
    finally:
        bar.close()
    barrier(world)
    if rank == 0:
        done = finished_samples(run_dir, records, per_prompt)
        total = len(records) * per_prompt
        missing = [(r["idx"], k) for r, k in itertools.islice(pending_samples(records, per_prompt, done), 5)]
        print(f"{run_dir}: {sum(map(len, done.values()))} of {total} samples" +
              (f"; missing: {missing}" if missing else ""), file=sys.stderr)
    if world > 1:
        dist.destroy_process_group()
    return 0



CHAT_HELP = "/image PATH (a picture for your next line), /draw TEXT (an image), /reset, /quit; other lines are questions"


def chat_lines(args):
    """(line number or None, text) of the scripted file, or of stdin as it is typed."""
    if args.chat_file is not None:
        try:
            text = args.chat_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise cli.UsageError(f"--chat-file {args.chat_file}: cannot read it ({e})") from None
        yield from ((n, line) for n, line in enumerate(split_lines(text), 1))
        return
    print(f"chat: {CHAT_HELP}", file=sys.stderr)
    for line in sys.stdin:
        yield None, line.rstrip("\n")


def save_new(out: Path, stem: str, write) -> Path:
    """write(tmp) into a temporary file in `out`, then give it the name out/stem_NN.png with the first NN no file has,
    claimed atomically: a hard link fails when the name exists (then the next NN is tried), so concurrent runs never
    get the same name and a chat never replaces a file. (Where the file system has no hard links, the name is claimed
    by creating it exclusively, then the file is renamed over the claim.)"""
    out = Path(out)
    tmp = cli.temp_name(out / f"{stem}.png")
    try:
        write(tmp)
        cli._fsync_file(tmp)
        for k in itertools.count():
            path = out / f"{stem}_{k:02d}.png"
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                continue
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS):
                    raise
            try:  # no hard links here: claim the name by creating it exclusively
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            try:
                os.replace(tmp, path)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            break
    finally:
        tmp.unlink(missing_ok=True)
    cli._fsync_dir(out)
    return path


def run_chat(args, ckpt: Path, defaults: dict, status: dict) -> int:
    """A conversation in one shared context (pipeline.Conversation): each '/draw' is drawn into the context and decoded
    to a PNG in --out (its path printed), each other line answered from the context, which holds every earlier turn
    and image. A mistake in a scripted file is one error line naming the file and line (exit 2); typed, it is said
    and the chat goes on."""
    if args.chat and args.chat_file is not None:
        raise cli.UsageError("give --chat (typed) or --chat-file FILE (scripted), not both")
    for flag, turn in (("prompt", "'/draw TEXT'"), ("image", "'/image PATH'"), ("question", "a line of text")):
        if getattr(args, flag) is not None:
            raise cli.UsageError(f"--chat / --chat-file: drop --{flag}; in a conversation that is a turn: {turn}")
    if args.sampler != "multinomial":
        raise cli.UsageError(f"--sampler {args.sampler}: a conversation draws with --sampler multinomial")
    ar_h, ar_w = args.ar_size or defaults["ar_size"]
    upsample = args.upsample if args.upsample is not None else defaults["upsample"]
    device, dtype = check_flags(args, upsample)
    try:
        check_generation_plan(ckpt, args, ar_h, ar_w, upsample, prompts=[""], editing=False)
        net, tok = load_hf.load_ar(ckpt, dtype=dtype, device=device)
        P.image_processor(net)  # questions about pictures need the checkpoint's preprocessor_config.json
        dec = load_hf.load_decoder(ckpt, dtype=dtype, device=device, cache_dir=args.cache_dir)
    except (load_hf.CheckpointError, ValueError) as e:
        return cli.fail(str(e))
    with writing(args.out):
        args.out.mkdir(parents=True, exist_ok=True)
    conv, picture, drawn = P.Conversation(net, tok), None, 0
    for n, line in chat_lines(args):
        where = f"--chat-file {args.chat_file}, line {n}: " if n is not None else ""
        line = line.strip()
        if n is not None and line:
            print(f"user: {line}")
        try:
            if not line:
                continue
            if line in ("/quit", "/exit"):
                break
            if line == "/reset":
                conv, picture = P.Conversation(net, tok), None
                continue
            if line.startswith("/image"):
                path = line[len("/image"):].strip()
                check_image(path, "/image")
                picture = path
                continue
            if line.startswith("/draw"):
                text = line[len("/draw"):].strip()
                if not text:
                    raise ValueError("/draw needs the text to draw (or the edit instruction): /draw TEXT")
                warn_unknown_words(tok, text, "/draw", ckpt)
                seed = P.sample_seed(args.seed, drawn)
                bits = conv.draw(text, picture, ar_height=ar_h, ar_width=ar_w, cfg_scale=args.cfg,
                                 temperature=args.temperature, seed=seed)
                image = P.decode_bits(dec, bits, ar_h, ar_w, upsampling_ratio=upsample, steps=args.steps,
                                      guidance=args.decoder_cfg, seed=[seed])[0].cpu().numpy()
                with writing(args.out):
                    path = save_new(args.out, "chat", lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
                drawn += 1
                status["note"] = f": the drawings so far are kept in {args.out}"
                print(f"model: {path}")
            elif line.startswith("/"):
                raise ValueError(f"unknown command {line.split()[0]!r}; the commands: {CHAT_HELP}")
            else:
                warn_unknown_words(tok, line, "question", ckpt)
                print(f"model: {conv.ask(line, picture, max_new_tokens=args.max_new_tokens or 256, temperature=args.answer_temperature, seed=args.seed)}")
            picture = None
        except cli.UsageError:
            raise
        except ValueError as e:
            if n is not None:
                return cli.fail(f"{where}{e}")
            print(f"error: {e}", file=sys.stderr)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
