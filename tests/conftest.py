"""Shared test helpers.

The golden fixture folder comes from ``UNIAR_GOLDEN_DIR`` (default: ``tests/fixtures/golden``). Every size a test
needs is read from that folder's configs and ``golden.json``: the same tests run against other fixture sets of the
same format (other depths, levels, head variants, grids and seeds).
"""
import copy
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU only through its interpreter (set before any import)
    os.environ.setdefault("TRITON_INTERPRET", "1")
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from shuffle import pytest_addoption, pytest_collection_modifyitems, pytest_report_header, pytest_terminal_summary  # noqa: E402,F401  the suite runs in a shuffled order

pytest_plugins = ["pytester"]  # tests/product/test_suite.py runs planted test files in-process

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

    def seed(self, tensor: str, scenario: str | None = None) -> int:
        """The seed set before the call that produced `tensor`: the scenario's settings when they state one, else
        the `manual_seed(N)` of the tensor's description (the format holds the seed in one or the other)."""
        settings = self.meta.get(scenario) if scenario else None
        if isinstance(settings, dict) and "seed" in settings:
            return int(settings["seed"])
        found = re.search(r"manual_seed\((\d+)\)", self.meta["tensors"][tensor]["what"])
        assert found, f"golden.json states no seed for {tensor}"
        return int(found.group(1))


@pytest.fixture(scope="session")
def golden() -> Golden:
    return Golden(golden_dir())


@pytest.fixture(scope="session")
def golden_ckpt(golden, tmp_path_factory) -> Path:
    """The golden checkpoint plus the released image processor's preprocessor_config.json (Qwen3-VL's: 65536 to
    16777216 pixels). The fixture sets carry no processor file (their vision tensors are given unresized), and a
    checkpoint without one, as with the official loader, cannot preprocess an understanding image."""
    import load_hf
    import pipeline

    folder = tmp_path_factory.mktemp("golden_ckpt")
    for entry in golden.dir.iterdir():
        if entry.name != pipeline.PREPROCESSOR_CONFIG:  # written below (never through a link into the fixture)
            (folder / entry.name).symlink_to(entry)
    v = golden.config["vision_config"]  # the released pixel bounds, the fixture's patch geometry
    load_hf.write_image_processor(folder, pipeline.ImageProcessorConfig(
        patch_size=v["patch_size"], merge_size=v["spatial_merge_size"], temporal_patch_size=v["temporal_patch_size"]))
    return folder


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = ""):
    """max |a - e| <= rtol * max |e|: a relative bound on the tensor as a whole (robust to near-zero entries)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rtol * max(scale, 1e-30), f"{name}: max abs err {err:.3e} > {rtol:g} * {scale:.3e}"


def own_copy(net: torch.nn.Module) -> torch.nn.Module:
    """A private deep copy of a shared (module- or session-scoped) model, for a test that replaces its parts.
    Shared fixtures are never mutated: monkeypatch cannot restore an ``nn.Module`` child exactly on every pytest
    version (since 9.2 its undo deletes a child that lives in ``_modules`` instead of putting it back)."""
    return copy.deepcopy(net)


def fingerprint(net: torch.nn.Module) -> tuple:
    """Structure and weights of a model: the names and types of its modules and every tensor's values, to check at
    the teardown of a shared fixture that no test changed it."""
    mods = tuple((n, type(m).__name__) for n, m in net.named_modules())
    state = tuple((k, v.detach().cpu().clone()) for k, v in net.state_dict().items())
    return mods, state


def assert_unchanged(net: torch.nn.Module, before: tuple, what: str) -> None:
    mods, state = fingerprint(net)
    assert mods == before[0], f"a test changed the modules of the shared fixture {what}"
    assert [k for k, _ in state] == [k for k, _ in before[1]], f"a test changed the weights of {what}"
    for (k, v), (_, w) in zip(state, before[1]):
        assert torch.equal(v, w), f"a test changed {what}'s {k}"
