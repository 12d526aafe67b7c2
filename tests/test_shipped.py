"""The checkpoints the project ships (checkpoints/toy from `python train.py`, checkpoints/toy-rl from `python rl.py`):
they load with load_hf.py, `python sample.py` with no argument draws a correct image, and the evaluation command's
held-out scores meet the training issue's bars (generation >= 85% fully correct, understanding >= 95%, editing >= 75%),
and the GRPO issue's bar (generation +5 points or >= 97%, understanding within 1 point)."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import load_hf
import sample
import toy
import train

ROOT = Path(__file__).resolve().parents[1]
TOY, TOY_RL = ROOT / "checkpoints" / "toy", ROOT / "checkpoints" / "toy-rl"
N = 256  # held-out examples per task: one answer is 0.4 points


def _scores(ckpt: Path) -> dict:
    net, tok = load_hf.load_ar(ckpt)
    dec = load_hf.load_decoder(ckpt)
    settings = {**train.sample_defaults(train.TrainConfig()), **train.read_sample_defaults(ckpt)}
    return train.evaluate(net, tok, dec, settings=settings, n=N)


@pytest.fixture(scope="module")
def toy_scores():
    return _scores(TOY)


def test_sample_with_no_argument_draws_the_default_prompt(tmp_path, capsys):
    assert sample.main(["--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]) == 0
    pngs = sorted(tmp_path.glob("*.png"))
    assert pngs, "sample.py wrote no image"
    prompt = train.read_sample_defaults(TOY)["prompt"]
    assert toy.score_image(np.asarray(Image.open(pngs[0]).convert("RGB")), prompt)["correct"]


def test_toy_checkpoint_meets_the_training_bar(toy_scores):
    assert toy_scores["n"] == N
    assert toy_scores["generation"] >= 0.85, toy_scores
    assert toy_scores["understanding"] >= 0.95, toy_scores
    assert toy_scores["editing"] >= 0.75, toy_scores


def test_rl_checkpoint_improves_generation_and_keeps_understanding(toy_scores):
    rl_scores = _scores(TOY_RL)
    # The GRPO issue's bar: +5 points of held-out generation, or >= 97%, understanding within 1 point. Measured with
    # `time python rl.py`: 92.2% -> 98.0% (n=256), understanding 100% -> 99.6%.
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
