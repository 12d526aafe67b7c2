"""sample.py end to end on the golden tiny checkpoint, and its answers to bad input."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sample
import text_encoders


@pytest.fixture()
def cache_dir(golden, tmp_path):
    """The golden folder has no text encoders; seed the prompt cache with the fixture's decoder prompt embeddings, as
    a first run with encoders would have done."""
    import decoder as D
    import json

    joint = json.loads((golden.dir / "sd3_transformer" / "config.json").read_text())["joint_attention_dim"]
    path = text_encoders.prompt_cache_path(golden.dir / "sd3_pipeline", tmp_path / "cache", D.DECODER_PROMPT, joint)
    text_encoders.write_prompt_cache(path, golden["dec.pipe_prompt_embeds"], golden["dec.pipe_pooled"])
    return tmp_path / "cache"


def test_text_to_image_end_to_end(golden, tmp_path, cache_dir, capsys):
    s = golden.scenario("e2e")
    common = ["--ckpt", str(golden.dir), "--prompt", s["prompt"], "--ar-size", f"{s['ar_height']}x{s['ar_width']}",
              "--upsample", "1", "--cfg", str(s["cfg"]), "--temperature", str(s["temperature"]), "--seed",
              str(s["seed"]), "--steps", "2", "--save-bits", "--cache-dir", str(cache_dir), "--device", "cpu"]
    rc = sample.main(common + ["--out", str(tmp_path / "one")])
    assert rc == 0, capsys.readouterr().err
    saved = load_file(str(tmp_path / "one" / "bits.safetensors"))
    assert torch.equal(saved["indices"], golden["e2e.indices"])  # the official seeded rollout
    img = np.asarray(Image.open(tmp_path / "one" / "sample_00.png"))
    assert img.shape == (s["ar_height"], s["ar_width"], 3)
    assert "peak resident memory" in capsys.readouterr().err
    rc = sample.main(common + ["--num-images", "3", "--out", str(tmp_path / "three")])
    assert rc == 0 and (tmp_path / "three" / "grid.png").exists()
    assert load_file(str(tmp_path / "three" / "bits.safetensors"))["bits"].shape[0] == 3


def greedy_answer(net, tok, image, question: str, max_new_tokens: int) -> list:
    """Greedy decoding written out: the chat prompt with the image, one full forward (no KV cache) per new token,
    argmax, stop before <|im_end|> / end of text. -> the new token ids."""
    import bsq
    import model as M

    v = net.cfg.vision
    pv, grid = bsq.preprocess_image(image, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                    temporal_patch_size=v.temporal_patch_size)
    ids = torch.tensor([tok.encode(M.render_chat_prompt(question, int(grid[0].prod()) // v.merge_unit))])
    stop, new = {tok.eos_id, tok.token_id(M.IM_END)}, []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            t = int(net.text_logits(ids, None, pv, grid)[0, -1].argmax())
            if t in stop:
                break
            new.append(t)
            ids = torch.cat([ids, torch.tensor([[t]])], 1)
    return new


def test_understanding_prints_the_answer(golden, tmp_path, capsys):
    """`--image --question` prints the greedy answer of the checkpoint: exactly the text of a written-out greedy
    decode (full forward per token, the fixture's image, at most --max-new-tokens tokens) and of model.answer called
    with the same arguments; `--answer-temperature` / `--seed` reach the sampler."""
    import load_hf
    import model as M

    path = tmp_path / "in.png"
    Image.fromarray(golden["vision.image_uint8"].numpy()).save(path)
    net, tok = load_hf.load_ar(golden.dir)
    base = ["--ckpt", str(golden.dir), "--image", str(path), "--device", "cpu", "--out", str(tmp_path / "o")]
    question, k = "What color is the cube?", 4
    assert sample.main(base + ["--question", question, "--max-new-tokens", str(k)]) == 0
    printed = capsys.readouterr().out
    new = greedy_answer(net, tok, str(path), question, k)
    assert new and len(new) <= k
    assert printed == tok.decode(new) + "\n"
    assert printed == M.answer(net, tok, str(path), question, max_new_tokens=k) + "\n"
    assert sample.main(base + ["--question", "what?", "--max-new-tokens", "6", "--answer-temperature", "1.5",
                               "--seed", "3"]) == 0
    assert capsys.readouterr().out == M.answer(net, tok, str(path), "what?", max_new_tokens=6, temperature=1.5,
                                               seed=3) + "\n"


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--ar-size", "100x64"], "AR size 100x64 must be positive multiples of 32"),
    (["--prompt", "x", "--cfg", "0.5"], "cfg must be >= 1"),
    (["--prompt", "x", "--temperature", "0"], "temperature must be > 0"),
    (["--image", "{bad}", "--question", "what?"], "is not a readable image file"),
    (["--image", "{bad}", "--prompt", "edit it", "--ar-size", "64x64"], "is not a readable image file"),
])
def test_bad_input_is_a_clear_message(golden, tmp_path, capsys, args, message):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    args = [a.replace("{bad}", str(bad)) for a in args]
    rc = sample.main(["--ckpt", str(golden.dir), "--out", str(tmp_path / "o")] + args)
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err


def test_missing_checkpoint_folder(tmp_path, capsys):
    rc = sample.main(["--ckpt", str(tmp_path / "nowhere"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint folder not found" in err and "expected layout" in err
