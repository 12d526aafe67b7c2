"""The README's Python API example runs as written on the golden tiny checkpoint (only its first line is swapped)."""
import json
import re
import runpy
from pathlib import Path

import numpy as np
from PIL import Image

import decoder
import text_encoders

README = Path(__file__).resolve().parent.parent / "README.md"


def _api_block() -> str:
    text = README.read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_example_runs(golden, tmp_path, monkeypatch):
    code = _api_block()
    first, rest = code.split("\n", 1)
    assert first.startswith("CKPT, PHOTO, AR_H, AR_W, UPSAMPLE = ")
    s = golden.scenario("e2e")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 120, 3), np.uint8)).save(tmp_path / "photo.png")
    # the golden folder has no text encoders: seed the decoder prompt cache as a first run with them would
    joint = json.loads((golden.dir / "sd3_transformer" / "config.json").read_text())["joint_attention_dim"]
    monkeypatch.setenv("UNIAR_CACHE", str(tmp_path / "cache"))
    text_encoders.write_prompt_cache(
        text_encoders.prompt_cache_path(golden.dir / "sd3_pipeline", tmp_path / "cache", decoder.DECODER_PROMPT, joint),
        golden["dec.pipe_prompt_embeds"], golden["dec.pipe_pooled"])
    monkeypatch.chdir(tmp_path)
    header = (f"CKPT, PHOTO, AR_H, AR_W, UPSAMPLE = {str(golden.dir)!r}, 'photo.png', {s['ar_height']}, "
              f"{s['ar_width']}, 1.0\n")
    script = tmp_path / "readme_example.py"
    script.write_text(header + rest)
    scope = runpy.run_path(str(script))
    assert scope["bits"].shape[0] == 1 and scope["images"].shape == (2, s["ar_height"], s["ar_width"], 3)
    assert (tmp_path / "cube.png").exists()
    assert scope["ids"].shape[0] == 1
