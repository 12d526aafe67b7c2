"""Nothing a user has is lost: saves killed (SIGKILL) at every instant leave the previous state or the new one, never a
mix, and the next run cleans up; a training run killed at random instants and resumed each time ends with the
weights of an uninterrupted run, bit for bit; a run never replaces a state or a checkpoint it did not write."""
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cli
import files
import killpoints
import load_hf
from conftest import ROOT

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child (POSIX)")


def killed_at(k: int, fn) -> bool:
    """Run fn in a forked child that SIGKILLs itself at its k-th file-system call; True if it was killed (False: fn
    finished before its k-th call)."""
    pid = os.fork()
    if pid == 0:  # the child: no pytest teardown, no cleanup code, as after a real kill
        try:
            killpoints.install(k)
            fn()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def tree(folder: Path) -> dict:
    """Every file under folder (hidden ones included) -> its bytes."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def write_checkpoint(files: dict):
    def write(tmp: Path):
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
    return write


@needs_fork
def test_checkpoint_folder_switch_killed_at_every_call(tmp_path):
    """files.replace_folder (what save_checkpoint writes through) killed before each of its file-system calls in turn:
    the folder exists at every instant; a load reads exactly the old checkpoint or exactly the new one (the old one
    until the journal is committed, the new one from then on); after the recovery the next save starts with, no
    staging folder, journal or temporary file is left."""
    old = {"config.json": b'{"a": 1}', "model.safetensors": b"old weights", "sub/x.json": b"old",
           "stale.bin": b"only in the old checkpoint", ".gitattributes": b"hidden: kept"}
    new = {"config.json": b'{"a": 2}', "model.safetensors": b"new weights", "sub/x.json": b"new",
           "sub/y.json": b"new only"}
    committed = False
    k = 0
    while True:
        k += 1
        root = tmp_path / f"ck{k}"
        write_checkpoint(old)(root)
        if not killed_at(k, lambda: files.replace_folder(root, write_checkpoint(new))):
            break
        assert root.is_dir(), k
        committed = committed or (root / files.JOURNAL).is_file()
        load_hf.resolve_part(root, "ar_model")  # a load finishes an interrupted switch before reading
        want = {**new, ".gitattributes": old[".gitattributes"]} if committed else old
        assert {n: b for n, b in tree(root).items() if not n.startswith(".")} == \
            {n: b for n, b in want.items() if not n.startswith(".")}, k
        files.recover_folder(root)  # what the next save does first: no staging folder or temporary file remains
        assert tree(root) == want, k
    assert committed and k > 20  # the kills did reach past the commit point, at every call of the switch
    assert tree(root) == {**new, ".gitattributes": old[".gitattributes"]}


@needs_fork
def test_state_save_killed_at_every_call(tmp_path):
    """files.save_run_state killed before each of its file-system calls: the run folder always holds one complete state
    (the previous until the rename, the new after it), and clean_run_dir leaves no temporary file."""
    run = tmp_path / "run"
    run.mkdir()
    files.save_run_state(run, {"step": 1}, {"w": torch.zeros(3)})
    k = 0
    while True:
        k += 1
        if not killed_at(k, lambda: files.save_run_state(run, {"step": 2}, {"w": torch.ones(3)})):
            break
        meta, tensors = files.load_run_state(run)
        assert (meta["step"], tensors["w"].tolist()) in ((1, [0.0] * 3), (2, [1.0] * 3)), k
        files.clean_run_dir(run)
        assert sorted(p.name for p in run.iterdir()) == [files.STATE_FILE], k
        files.save_run_state(run, {"step": 1}, {"w": torch.zeros(3)})
    assert k > 3


def weights(ckpt: Path) -> dict:
    return load_file(str(ckpt / "model.safetensors"))


TINY = ["--smoke", "--stage1-steps", "3", "--stage2-steps", "3", "--save-every", "1", "--no-eval"]


def run_killed(k: int, log: Path, module: str, args: list) -> int:
    """`python -m module args` SIGKILLed at its k-th file-system call (0: never) -> its exit code."""
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "killpoints.py"), str(k), str(log), module] + args,
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode in (0, -signal.SIGKILL), r.stderr[-3000:]
    return r.returncode


def no_leftovers(*folders: Path) -> list:
    return [p for f in folders for p in f.rglob(".*")]


def test_training_killed_at_random_instants_resumes_to_the_same_weights(tmp_path):
    """`train.py` killed with SIGKILL at random file-system calls (inside state saves and the checkpoint switch
    among them), restarted after each kill with --resume (without it while no state was saved yet): the final
    checkpoint equals an uninterrupted run's bit for bit, and no temporary file or folder is left."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert run_killed(0, tmp_path / "ref.log", "train", TINY + ["--run-dir", str(ref)]) == 0
    calls = len((tmp_path / "ref.log").read_text().splitlines())  # file-system calls of a whole run
    kills = 0
    for k in random.Random(0).sample(range(1, calls + 1), 5) + [0]:
        resume = ["--resume"] if files.run_state_meta(run) is not None else []
        kills += run_killed(k, tmp_path / "run.log", "train", TINY + ["--run-dir", str(run)] + resume) != 0
    assert kills >= 4
    want, got = weights(ref / "checkpoint"), weights(run / "checkpoint")
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert files.run_state_meta(run)["history"] == files.run_state_meta(ref)["history"]
    assert no_leftovers(run) == []


WRITER = """
import sys, torch, sample, load_hf
out, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
k = 2 if who == "a" else 1  # run a: two images, grid and bits; run b: one image
images = torch.full((k, 8, 8, 3), 10 if who == "a" else 200, dtype=torch.uint8)
bits = torch.zeros(k, 4, 4, 4, 64, dtype=torch.long) if who == "a" else None
for i in range(n):
    sample.write_outputs(sample.Path(out), images, bits, {"seed": who})
    for _ in range(20):
        load_hf.write_prompt_cache(sample.Path(out).parent / "cache.safetensors", torch.full((1, 2), float(i)),
                                         torch.zeros(1, 2))
"""


def test_concurrent_runs_with_the_same_out_never_mix(tmp_path):
    """Two processes write their output sets into one --out folder over and over (sample.write_outputs, as sample.py
    does at the end of a run) and the decoder prompt cache beside it: the folder ends with exactly one run's set (no
    PNG of one beside the grid or bits of the other), the user's own file in it is untouched, no temporary file or
    lock is left, and neither process failed on a shared temporary name."""
    import numpy as np
    from PIL import Image

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), who, "25"], cwd=ROOT, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}) for who in "ab"]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    names = sorted(p.name for p in out.iterdir())
    values = {n: int(np.asarray(Image.open(out / n))[0, 0, 0]) for n in names if n.startswith("sample_")}
    if values["sample_00.png"] == 10:  # run a's set
        assert names == [".uniar-outputs.json", "bits.safetensors", "grid.png", "notes.txt", "sample_00.png",
                         "sample_01.png"]
        assert values == {"sample_00.png": 10, "sample_01.png": 10}
        from safetensors import safe_open

        with safe_open(str(out / "bits.safetensors"), "pt") as f:
            assert f.metadata()["seed"] == "a"
    else:
        assert names == [".uniar-outputs.json", "notes.txt", "sample_00.png"] and values == {"sample_00.png": 200}
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.safetensors", "out"]
    assert load_file(str(tmp_path / "cache.safetensors"))["prompt_embeds"].tolist() == [[24.0, 24.0]]


def test_state_of_the_earlier_layout_resumes_and_is_replaced(tmp_path):
    """A run folder from before the one-file state (state/state.json + state/state.safetensors) still resumes; the
    first new save supersedes it and removes it, but never a `state` folder holding anything else."""
    from safetensors.torch import save_file

    run = tmp_path / "run"
    (run / "state").mkdir(parents=True)
    (run / "state" / "state.json").write_text('{"stage": 2, "step": 5}')
    save_file({"w": torch.full((2,), 7.0)}, str(run / "state" / "state.safetensors"))
    meta, tensors = files.load_run_state(run)
    assert meta == {"stage": 2, "step": 5} and tensors["w"].tolist() == [7.0, 7.0]
    files.save_run_state(run, {"stage": 2, "step": 6}, {"w": torch.zeros(2)})
    assert sorted(p.name for p in run.iterdir()) == [files.STATE_FILE] and files.run_state_meta(run)["step"] == 6
    (run / "state").mkdir()
    (run / "state" / "notes.txt").write_text("mine")
    files.save_run_state(run, {"stage": 2, "step": 7}, {"w": torch.zeros(2)})
    assert (run / "state" / "notes.txt").read_text() == "mine"


def test_folder_lock_waits_for_a_live_writer_and_takes_over_a_dead_one(tmp_path):
    """A lock held by a running process is waited for (then one line naming it); one left by a killed process, or
    left empty by a process killed while creating it, is taken over."""
    lock = tmp_path / files.LOCK
    lock.write_text(str(os.getpid()))  # a live owner
    with pytest.raises(cli.UsageError, match=f"being written by another run \\(process {os.getpid()}"):
        with files.folder_lock(tmp_path, timeout=0.2):
            pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(dead.stdout.strip())  # its owner has exited
    with files.folder_lock(tmp_path, timeout=0.2):
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists()
    lock.write_text("")  # created, never written: its owner died in between
    os.utime(lock, (lock.stat().st_atime - 10, lock.stat().st_mtime - 10))
    with files.folder_lock(tmp_path, timeout=0.5):
        assert lock.read_text() == str(os.getpid())


@needs_fork
def test_a_state_save_killed_inside_safetensors_leaves_nothing_the_next_run_keeps(tmp_path):
    """safetensors' save_file writes its own temporary file (`.tmpXXXXXX`, no owner in its name) beside its target.
    A state save SIGKILLed while that file is being written leaves it inside a folder named with the dead process's
    id, which clean_run_dir (run by train.py / rl.py at start, under the run's lock) removes; so are bare `.tmpXXXXXX`
    files an earlier version left in the run folder, while a live process's save and a user's own files stay. The
    resumed run then continues the saved state."""
    import re
    import time

    from safetensors.torch import save_file

    import train

    run = tmp_path / "run"
    flags = ["--smoke", "--stage1-steps", "3", "--stage2-steps", "1", "--save-every", "1", "--no-eval",
             "--run-dir", str(run), "--out", str(tmp_path / "ckpt")]
    assert train.main(flags + ["--stop-after", "1"]) == 0
    meta, tensors = files.load_run_state(run)
    tensors["pad"] = torch.zeros(2**23)  # 32 MB: time to catch the save inside safetensors
    pid = os.fork()
    if pid == 0:
        try:
            while True:
                files.save_run_state(run, meta, tensors)
        finally:
            os._exit(0)
    deadline, caught = time.time() + 120, []
    while not caught:
        caught = [p for p in run.rglob(".tmp*") if re.fullmatch(r"\.tmp[0-9A-Za-z]{6}", p.name)]
        assert time.time() < deadline, "never caught a save inside safetensors"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    leftovers = [p for p in run.rglob(".*")]
    assert leftovers and all(str(pid) in str(p.relative_to(run)) for p in leftovers), leftovers  # in its folder
    meta_now, tensors_now = files.load_run_state(run)  # the state file is a complete one
    assert meta_now == meta
    # what an earlier version left: safetensors' file bare in the run folder (a partial state), beside a user's
    # files of similar names and a live process's save in progress
    (run / ".tmpAb3dE9").write_bytes((run / files.STATE_FILE).read_bytes()[:4096])
    (run / ".tmpQ0").write_bytes(b"")
    (run / ".tmpNotes").write_text("mine")
    (run / ".tmpZZZZZZ").write_text("mine too: not a safetensors file")
    live = run / f".state.{os.getpid()}-0123abcd.tmp.safetensors"
    live.mkdir()
    save_file({"w": torch.zeros(1)}, str(live / "x.safetensors"))
    assert train.main(flags + ["--resume", "--stop-after", "1"]) == 0
    assert sorted(p.name for p in run.rglob(".*")) == sorted([".tmpQ0", ".tmpNotes", ".tmpZZZZZZ", live.name])
    assert (live / "x.safetensors").is_file()
    assert len(files.run_state_meta(run)["history"]["stage1"]) == 2
