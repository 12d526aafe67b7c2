"""sample.py end to end on the golden tiny checkpoint, and its answers to bad input."""
import json
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import chat
import cli
import generate_batch
import load_hf
import sample


@pytest.fixture()
def cache_dir(golden, tmp_path):
    """The golden folder has no text encoders; seed the prompt cache with the fixture's decoder prompt embeddings, as
    a first run with encoders would have done."""
    import decoder as D
    import json

    joint = json.loads((golden.dir / "sd3_transformer" / "config.json").read_text())["joint_attention_dim"]
    path = load_hf.prompt_cache_path(golden.dir / "sd3_pipeline", tmp_path / "cache", D.DECODER_PROMPT, joint)
    load_hf.write_prompt_cache(path, golden["dec.pipe_prompt_embeds"], golden["dec.pipe_pooled"])
    return tmp_path / "cache"


def decoder_unit(golden) -> tuple[int, int]:
    """(pixels per decoder token = VAE scale x transformer patch, pos_embed_max_size), read from the fixture's
    decoder configs (no VAE folder: pixel space, scale 1)."""
    tr = json.loads((golden.dir / "sd3_transformer" / "config.json").read_text())
    vae_cfg = golden.dir / "sd3_pipeline" / "vae" / "config.json"
    scale = 2 ** (len(json.loads(vae_cfg.read_text())["block_out_channels"]) - 1) if vae_cfg.exists() else 1
    return tr["patch_size"] * scale, tr["pos_embed_max_size"]


def valid_upsample(golden, ar_h: int, ar_w: int) -> tuple[float, int, int]:
    """An --upsample ratio the fixture's decoder accepts at AR size ar_h x ar_w -> (ratio, out_h, out_w): output
    sides multiples of 16 and of the decoder unit, at most pos_embed_max_size units a side. Tried in order: 1 (the
    cheapest decode), the dec scenario's ratio, then every k/64 in [1, 2]."""
    import math

    unit, grid = decoder_unit(golden)
    step = math.lcm(16, unit)
    for r in [1.0, float(golden.scenario("dec")["upsampling_ratio"])] + [k / 64 for k in range(64, 129)]:
        h, w = int(round(ar_h * r)), int(round(ar_w * r))
        if 1.0 <= r <= 2.0 and h % step == 0 and w % step == 0 and max(h, w) <= grid * unit:
            return r, h, w
    raise AssertionError(f"the fixture's decoder accepts no ratio in [1, 2] at AR size {ar_h}x{ar_w}")


def size_cases(golden) -> dict:
    """Placeholders of the size mistakes, built from the fixture's configs: {ds} AR pixels per token (patch x
    merge), {bad_ar} an AR size that is no multiple of it, {nm_ar} / {nm_up} / {nm_out} a valid AR size and ratio
    whose output is no multiple of {step} = lcm(16, decoder unit), {big} an AR side (valid for the AR grid and the
    decoder's multiple) past the decoder's largest side at --upsample 1."""
    import math

    v = golden.config["vision_config"]
    ds = v["patch_size"] * v["spatial_merge_size"]
    unit, grid = decoder_unit(golden)
    step = math.lcm(16, unit)
    out = {"{ds}": str(ds), "{bad_ar}": f"{3 * ds + ds // 2}x{2 * ds}", "{step}": str(step)}
    for r in (1.25, 1.5, 1.125, 1.75) + tuple(1 + k / 64 for k in range(1, 64)):
        pairs = [(2, 3)] + [(m, m + 1) for m in range(1, 65)]
        hit = [(a, b) for a, b in pairs if int(round(a * ds * r)) % step or int(round(b * ds * r)) % step]
        if hit:
            h, w = hit[0][0] * ds, hit[0][1] * ds
            out.update({"{nm_ar}": f"{h}x{w}", "{nm_up}": str(r),
                        "{nm_out}": f"{int(round(h * r))}x{int(round(w * r))}"})
            break
    assert "{nm_ar}" in out, "no AR size and ratio give an output off the decoder's multiple"
    big = math.lcm(ds, step) * (grid * unit // math.lcm(ds, step) + 1)
    out["{big}"] = str(big)
    return out


def test_text_to_image_end_to_end(golden, tmp_path, cache_dir, capsys):
    s = golden.scenario("e2e")
    up, out_h, out_w = valid_upsample(golden, s["ar_height"], s["ar_width"])
    common = ["--ckpt", str(golden.dir), "--prompt", s["prompt"], "--ar-size", f"{s['ar_height']}x{s['ar_width']}",
              "--upsample", repr(up), "--cfg", str(s["cfg"]), "--temperature", str(s["temperature"]), "--seed",
              str(golden.seed("e2e.indices", "e2e")), "--steps", "2", "--save-bits", "--cache-dir", str(cache_dir),
              "--device", "cpu"]
    rc = sample.main(common + ["--out", str(tmp_path / "one")])
    assert rc == 0, capsys.readouterr().err
    saved = load_file(str(tmp_path / "one" / "bits.safetensors"))
    assert torch.equal(saved["indices"], golden["e2e.indices"])  # the official seeded rollout
    img = np.asarray(Image.open(tmp_path / "one" / "sample_00.png"))
    assert img.shape == (out_h, out_w, 3)
    err = capsys.readouterr().err
    assert "peak resident memory" in err
    v = golden.config["vision_config"]
    ds = v["patch_size"] * v["spatial_merge_size"]  # AR pixels per generated token (patch x merge)
    n = (s["ar_height"] // ds) * (s["ar_width"] // ds)
    assert n == golden["e2e.indices"].shape[1]  # one generated token per downsample x downsample block
    assert f"AR steps: 100%" in err and f"{n}/{n}" in err  # the AR bar reaches its last step
    rc = sample.main(common + ["--num-images", "3", "--out", str(tmp_path / "three")])
    assert rc == 0 and (tmp_path / "three" / "grid.png").exists()
    assert load_file(str(tmp_path / "three" / "bits.safetensors"))["bits"].shape[0] == 3


def greedy_answer(net, tok, image, question: str, max_new_tokens: int) -> list:
    """Greedy decoding written out: the chat prompt with the image, one full forward (no KV cache) per new token,
    argmax, stop before an end token (<|im_end|>, end of text, generation_config.json's eos ids: the tokenizer's
    end_ids). -> (the prompt ids, the image's patch rows, the new token ids, the end token it stopped at or None)."""
    import pipeline as P

    v = net.cfg.vision
    pv, grid = P.preprocess_image(image, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                  temporal_patch_size=v.temporal_patch_size)
    ids = torch.tensor([tok.encode(P.render_chat_prompt(question, int(grid[0].prod()) // v.merge_unit))])
    prompt = ids[0].tolist()
    stop, new, ended = {tok.eos_id, tok.token_id(P.IM_END), *tok.end_ids}, [], None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            t = int(net.text_logits(ids, None, pv, grid)[0, -1].argmax())
            if t in stop:
                ended = t
                break
            new.append(t)
            ids = torch.cat([ids, torch.tensor([[t]])], 1)
    return prompt, pv, new, ended


def test_understanding_prints_the_answer(golden, golden_ckpt, tmp_path, capsys, monkeypatch):
    """`--image --question` prints the greedy answer of the checkpoint: exactly the text of a written-out greedy
    decode (full forward per token, the fixture's image, at most --max-new-tokens tokens) and of pipeline.answer called
    with the same arguments; `--answer-temperature` / `--seed` reach the sampler. The ids, image rows and tokens the
    run hands to / gets from the decoding loop are checked too, so an answer that ends at once (an empty line, as
    on some fixtures) still pins the prompt and the stop."""
    import load_hf
    import pipeline as P

    path = tmp_path / "in.png"
    Image.fromarray(golden["vision.image_uint8"].numpy()).save(path)
    net, tok = load_hf.load_ar(golden_ckpt)  # the golden checkpoint with the released preprocessor_config.json
    base = ["--ckpt", str(golden_ckpt), "--image", str(path), "--device", "cpu", "--out", str(tmp_path / "o")]
    question, k = "What color is the cube?", 4
    calls, real = [], P.generate_text

    def spy(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, **kw):
        out = real(model, input_ids, attention_mask, pixel_values, image_grid_thw, **kw)
        calls.append((input_ids.detach().cpu().clone(), None if attention_mask is None else attention_mask.cpu(),
                      pixel_values.detach().cpu().clone(), kw, out))
        return out

    monkeypatch.setattr(P, "generate_text", spy)
    assert sample.main(base + ["--question", question, "--max-new-tokens", str(k)]) == 0
    monkeypatch.setattr(P, "generate_text", real)
    printed = capsys.readouterr().out
    prompt, pv, new, ended = greedy_answer(net, tok, str(path), question, k)
    assert len(new) <= k and (ended is not None or len(new) == k)
    assert len(calls) == 1
    ids, mask, got_pv, kw, out = calls[0]
    assert (ids if mask is None else ids[mask.bool()]).tolist() == prompt  # the chat prompt with the image
    assert torch.equal(got_pv.to(pv.dtype), pv)  # the fixture image's patch rows
    assert kw["max_new_tokens"] == k and ended in (None, *kw["stop_ids"])
    assert out == [new + ([] if ended is None else [ended])]  # the same greedy tokens, stopped at the same end
    assert printed == tok.decode(new) + "\n"  # even when the answer is empty
    assert printed == P.answer(net, tok, str(path), question, max_new_tokens=k) + "\n"
    assert sample.main(base + ["--question", "what?", "--max-new-tokens", "6", "--answer-temperature", "1.5",
                               "--seed", "3"]) == 0
    assert capsys.readouterr().out == P.answer(net, tok, str(path), "what?", max_new_tokens=6, temperature=1.5,
                                               seed=3) + "\n"


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--ar-size", "{bad_ar}"], "AR size {bad_ar} must be positive multiples of {ds}"),
    (["--prompt", "x", "--cfg", "0.5"], "cfg must be >= 1"),
    (["--prompt", "x", "--temperature", "0"], "temperature must be > 0"),
    (["--image", "{bad}", "--question", "what?"], "is not a readable image file"),
    (["--image", "{bad}", "--prompt", "edit it", "--ar-size", "64x64"], "is not a readable image file"),
])
def test_bad_input_is_a_clear_message(golden, tmp_path, capsys, args, message):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    fill = {"{bad}": str(bad), **size_cases(golden)}

    def sub(s):
        for k, val in fill.items():
            s = s.replace(k, val)
        return s

    args, message = [sub(a) for a in args], sub(message)
    rc = sample.main(["--ckpt", str(golden.dir), "--out", str(tmp_path / "o")] + args)
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err


def test_missing_checkpoint_folder(tmp_path, capsys):
    rc = sample.main(["--ckpt", str(tmp_path / "nowhere"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint folder not found" in err and "expected layout" in err


# ---------------------------------------------------------------------------------------------------------------------
# Ordinary mistakes: one `error: ...` line naming the flag / file / field, exit code 2, before anything loads
# ---------------------------------------------------------------------------------------------------------------------


class Loaded(Exception):
    """Raised by the patched loaders: reaching them means a check came too late."""


@pytest.fixture()
def no_loading(monkeypatch):
    import load_hf

    def loaded(*a, **k):
        raise Loaded

    monkeypatch.setattr(load_hf, "load_ar", loaded)
    monkeypatch.setattr(load_hf, "load_decoder", loaded)


def _no_cuda_reason() -> str:
    return "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"


SEED_RANGE = "must be an integer in [0, 18446744073709551615]"
T_HINT = "(temperature must be > 0; 0.01 is already near-greedy, below it logits / temperature overflows)"
CFG_HINT = "(cfg must be >= 1, 1 = no guidance; larger guidance overflows the guided logits)"


@pytest.mark.parametrize("flags, message", [
    (["--device", "banana"], "--device 'banana' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    (["--out", "{file}"], "--out {file} is an existing file; --out names a folder to write into"),
    (["--out", "{file}/sub"], "--out {file}/sub: {file} is a file, so the folder cannot be created"),
    (["--seed", "-1"], f"--seed {SEED_RANGE}, got -1 (the range torch.Generator.manual_seed takes)"),
    (["--seed", str(2**64)], f"--seed {SEED_RANGE}, got {2**64} (the range torch.Generator.manual_seed takes)"),
    (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["--temperature", "1e-30"], f"--temperature must be a finite number in [0.01, 100], got 1e-30 {T_HINT}"),
    (["--temperature", "inf"], f"--temperature must be a finite number in [0.01, 100], got inf {T_HINT}"),
    (["--cfg", "1e30"], f"--cfg must be a finite number in [1, 100], got 1e+30 {CFG_HINT}"),
    (["--cfg", "nan"], f"--cfg must be a finite number in [1, 100], got nan {CFG_HINT}"),
    (["--decoder-cfg", "nan"], "--decoder-cfg must be a finite number in [1, 100], got nan (1 = no guidance)"),
    (["--steps", "0"], "--steps must be an integer >= 1, got 0 (decoder denoising steps)"),
    (["--upsample", "2.5"], "--upsample must be a finite number in [1, 2], got 2.5 (decoder output size / AR size)"),
    (["--ar-size", "64"], "argument --ar-size: must look like HxW, e.g. 512x512, got '64'"),
    (["--ar-size", "{nm_ar}", "--upsample", "{nm_up}"],
     "--ar-size {nm_ar} / --upsample {nm_up}: output size {nm_out} (AR {nm_ar} x {nm_up}) must be a multiple of {step}"),
    (["--ar-size", "{big}x{big}", "--upsample", "1"], "--ar-size {big}x{big} / --upsample 1.0: output size {big}x{big} "
     "(AR {big}x{big} x 1.0) exceeds the decoder's largest side {side} px (pos_embed_max_size {grid} x {unit} px)"),
    (["--ar-size", "{bad_ar}"], "--ar-size: AR size {bad_ar} must be positive multiples of {ds} px"),
    (["--question", "q", "--image", "{img}", "--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
    (["--question", "q", "--image", "{file}"], "--image: {file} is not a readable image file ({pil})"),
    # empty text is refused, not drawn / answered
    (["--prompt", ""], "--prompt is empty; give the text to draw (or, with --image, the edit instruction)"),
    (["--prompt", " \t "], "--prompt is empty; give the text to draw (or, with --image, the edit instruction)"),
    (["--question", "", "--image", "{img}"], "--question is empty; give a question about --image"),
    (["--question", "  ", "--image", "{img}"], "--question is empty; give a question about --image"),
    # conversations (chat.py) answer too: their answer flags are checked (they ran, or crashed after loading)
    (["chat.py", "--file", "{chat}", "--answer-temperature", "-1"],
     "--answer-temperature must be a finite number in [0, 100], got -1.0 (0 = greedy)"),
    (["chat.py", "--file", "{chat}", "--answer-temperature", "nan"],
     "--answer-temperature must be a finite number in [0, 100], got nan (0 = greedy)"),
    (["chat.py", "--file", "{chat}", "--max-new-tokens", "-5"], "--max-new-tokens must be an integer >= 1, got -5"),
    (["chat.py", "--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
    (["chat.py", "--file", "{chat}", "--prompt", "x"],
     "chat.py: drop --prompt; in a conversation that is a turn: '/draw TEXT'"),
    (["chat.py", "--file", "{chat}", "--sampler", "kernel"],
     "--sampler kernel: a conversation draws with --sampler multinomial"),
])
def test_mistakes_are_one_line_errors_before_loading(golden, tmp_path, capsys, no_loading, flags, message):
    """The golden checkpoint (no uniar_sample.json: the official defaults); the loaders raise if reached. A case
    starting with "chat.py" runs chat.main, the others sample.main."""
    from PIL import UnidentifiedImageError

    f = tmp_path / "afile"
    f.write_text("x")
    img = tmp_path / "in.png"
    Image.fromarray(golden["vision.image_uint8"].numpy()).save(img)
    try:
        Image.open(f)
    except UnidentifiedImageError as e:
        pil = str(e)
    unit, grid = decoder_unit(golden)  # pixels per transformer token, the position table's side
    sizes = size_cases(golden)
    assert int(sizes["{big}"]) > grid * unit  # the oversized case is oversized on this fixture
    turns = tmp_path / "turns.txt"
    turns.write_text("/draw a red circle at the top left\nwhat color is it?\n")
    fill = {"{file}": str(f), "{img}": str(img), "{pil}": pil, "{chat}": str(turns), **sizes,
            "{side}": str(grid * unit), "{grid}": str(grid), "{unit}": str(unit)}

    def sub(s):
        for k, val in fill.items():
            s = s.replace(k, val)
        return s

    if flags[0] == "chat.py":
        main, flags = chat.main, flags[1:]
    else:
        main, flags = sample.main, flags if "--question" in flags else ["--prompt", "x"] + flags
    out = tmp_path / "o"
    rc = main(["--ckpt", str(golden.dir), "--out", str(out), "--device", "cpu"] + [sub(a) for a in flags])
    assert (rc, capsys.readouterr().err) == (2, f"error: {sub(message)}\n")
    assert not out.exists()  # nothing written either


MOVED_CHAT = "chat.py: python chat.py ..."
MOVED_CHAT_FILE = "chat.py: python chat.py --file FILE ..."
MOVED_PROMPTS = "generate_batch.py: python generate_batch.py --prompts FILE ..."


@pytest.mark.parametrize("flags, message", [
    (["--chat"], f"--chat moved to {MOVED_CHAT}"),
    (["--seed", "3", "--chat", "--max-new-tokens", "0"], f"--chat moved to {MOVED_CHAT}"),
    (["--chat-file", "{turns}"], f"--chat-file moved to {MOVED_CHAT_FILE}"),
    (["--chat-file={turns}", "--steps", "0"], f"--chat-file moved to {MOVED_CHAT_FILE}"),
    (["--prompts", "{prompts}"], f"--prompts moved to {MOVED_PROMPTS}"),
    # with the flags only the new command takes (else `unrecognized arguments`), and a flag sample.py refuses
    (["--prompts", "{prompts}", "--batch-size", "16", "--resume", "--run-name", "r"], f"--prompts moved to "
     f"{MOVED_PROMPTS}"),
    (["--cfg", "0", "--prompts={prompts}", "--samples-per-prompt", "4"], f"--prompts moved to {MOVED_PROMPTS}"),
])
def test_former_modes_name_the_command_that_runs_them(tmp_path, capsys, no_loading, flags, message):
    """sample.py's former modes (--chat, --chat-file, --prompts) are chat.py and generate_batch.py now: spelled the
    old way they are one line naming the new command, exit code 2, before any other check, nothing loaded or
    written."""
    (tmp_path / "turns.txt").write_text("/draw a red circle at the top left\n")
    (tmp_path / "p.jsonl").write_text('{"idx": 0, "prompt": "a red circle at the top left"}\n')
    flags = [a.replace("{turns}", str(tmp_path / "turns.txt")).replace("{prompts}", str(tmp_path / "p.jsonl"))
             for a in flags]
    assert sample.main(flags + ["--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr() == ("", f"error: {message}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "turns.txt"]


def test_former_mode_as_a_command_line(tmp_path):
    """The same as a process (the README's old prompt-file command): exit code 2, the one line, no traceback."""
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--prompts", "prompts/toy_heldout.jsonl",
                        "--batch-size", "16", "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"error: --prompts moved to {MOVED_PROMPTS}\n")
    assert not (tmp_path / "out").exists()


def test_default_prompt_run_error_is_one_line(tmp_path, capsys, no_loading):
    """`python sample.py` with a bad flag: the error alone (the default-prompt notice comes only once checks pass)."""
    assert sample.main(["--steps", "0", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == "error: --steps must be an integer >= 1, got 0 (decoder denoising steps)\n"


def test_device_cuda_without_cuda(golden, tmp_path, capsys, no_loading):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = sample.main(["--ckpt", str(golden.dir), "--prompt", "x", "--device", "cuda", "--out", str(tmp_path)])
    assert (rc, capsys.readouterr().err) == (2, f"error: --device cuda: CUDA is not available on this machine "
                                                f"({_no_cuda_reason()}); use --device cpu (or auto)\n")


@pytest.mark.parametrize("side, limit", [(12, "100"), (64, "200")])  # PIL's warning band, then its error
@pytest.mark.parametrize("task", [["--question", "what?"], ["--prompt", "edit it", "--ar-size", "64x96"]])
def test_decompression_bomb_is_a_clear_error(golden, tmp_path, capsys, monkeypatch, no_loading, side, limit, task):
    from PIL import Image as PILImage

    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(path)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)
    rc = sample.main(["--ckpt", str(golden.dir), "--image", str(path), "--out", str(tmp_path / "o")] + task)
    assert (rc, capsys.readouterr().err) == (2, (
        f"error: --image: {path} is over PIL's decompression-bomb limit of Image.MAX_IMAGE_PIXELS = 100 pixels "
        f"(Image size ({side * side} pixels) exceeds limit of {limit} pixels, could be decompression bomb DOS "
        "attack.); downscale the image first\n"))


@pytest.mark.parametrize("content, message", [
    ("{", "{f} is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)); "
          "fix or delete it"),
    ('{"steps": 0}', "{f}: field 'steps' must be an integer >= 1, got 0"),
    ('{"ar_size": [64]}', "{f}: field 'ar_size' must be a list of two positive integers [height, width], got [64]"),
    ('{"decoder_cfg": NaN}', "{f}: field 'decoder_cfg' must be a number in [1, 100], got NaN"),
    ('{"temprature": 1.0}', "{f}: unknown field 'temprature'; the fields are ar_size, upsample, cfg, temperature, "
                            "steps, decoder_cfg, prompt"),
    ("[1]", "{f} must hold a JSON object with the fields ar_size, upsample, cfg, temperature, steps, decoder_cfg, "
            "prompt"),
])
@pytest.mark.parametrize("extra", [[], ["--help"]])
def test_invalid_uniar_sample_json(tmp_path, capsys, no_loading, content, message, extra):
    f = tmp_path / "ckpt" / "uniar_sample.json"
    f.parent.mkdir()
    f.write_text(content)
    rc = sample.main(["--ckpt", str(f.parent), "--prompt", "x", "--out", str(tmp_path / "o")] + extra)
    assert (rc, capsys.readouterr()) == (2, ("", f"error: {message.replace('{f}', str(f))}\n"))


def test_help_shows_the_defaults_of_the_checkpoint_it_will_use(golden, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one help line per flag
    with pytest.raises(SystemExit) as e:
        sample.main(["--help"])
    toy = capsys.readouterr().out
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(golden.dir), "--help"])
    released = capsys.readouterr().out
    assert e.value.code == 0
    assert f"Defaults below: those of {cli.DEFAULT_CKPT} (its uniar_sample.json)." in toy
    assert f"Defaults below: those of {golden.dir} (the official inference defaults)." in released
    toy, released = " ".join(toy.split()), " ".join(released.split())
    for size, steps, up, text in (("64x64", 10, 1.0, toy), ("960x960", 28, 1.067, released)):
        assert f"--ar-size AR_SIZE AR grid in pixels, HxW, multiples of 32 (default {size})" in text
        assert f"--steps STEPS decoder denoising steps, >= 1 (default {steps})" in text
        assert f"--upsample UPSAMPLE decoder output / AR size, in [1, 2] (default {up})" in text
        assert "--seed SEED seed of the AR bit sampling and the decoder noise" in text
        assert "--num-images NUM_IMAGES images per prompt" in text
        assert ("--max-new-tokens MAX_NEW_TOKENS understanding: answer length limit (default min(1024, what the "
                "checkpoint's position budget text_config.max_position_embeddings leaves after the prompt), decided "
                "at run time)") in text


def test_unknown_toy_words_are_named_with_the_vocabulary(tmp_path, capsys, no_loading):
    """The toy tokenizer reads words it does not know as <unk>: a one-line warning lists them and the vocabulary;
    a prompt in toy words gets none."""
    import toy

    known = " ".join(toy.vocabulary_words())
    with pytest.raises(Loaded):
        sample.main(["--prompt", "a red cube on a table", "--out", str(tmp_path / "o")])
    assert capsys.readouterr().err == (
        f"warning: --prompt: the word-level tokenizer of {cli.DEFAULT_CKPT} does not know 'cube', 'on', 'table' "
        f"(read as <unk>); it knows: {known} (README.md: Toy vocabulary)\n")
    with pytest.raises(Loaded):
        sample.main(["--prompt", "a blue triangle at the top right", "--out", str(tmp_path / "o")])
    assert capsys.readouterr().err == ""


def test_answer_length_fits_the_position_budget(tmp_path, capsys, monkeypatch):
    """--max-new-tokens left out: min(1024, max_position_embeddings - prompt length) (the toy's budget is 512, so the
    old fixed default of 1024 could not run at all); more than the room left is an error before loading."""
    import re

    import load_hf
    import pipeline as P

    img = tmp_path / "in.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(img)
    assert load_hf.ar_config(cli.DEFAULT_CKPT).text.max_position_embeddings == 512
    seen = {}
    monkeypatch.setattr(load_hf, "load_ar", lambda *a, **k: (None, None))
    monkeypatch.setattr(P, "answer", lambda *a, **k: seen.update(k) or "red")
    base = ["--image", str(img), "--question", "what color is it?", "--out", str(tmp_path / "o")]
    assert sample.main(base + ["--max-new-tokens", "5000"]) == 2 and not seen
    err = capsys.readouterr().err
    m = re.fullmatch(r"error: --max-new-tokens 5000: the prompt takes (\d+) of the max_position_embeddings=512 "
                     rf"positions of {re.escape(str(cli.DEFAULT_CKPT))}/config.json; use at most (\d+)\n", err)
    assert m and int(m[1]) + int(m[2]) == 512, err
    assert sample.main(base) == 0
    assert seen["max_new_tokens"] == min(1024, int(m[2])) == int(m[2])
    assert sample.main(base + ["--max-new-tokens", m[2]]) == 0 and seen["max_new_tokens"] == int(m[2])


# ----- a damaged checkpoint: one error line naming the file and the field or tensor, exit code 2 -----

def poisonable_key(sd: dict) -> str:
    """A weight present in this weights file to plant a NaN in: the first floating-point key (names sorted) with
    elements, so the case does not depend on which tensors a fixture stores (e.g. lm_head.weight, absent when the
    embeddings are tied)."""
    return next(k for k in sorted(sd) if sd[k].is_floating_point() and sd[k].numel())


def _damaged_copy(golden, tmp_path, defect: str) -> tuple[Path, str]:
    """A copy of the fixture checkpoint with one defect -> (folder, the message sample.py must print)."""
    import shutil

    from safetensors.torch import save_file

    root = tmp_path / "ckpt"
    shutil.copytree(golden.dir, root, ignore=shutil.ignore_patterns("golden*"))
    if defect == "config field missing":
        d = json.loads((root / "config.json").read_text())
        del d["text_config"]["rope_theta"]
        (root / "config.json").write_text(json.dumps(d))
        return root, (f"{root / 'config.json'}: required field 'text_config.rope_theta' is missing: it must be a "
                      "finite number > 0; restore it from the checkpoint's original file")
    if defect == "decoder config type":
        path = root / "sd3_transformer" / "config.json"
        d = json.loads(path.read_text())
        d["num_layers"] = str(d["num_layers"])
        path.write_text(json.dumps(d))
        return root, f"{path}: field 'num_layers' must be an integer >= 1, got \"{d['num_layers']}\""
    assert defect == "NaN weight"
    sd = load_file(str(root / "model.safetensors"))
    key = poisonable_key(sd)
    sd[key].view(-1)[0] = float("nan")
    save_file(sd, str(root / "model.safetensors"))
    return root, (f"cannot load {root}: NaN or inf values in '{key}' in model.safetensors; the checkpoint "
                  "is damaged: download it again")


@pytest.mark.parametrize("defect", ["config field missing", "decoder config type", "NaN weight"])
def test_damaged_checkpoint_is_one_error_line(golden, tmp_path, capsys, defect):
    """Today's failure modes of such checkpoints were wrong images with exit code 0 (a config field silently
    defaulted, NaN weights) or a traceback; now one line before anything is drawn."""
    root, message = _damaged_copy(golden, tmp_path, defect)
    s = golden.scenario("e2e")
    up = valid_upsample(golden, s["ar_height"], s["ar_width"])[0]  # a size the checks pass: the defect is the error
    rc = sample.main(["--ckpt", str(root), "--prompt", "a cube", "--ar-size", f"{s['ar_height']}x{s['ar_width']}",
                      "--upsample", repr(up), "--device", "cpu", "--out", str(tmp_path / "o")])
    assert (rc, capsys.readouterr()) == (2, ("", f"error: {message}\n"))
    assert not (tmp_path / "o" / "sample_00.png").exists()


def test_damaged_checkpoint_command_line(golden, tmp_path):
    """The same as a process: exit code 2, the one line on stderr, no traceback."""
    import subprocess
    import sys

    from conftest import ROOT

    root, message = _damaged_copy(golden, tmp_path, "config field missing")
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", str(root), "--prompt", "a cube",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"error: {message}\n")


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits(tmp_path):
    import pipeline as P

    a = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    got = P.load_image(str(tmp_path / "g16.png"))
    want = np.round(a.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert got.dtype == np.uint8 and np.array_equal(got, np.repeat(want[..., None], 3, -1))
    assert got.max() == 255 and len(np.unique(got)) > 200  # not clipped to 0 / 255


def test_no_dynamo_import_on_the_way_to_the_first_image(tmp_path):
    """`python sample.py` on the toy checkpoint: building the modules on the meta device must not import
    torch._dynamo (about 1 s of start-up)."""
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys, sample; rc = sample.main(['--out', sys.argv[1], '--steps', '1', '--device', 'cpu']); "
            "print(rc, 'torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.stdout.splitlines()[-1] == "0 False", r.stderr[-2000:]
    assert (tmp_path / "o" / "sample_00.png").is_file()


# ----- released checkpoints by hub id -----

def _hub_cache(tmp_path, repo_id: str, source: Path) -> Path:
    """A Hugging Face hub cache holding `source` as the main revision of `repo_id` (the cache's own layout:
    models--owner--name/refs/main names a snapshot folder whose files link to the real ones)."""
    cache = tmp_path / "hub"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    for f in source.rglob("*"):
        if f.is_file():
            (snap / f.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            (snap / f.relative_to(source)).symlink_to(f.resolve())
    return cache


def test_hub_id_resolves_through_the_offline_cache(tmp_path):
    """`--ckpt ShareLab-SII/UniAR-RL` with HF_HUB_OFFLINE=1 reads the snapshot in the hub cache: the image equals the
    one from the same files given as a folder; an id the cache lacks is one line naming the download command."""
    import os
    import subprocess
    import sys

    root = Path(sample.__file__).resolve().parent
    src = root / "checkpoints" / "toy-rl"
    env = dict(os.environ, HF_HUB_CACHE=str(_hub_cache(tmp_path, "ShareLab-SII/UniAR-RL", src)), HF_HUB_OFFLINE="1")
    outs = {}
    for name, ckpt in (("hub", "ShareLab-SII/UniAR-RL"), ("folder", str(src))):
        r = subprocess.run([sys.executable, "sample.py", "--ckpt", ckpt, "--seed", "3", "--out", str(tmp_path / name)],
                           cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        outs[name] = np.asarray(Image.open(tmp_path / name / "sample_00.png"))
    assert np.array_equal(outs["hub"], outs["folder"]) and outs["hub"].std() > 0
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", "ShareLab-SII/UniAR-SFT", "--out", str(tmp_path / "x")],
                       cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: --ckpt: ShareLab-SII/")
    assert "huggingface-cli download ShareLab-SII/UniAR-SFT --local-dir UniAR-SFT" in r.stderr
    assert not (tmp_path / "x").exists()


def test_hub_id_without_huggingface_hub_prints_the_download_command(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if the optional package were not installed
    rc = sample.main(["--ckpt", "ShareLab-SII/UniAR-RL", "--prompt", "x", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "needs the optional huggingface_hub" in err
    assert "pip install huggingface_hub && huggingface-cli download ShareLab-SII/UniAR-RL --local-dir UniAR-RL" in err


# ----- outputs: a drawing never replaces a file, a failed write is one line and loses nothing, Ctrl-C is one line -----

def test_chat_never_replaces_a_file_written_meanwhile(tmp_path, capsys, monkeypatch):
    """Another run (a second `chat.py --file ... --out` on the same folder) writes chat_00.png while this one is saving
    its drawing: this drawing takes the next free name, and the other file is kept byte for byte (the name used to
    be chosen before the write and the file renamed over whatever had appeared there)."""
    from PIL import Image as PILImage

    out, turns = tmp_path / "chat", tmp_path / "turns.txt"
    turns.write_text("/draw a red circle at the top left\n")
    real_save = PILImage.Image.save

    def save(self, fp, *a, **k):
        if not (out / "chat_00.png").exists():
            (out / "chat_00.png").write_bytes(b"the other run's drawing")
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(PILImage.Image, "save", save)
    assert chat.main(["--file", str(turns), "--out", str(out), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"model: {out / 'chat_01.png'}"
    assert (out / "chat_00.png").read_bytes() == b"the other run's drawing"
    assert np.asarray(Image.open(out / "chat_01.png")).shape == (64, 64, 3)
    assert sorted(p.name for p in out.iterdir()) == ["chat_00.png", "chat_01.png"]


def test_concurrent_drawings_get_distinct_names(tmp_path):
    """The name claim races: 4 writers saving 25 drawings each into one folder at once get 100 distinct names,
    and every file holds what its writer wrote."""
    import threading

    got, start = {}, threading.Barrier(4)

    def writer(w):
        start.wait()
        for i in range(25):
            body = f"{w}-{i}".encode()
            got[body] = chat.save_new(tmp_path, "chat", lambda tmp: Path(tmp).write_bytes(body))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 100 and len(set(got.values())) == 100
    assert all(path.read_bytes() == body for body, path in got.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"chat_{k:02d}.png" for k in range(100)]


@pytest.mark.parametrize("code, reason, fix", [
    ("ENOSPC", "No space left on device", "free some space"),
    ("EROFS", "Read-only file system", "make it writable"),
])
@pytest.mark.parametrize("mode", ["single", "chat", "prompts"])
def test_failed_write_is_one_line_and_loses_nothing(tmp_path, capsys, monkeypatch, mode, code, reason, fix):
    """Disk full / read-only while the images are written (simulated: the PNG write raises what the system would):
    one error line naming the folder, exit code 2, no traceback; what the folder held before (an earlier run's
    set, a drawing, the finished samples) is intact and no temporary file is left."""
    import errno

    from PIL import Image as PILImage

    out = tmp_path / "o"
    turns, prompts = tmp_path / "turns.txt", tmp_path / "p.jsonl"
    turns.write_text("/draw a red circle at the top left\n")
    prompts.write_text('{"idx": 0, "prompt": "a blue circle at the bottom right"}\n')
    main, args = {"single": (sample.main, ["--seed", "1"]), "chat": (chat.main, ["--file", str(turns)]),
                  "prompts": (generate_batch.main, ["--prompts", str(prompts), "--samples-per-prompt", "2",
                                                    "--batch-size", "2"])}[mode]
    out.mkdir()
    if mode == "single":
        assert sample.main(["--out", str(out), "--device", "cpu"]) == 0  # an earlier run's set
    elif mode == "chat":
        (out / "chat_00.png").write_bytes(b"an earlier drawing")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save, saves = PILImage.Image.save, []

    def save(self, fp, *a, **k):
        saves.append(fp)
        if mode != "prompts" or len(saves) > 1:  # a prompt file: the first sample is written, the second fails
            raise OSError(getattr(errno, code), reason)
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(PILImage.Image, "save", save)
    capsys.readouterr()
    rc = main(args + ["--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    where = out / "p" if mode == "prompts" else out
    then = (f"{fix} and continue with the same flags and --resume (the finished files are kept), or pass another --out"
            if mode == "prompts" else f"{fix}, or pass another --out")
    assert (rc, err.splitlines()[-1]) == (2, f"error: --out: cannot write in {where} ({reason}); {then}"), err
    assert err.count("error:") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    if mode == "prompts":
        sample_dir = out / "p" / "00000" / "samples"
        assert [p.name for p in sample_dir.iterdir()] == ["0000.png"]
        Image.open(sample_dir / "0000.png").load()  # whole
    assert not [p for p in out.rglob(".*") if p.name not in (sample.OUTPUTS, generate_batch.RUN_SETTINGS)]


@pytest.mark.parametrize("mode", [["sample.py", "--prompt", "x"], ["chat.py", "--file", "{turns}"],
                                  ["generate_batch.py", "--prompts", "{prompts}"]])
def test_read_only_out_is_refused_before_loading(golden, tmp_path, capsys, monkeypatch, no_loading, mode):
    """A read-only (or not writable) --out folder is refused before anything loads, not after the drawing."""
    import os

    (tmp_path / "turns.txt").write_text("/draw a cube\n")
    (tmp_path / "p.jsonl").write_text('{"idx": 0, "prompt": "a cube"}\n')
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m, *a, **k: Path(p) != tmp_path and real_access(p, m, *a, **k))
    main = {"sample.py": sample.main, "chat.py": chat.main, "generate_batch.py": generate_batch.main}[mode[0]]
    mode = [a.replace("{turns}", str(tmp_path / "turns.txt")).replace("{prompts}", str(tmp_path / "p.jsonl"))
            for a in mode[1:]]
    out = tmp_path / "o"
    rc = main(["--ckpt", str(golden.dir), "--out", str(out), "--device", "cpu"] + mode)
    assert (rc, capsys.readouterr().err) == (2, f"error: --out {out}: cannot write in {tmp_path} (read-only file "
                                                "system or no permission); make it writable, or pass another --out\n")
    assert not out.exists()


def test_ctrl_c_in_a_chat_is_one_line(tmp_path):
    """Ctrl-C during `chat.py --file`: one line saying where the drawings are, exit code 130, no traceback; every
    drawing written is whole and no temporary file is left."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    turns, out = tmp_path / "turns.txt", tmp_path / "chat"
    turns.write_text("/draw a red circle at the top left\n" * 300)
    p = subprocess.Popen([sys.executable, str(ROOT / "chat.py"), "--file", str(turns), "--out", str(out),
                          "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not (line := p.stdout.readline()).startswith("model: "):  # the first drawing is written
        assert line, p.stderr.read()[-2000:]
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert (p.returncode, err) == (130, f"interrupted by SIGINT: the drawings so far are kept in {out}\n")
    drawn = sorted(out.iterdir())
    assert 1 <= len(drawn) < 300 and all(f.name.startswith("chat_") for f in drawn)
    for f in drawn:
        Image.open(f).load()


def test_full_disk_while_saving_bits_is_one_line(tmp_path, capsys, monkeypatch):
    """--save-bits writes bits.safetensors with safetensors' save_file, which reports a full disk as its own error
    (the system's number in its text), not an OSError: the same one line naming --out, exit 2, the earlier set kept."""
    import errno
    import os

    from safetensors import SafetensorError

    out = tmp_path / "o"
    assert sample.main(["--out", str(out), "--device", "cpu", "--save-bits"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code = errno.ENOSPC

    def full(*a, **k):
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")

    monkeypatch.setattr(sample, "save_file", full)
    capsys.readouterr()
    rc = sample.main(["--out", str(out), "--device", "cpu", "--save-bits", "--seed", "3"])
    err = capsys.readouterr().err
    assert (rc, err.splitlines()[-1]) == (2, f"error: --out: cannot write in {out} ({os.strerror(code)}); free some "
                                             "space, or pass another --out"), err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
