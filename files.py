"""Crash-safe file operations: every file this project writes goes through here. A file is written to a temporary
name and renamed over its target (`atomic_write`, `atomic_save_file`), so at every instant it is the old file or the
new one; a folder of files (a checkpoint, a run's outputs) is staged and switched in under a journal
(`replace_folder`), so a crash at any instant is rolled forward by the next reader; a training run holds its
folders with an operating-system lock (`run_lock`) and keeps its whole state in one file (`save_run_state`).
Failures a user can fix (a full disk, a folder in use) are UsageError: one line naming the folder and what to do.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file


class UsageError(ValueError):
    """Bad input: the message names the flag, file or field and what to do (printed as `error: <message>`)."""

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


def error_number(e: BaseException) -> int | None:
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
        code = error_number(e)
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


def clean_run_dir(run_dir: Path) -> None:
    """Remove the temporary files and folders that processes killed while saving left in the run folder (the
    state's, the plots', metrics.json's), and safetensors' own temporary files that saves of earlier versions left.
    For the holder of the folder's run_lock (train.py / rl.py call it under the lock)."""
    remove_temp_files(run_dir)
    remove_safetensors_temps(run_dir)


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
