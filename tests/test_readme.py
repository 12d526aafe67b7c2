"""The README's Python API example runs as written on the golden tiny checkpoint (only its first line is swapped) and
produces what it says it does."""
import json
import re
import runpy
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import decoder
import text_encoders

README = Path(__file__).resolve().parent.parent / "README.md"


def _api_block() -> str:
    text = README.read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_example_runs(golden, golden_ckpt, tmp_path, monkeypatch, capsys):
    """The README's Python API block, run as written on the golden checkpoint, produces what it says: the template
    rendering the fixture's official prompts use, its tokens, the seeded bits of text-to-image and editing (those
    model.generate_bits gives for the block's arguments; the same call reproduces the official e2e indices), the greedy
    answer model.answer gives, and the decoder's images of those bits, the first saved as cube.png."""
    import bsq
    import load_hf
    import model as M

    code = _api_block()
    first, rest = code.split("\n", 1)
    assert first.startswith("CKPT, PHOTO, AR_H, AR_W, UPSAMPLE = ")
    s = golden.scenario("e2e")
    H, W = s["ar_height"], s["ar_width"]
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 120, 3), np.uint8)).save(tmp_path / "photo.png")
    # the golden folder has no text encoders: seed the decoder prompt cache as a first run with them would
    joint = json.loads((golden.dir / "sd3_transformer" / "config.json").read_text())["joint_attention_dim"]
    monkeypatch.setenv("UNIAR_CACHE", str(tmp_path / "cache"))
    text_encoders.write_prompt_cache(
        text_encoders.prompt_cache_path(golden_ckpt / "sd3_pipeline", tmp_path / "cache", decoder.DECODER_PROMPT,
                                        joint),
        golden["dec.pipe_prompt_embeds"], golden["dec.pipe_pooled"])
    monkeypatch.chdir(tmp_path)
    # the golden checkpoint with the released preprocessor_config.json (understanding resizes the photo by it)
    header = f"CKPT, PHOTO, AR_H, AR_W, UPSAMPLE = {str(golden_ckpt)!r}, 'photo.png', {H}, {W}, 1.0\n"
    script = tmp_path / "readme_example.py"
    script.write_text(header + rest)
    capsys.readouterr()
    scope = runpy.run_path(str(script))
    printed = capsys.readouterr().out
    # the arguments the block passes (kept in step with README.md)
    prompt, edit, question = "a red cube on a table", "make it blue", "What is in this picture?"
    assert all(x in rest for x in (repr(prompt).replace("'", '"'), repr(edit).replace("'", '"'),
                                   repr(question).replace("'", '"')))
    # prompt rendering and tokens: the official rendering of the fixture's prompt, with the block's prompt in it
    assert scope["text"] == s["rendered"][0].replace(s["prompt"], prompt, 1)
    if s["prompt"] == prompt:  # the official tokenization (row 0, left padding removed)
        row = golden["e2e.prefix_ids"][0][golden["e2e.attention_mask"][0].bool()]
        assert scope["ids"].tolist() == [row.tolist()] and scope["mask"].bool().all()
    # bits: the generate_bits call the block makes, a call that reproduces the official seeded e2e indices
    net, tok = load_hf.load_ar(golden_ckpt)
    official = M.generate_bits(net, tok, s["prompt"], ar_height=H, ar_width=W, cfg=s["cfg"],
                               temperature=s["temperature"], seed=s["seed"])
    assert torch.equal(bsq.bits_to_indexes(official), golden["e2e.indices"])
    N = (H // net.cfg.downsample) * (W // net.cfg.downsample)
    assert scope["bits"].shape == (1, N, *net.bits_shape)
    assert torch.equal(scope["bits"], M.generate_bits(net, tok, prompt, ar_height=H, ar_width=W, cfg=1.5,
                                                      temperature=1.0, seed=0))
    photo = Image.open(tmp_path / "photo.png")
    assert torch.equal(scope["edited"], M.generate_bits(net, tok, edit, ar_height=H, ar_width=W, cfg=1.5, seed=0,
                                                        input_images=[photo]))
    assert not torch.equal(scope["bits"], scope["edited"])
    # understanding: the printed line is model.answer's greedy answer
    want = M.answer(net, tok, photo, question, max_new_tokens=32)
    assert want and printed == want + "\n"
    # pixels: the decoder's images of both bit sets, the first saved as cube.png
    images = scope["images"]
    assert images.shape == (2, H, W, 3) and images.dtype == torch.uint8
    again = scope["dec"].decode(torch.cat([scope["bits"], scope["edited"]]), H, W, upsampling_ratio=1.0, steps=28,
                                guidance=1.5, seed=0)
    assert torch.equal(images, again)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cube.png")), images[0].numpy())
