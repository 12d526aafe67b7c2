"""Chat with a UniAR checkpoint in one shared context: the model reads its own drawings as bits.

    python chat.py                                # typed: '/draw a red circle at the top left', then ask about it
    python chat.py --file turns.txt --out chat    # scripted: one turn per line

A turn is '/image PATH' (a picture for your next line), '/draw TEXT' (an image: a prompt, or an edit of what came
before), '/reset' (start over), '/quit', or any other line: a question or an instruction answered in text. Each
drawing is decoded to a PNG in --out (its path printed, never replacing a file); the context keeps every earlier turn
and image, so a later question reads the drawing as it was sampled. The model stays loaded for the whole
conversation (the AR model and the decoder together). Every flag is checked before anything loads.
"""
from __future__ import annotations

import argparse
import errno
import itertools
import os
import sys
from pathlib import Path

# Apple's GPU: an operation the installed torch lacks on MPS runs on the CPU instead of stopping the run (torch reads
# this when it is imported, so it is set first; a value the user set is kept).
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
from PIL import Image

import cli
import files
import load_hf
import pipeline as P

CHAT_HELP = "/image PATH (a picture for your next line), /draw TEXT (an image), /reset, /quit; other lines are questions"


def build_parser(ckpt: Path, d: dict) -> cli.Parser:
    """The parser; `d` are the defaults of checkpoint `ckpt`."""
    ap = cli.script_parser(__doc__, ckpt, d)
    ap.add_argument("--file", type=Path, default=None, help="the conversation scripted: one turn per line, each "
                    "printed as 'user: ...' before the model's reply (default: typed on stdin)")
    for flag in ("--prompt", "--image", "--question"):  # sample.py's: a turn here (refused with the turn to type)
        ap.add_argument(flag, help=argparse.SUPPRESS)
    cli.add_image_flags(ap, d, kernel_sampler=False)  # a conversation draws with multinomial
    cli.add_answer_flags(ap)
    cli.add_output_flags(ap)
    return ap


def main(argv=None) -> int:
    """Exit code 0; 2 with one `error: ...` line for bad input (checked before anything loads; in a scripted file:
    naming the file and line) or an output folder that cannot be written; 130 / 143 with one line after Ctrl-C /
    SIGTERM (every drawing written so far is kept)."""
    return cli.run_script(run, argv)


def run(argv: list, status: dict) -> int:
    """A conversation in one shared context (pipeline.Conversation): each '/draw' is drawn into the context and decoded
    to a PNG in --out (its path printed), each other line answered from the context, which holds every earlier turn
    and image. A mistake in a scripted file is one error line naming the file and line (exit 2); typed, it is said
    and the chat goes on."""
    ckpt, defaults = cli.checkpoint_settings(argv, load_hf.resolve_checkpoint)
    args = build_parser(ckpt, defaults).parse_args(argv)
    cli.apply_defaults(args, defaults)
    for flag, turn in (("prompt", "'/draw TEXT'"), ("image", "'/image PATH'"), ("question", "a line of text")):
        if getattr(args, flag) is not None:
            raise cli.UsageError(f"chat.py: drop --{flag}; in a conversation that is a turn: {turn}")
    if args.sampler != "multinomial":
        raise cli.UsageError(f"--sampler {args.sampler}: a conversation draws with --sampler multinomial")
    cli.check_seed(args.seed)
    cli.check_image_flags(args)
    cli.check_answer_flags(args)
    device = cli.check_device_and_out(args)
    dtype = cli.DTYPES[args.dtype] or load_hf.default_dtype(device)
    try:
        cli.check_generation(load_hf.Plan(ckpt), *args.ar_size, args.upsample, [""])
        net, tok = load_hf.load_ar(ckpt, dtype=dtype, device=device)
        P.image_processor(net)  # questions about pictures need the checkpoint's preprocessor_config.json
        dec = load_hf.load_decoder(ckpt, dtype=dtype, device=device, cache_dir=args.cache_dir)
    except ValueError as e:  # load_hf.CheckpointError too
        return cli.fail(e)
    with cli.writing(args.out):
        args.out.mkdir(parents=True, exist_ok=True)
    return converse(args, ckpt, net, tok, dec, status)


def converse(args, ckpt: Path, net, tok, dec, status: dict) -> int:
    """The turns, one after the other, in one pipeline.Conversation (see `run`) -> the exit code."""
    ar_h, ar_w = args.ar_size
    conv, picture, drawn = P.Conversation(net, tok), None, 0
    for n, line in turns(args.file):
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
                cli.check_image(path, "/image")
                picture = path
                continue
            if line.startswith("/draw"):
                text = line[len("/draw"):].strip()
                if not text:
                    raise ValueError("/draw needs the text to draw (or the edit instruction): /draw TEXT")
                cli.warn_unknown_words(tok, text, "/draw", ckpt)
                seed = P.sample_seed(args.seed, drawn)
                bits = conv.draw(text, picture, ar_height=ar_h, ar_width=ar_w, cfg_scale=args.cfg,
                                 temperature=args.temperature, seed=seed)
                image = P.decode_bits(dec, bits, ar_h, ar_w, upsampling_ratio=args.upsample, steps=args.steps,
                                      guidance=args.decoder_cfg, seed=[seed])[0].cpu().numpy()
                with cli.writing(args.out):
                    path = save_new(args.out, "chat", lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
                drawn += 1
                status["note"] = f": the drawings so far are kept in {args.out}"
                print(f"model: {path}")
            elif line.startswith("/"):
                raise ValueError(f"unknown command {line.split()[0]!r}; the commands: {CHAT_HELP}")
            else:
                cli.warn_unknown_words(tok, line, "question", ckpt)
                print(f"model: {conv.ask(line, picture, max_new_tokens=args.max_new_tokens or 256, temperature=args.answer_temperature, seed=args.seed)}")
            picture = None
        except cli.UsageError:  # an output folder that cannot be written: the run ends
            raise
        except ValueError as e:
            if n is not None:
                return cli.fail(f"--file {args.file}, line {n}: {e}")
            print(f"error: {e}", file=sys.stderr)
        sys.stdout.flush()
    return 0


def turns(path: Path | None):
    """(line number, text) of the scripted file, or (None, text) of stdin as it is typed."""
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise cli.UsageError(f"--file {path}: cannot read it ({e})") from None
        yield from enumerate(cli.split_lines(text), 1)
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
    tmp = files.temp_name(out / f"{stem}.png")
    try:
        write(tmp)
        files._fsync_file(tmp)
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
    files._fsync_dir(out)
    return path


if __name__ == "__main__":
    sys.exit(main())
