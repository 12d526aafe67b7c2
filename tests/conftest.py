"""Shared test helpers.

The golden fixture folder comes from ``UNIAR_GOLDEN_DIR`` (default: ``tests/fixtures/golden``). Every size a test
needs is read from that folder's configs and ``golden.json``: the same tests run against other fixture sets of the
same format (other depths, levels, head variants, grids and seeds).
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU only through its interpreter (set before any import)
    os.environ.setdefault("TRITON_INTERPRET", "1")
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MANIFESTS = FIXTURES / "manifests"


def golden_dir() -> Path:
    return Path(os.environ.get("UNIAR_GOLDEN_DIR", FIXTURES / "golden")).resolve()


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def load_manifest(name: str) -> dict:
    """{key: shape} of one full-size checkpoint part (``tests/fixtures/manifests/<name>.json``)."""
    data = read_json(MANIFESTS / f"{name}.json")
    if isinstance(data, dict) and "keys" in data:
        data = data["keys"]
    if isinstance(data, list):
        return {d["key"] if "key" in d else d["name"]: list(d["shape"]) for d in data}
    return {k: list(v["shape"] if isinstance(v, dict) else v) for k, v in data.items()}


class Golden:
    """The golden tensors (``golden.safetensors``), their descriptions and the scenario settings."""

    def __init__(self, folder: Path):
        self.dir = folder
        self.meta = read_json(folder / "golden.json")
        self.tensors = load_file(str(folder / "golden.safetensors"))
        self.config = read_json(folder / "config.json")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def scenario(self, name: str) -> dict:
        return self.meta[name]


@pytest.fixture(scope="session")
def golden() -> Golden:
    return Golden(golden_dir())


@pytest.fixture(scope="session")
def golden_ckpt(golden, tmp_path_factory) -> Path:
    """The golden checkpoint plus the released image processor's preprocessor_config.json (Qwen3-VL's: 65536 to
    16777216 pixels). The fixture sets carry no processor file (their vision tensors are given unresized), and a
    checkpoint without one, as with the official loader, cannot preprocess an understanding image."""
    import bsq
    import load_hf

    folder = tmp_path_factory.mktemp("golden_ckpt")
    for entry in golden.dir.iterdir():
        (folder / entry.name).symlink_to(entry)
    load_hf.write_image_processor(folder, bsq.ImageProcessorConfig())
    return folder


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = ""):
    """max |a - e| <= rtol * max |e|: a relative bound on the tensor as a whole (robust to near-zero entries)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rtol * max(scale, 1e-30), f"{name}: max abs err {err:.3e} > {rtol:g} * {scale:.3e}"
