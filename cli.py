"""Checks and plumbing shared by the command lines (sample.py, train.py): bad input becomes one line
`error: ...` on stderr and exit code 2, found before anything expensive runs; Ctrl-C / SIGTERM during training save
the state and exit with 130 / 143; files are written atomically.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes [0, 2**64 - 1] (negative seeds wrap around)
# Sampling ranges. Temperatures below 0.01 make logits / temperature overflow in half precision long before they
# differ from 0.01, which already picks the likelier bit of any pair whose logits differ by more than ~0.05
# (near-greedy); guidance above 100 overflows the guided logits the same way.
TEMPERATURE_RANGE = (0.01, 100.0)
CFG_RANGE = (1.0, 100.0)


class UsageError(ValueError):
    """Bad input: the message names the flag, file or field and what to do (printed as `error: <message>`)."""


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
    """'auto' -> cuda when there is one, else cpu; 'cpu', 'cuda', 'cuda:N', 'mps' checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
            raise UsageError(f"{flag} {name}: MPS is not available on this machine; use {flag} cpu (or auto)")
        return dev
    raise UsageError(f"{flag} {name!r}: unsupported device type {dev.type!r}; use auto, cpu, cuda, cuda:N or mps")


def check_int_range(value: int, flag: str, lo: int, hi: int | None = None, hint: str = "") -> int:
    if value < lo or (hi is not None and value > hi):
        span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise UsageError(f"{flag} must be an integer {span}, got {value}" + (f" ({hint})" if hint else ""))
    return value


def check_float_range(value: float, flag: str, lo: float, hi: float, hint: str = "") -> float:
    if not (math.isfinite(value) and lo <= value <= hi):
        raise UsageError(f"{flag} must be a finite number in [{lo:g}, {hi:g}], got {value}" +
                         (f" ({hint})" if hint else ""))
    return value


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
    `defaults` (the official ones); without the file, the defaults (or a UsageError when `required`)."""
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


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------


def atomic_write(path: Path, write) -> Path:
    """write(tmp_path) into a temporary file beside `path`, then rename it over `path` (never a half-written file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # created by `write`: the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
