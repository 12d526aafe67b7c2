"""Draw every prompt of a prompt file with a UniAR checkpoint: the official batch launcher's format and output layout,
resumable, data parallel under torchrun.

    python generate_batch.py --ckpt CKPT --prompts prompts.jsonl --samples-per-prompt 4 --out out
    torchrun --nproc_per_node 8 generate_batch.py --ckpt CKPT --prompts prompts.jsonl --out out   # one GPU each
    python generate_batch.py --ckpt CKPT --prompts edits.jsonl --image-root imgs --image-key image   # editing

A .jsonl of {"idx", "prompt", "meta"} records (or a text file with one prompt per line) is written as
<out>/<run-name>/<idx:05d>/samples/<k:04d>.png and <idx:05d>/metadata.json. Each image depends only on (--seed, the
record's idx, the sample's k): the same bytes for any batch size and process count. Each PNG is written atomically,
so a killed run continues with --resume (which first checks the run folder holds this file's records, drawn with
these settings). Defaults are the checkpoint's, as in sample.py. Every flag is checked before anything loads.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
from pathlib import Path

# Apple's GPU: an operation the installed torch lacks on MPS runs on the CPU instead of stopping the run (torch reads
# this when it is imported, so it is set first; a value the user set is kept).
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import cli
import files
import load_hf
import pipeline as P

SAMPLES_MAX = 10000  # --samples-per-prompt: samples are named <k:04d>.png, k < 10000
IDX_MAX = 2**63 - 1  # a record's idx (its folder <idx:05d>: at most 19 digits)
DEPTH_MAX = 100  # how deeply a record may nest lists / objects (its meta is copied to metadata.json)
RUN_SETTINGS = ".uniar-settings.json"  # in a run folder: the settings of its samples (--resume checks them)
SETTING_FLAGS = {"ckpt": "--ckpt", "seed": "--seed", "cfg": "--cfg", "temperature": "--temperature",
                 "ar_size": "--ar-size", "upsample": "--upsample", "steps": "--steps", "decoder_cfg": "--decoder-cfg",
                 "dtype": "--dtype", "image_key": "--image-key"}
SAMPLE_NAME = re.compile(r"(\d{4})\.png")


def build_parser(ckpt: Path, d: dict) -> cli.Parser:
    """The parser; `d` are the defaults of checkpoint `ckpt`."""
    ap = cli.script_parser(__doc__, ckpt, d)
    ap.add_argument("--prompts", type=Path, required=True, help="a .jsonl of {\"idx\", \"prompt\", \"meta\"} records, "
                    "or a text file with one prompt per line; writes <out>/<run-name>/<idx:05d>/samples/<k:04d>.png "
                    "and <idx:05d>/metadata.json. Under torchrun each process takes its share")
    ap.add_argument("--samples-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    ap.add_argument("--batch-size", type=int, default=8, help="images per AR rollout and decoder batch (default 8)")
    ap.add_argument("--run-name", default=None, help="the run's folder under --out (default: the prompt file's name)")
    ap.add_argument("--resume", action="store_true", help="skip the samples already written")
    ap.add_argument("--image-root", type=Path, default=None, help="editing records: the input image is "
                    "<image-root>/<meta[image-key]> (with --image-key)")
    ap.add_argument("--image-key", default=None, help="editing records: the field holding the input image's path")
    for flag in ("--prompt", "--image", "--question"):  # sample.py's (refused: the prompts are the file's)
        ap.add_argument(flag, help=argparse.SUPPRESS)
    cli.add_image_flags(ap, d, kernel_sampler=False)  # multinomial only: each image from its own seeds
    cli.add_output_flags(ap)
    return ap


def main(argv=None) -> int:
    """Exit code 0; 2 with one `error: ...` line for bad input (checked before anything loads: the prompt file, its
    input images, the run folder against --resume) or an output folder that cannot be written; 130 / 143 with one
    line after Ctrl-C / SIGTERM (every sample written so far is kept; --resume continues)."""
    return cli.run_script(run, argv)


def run(argv: list, status: dict) -> int:
    """Every (prompt, sample) of the file, batched; each process of a torchrun takes every world-th pending sample; a
    record's metadata.json is written as its first sample starts, each PNG atomically, so --resume skips exactly the
    finished ones (after checking the folder holds this file's records, drawn with these settings)."""
    ckpt, defaults = cli.checkpoint_settings(argv, load_hf.resolve_checkpoint)
    args = build_parser(ckpt, defaults).parse_args(argv)
    cli.apply_defaults(args, defaults)
    for flag in ("prompt", "image", "question"):
        if getattr(args, flag) is not None:
            raise cli.UsageError(f"--prompts runs a prompt file; drop --{flag}")
    if args.sampler != "multinomial":
        raise cli.UsageError(f"--sampler {args.sampler}: --prompts draws each image from its own seeds (the same image "
                             "in any batch), which takes --sampler multinomial")
    per_prompt = cli.check_int_range(args.samples_per_prompt, "--samples-per-prompt", 1, SAMPLES_MAX,
                                     "samples are named <k:04d>.png")
    cli.check_int_range(args.batch_size, "--batch-size", 1)
    if (args.image_root is None) != (args.image_key is None):
        raise cli.UsageError("--image-root and --image-key go together (editing records)")
    run_dir = args.out / run_name(args)
    records, numbers = read_prompts(args.prompts)
    editing = args.image_root is not None
    images = input_images(args, records, numbers) if editing else {}
    cli.check_seed(args.seed)
    cli.check_image_flags(args)
    device = cli.check_device_and_out(args)
    dtype = cli.DTYPES[args.dtype] or load_hf.default_dtype(device)
    ar_h, ar_w = args.ar_size
    try:
        cli.check_generation(load_hf.Plan(ckpt), ar_h, ar_w, args.upsample, [r["prompt"] for r in records],
                             editing=editing)
    except ValueError as e:  # load_hf.CheckpointError too
        raise cli.UsageError(str(e)) from None
    settings = json.loads(json.dumps({
        "ckpt": str(Path(ckpt).resolve()), "seed": args.seed, "cfg": args.cfg, "temperature": args.temperature,
        "ar_size": [ar_h, ar_w], "upsample": args.upsample, "steps": args.steps, "decoder_cfg": args.decoder_cfg,
        "dtype": str(dtype).removeprefix("torch."), "image_key": args.image_key}))
    done = finished_samples(run_dir, records, per_prompt)
    n_done = sum(map(len, done.values()))
    if n_done and not args.resume:
        raise cli.UsageError(f"{run_dir} already holds {n_done} of this file's samples; pass --resume to skip them, or "
                             "another --run-name / --out")
    have_meta = check_run_folder(args, run_dir, records, numbers, settings, n_done)

    rank, world, device = setup_ranks(device)
    status["note"] = f": the finished samples are kept in {run_dir}; continue with the same flags and --resume"
    if rank == 0:
        start_run_folder(run_dir, settings)
    barrier(world)  # every process has listed the finished samples before any is written
    n_pending = len(records) * per_prompt - n_done
    mine = itertools.islice(pending_samples(records, per_prompt, done), rank, None, world)
    net, tok = load_hf.load_ar(ckpt, dtype=dtype, device=device)
    dec = load_hf.load_decoder(ckpt, dtype=dtype, device=device, cache_dir=args.cache_dir)

    bar = tqdm(total=len(range(rank, n_pending, world)), desc="samples", unit="img",
               disable=rank != 0 and world > 1)
    try:
        while batch := list(itertools.islice(mine, args.batch_size)):
            write_metadata(run_dir, [r for r, _ in batch], have_meta)  # a record's as its first sample starts
            seeds = [P.sample_seed(args.seed, r["idx"], k) for r, k in batch]
            inputs = [images[r["idx"]] for r, _ in batch] if editing else None
            bits = P.generate_bits(net, tok, [r["prompt"] for r, _ in batch], ar_height=ar_h, ar_width=ar_w,
                                   cfg_scale=args.cfg, temperature=args.temperature, seed=seeds, input_images=inputs)
            out = P.decode_bits(dec, bits, ar_h, ar_w, upsampling_ratio=args.upsample, steps=args.steps,
                                guidance=args.decoder_cfg, seed=seeds).cpu()
            for (r, k), im in zip(batch, out):
                path = sample_path(run_dir, r["idx"], k)
                with cli.writing(run_dir, resume=True):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    files.atomic_write(path, lambda tmp: Image.fromarray(im.numpy()).save(tmp, format="PNG"))
                sys.stdout.write(f"{path}\n")  # one write per line: processes sharing stdout never split a line
                sys.stdout.flush()
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


def start_run_folder(run_dir: Path, settings: dict) -> None:
    """The run folder, cleared of a killed run's temporary files, with the settings its samples are drawn with."""
    with cli.writing(run_dir, resume=True):
        if run_dir.is_dir():
            files.remove_temp_files(run_dir, recursive=True)  # left by a killed run
        run_dir.mkdir(parents=True, exist_ok=True)
        f = run_dir / RUN_SETTINGS
        if not f.is_file() or json.loads(f.read_text(encoding="utf-8")) != settings:
            files.atomic_write(f, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2), encoding="utf-8"))


def write_metadata(run_dir: Path, records: list, have_meta: set) -> None:
    """<idx:05d>/metadata.json of each record that has none yet (its idx then joins `have_meta`)."""
    with cli.writing(run_dir, resume=True):
        for r in records:
            if r["idx"] not in have_meta:
                folder = run_dir / f"{r['idx']:05d}"
                folder.mkdir(exist_ok=True)
                files.atomic_write(folder / "metadata.json", lambda tmp: Path(tmp).write_text(
                    json.dumps(r, indent=2, ensure_ascii=False), encoding="utf-8"))
                have_meta.add(r["idx"])


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
        lines = cli.split_lines(Path(path).read_text(encoding="utf-8"))
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


if __name__ == "__main__":
    sys.exit(main())
