"""The command lines' shared code (sample.py, chat.py, generate_batch.py, train.py, rl.py, ...): bad input becomes one
line `error: ...` on stderr and exit code 2, found before anything expensive runs; a training run's folders are
checked before it starts; Ctrl-C / SIGTERM during training save the state and exit with 130 / 143 (SignalGuard). The
sampling scripts share their parser pieces, their flag checks (against load_hf.Plan, the checkpoint's configs read
once) and their output writing here, and a training run's bookkeeping (RunClock: its record, saves every
N steps, signals, stop and resume). The files themselves are written by files.py.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import secrets
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from tokenizers import models

import files
import pipeline as P
from files import UsageError  # the one error type of bad input, raised by the file operations too

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes [0, 2**64 - 1] (negative seeds wrap around)
# Sampling ranges. Temperatures below 0.01 make logits / temperature overflow in half precision long before they
# differ from 0.01, which already picks the likelier bit of any pair whose logits differ by more than ~0.05
# (near-greedy); guidance above 100 overflows the guided logits the same way.
TEMPERATURE_RANGE = (0.01, 100.0)
CFG_RANGE = (1.0, 100.0)


class Parser(argparse.ArgumentParser):
    """argparse with its errors turned into UsageError: one line, no usage block, exit code 2 via `fail`."""

    def error(self, message):
        raise UsageError(message)


def fail(message) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------------------------------
# Flag checks
# ---------------------------------------------------------------------------------------------------------------------


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """'auto' -> CUDA when a GPU is visible, else Apple's GPU (MPS) when there is one, else the CPU: the fastest
    device of a Linux / Windows GPU box or of a Mac. 'cpu', 'cuda', 'cuda:N', 'mps' are checked against this machine
    (a UsageError naming the flag when the device is absent, before anything loads)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{flag} {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError(f"{flag} {name}: CUDA is not available on this machine ({why}); use {flag} cpu "
                             "(or auto)")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"{flag} {name}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            why = ("this torch build has no MPS" if not torch.backends.mps.is_built() else
                   "MPS needs macOS 12.3+ on Apple silicon or an AMD GPU")
            raise UsageError(f"{flag} {name}: MPS (Apple's GPU) is not available on this machine ({why}); use {flag} "
                             "cpu (or auto)")
        if dev.index not in (None, 0):
            raise UsageError(f"{flag} {name}: a Mac has one MPS device, mps (or mps:0)")
        return dev
    raise UsageError(f"{flag} {name!r}: unsupported device type {dev.type!r}; use auto, cpu, cuda, cuda:N or mps")


def check_int_range(value: int, flag: str, lo: int, hi: int | None = None, hint: str = "") -> int:
    return check_number(value, flag, lo, hi, integer=True, hint=hint)


def check_float_range(value: float, flag: str, lo: float, hi: float, hint: str = "") -> float:
    return check_number(value, flag, lo, hi, hint=hint)


def check_seed(seed: int, flag: str = "--seed", hi: int = SEED_MAX) -> int:
    return check_int_range(seed, flag, 0, hi, "the range torch.Generator.manual_seed takes" if hi == SEED_MAX
                           else "")


def check_out_folder(path: Path, flag: str = "--out") -> Path:
    """An output folder: absent (created later) or a folder; never an existing file (nor one under a file)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {p} is an existing file; {flag} names a folder to write into")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {p}: {parent} is a file, so the folder cannot be created")
            break
    return p


def check_out_writable(path: Path, flag: str = "--out") -> Path:
    """An output folder this process may write into (it, or the nearest folder above it that exists): a read-only
    file system or a folder without write permission is a UsageError before anything loads. (A full disk shows only
    when writing: `cannot_write` words that error.)"""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            if q.is_dir() and not os.access(q, os.W_OK | os.X_OK):
                raise UsageError(f"{flag} {p}: cannot write in {q} (read-only file system or no permission); make it "
                                 f"writable, or pass another {flag}")
            break
    return p


def cannot_write(e: BaseException, folder, flag: str = "--out", resume: bool = False) -> str:
    """The one line for a write that failed in an output folder (disk full, read-only, no permission): the folder,
    the system's reason and what to do. `resume`: the finished files stay and a rerun with --resume continues."""
    reason, code = files.io_failure(e) or str(e), files.error_number(e)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        fix = "free some space"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "make it writable"
    else:
        fix = "fix that"
    then = (f"{fix} and continue with the same flags and --resume (the finished files are kept), or pass another "
            f"{flag}" if resume else f"{fix}, or pass another {flag}")
    return f"{flag}: cannot write in {folder} ({reason}); {then}"


COUNT_MAX = 2**31 - 1  # the implicit upper bound of an integer setting that states none (steps, widths, ...)


def check_number(value, flag: str, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False,
                 integer: bool = False, multiple: int | None = None, hint: str = ""):
    """A flag's value within its range, else a UsageError saying what is valid: a finite number (an integer with
    `integer`, a multiple of `multiple`) from `lo` to `hi` (None: unbounded; `lo_open` / `hi_open`: the bound itself
    excluded)."""
    if (integer or multiple) and hi is None and isinstance(value, int) and value > COUNT_MAX:  # past any real use
        raise UsageError(f"{flag} must be at most {COUNT_MAX}, got {value}" + (f" ({hint})" if hint else ""))
    ok = ((isinstance(value, int) or math.isfinite(value)) and (lo is None or (value > lo if lo_open else value >= lo))
          and (hi is None or (value < hi if hi_open else value <= hi)) and (not multiple or value % multiple == 0))
    if ok:
        return value
    what = f"a multiple of {multiple}" if multiple else "an integer" if integer else "a finite number"
    show = lambda v: str(v) if isinstance(v, int) else f"{v:g}"  # noqa: E731
    if lo is not None and hi is not None:
        span = f" in {'(' if lo_open else '['}{show(lo)}, {show(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        span = f" {'>' if lo_open else '>='} {show(lo)}"
    else:
        span = "" if hi is None else f" {'<' if hi_open else '<='} {show(hi)}"
    raise UsageError(f"{flag} must be {what}{span}, got {value}" + (f" ({hint})" if hint else ""))


# ---------------------------------------------------------------------------------------------------------------------
# uniar_sample.json: how sample.py / train.py --eval / rl.py sample a project checkpoint
# ---------------------------------------------------------------------------------------------------------------------

SAMPLE_JSON = "uniar_sample.json"
OFFICIAL_SAMPLE_DEFAULTS = {"ar_size": (960, 960), "upsample": 1.067, "cfg": 1.5, "temperature": 1.0, "steps": 28,
                            "decoder_cfg": 1.5, "prompt": None}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_field(key: str, v):
    """-> None if the value is fine, else what it must be."""
    if key == "ar_size":
        ok = isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                         for x in v)
        return None if ok else "a list of two positive integers [height, width]"
    if key == "steps":
        return None if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else "an integer >= 1"
    if key == "prompt":
        return None if v is None or (isinstance(v, str) and v.strip()) else "a non-empty string or null"
    lo, hi = {"upsample": (1.0, 2.0), "cfg": CFG_RANGE, "decoder_cfg": CFG_RANGE,
              "temperature": TEMPERATURE_RANGE}[key]
    return None if _number(v) and math.isfinite(v) and lo <= v <= hi else f"a number in [{lo:g}, {hi:g}]"


def read_sample_settings(ckpt, *, required: bool = False, defaults: dict = OFFICIAL_SAMPLE_DEFAULTS) -> dict:
    """The checkpoint's `uniar_sample.json`, checked field by field (UsageError naming the file and field), over
    `defaults` (the official ones); without the file, the defaults (or a UsageError when `required`). A save of the
    checkpoint killed mid-switch is finished first (`files.finish_interrupted_save`): the settings are the new ones."""
    files.finish_interrupted_save(ckpt)
    f = Path(ckpt) / SAMPLE_JSON
    out = dict(defaults)
    if not f.is_file():
        if required:
            raise UsageError(f"{f} not found: not a checkpoint written by train.py / rl.py")
        return out
    try:
        with open(f) as fh:
            j = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{f} is not valid JSON ({e}); fix or delete it") from None
    if not isinstance(j, dict):
        raise UsageError(f"{f} must hold a JSON object with the fields {', '.join(OFFICIAL_SAMPLE_DEFAULTS)}")
    for key, v in j.items():
        if key not in OFFICIAL_SAMPLE_DEFAULTS:
            raise UsageError(f"{f}: unknown field {key!r}; the fields are {', '.join(OFFICIAL_SAMPLE_DEFAULTS)}")
        want = _check_field(key, v)
        if want is not None:
            raise UsageError(f"{f}: field {key!r} must be {want}, got {json.dumps(v)}")
        out[key] = v
    if "ar_size" in out:
        out["ar_size"] = tuple(out["ar_size"])
    return out


def check_run_start(run_dir: Path, resume: bool, overwrite: bool) -> dict | None:
    """Before a training run builds anything: `--resume` needs a state; a run folder that holds one is started over
    only with `--overwrite`. -> the state's record when resuming, else None."""
    meta = files.run_state_meta(run_dir)
    if resume:
        if meta is None:
            raise UsageError(f"--resume: no training state in {run_dir} yet ({files.STATE_FILE}); start without --resume, "
                             "or give the --run-dir of the interrupted run")
        return meta
    if meta is not None and not overwrite:
        raise UsageError(f"--run-dir {run_dir} holds the state of an earlier run ({meta.get('where', 'unfinished')}); "
                         "continue it with --resume, start over with --overwrite (its state is replaced), or pass "
                         "another --run-dir")
    return None


def check_checkpoint_out(out: Path, run_id: str, overwrite: bool, flag: str = "--out") -> Path:
    """A checkpoint folder a run will write: absent, empty, written by this same run (its files.RUN_MARK), or replaced only
    with `--overwrite`; never a file. An interrupted save in it is finished first (files.recover_folder)."""
    out = check_out_folder(out, flag)
    files.recover_folder(out)  # a save killed mid-switch is finished first: the folder then says who wrote it
    if overwrite or not out.is_dir() or not any(not e.name.startswith(".") for e in out.iterdir()):
        return out
    try:
        mark = json.loads((out / files.RUN_MARK).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        mark = None
    if mark != run_id:
        raise UsageError(f"{flag} {out} holds files this run did not write (another checkpoint?); pass another "
                         f"{flag}, or --overwrite to replace them")
    return out


def new_run_id() -> str:
    return secrets.token_hex(8)


def report_interrupted(e: "Interrupted", run_dir: Path | None, what: str = "training") -> int:
    """The one line after Ctrl-C / SIGTERM: where the saved state is and how to continue -> the exit code."""
    meta = None if run_dir is None else files.run_state_meta(run_dir)
    if meta is None:
        print(f"interrupted by {e.name} before any {what} state was saved", file=sys.stderr)
    else:
        print(f"interrupted by {e.name}: {what} state saved in {Path(run_dir) / files.STATE_FILE} "
              f"({meta.get('where', 'saved')}); continue with the same flags and --resume", file=sys.stderr)
    return e.exit_code


def check_run_folders(run_dir: Path, out: Path | None) -> Path:
    """train.py / rl.py: --run-dir and --out (default <run-dir>/checkpoint) are folders this user can write, and the
    checkpoint folder is neither the run folder nor above it (saving a checkpoint replaces every entry of its folder,
    which would take the run's state, or the whole run folder, with it). -> the checkpoint folder."""
    check_out_writable(check_out_folder(run_dir, "--run-dir"), "--run-dir")
    out = Path(out) if out is not None else Path(run_dir) / "checkpoint"
    check_out_folder(out)
    o, r = out.resolve(), Path(run_dir).resolve()
    if o == r or o in r.parents:
        raise UsageError(f"--out {out} {'is' if o == r else 'contains'} --run-dir {run_dir}: saving the checkpoint "
                         "replaces everything in --out; pass another --out (default: <run-dir>/checkpoint)")
    return check_out_writable(out)


def resume_advice(run_dir: Path) -> str:
    """What to do after a write failed mid-run: where the last state saved is, and how to continue from it."""
    try:
        meta = files.run_state_meta(run_dir)
    except UsageError:
        meta = None
    fix = "free some space (or make the folder writable)"
    if meta is None:
        return f"nothing was saved yet: {fix}, then run the same command again"
    return (f"the state saved before ({meta.get('where', 'saved')}) is intact in {Path(run_dir) / files.STATE_FILE}: {fix}, "
            "then run the same command with --resume")


# ---------------------------------------------------------------------------------------------------------------------
# Ctrl-C / SIGTERM during training
# ---------------------------------------------------------------------------------------------------------------------


class Interrupted(Exception):
    """Raised by SignalGuard: the process got SIGINT or SIGTERM; exit with `exit_code` (128 + signal number)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + signum


class SignalGuard:
    """SIGINT / SIGTERM handlers for a training loop. Inside `deferred()` (a training step and the state save after
    it) a signal only sets `pending`, which the loop checks once the step is done, saves and raises Interrupted;
    elsewhere, or at a second signal, Interrupted is raised at once. Use as a context manager (the previous handlers
    come back at exit)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.pending: int | None = None
        self._depth = 0
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False

    def _handle(self, signum, frame):
        if self._depth and self.pending is None:
            self.pending = signum
            return
        raise Interrupted(signum)

    @contextmanager
    def deferred(self):
        """Signals inside the block only set `pending`; one still pending when the outermost block ends is raised
        there (the loop inside normally raises it itself after saving)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0 and self.pending is not None:
            raise Interrupted(self.pending)


def add_run_flags(ap: argparse.ArgumentParser, run_dir: Path, what: str, checkpoint: str) -> None:
    """The flags train.py and rl.py share: --run-dir (`what` it holds), --out (the `checkpoint` written), --resume,
    --overwrite."""
    ap.add_argument("--run-dir", type=Path, default=run_dir,
                    help=f"{what} (default: {run_dir.parent.name}/{run_dir.name})")
    ap.add_argument("--out", type=Path, default=None, help=f"{checkpoint} folder (default: <run-dir>/checkpoint)")
    ap.add_argument("--resume", action="store_true", help=f"continue from <run-dir>/{files.STATE_FILE}")
    ap.add_argument("--overwrite", action="store_true", help="start over in a run folder that holds a state, and "
                    "replace an --out folder this run did not write")


# ---------------------------------------------------------------------------------------------------------------------
# The bookkeeping around a training loop (train.py's two stages, rl.py's GRPO steps), so that the loop reads as the
# algorithm
# ---------------------------------------------------------------------------------------------------------------------


class RunClock:
    """A training run's state file, its signals and its stop condition, around one or more loops:

        clock = cli.RunClock(guard, run_dir, meta, save_every=..., stop_after=..., where=...)
        with clock.loop(total, "stage 1", state=lambda: tensors, seconds=(meta["time_s"], "stage1")) as loop:
            for step in loop:                   # meta["step"] .. total - 1
                ...one step...
                loop.show(postfix)              # the progress bar's
            if loop.stopped:                    # --stop-after: the state is saved
                return
            ...the end of the loop (signals still deferred)...

    After every step: meta["step"] is the next step and the step's time is added to `seconds` (a dict and its key);
    the state (meta and `state()`) is saved in <run_dir>/state.safetensors every `save_every` steps (and after the
    last one with `save_last`), at --stop-after (`stop_after` steps of this process, counted over every loop) and at
    Ctrl-C / SIGTERM, which wait for the step to end (SignalGuard.deferred), then raise Interrupted (exit 130 / 143).
    With several processes rank 0 writes the state, every rank waits for it, and a signal any rank got stops them all
    after the same step. From the clock's making on, an interruption reports the state in run_dir (guard.run_dir)."""

    def __init__(self, guard: SignalGuard, run_dir: Path, meta: dict, *, save_every: int, stop_after: int | None,
                 where, rank: int = 0, world: int = 1):
        self.guard, self.run_dir, self.meta, self.where = guard, run_dir, meta, where
        self.save_every, self.stop_after, self.rank, self.world = save_every, stop_after, rank, world
        self.done = 0  # steps of this process, over every loop
        guard.run_dir = run_dir  # an interruption from here on reports the state saved there

    def save(self, state) -> None:
        """The run's record and the tensors `state()` returns (called on every rank), in one file (rank 0); meta["where"]
        says where it is."""
        tensors = state()  # on every rank: under FSDP, gathering the state is a collective
        if self.rank == 0:
            self.meta["where"] = self.where(self.meta)
            with files.writing(self.run_dir, lambda: resume_advice(self.run_dir)):
                files.save_run_state(self.run_dir, self.meta, tensors)
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def pending(self) -> int:
        """The signal this process got during the step (0: none); with several processes the largest any rank got."""
        signum = self.guard.pending or 0
        if self.world > 1:
            import torch.distributed as dist

            t = torch.tensor([signum])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            signum = int(t)
        return signum

    @contextmanager
    def loop(self, total: int, desc: str, *, state, seconds: tuple, save_last: bool = False):
        """The steps meta["step"] .. total - 1 (see the class), with signals deferred until the block ends."""
        steps = _Steps(self, total, desc, state, seconds, save_last)
        with self.guard.deferred():  # Ctrl-C / SIGTERM: finish the current step, save the state, then stop
            yield steps


class _Steps:
    """RunClock.loop's steps: iterate them; `show` sets the progress bar's postfix; `stopped` after --stop-after."""

    def __init__(self, clock: RunClock, total: int, desc: str, state, seconds: tuple, save_last: bool):
        self.clock, self.total, self.state, self.seconds, self.save_last = clock, total, state, seconds, save_last
        self.stopped = False
        start = clock.meta["step"]
        self.bar = None
        if clock.rank == 0:
            from tqdm import tqdm

            self.bar = tqdm(range(start, total), desc=desc, initial=start, total=total, dynamic_ncols=True)
        self._steps = self.bar if self.bar is not None else range(start, total)

    def show(self, postfix: dict | None = None, **more) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, **more)

    def __iter__(self):
        import time

        for step in self._steps:
            t0 = time.perf_counter()
            yield step
            self.clock.meta["step"] = step + 1
            times, key = self.seconds
            times[key] = times.get(key, 0.0) + time.perf_counter() - t0
            if self._end_of_step(step):
                return

    def _end_of_step(self, step: int) -> bool:
        """Save the state if it is due, stop at a signal (Interrupted) -> whether --stop-after ends the loop here."""
        clock = self.clock
        clock.done += 1
        stop = clock.stop_after is not None and clock.done >= clock.stop_after
        saved = (step + 1) % clock.save_every == 0 or stop or (self.save_last and step + 1 == self.total)
        if saved:
            clock.save(self.state)
        signum = clock.pending()  # after the save: a signal that came during it is handled now
        if signum and not saved:
            clock.save(self.state)
        if (signum or stop) and self.bar is not None:
            self.bar.close()
        if signum:
            raise Interrupted(signum)
        self.stopped = stop
        return stop


# ---------------------------------------------------------------------------------------------------------------------
# The sampling scripts (sample.py, chat.py, generate_batch.py): parser pieces, checks, writing
# ---------------------------------------------------------------------------------------------------------------------

DEFAULT_CKPT = Path(__file__).resolve().parent / "checkpoints" / "toy"  # the project's toy checkpoint
MAX_NEW_TOKENS = 1024  # understanding: the default answer limit, lowered to what the position budget leaves
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # None: the
# device's default (load_hf.default_dtype: bf16 on CUDA, fp32 on MPS and CPU)


def run_script(body, argv) -> int:
    """A sampling script's main: body(argv, status) -> exit code. Bad input is one `error: ...` line and exit code 2;
    Ctrl-C / SIGTERM one line (with status["note"]: where the finished files are, how to continue) and 130 / 143."""
    status = {"note": ""}
    with SignalGuard():
        try:
            return body(sys.argv[1:] if argv is None else list(argv), status)
        except UsageError as e:
            return fail(e)
        except Interrupted as e:
            print(f"interrupted by {e.name}{status['note']}", file=sys.stderr)
            return e.exit_code


def checkpoint_settings(argv: list, resolve) -> tuple[Path, dict]:
    """--ckpt read ahead of the full parser, so that --help can show the defaults of the checkpoint it will use ->
    (the checkpoint, its sample settings). `resolve` is load_hf.resolve_checkpoint (a folder, or a hub id through the
    local hub cache); its error is one line naming --ckpt."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--ckpt", type=Path, default=None)
    try:
        named = pre.parse_known_args(argv)[0].ckpt
    except SystemExit:  # e.g. `--ckpt` without a value: the full parser reports it
        named = None
    if named is not None:
        try:
            named = resolve(named)
        except ValueError as e:  # load_hf.CheckpointError
            raise UsageError(f"--ckpt: {e}") from None
    ckpt = named or DEFAULT_CKPT
    return ckpt, read_sample_settings(ckpt)


def parse_size(s: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like HxW, e.g. 512x512, got {s!r}") from None
    return h, w


def script_parser(doc: str, ckpt: Path, d: dict) -> Parser:
    """A sampling script's parser with --ckpt; `d` are the defaults of checkpoint `ckpt` (its uniar_sample.json, or
    the official ones)."""
    where = f"its {SAMPLE_JSON}" if (Path(ckpt) / SAMPLE_JSON).is_file() else "the official inference defaults"
    ap = Parser(description=f"{doc}\nDefaults below: those of {ckpt} ({where}).",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=None, help="checkpoint folder (released layout); default: the "
                    f"project's toy checkpoint ({DEFAULT_CKPT})")
    return ap


def add_image_flags(ap: argparse.ArgumentParser, d: dict, kernel_sampler: bool = True) -> None:
    """The flags of drawing: the AR model's sampling, the seed, the sizes, the decoder's steps and guidance.
    `kernel_sampler`: the script offers --sampler kernel (else --sampler is hidden, and the script refuses kernel)."""
    t_lo, t_hi = TEMPERATURE_RANGE
    g_lo, g_hi = CFG_RANGE
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
    ap.add_argument("--sampler", default="multinomial", choices=["multinomial", "kernel"],
                    help="bit sampler: the official multinomial draw (bit-identical seeds), or the one-launch bitwise "
                    "kernel (Triton on GPU; another random stream)" if kernel_sampler else argparse.SUPPRESS)


def add_answer_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--max-new-tokens", type=int, default=None, help=f"understanding: answer length limit (default "
                    f"min({MAX_NEW_TOKENS}, what the checkpoint's position budget text_config.max_position_embeddings "
                    "leaves after the prompt), decided at run time)")
    ap.add_argument("--answer-temperature", type=float, default=0.0, help="understanding: 0 = greedy (official)")


def add_output_flags(ap: argparse.ArgumentParser) -> None:
    """--device, --dtype, --out, --cache-dir."""
    ap.add_argument("--device", default="auto", help="auto (CUDA, else Apple's MPS, else CPU), cpu, cuda, "
                    "cuda:1, mps")
    ap.add_argument("--dtype", default="auto", choices=list(DTYPES),
                    help="auto: bfloat16 on CUDA, float32 on Apple's MPS and on the CPU")
    ap.add_argument("--out", type=Path, default=Path("out"), help="output folder")
    ap.add_argument("--cache-dir", type=Path, default=None, help="where the decoder prompt embeddings are cached")


def apply_defaults(args, defaults: dict) -> None:
    """The checkpoint exists, and the drawing flags left out take its defaults (args.ar_size, args.upsample, ...)."""
    if args.ckpt is None and not (DEFAULT_CKPT / "config.json").exists():
        raise UsageError(f"no --ckpt given and the project's toy checkpoint does not exist yet ({DEFAULT_CKPT}); "
                         "pass --ckpt PATH to a UniAR checkpoint folder, e.g. a download of ShareLab-SII/UniAR-RL "
                         "(README: Released checkpoints)")
    for name in ("cfg", "temperature", "ar_size", "upsample", "steps", "decoder_cfg"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])


def check_image_flags(args) -> None:
    """The ranges of the drawing flags (after apply_defaults)."""
    check_float_range(args.cfg, "--cfg", *CFG_RANGE, "cfg must be >= 1, 1 = no guidance; larger guidance overflows "
                      "the guided logits")
    check_float_range(args.temperature, "--temperature", *TEMPERATURE_RANGE, "temperature must be > 0; 0.01 is "
                      "already near-greedy, below it logits / temperature overflows")
    check_float_range(args.upsample, "--upsample", 1.0, 2.0, "decoder output size / AR size")
    check_int_range(args.steps, "--steps", 1, hint="decoder denoising steps")
    check_float_range(args.decoder_cfg, "--decoder-cfg", *CFG_RANGE, "1 = no guidance")


def check_answer_flags(args) -> None:
    check_float_range(args.answer_temperature, "--answer-temperature", 0.0, TEMPERATURE_RANGE[1], "0 = greedy")
    if args.max_new_tokens is not None:
        check_int_range(args.max_new_tokens, "--max-new-tokens", 1)


def check_device_and_out(args, writes: bool = True) -> torch.device:
    """--device present on this machine; --out a folder (writable when the run `writes` there) -> the device."""
    device = resolve_device(args.device)
    check_out_folder(args.out)
    if writes:
        check_out_writable(args.out)
    return device


def check_image(path, flag: str = "--image") -> None:
    """A readable image file, within PIL's decompression-bomb limit (ValueError naming the flag)."""
    try:
        P.load_image(path)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None


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


def check_generation(plan, ar_h: int, ar_w: int, upsample: float, prompts: list, *, image=None,
                     editing: bool = False) -> None:
    """--ar-size / --upsample against the AR grid, the position budget and the decoder (`plan`: load_hf.Plan), for
    every prompt; `image`: an edit's input image (checked readable), `editing`: the prompts edit input images
    (ValueError naming the flag; load_hf.CheckpointError for the checkpoint's own problems)."""
    cfg, tok, root = plan.config, plan.tokenizer, plan.root
    if image is not None:
        check_image(image)
        editing = True
    ds = cfg.downsample
    if ar_h <= 0 or ar_w <= 0 or ar_h % ds or ar_w % ds:
        raise ValueError(f"--ar-size: AR size {ar_h}x{ar_w} must be positive multiples of {ds} px")
    unit, max_grid = plan.decoder_geometry
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


def check_understanding(plan, image, question: str, max_new_tokens: int | None) -> int:
    """--image readable, and --max-new-tokens within what the position budget leaves after the prompt (`plan`:
    load_hf.Plan) -> the answer limit (left out: min(MAX_NEW_TOKENS, that room))."""
    cfg, tok, root = plan.config, plan.tokenizer, plan.root
    check_image(image)
    proc = plan.processor  # the preprocessing pipeline.answer will use
    if proc is None:
        raise ValueError(f"{root}: the checkpoint {P.NO_IMAGE_PROCESSOR}")
    _, grid = proc(image)
    warn_unknown_words(tok, question, "--question", root)
    n_prompt = len(tok.encode(P.render_chat_prompt(question, int(grid[0].prod()) // cfg.vision.merge_unit)))
    budget = cfg.text.max_position_embeddings
    room = budget - n_prompt
    if room < 1:
        raise ValueError(f"--question: the prompt (question + image) takes {n_prompt} tokens, the whole position "
                         f"budget max_position_embeddings={budget} of {root / 'config.json'}; use a shorter question "
                         "or a smaller image")
    if max_new_tokens is None:
        return min(MAX_NEW_TOKENS, room)
    if max_new_tokens > room:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: the prompt takes {n_prompt} of the "
                         f"max_position_embeddings={budget} positions of {root / 'config.json'}; use at most {room}")
    return max_new_tokens


def split_lines(text: str) -> list:
    """Lines ended by \\n, \\r\\n or \\r only: str.splitlines would also split a prompt at the Unicode line and
    paragraph separators (U+2028, U+0085, ...), which JSON strings and prompts may hold as text."""
    return re.split(r"\r\n|\r|\n", text)


@contextmanager
def writing(folder: Path, resume: bool = False):
    """A write into an output folder that fails (disk full, read-only, no permission) becomes one error line naming
    the folder; the files are written atomically, so nothing finished before is lost."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        if files.io_failure(e) is None:
            raise
        raise UsageError(cannot_write(e, folder, resume=resume)) from None
