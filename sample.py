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
import gc
import json
import os
import sys
import time
from pathlib import Path

# Apple's GPU: an operation the installed torch lacks on MPS runs on the CPU instead of stopping the run (torch reads
# this when it is imported, so it is set first; a value the user set is kept).
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import save_file
from tokenizers import models
from tqdm import tqdm

import bsq
import cli
import decoder as D
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
    """Exit code 0, or 2 with one `error: ...` line for bad input (checked before anything loads)."""
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except cli.UsageError as e:
        return cli.fail(e)


def _main(argv: list) -> int:
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
    if args.prompts is not None:
        return run_prompts(args, ckpt, defaults)
    if args.chat or args.chat_file is not None:
        return run_chat(args, ckpt, defaults)
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
        images = dec.decode(bits, ar_h, ar_w, upsampling_ratio=upsample, steps=args.steps,
                            guidance=args.decoder_cfg, seed=args.seed, progress=True)
    except (load_hf.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_dec = time.perf_counter()
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
    else:
        cli.check_float_range(args.answer_temperature, "--answer-temperature", 0.0, cli.TEMPERATURE_RANGE[1],
                              "0 = greedy")
        if args.max_new_tokens is not None:
            cli.check_int_range(args.max_new_tokens, "--max-new-tokens", 1)
    device = cli.resolve_device(args.device)
    cli.check_out_folder(args.out)
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
        bsq.load_image(path)
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
        D.output_size(ar_h, ar_w, upsample, unit, max_grid)
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


def read_prompts(path: Path) -> list:
    """A .jsonl of {"idx", "prompt", "meta"} records (the official format; idx defaults to the record's position),
    or a text file with one prompt per line -> records. UsageError naming the file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise cli.UsageError(f"--prompts {path}: cannot read it ({e})") from None
    records, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if Path(path).suffix != ".jsonl":
            rec = {"idx": len(records), "prompt": line.strip()}
        else:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise cli.UsageError(f"--prompts {path} line {n}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise cli.UsageError(f"--prompts {path} line {n}: a record must be a JSON object")
            rec = {"idx": len(records), **rec}
        idx, prompt = rec["idx"], rec.get("prompt")
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise cli.UsageError(f"--prompts {path} line {n}: 'idx' must be an integer >= 0, got {json.dumps(idx)}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise cli.UsageError(f"--prompts {path} line {n}: 'prompt' must be a non-empty string")
        if idx in seen:
            raise cli.UsageError(f"--prompts {path} line {n}: idx {idx} appears twice")
        seen.add(idx)
        records.append(rec)
    if not records:
        raise cli.UsageError(f"--prompts {path}: no prompt in it")
    return records


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


def sample_path(run_dir: Path, idx: int, k: int) -> Path:
    return run_dir / f"{idx:05d}" / "samples" / f"{k:04d}.png"


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


def run_prompts(args, ckpt: Path, defaults: dict) -> int:
    """--prompts: every (prompt, sample) of the file, batched; each process of a torchrun takes every world-th
    pending sample; each PNG is written atomically, so --resume skips exactly the finished ones."""
    for flag in ("prompt", "image", "question"):
        if getattr(args, flag) is not None:
            raise cli.UsageError(f"--prompts runs a prompt file; drop --{flag}")
    cli.check_int_range(args.samples_per_prompt, "--samples-per-prompt", 1)
    cli.check_int_range(args.batch_size, "--batch-size", 1)
    if (args.image_root is None) != (args.image_key is None):
        raise cli.UsageError("--image-root and --image-key go together (editing records)")
    ar_h, ar_w = args.ar_size or defaults["ar_size"]
    upsample = args.upsample if args.upsample is not None else defaults["upsample"]
    records = read_prompts(args.prompts)
    editing = args.image_root is not None
    images = {r["idx"]: input_image_path(r, args.image_root, args.image_key) for r in records} if editing else {}
    for idx, f in images.items():
        if not f.is_file():
            raise cli.UsageError(f"--image-root: the input image of record idx {idx} does not exist: {f}")
    device, dtype = check_flags(args, upsample)

    try:
        check_generation_plan(ckpt, args, ar_h, ar_w, upsample, [r["prompt"] for r in records], editing)
    except (load_hf.CheckpointError, ValueError) as e:
        raise cli.UsageError(str(e)) from None
    run_dir = args.out / (args.run_name or Path(args.prompts).stem)
    jobs = [(r, k) for r in records for k in range(args.samples_per_prompt)]
    done = sum(sample_path(run_dir, r["idx"], k).is_file() for r, k in jobs)
    if done and not args.resume:
        raise cli.UsageError(f"{run_dir} already holds {done} of this file's samples; pass --resume to skip them, or "
                             "another --run-name / --out")
    rank, world, device = setup_ranks(device)
    if rank == 0 and run_dir.is_dir():
        cli.remove_temp_files(run_dir, recursive=True)  # left by a killed run
    pending = [(r, k) for r, k in jobs if not sample_path(run_dir, r["idx"], k).is_file()]
    barrier(world)  # every process has listed the pending samples before any is written
    if rank == 0:
        for r in records:
            (run_dir / f"{r['idx']:05d}").mkdir(parents=True, exist_ok=True)
            cli.atomic_write(run_dir / f"{r['idx']:05d}" / "metadata.json", lambda tmp: Path(tmp).write_text(
                json.dumps(r, indent=2, ensure_ascii=False), encoding="utf-8"))
    mine = pending[rank::world]
    net, tok = load_hf.load_ar(ckpt, dtype=dtype, device=device)
    dec = load_hf.load_decoder(ckpt, dtype=dtype, device=device, cache_dir=args.cache_dir)

    bar = tqdm(total=len(mine), desc="samples", unit="img", disable=rank != 0 and world > 1)
    for i in range(0, len(mine), args.batch_size):
        batch = mine[i:i + args.batch_size]
        seeds = [P.sample_seed(args.seed, r["idx"], k) for r, k in batch]
        inputs = [images[r["idx"]] for r, _ in batch] if editing else None
        bits = P.generate_bits(net, tok, [r["prompt"] for r, _ in batch], ar_height=ar_h, ar_width=ar_w,
                               cfg_scale=args.cfg, temperature=args.temperature, seed=seeds, input_images=inputs)
        out = dec.decode(bits, ar_h, ar_w, upsampling_ratio=upsample, steps=args.steps, guidance=args.decoder_cfg,
                         seed=seeds).cpu()
        for (r, k), im in zip(batch, out):
            path = sample_path(run_dir, r["idx"], k)
            path.parent.mkdir(parents=True, exist_ok=True)
            cli.atomic_write(path, lambda tmp: Image.fromarray(im.numpy()).save(tmp, format="PNG"))
            print(path, flush=True)
        bar.update(len(batch))
    bar.close()
    barrier(world)
    if rank == 0:
        missing = [(r["idx"], k) for r, k in jobs if not sample_path(run_dir, r["idx"], k).is_file()]
        print(f"{run_dir}: {len(jobs) - len(missing)} of {len(jobs)} samples" +
              (f"; missing: {missing[:5]}" if missing else ""), file=sys.stderr)
    if world > 1:
        dist.destroy_process_group()
    return 0



CHAT_HELP = "/image PATH (a picture for your next line), /draw TEXT (an image), /reset, /quit; other lines are questions"


def chat_lines(args):
    """(line number or None, text) of the scripted file, or of stdin as it is typed."""
    if args.chat_file is not None:
        try:
            text = args.chat_file.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise cli.UsageError(f"--chat-file {args.chat_file}: cannot read it ({e})") from None
        yield from ((n, line) for n, line in enumerate(text.splitlines(), 1))
        return
    print(f"chat: {CHAT_HELP}", file=sys.stderr)
    for line in sys.stdin:
        yield None, line.rstrip("\n")


def next_free(out: Path, stem: str) -> Path:
    """out/stem_NN.png with the first NN no file has: a chat never replaces a file."""
    k = 0
    while (out / f"{stem}_{k:02d}.png").exists():
        k += 1
    return out / f"{stem}_{k:02d}.png"


def run_chat(args, ckpt: Path, defaults: dict) -> int:
    """A conversation in one shared context (pipeline.Conversation): each '/draw' is drawn into the context and decoded
    to a PNG in --out (its path printed), each other line answered from the context, which holds every earlier turn
    and image. A mistake in a scripted file is one error line naming the file and line (exit 2); typed, it is said
    and the chat goes on."""
    if args.chat and args.chat_file is not None:
        raise cli.UsageError("give --chat (typed) or --chat-file FILE (scripted), not both")
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
                warn_unknown_words(tok, text, "/draw", ckpt)
                seed = P.sample_seed(args.seed, drawn)
                bits = conv.draw(text, picture, ar_height=ar_h, ar_width=ar_w, cfg_scale=args.cfg,
                                 temperature=args.temperature, seed=seed)
                image = dec.decode(bits, ar_h, ar_w, upsampling_ratio=upsample, steps=args.steps,
                                   guidance=args.decoder_cfg, seed=[seed])[0].cpu().numpy()
                path = next_free(args.out, "chat")
                cli.atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
                drawn += 1
                print(f"model: {path}")
            elif line.startswith("/"):
                raise ValueError(f"unknown command {line.split()[0]!r}; the commands: {CHAT_HELP}")
            else:
                warn_unknown_words(tok, line, "question", ckpt)
                print(f"model: {conv.ask(line, picture, max_new_tokens=args.max_new_tokens or 256, temperature=args.answer_temperature, seed=args.seed)}")
            picture = None
        except ValueError as e:
            if n is not None:
                return cli.fail(f"{where}{e}")
            print(f"error: {e}", file=sys.stderr)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
