"""Checks and plumbing shared by the command lines (sample.py, train.py): bad input becomes one line
`error: ...` on stderr and exit code 2, found before anything expensive runs; Ctrl-C / SIGTERM during training save
the state and exit with 130 / 143; files are written atomically.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

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
    reason, code = io_failure(e) or str(e), _errno(e)
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


def finish_interrupted_save(folder) -> None:
    """Before anything is read from a checkpoint folder: a save killed after its journal commit left it half
    switched (some entries of the old checkpoint moved aside, the new ones not yet in), so the switch is finished
    first (`recover_folder`, under the folder's lock). Only then is the folder written to: without a journal nothing
    is, so a folder the user cannot write (a hub cache, a shared download) still loads. UsageError (one line) when
    the switch cannot be finished: a folder that is not writable, or a damaged journal."""
    folder = Path(folder)
    journal = folder / JOURNAL
    if not journal.is_file():
        return
    try:
        recover_folder(folder)
    except UsageError:
        raise
    except OSError as e:
        raise UsageError(f"{journal}: a save into {folder} was interrupted and must be finished before the checkpoint "
                         f"can be read, but {e.filename or folder} cannot be written ({e.strerror or e}); run this once "
                         "as a user who may write the folder (or make it writable), or save the checkpoint again"
                         ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{journal}: the journal of an interrupted save into {folder} is damaged ({type(e).__name__}: "
                         f"{e}); the new files are in the hidden .new-* folder beside it: save the checkpoint again, "
                         "or move those files into the folder and delete the journal") from None


def read_sample_settings(ckpt, *, required: bool = False, defaults: dict = OFFICIAL_SAMPLE_DEFAULTS) -> dict:
    """The checkpoint's `uniar_sample.json`, checked field by field (UsageError naming the file and field), over
    `defaults` (the official ones); without the file, the defaults (or a UsageError when `required`). A save of the
    checkpoint killed mid-switch is finished first (`finish_interrupted_save`): the settings are the new ones."""
    finish_interrupted_save(ckpt)
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


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (POSIX; elsewhere the rename itself is what the system offers)."""
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def temp_name(path: Path) -> Path:
    """A hidden temporary name beside `path`, unique to this process and call (concurrent runs never share one)."""
    return path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")


def atomic_write(path: Path, write) -> Path:
    """write(tmp_path) into a temporary file beside `path`, flush it to disk, then rename it over `path` in one atomic
    step: at every instant `path` is the previous file or the new one, never a half-written one."""
    path = Path(path)
    tmp = temp_name(path)  # created by `write`: the usual permissions
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def remove_temp_files(folder: Path, stem: str = "*", suffix: str = "*", recursive: bool = False) -> None:
    """Delete the temporary files atomic_write left behind (for `stem` + `suffix`) when its process was killed; those
    of a process still running are kept (it may be about to rename them). Also the private folders of the same name
    that atomic_save_file writes in (with whatever safetensors left inside)."""
    for f in list((Path(folder).rglob if recursive else Path(folder).glob)(f".{stem}.*.tmp{suffix}")):
        m = re.search(r"\.(\d+)-[0-9a-f]{8}\.tmp", f.name)
        if m and f.is_file() and not _alive(int(m.group(1)), f):
            f.unlink(missing_ok=True)
        elif m and f.is_dir() and not f.is_symlink() and not _alive(int(m.group(1)), f):
            shutil.rmtree(f, ignore_errors=True)


def atomic_save_file(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    """safetensors' save_file, atomically and without leaving anything behind when killed: save_file writes its own
    temporary file (`.tmpXXXXXX`, a name without an owner) beside its target and renames it, so the target here is
    inside a private hidden folder named like atomic_write's temporary files (this process's id); the finished file
    is then renamed over `path`. A save killed at any instant leaves `path` as it was, and the folder, with
    safetensors' temporary file in it, is removed by remove_temp_files once its process is gone."""
    path = Path(path)
    stage = temp_name(path)
    stage.mkdir()
    try:
        tmp = stage / path.name
        save_file(tensors, str(tmp), metadata=metadata)
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    _fsync_dir(path.parent)
    return path


_SAFETENSORS_TEMP = re.compile(r"\.tmp[0-9A-Za-z]{6}")  # the Rust tempfile crate's name, which save_file uses


def remove_safetensors_temps(folder: Path) -> list:
    """Delete the temporary files safetensors' save_file left in `folder` (not in a folder of atomic_save_file: an
    earlier version's saves, killed while writing). Their names carry no process id, so only the holder of the
    folder's run_lock may call this: no save of a live run of this project writes there then. Only a file with that
    exact name whose bytes are the start of a safetensors file (or too short to tell) goes. -> the files removed."""
    gone = []
    for f in Path(folder).iterdir():
        if not (_SAFETENSORS_TEMP.fullmatch(f.name) and f.is_file() and not f.is_symlink()):
            continue
        try:
            with open(f, "rb") as fh:
                head = fh.read(9)
        except OSError:
            continue
        if len(head) < 9 or (int.from_bytes(head[:8], "little") < 2**28 and head[8:9] == b"{"):
            f.unlink(missing_ok=True)
            gone.append(f)
    return gone


def _errno(e: BaseException) -> int | None:
    """The system's error number of an OSError, or of safetensors' I/O error (which carries it in its text)."""
    if isinstance(e, OSError):
        return e.errno
    m = re.search(r"\(os error (\d+)\)", str(e)) if isinstance(e, SafetensorError) else None
    return int(m.group(1)) if m else None


def io_failure(e: BaseException) -> str | None:
    """Why a write failed (disk full, read-only file system, no permission, ...) for an OSError or safetensors' I/O
    error; None for any other error."""
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    if isinstance(e, SafetensorError):
        code = _errno(e)
        if code is not None:
            return os.strerror(code)
        if "I/O error" in str(e):
            return str(e)
    return None


@contextmanager
def writing(folder: Path, advice):
    """A failed write inside the block (disk full, read-only, ...) becomes one UsageError line: `cannot write
    <folder>: <reason>; <advice>` (`advice` a text, or a function giving it once the write has failed)."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        reason = io_failure(e)
        if reason is None:
            raise
        raise UsageError(f"cannot write {folder}: {reason}; {advice() if callable(advice) else advice}") from None


# A set of entries replaced as a whole (a checkpoint folder, sample.py's outputs): the new entries are staged in a
# hidden folder inside the target, then switched in under a journal and a lock, so the target never disappears, a
# crash at any instant is rolled forward, and concurrent writers never interleave.
JOURNAL = ".uniar-switch.json"
LOCK = ".uniar-lock"


def _alive(pid: int, path: Path) -> bool:
    """Whether the process that owns `path` may still be running (POSIX: ask the system; elsewhere: a day)."""
    if os.name == "posix":
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        return time.time() - path.stat().st_mtime < 86400
    except FileNotFoundError:
        return False


@contextmanager
def folder_lock(root: Path, timeout: float = 60.0):
    """One writer at a time switches entries in `root`: a lock file created exclusively (on every system), holding
    the owner's pid; a lock whose owner was killed is taken over."""
    path = Path(root) / LOCK
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(path.read_text() or 0)
                age = time.time() - path.stat().st_mtime
            except (FileNotFoundError, ValueError):
                owner, age = 0, 0.0  # being written or removed right now: look again
            if (owner and not _alive(owner, path)) or (not owner and age > 5.0):  # killed, or killed mid-creation
                path.unlink(missing_ok=True)
            elif time.monotonic() > deadline:
                raise UsageError(f"{root} is being written by another run (process {owner}, {path}); wait for it, or "
                                 "delete the lock file if that process is gone") from None
            else:
                time.sleep(0.02)
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


# A training run (train.py, rl.py) holds its run folder and its checkpoint folder for the whole run: a second run
# given either is refused at once. The lock is the operating system's (flock; on Windows a locked byte), so a run
# killed in any way releases it with its process, and the next run takes the folder over.
RUN_LOCK = ".uniar-run-lock"
_WIN_LOCK_BYTE = 1 << 20  # Windows locks are mandatory: lock a byte past the pid, which others read


def _try_lock(fd: int) -> bool:
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, _WIN_LOCK_BYTE, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _lock_owner(fd: int) -> int:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return int(os.read(fd, 32).decode() or 0)
    except (OSError, ValueError):
        return 0


def _acquire_run_lock(folder: Path, flag: str) -> int:
    path = folder / RUN_LOCK
    deadline = time.monotonic() + 2.0  # only for a new owner to write its pid: never a wait for another run
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder was removed as its previous run finished: make it again
            folder.mkdir(parents=True, exist_ok=True)
            continue
        if _try_lock(fd):
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:  # the previous owner removed this file as it finished: lock the file now there
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, str(os.getpid()).encode())
            return fd
        owner = _lock_owner(fd)
        os.close(fd)
        if (owner and _alive(owner, path)) or time.monotonic() > deadline:
            who = f"process {owner}" if owner else "another process"
            raise UsageError(f"{flag} {folder} is in use by another run ({who}); wait for it to finish, or pass "
                             f"another {flag}")
        time.sleep(0.05)  # locked, but its owner has not written its pid yet


def _release_run_lock(folder: Path, fd: int) -> None:
    path = folder / RUN_LOCK
    if os.name == "nt":  # an open file cannot be removed there: unlock, close, then remove unless reopened
        import msvcrt

        os.lseek(fd, _WIN_LOCK_BYTE, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        os.close(fd)
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
        return
    try:
        path.unlink(missing_ok=True)  # while still locked: a run that opened it meanwhile sees it gone, retries
    finally:
        os.close(fd)


@contextmanager
def run_lock(folder: Path, flag: str):
    """Hold `folder` (a run folder, a checkpoint folder) for a whole run: created if absent, then locked; a folder
    another live run holds is a UsageError at once, naming the flag, the folder and that run's process. A lock
    left by a killed run is taken over. At the end the lock file goes, and the folder too when this run created
    it and left it empty (a run stopped before it wrote there), with the empty folders above it it created."""
    folder = Path(folder)
    created = [d for d in (folder, *folder.parents) if not d.exists()]  # deepest first
    with writing(folder, f"make it writable, or pass another {flag}"):
        folder.mkdir(parents=True, exist_ok=True)
        fd = _acquire_run_lock(folder, flag)
    try:
        yield folder
    finally:
        _release_run_lock(folder, fd)
        for d in created:
            try:
                d.rmdir()  # only when empty
            except OSError:
                break


def replace_folder(root: Path, write, owned: str | None = None) -> Path:
    """write(staging) fills a new hidden folder inside `root` completely (flushed to disk); then, under the folder
    lock, a journal naming it is written atomically (the commit point), the entries it replaces move aside into a
    hidden old folder, the new ones move in, and the old ones are deleted. Replaced: every visible entry of `root`
    (a checkpoint), or with `owned` (the name of a hidden list file) only the entries the previous switch listed
    there and the ones the new set brings (sample outputs beside the user's own files). A crash before the commit
    leaves the old contents; after it, `recover_folder` (run by the next switch or load) finishes the switch."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    new = root / f".new-{tag}"
    new.mkdir()
    try:
        write(new)
        if owned is not None:
            names = sorted(e.name for e in new.iterdir() if not e.name.startswith("."))
            (new / owned).write_text(json.dumps(names))
        for f in new.rglob("*"):
            if f.is_file():
                _fsync_file(f)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    try:
        with folder_lock(root):
            recover_folder(root, locked=True)
            journal = {"new": new.name, "old": f".old-{tag}", "phase": 1, "owned": owned}
            _write_journal(root, journal)
            _finish_switch(root, journal)
    except BaseException:
        if not _committed(root, new):  # failed before the commit (a full disk, say): the folder stays as it was
            shutil.rmtree(new, ignore_errors=True)
        raise
    return root


def _committed(root: Path, new: Path) -> bool:
    """Whether the journal in `root` names the staging folder `new` (the switch to it is committed); a journal that
    cannot be read counts as committed, so its staged entries are kept for the recovery."""
    try:
        return json.loads((root / JOURNAL).read_text()).get("new") == new.name
    except FileNotFoundError:
        return False
    except (OSError, ValueError, AttributeError):
        return True


def _write_journal(root: Path, journal: dict) -> None:
    atomic_write(root / JOURNAL, lambda tmp: Path(tmp).write_text(json.dumps(journal)))


def _replaced(root: Path, journal: dict) -> list:
    """The entries of `root` a switch moves aside (phase 1)."""
    new = root / journal["new"]
    if journal.get("owned") is None:
        return [e for e in root.iterdir() if not e.name.startswith(".")]
    try:
        names = set(json.loads((root / journal["owned"]).read_text()))
    except (OSError, ValueError):
        names = set()
    names |= {e.name for e in new.iterdir()} if new.is_dir() else set()
    return [root / n for n in sorted(names) if (root / n).exists() and not n.startswith(".")]


def _finish_switch(root: Path, journal: dict) -> None:
    """Phase 1 moves the replaced entries into the old folder; phase 2 moves the staged entries in. The journal
    records the phase, so running this again after a crash makes exactly the moves not yet made."""
    new, old = root / journal["new"], root / journal["old"]
    if journal["phase"] == 1:
        old.mkdir(exist_ok=True)
        for e in _replaced(root, journal):
            os.replace(e, old / e.name)
        journal = {**journal, "phase": 2}
        _write_journal(root, journal)
    for e in list(new.iterdir()) if new.is_dir() else []:
        os.replace(e, root / e.name)
    _fsync_dir(root)
    (root / JOURNAL).unlink()
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(root: Path, locked: bool = False) -> None:
    """Finish a switch that a killed process left half done (roll forward: its staged entries were complete), then
    remove the staging and old folders and temporary files that killed processes left behind."""
    root = Path(root)
    if not root.is_dir():
        return
    if not locked:
        with folder_lock(root):
            return recover_folder(root, locked=True)
    if (root / JOURNAL).is_file():
        _finish_switch(root, json.loads((root / JOURNAL).read_text()))
    for e in root.iterdir():
        tag = re.fullmatch(r"\.(?:new|old)-(\d+)-[0-9a-f]+", e.name)
        if tag and e.is_dir() and not _alive(int(tag.group(1)), e):  # a live writer may still be staging
            shutil.rmtree(e, ignore_errors=True)
    remove_temp_files(root, Path(JOURNAL).stem, Path(JOURNAL).suffix)


# ---------------------------------------------------------------------------------------------------------------------
# A training run's state (train.py, rl.py): one file, switched in by one rename
# ---------------------------------------------------------------------------------------------------------------------

STATE_FILE = "state.safetensors"  # in the run folder: the tensors, with the run's JSON record in the header
_STATE_KEY = "uniar_state"
_LEGACY_STATE = "state"  # the earlier layout: a folder state/ with state.json + state.safetensors


def save_run_state(run_dir: Path, meta: dict, tensors: dict) -> Path:
    """The whole state in one file, written completely and then renamed over the previous one: at every instant the
    run folder holds one complete state, the previous or the new (atomic_save_file: a save killed midway leaves
    nothing that the next run's clean_run_dir does not remove)."""
    run_dir = Path(run_dir)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    path = atomic_save_file(run_dir / STATE_FILE, tensors, metadata={_STATE_KEY: json.dumps(meta)})
    for name in (_LEGACY_STATE, _LEGACY_STATE + ".old", _LEGACY_STATE + ".tmp"):  # superseded by the new file
        legacy = run_dir / name
        if legacy.is_dir() and {f.name for f in legacy.iterdir()} <= {"state.json", "state.safetensors"}:
            shutil.rmtree(legacy)  # only a folder of the earlier layout, nothing a user put there
    return path


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict:
    """The optimizer's per-parameter state as flat tensors ("opt.<param index>.<name>") for save_run_state."""
    return {f"opt.{i}.{k}": torch.as_tensor(v) for i, st in opt.state_dict()["state"].items() for k, v in st.items()}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict) -> None:
    """The inverse of optimizer_tensors (the hyper-parameters stay those `opt` was built with)."""
    sd = opt.state_dict()
    state = {}
    for i in range(len(sd["param_groups"][0]["params"])):
        keys = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        if keys:
            state[i] = keys
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def run_state_meta(run_dir: Path) -> dict | None:
    """The JSON record of the run folder's state (no tensors read), or None when it holds none."""
    got = _read_run_state(Path(run_dir), tensors=False)
    return None if got is None else got[0]


def load_run_state(run_dir: Path) -> tuple[dict, dict]:
    """(record, tensors) of the run folder's state; UsageError when there is none or it cannot be read."""
    got = _read_run_state(Path(run_dir), tensors=True)
    if got is None:
        raise UsageError(f"--resume: no training state in {Path(run_dir)} yet ({STATE_FILE}); start without --resume, "
                         "or give the --run-dir of the interrupted run")
    return got


def _read_run_state(run_dir: Path, tensors: bool):
    f = run_dir / STATE_FILE
    legacy = run_dir / _LEGACY_STATE
    try:
        if f.is_file():
            with safe_open(str(f), "pt") as h:
                meta = json.loads((h.metadata() or {})[_STATE_KEY])
            return meta, (load_file(str(f)) if tensors else None)
        if (legacy / "state.json").is_file() and (legacy / "state.safetensors").is_file():
            f = legacy / "state.json"
            meta = json.loads(f.read_text())
            return meta, (load_file(str(legacy / "state.safetensors")) if tensors else None)
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        raise UsageError(f"{f}: not a readable training state ({type(e).__name__}: {e}); delete it to start over, "
                         "or restore it from a backup") from None
    return None


RUN_MARK = "uniar_run.json"  # in a checkpoint folder: the id of the training run that wrote it


def check_run_start(run_dir: Path, resume: bool, overwrite: bool) -> dict | None:
    """Before a training run builds anything: `--resume` needs a state; a run folder that holds one is started over
    only with `--overwrite`. -> the state's record when resuming, else None."""
    meta = run_state_meta(run_dir)
    if resume:
        if meta is None:
            raise UsageError(f"--resume: no training state in {run_dir} yet ({STATE_FILE}); start without --resume, "
                             "or give the --run-dir of the interrupted run")
        return meta
    if meta is not None and not overwrite:
        raise UsageError(f"--run-dir {run_dir} holds the state of an earlier run ({meta.get('where', 'unfinished')}); "
                         "continue it with --resume, start over with --overwrite (its state is replaced), or pass "
                         "another --run-dir")
    return None


def check_checkpoint_out(out: Path, run_id: str, overwrite: bool, flag: str = "--out") -> Path:
    """A checkpoint folder a run will write: absent, empty, written by this same run (its RUN_MARK), or replaced only
    with `--overwrite`; never a file. An interrupted save in it is finished first (recover_folder)."""
    out = check_out_folder(out, flag)
    recover_folder(out)  # a save killed mid-switch is finished first: the folder then says who wrote it
    if overwrite or not out.is_dir() or not any(not e.name.startswith(".") for e in out.iterdir()):
        return out
    try:
        mark = json.loads((out / RUN_MARK).read_text()).get("run_id")
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
    meta = None if run_dir is None else run_state_meta(run_dir)
    if meta is None:
        print(f"interrupted by {e.name} before any {what} state was saved", file=sys.stderr)
    else:
        print(f"interrupted by {e.name}: {what} state saved in {Path(run_dir) / STATE_FILE} "
              f"({meta.get('where', 'saved')}); continue with the same flags and --resume", file=sys.stderr)
    return e.exit_code


def clean_run_dir(run_dir: Path) -> None:
    """Remove the temporary files and folders that processes killed while saving left in the run folder (the
    state's, the plots', metrics.json's), and safetensors' own temporary files that saves of earlier versions left.
    For the holder of the folder's run_lock (train.py / rl.py call it under the lock)."""
    remove_temp_files(run_dir)
    remove_safetensors_temps(run_dir)


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
        meta = run_state_meta(run_dir)
    except UsageError:
        meta = None
    fix = "free some space (or make the folder writable)"
    if meta is None:
        return f"nothing was saved yet: {fix}, then run the same command again"
    return (f"the state saved before ({meta.get('where', 'saved')}) is intact in {Path(run_dir) / STATE_FILE}: {fix}, "
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


def save_grid(images, path: Path, cols: int | None = None, gap: int = 0, zoom: int = 1) -> None:
    """images (B, H, W, 3) uint8 (numpy or torch) -> one PNG, written atomically: `cols` per row (default: as square
    a grid as possible), `gap` white pixels between them, enlarged `zoom` times (nearest, for tiny toy images)."""
    from PIL import Image

    images = np.asarray(images)
    B, H, W, _ = images.shape
    cols = cols or int(B**0.5 + 0.999)
    rows = (B + cols - 1) // cols
    canvas = np.full((rows * (H + gap), cols * (W + gap), 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * (H + gap):r * (H + gap) + H, c * (W + gap):c * (W + gap) + W] = im
    big = Image.fromarray(canvas)
    if zoom != 1:
        big = big.resize((canvas.shape[1] * zoom, canvas.shape[0] * zoom), Image.NEAREST)
    atomic_write(path, lambda tmp: big.save(tmp, format="PNG"))


def add_run_flags(ap: argparse.ArgumentParser, run_dir: Path, what: str, checkpoint: str) -> None:
    """The flags train.py and rl.py share: --run-dir (`what` it holds), --out (the `checkpoint` written), --resume,
    --overwrite."""
    ap.add_argument("--run-dir", type=Path, default=run_dir,
                    help=f"{what} (default: {run_dir.parent.name}/{run_dir.name})")
    ap.add_argument("--out", type=Path, default=None, help=f"{checkpoint} folder (default: <run-dir>/checkpoint)")
    ap.add_argument("--resume", action="store_true", help=f"continue from <run-dir>/{STATE_FILE}")
    ap.add_argument("--overwrite", action="store_true", help="start over in a run folder that holds a state, and "
                    "replace an --out folder this run did not write")
