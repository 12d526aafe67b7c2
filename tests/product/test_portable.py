"""Laptops without Linux or Triton: the product and the parity tests run with `import triton` failing, the memory
line needs no /proc, the requirements leave Triton out on macOS and Windows, and `--device auto` picks CUDA, then
Apple's MPS, then the CPU, each with its dtype."""
import io
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import cli
import files
import load_hf
import rl
import sample
from conftest import ROOT

# ----- no Triton -----

# Golden parity tests with the kernels' dispatch on their path (every attention and the bit sampler consult it): the
# kernel file itself (its Triton tests skip, its fallback tests run), the AR model (understanding logits, end-to-end
# bits from the prompt, editing), the visual tokenizer's bits and the decoder's transformer. sample.py end to end is
# the toy run before them.
PARITY_TESTS = ["tests/parity/test_kernels.py"] + [
    f"tests/parity/test_model.py::{t}" for t in ("test_understanding_logits", "test_e2e_prompt_to_indices",
                                          "test_edit_exact")] + [
    f"tests/parity/test_bsq.py::{t}" for t in ("test_bsq_indices", "test_tower_features_and_bits")] + [
    "tests/parity/test_decoder.py::test_transformer_forward_matches_golden"]

# Runs a script as `python SCRIPT ARGS` does (runpy, as __main__), first printing PYTORCH_ENABLE_MPS_FALLBACK as it
# is when torch starts to load.
WATCHED = """import importlib.abc, os, runpy, sys
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == 'torch':
            print('at torch import:', os.environ.get('PYTORCH_ENABLE_MPS_FALLBACK'), flush=True)
            sys.meta_path.remove(self)
sys.meta_path.insert(0, Watch())
sys.argv = sys.argv[1:]
sys.path.insert(0, os.getcwd())
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def _env_without_triton(tmp_path) -> dict:
    """An environment in which `import triton` fails, as on macOS / Windows: a `triton` package first on the path
    whose import raises ImportError."""
    pkg = tmp_path / "no_triton" / "triton"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('raise ImportError("triton is blocked by tests/product/test_portable.py")\n')
    path = [str(pkg.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    env.pop("PYTORCH_ENABLE_MPS_FALLBACK", None)
    return env


def test_without_triton_the_toy_sample_and_the_parity_tests_pass(tmp_path):
    """With `import triton` failing: `python sample.py` (the toy checkpoint) writes its image (and had set
    PYTORCH_ENABLE_MPS_FALLBACK=1 before torch loaded), and the golden parity tests pass, the Triton kernel tests
    being skipped with the reason (and only those)."""
    env = _env_without_triton(tmp_path)
    r = subprocess.run([sys.executable, "-c", WATCHED, "sample.py", "--out", str(tmp_path / "toy"), "--steps", "1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[0] == "at torch import: 1"
    assert (tmp_path / "toy" / "sample_00.png").is_file() and "| peak " in r.stderr  # the closing line
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *PARITY_TESTS],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert skipped and all("tests/parity/test_kernels.py" in line and "triton is not installed" in line for line in skipped)
    assert re.fullmatch(r"\d+ passed, \d+ skipped( in .*)?", out.strip().splitlines()[-1]), out[-2000:]


# ----- peak memory without /proc -----

def _no_proc(monkeypatch):
    """Every open() of a /proc path fails, as on macOS and Windows."""
    real = io.open

    def guarded(file, *a, **k):
        if str(file).startswith("/proc"):
            raise FileNotFoundError(2, "No such file or directory (this test hides /proc)", str(file))
        return real(file, *a, **k)

    monkeypatch.setattr("builtins.open", guarded)
    monkeypatch.setattr(io, "open", guarded)


def test_memory_line_without_proc(tmp_path, capsys, monkeypatch):
    """`python sample.py` (the toy checkpoint) with /proc unreadable: the closing line gives the process's peak
    resident memory in GiB, at most what getrusage reports right after and at least 0.05 GiB (torch alone takes
    more)."""
    resource = pytest.importorskip("resource", reason="Windows has no getrusage (the Windows line is tested below)")
    _no_proc(monkeypatch)
    with pytest.raises(FileNotFoundError):
        open("/proc/self/status")
    assert sample.main(["--out", str(tmp_path / "o"), "--steps", "1", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    m = re.search(r"peak resident memory (\d+\.\d\d) GiB\]$", err.strip())
    assert m, err[-2000:]
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 2**30
    assert 0.05 <= float(m.group(1)) <= after + 0.005


@pytest.mark.parametrize("platform, ru_maxrss", [("linux", 3 * 2**20), ("darwin", 3 * 2**30), ("freebsd14", 3 * 2**20)])
def test_peak_memory_units_per_system(monkeypatch, platform, ru_maxrss):
    """getrusage's ru_maxrss is KiB on Linux and the BSDs and bytes on macOS: 3 GiB reads as 3.00 GiB on each."""
    fake = SimpleNamespace(RUSAGE_SELF=0, getrusage=lambda who: SimpleNamespace(ru_maxrss=ru_maxrss))
    monkeypatch.setitem(sys.modules, "resource", fake)
    monkeypatch.setattr(sys, "platform", platform)
    assert sample.peak_memory(torch.device("cpu")) == "peak resident memory 3.00 GiB"


def test_peak_memory_on_windows_and_on_mps(monkeypatch):
    """No `resource` module (Windows): the line says the peak was not measured instead of failing. On MPS the Metal
    driver's allocation is added."""
    monkeypatch.setitem(sys.modules, "resource", None)  # `import resource` raises ImportError
    monkeypatch.setattr(sys, "platform", "win32")
    assert sample.peak_memory(torch.device("cpu")) == "peak memory not measured on this system"
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 3 * 2**29)
    assert sample.peak_memory(torch.device("mps")) == ("peak memory not measured on this system, Metal driver "
                                                       "memory at the end 1.50 GiB")


# ----- requirements per system -----

def _lines(f: str) -> list:
    """The lines of a requirements file as pip reads them (comments and blank lines dropped)."""
    lines = (re.sub(r"(^|\s)#.*", "", line).strip() for line in (ROOT / f).read_text().splitlines())
    return [line for line in lines if line]


def _requirements(files=("requirements.txt", "requirements-test.txt")) -> list:
    """The requirements of the files (a `-c FILE` line applies constraints: it adds none)."""
    from packaging.requirements import Requirement

    return [Requirement(line) for f in files for line in _lines(f) if not line.startswith("-c ")]


def _constraints(f="requirements-test.txt") -> list:
    from packaging.requirements import Requirement

    return [Requirement(c) for line in _lines(f) if line.startswith("-c ") for c in _lines(line[3:].strip())]


def _install_set(sys_platform: str) -> dict:
    """{name: specifier} pip installs on `sys_platform` (markers evaluated for that system)."""
    from packaging.markers import default_environment

    system = {"linux": "Linux", "darwin": "Darwin", "win32": "Windows"}[sys_platform]
    env = dict(default_environment(), sys_platform=sys_platform, platform_system=system, os_name=(
        "nt" if sys_platform == "win32" else "posix"))
    chosen = {}
    for r in _requirements():
        if r.marker is None or r.marker.evaluate(env):
            assert r.name not in chosen, f"{r.name} is required twice on {sys_platform}"
            chosen[r.name] = r.specifier
    return chosen


def test_requirements_leave_triton_out_on_macos_and_windows():
    """macOS and Windows get every requirement but Triton (which has no wheels there); Linux gets Triton too. macOS
    needs torch 2.7+ (earlier builds abort on MPS in grouped-query attention); elsewhere 2.5+ stays accepted."""
    linux, mac, win = (_install_set(p) for p in ("linux", "darwin", "win32"))
    assert "triton" in linux and "triton" not in mac and "triton" not in win
    assert set(mac) == set(win) == set(linux) - {"triton"}
    assert "2.6.0" not in mac["torch"] and {"2.7.0", "2.13.0"} <= set(mac["torch"].filter(["2.7.0", "2.13.0"]))
    assert "2.5.0" in linux["torch"] and "2.5.0" in win["torch"] and "2.13.0" in linux["torch"]


def test_test_constraints_pin_what_the_requirements_accept():
    """requirements-test.txt applies constraints-test.txt: one exact version for each package of the test environment
    (torch aside: the command installs it first), each one inside the range the requirements accept, on every system
    the package installs on (Triton on Linux only)."""
    pins = _constraints()
    assert pins and all(len(p.specifier) == 1 and next(iter(p.specifier)).operator == "==" for p in pins)
    names = [p.name.lower() for p in pins]
    assert len(names) == len(set(names)) and "torch" not in names
    assert {"pytest", "numpy", "tokenizers", "safetensors", "transformers", "diffusers"} <= set(names)
    for plat in ("linux", "darwin", "win32"):
        wanted = _install_set(plat)
        for p in pins:
            if p.name in wanted and (p.marker is None or p.marker.evaluate({"sys_platform": plat})):
                version = next(iter(p.specifier)).version
                assert version in wanted[p.name], f"{p.name}=={version} is outside {wanted[p.name]} on {plat}"
    triton = next(p for p in pins if p.name == "triton")
    assert triton.marker.evaluate({"sys_platform": "linux"}) and not triton.marker.evaluate({"sys_platform": "darwin"})


# ----- device selection -----

@pytest.fixture()
def machine(monkeypatch):
    """Set what this machine pretends to have: machine(cuda=..., mps=..., mps_built=...)."""
    def set_(cuda=False, mps=False, mps_built=None):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        monkeypatch.setattr(torch.backends.mps, "is_built", lambda: mps if mps_built is None else mps_built)
    return set_


class Loaded(Exception):
    pass


@pytest.mark.parametrize("cuda, mps, device, dtype", [(True, True, "cuda", torch.bfloat16),
                                                      (False, True, "mps", torch.float32),
                                                      (False, False, "cpu", torch.float32)])
def test_device_auto_prefers_cuda_then_mps_then_cpu(machine, monkeypatch, tmp_path, cuda, mps, device, dtype):
    """`python sample.py` (default --device auto, --dtype auto) loads the model on CUDA in bf16 when there is a CUDA
    GPU, else on Apple's MPS in fp32, else on the CPU in fp32."""
    machine(cuda=cuda, mps=mps)
    seen = {}

    def load_ar(ckpt, *, dtype=None, device="cpu"):
        seen.update(dtype=dtype, device=device)
        raise Loaded

    monkeypatch.setattr(load_hf, "load_ar", load_ar)
    with pytest.raises(Loaded):
        sample.main(["--out", str(tmp_path / "o")])
    assert seen == {"device": torch.device(device), "dtype": dtype}
    assert cli.resolve_device("auto") == torch.device(device)


@pytest.mark.parametrize("flag, have, message", [
    ("mps", dict(), "--device mps: MPS (Apple's GPU) is not available on this machine (this torch build has no MPS); "
                    "use --device cpu (or auto)"),
    ("mps", dict(mps_built=True), "--device mps: MPS (Apple's GPU) is not available on this machine (MPS needs macOS "
                                  "12.3+ on Apple silicon or an AMD GPU); use --device cpu (or auto)"),
    ("mps:1", dict(mps=True), "--device mps:1: a Mac has one MPS device, mps (or mps:0)"),
])
def test_device_mps_where_there_is_none_is_one_line(machine, tmp_path, capsys, flag, have, message):
    """sample.py and rl.py: an MPS device this machine lacks is one `error:` line, exit code 2, nothing loaded."""
    machine(**have)
    assert sample.main(["--device", flag, "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "o").exists()
    assert rl.main(["--device", flag, "--out", str(tmp_path / "rl"), "--run-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "rl").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", ["train.py", "rl.py"])
def test_train_and_rl_turn_on_the_mps_cpu_fallback_unless_the_user_chose(monkeypatch, script):
    """train.py and rl.py, like sample.py (whose order against the torch import the run without Triton checks), set
    PYTORCH_ENABLE_MPS_FALLBACK=1 when they load, so that an operation MPS lacks runs on the CPU instead of stopping
    the run; a value the user set is kept."""
    import runpy

    for user, want in ((None, "1"), ("0", "0")):
        if user is None:
            monkeypatch.delenv("PYTORCH_ENABLE_MPS_FALLBACK", raising=False)
        else:
            monkeypatch.setenv("PYTORCH_ENABLE_MPS_FALLBACK", user)
        runpy.run_path(str(ROOT / script), run_name="loaded_by_the_test")  # the module's top level, not main()
        assert os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK") == want


# ----- a checkpoint folder the user cannot write -----

def test_checkpoint_in_a_folder_the_user_cannot_write_loads(tmp_path, capsys, monkeypatch):
    """A checkpoint the user may read but not write (a hub cache, a shared download; the toy checkpoint here, made
    read-only): `sample.py` draws from it. Loading finishes a save that a kill interrupted, which takes a lock file in
    the folder, but only when there is one to finish: with none, nothing there is written (finishing is refused here,
    as a folder without write access would, and the folder stays byte for byte as it was)."""
    import shutil
    from pathlib import Path

    ckpt = tmp_path / "toy"
    shutil.copytree(ROOT / "checkpoints" / "toy", ckpt)
    before = {f: f.read_bytes() for f in ckpt.rglob("*") if f.is_file()}

    def refused(real):
        def call(folder, *a, **k):
            if Path(folder).resolve() == ckpt.resolve():
                raise PermissionError(13, "Permission denied", str(Path(folder) / files.LOCK))
            return real(folder, *a, **k)  # --out is written as usual
        return call

    monkeypatch.setattr(files, "folder_lock", refused(files.folder_lock))
    monkeypatch.setattr(files, "recover_folder", refused(files.recover_folder))
    modes = {p: p.stat().st_mode for p in [ckpt, *ckpt.rglob("*")]}
    for p in modes:
        p.chmod(modes[p] & ~0o222)  # read-only for its owner too (root writes there anyway: the patches above)
    try:
        rc = sample.main(["--ckpt", str(ckpt), "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "o")])
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path / "o" / "sample_00.png").is_file()
    assert {f: f.read_bytes() for f in ckpt.rglob("*") if f.is_file()} == before
