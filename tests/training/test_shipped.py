"""The checkpoints the project ships (checkpoints/toy from `python train.py`, checkpoints/toy-rl from `python rl.py`):
the evaluation command's held-out scores are the README's, and they meet the training issue's bars (generation >= 85%
fully correct, understanding >= 95%, editing >= 75%), the shared-context issue's bar (questions about its own drawings
answered from the context: >= 95%, within 2 points of decoding and re-encoding them) and the GRPO issue's bar
(generation +5 points or >= 97%, understanding within 1 point)."""
import contextlib
import io
import json
import re
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[2]
TOY, TOY_RL = ROOT / "checkpoints" / "toy", ROOT / "checkpoints" / "toy-rl"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # the README and its docs/ pages
N = 256  # held-out examples per task: one answer is 0.4 points


def _scores(ckpt: Path) -> dict:
    """What the README's evaluation command, `python train.py --eval CKPT`, prints (its one JSON line)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train.main(["--eval", str(ckpt)]) == 0
    return json.loads(out.getvalue())


def _readme_row(label: str) -> list:
    """The percentages of the table row (README or docs/training.md) that starts with `label`, as fractions."""
    row = next(line for p in PAGES for line in p.read_text().splitlines() if line.startswith(f"| {label}"))
    return [round(float(x) / 100, 3) for x in re.findall(r"([\d.]+)%", row)]


@pytest.fixture(scope="module")
def toy_scores():
    return _scores(TOY)


@pytest.fixture(scope="module")
def rl_scores():
    return _scores(TOY_RL)


def test_readme_tables_are_what_the_evaluation_command_prints(toy_scores, rl_scores):
    """The held-out scores the README states for both shipped checkpoints are the ones `--eval` prints."""
    got = [round(toy_scores[k], 3) for k in ("generation", "understanding", "editing")]
    assert _readme_row("before (`checkpoints/toy`)")[:3] == got
    conv = [round(toy_scores[k], 3) for k in ("conversation", "conversation_reencoded")]
    assert _readme_row("`checkpoints/toy`") == got + conv
    got_rl = [round(rl_scores[k], 3) for k in ("generation", "understanding", "editing")]
    assert _readme_row("after 100 steps")[:3] == got_rl


def test_toy_checkpoint_meets_the_training_bar(toy_scores):
    assert toy_scores["n"] == N
    assert toy_scores["generation"] >= 0.85, toy_scores
    assert toy_scores["understanding"] >= 0.95, toy_scores
    assert toy_scores["editing"] >= 0.75, toy_scores


def test_toy_checkpoint_reads_its_own_drawings_from_the_context(toy_scores):
    assert toy_scores["conversation"] >= 0.95, toy_scores
    assert toy_scores["conversation"] >= toy_scores["conversation_reencoded"] - 0.02, toy_scores


def test_rl_checkpoint_improves_generation_and_keeps_understanding(toy_scores, rl_scores):
    # The GRPO issue's bar: +5 points of held-out generation, or >= 97%, understanding within 1 point. Measured with
    # The README's GRPO table has the figures.
    gain = rl_scores["generation"] - toy_scores["generation"]
    assert gain >= 0.05 or rl_scores["generation"] >= 0.97, (toy_scores, rl_scores)
    assert abs(rl_scores["understanding"] - toy_scores["understanding"]) <= 0.01, (toy_scores, rl_scores)


def test_rl_checkpoint_differs_only_outside_the_tower():
    from safetensors.torch import load_file

    a, b = load_file(TOY / "model.safetensors"), load_file(TOY_RL / "model.safetensors")
    assert a.keys() == b.keys()
    changed = [k for k in a if not (a[k] == b[k]).all()]
    assert changed and not any(k.startswith("model.visual.") for k in changed)
    cfg = json.loads((TOY_RL / "config.json").read_text())
    assert cfg == json.loads((TOY / "config.json").read_text())
