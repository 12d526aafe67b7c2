"""The product's import graph reads bottom-up: each module imports only modules of lower layers (no cycle, no upward
import), the model files import no boundary code, and nothing in the product imports the tests."""
import ast
from pathlib import Path

from conftest import ROOT

# Lower number = lower layer. A module may import only modules of a strictly lower layer.
LAYERS = {
    "kernels": 0, "config_schema": 0, "toy": 0, "files": 0,
    "bsq": 1,
    "model": 2,
    "decoder": 3,
    "text_encoders": 4,
    "pipeline": 5,
    "load_hf": 6, "cli": 6,
    "evaluate": 7,
    "finetune": 7.5,
    "sample": 8, "chat": 8, "generate_batch": 8, "train": 8, "rl": 8,
    "bench": 9,
}
MODEL_FILES = ("bsq", "model", "decoder")


def product_modules() -> dict:
    """module name -> its source files (kernels/ is one module: the package)."""
    mods = {p.stem: [p] for p in ROOT.glob("*.py")}
    mods["kernels"] = sorted((ROOT / "kernels").glob("*.py"))
    return mods


def imports(paths: list, names: set) -> set:
    """The project modules imported anywhere in these files (top level or inside functions)."""
    got = set()
    for p in paths:
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                got |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                got.add(node.module.split(".")[0])
    return got & names


def graph() -> dict:
    mods = product_modules()
    names = set(mods) | {"tests", "conftest", "reference"}
    return {m: imports(paths, names) - {m} for m, paths in mods.items()}


def test_every_product_module_has_a_layer():
    assert set(product_modules()) == set(LAYERS), "a product file was added or removed: give it a layer here"


def test_imports_go_only_down():
    bad = [f"{m} (layer {LAYERS[m]}) imports {d} (layer {LAYERS.get(d, 'tests')})"
           for m, deps in graph().items() for d in sorted(deps) if d not in LAYERS or LAYERS[d] >= LAYERS[m]]
    assert not bad, "\n".join(bad)


def test_model_files_import_no_boundary_code():
    g = graph()
    for m in MODEL_FILES:
        assert g[m] <= {"kernels", "config_schema", "bsq", "model"}, (m, g[m])


def test_product_never_imports_the_tests():
    for m, deps in graph().items():
        assert not deps & {"tests", "conftest", "reference"}, (m, deps)
    assert not [p.name for p in ROOT.glob("*.py") if '"tests"' in p.read_text(encoding="utf-8")]  # no sys.path trick
