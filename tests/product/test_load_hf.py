"""load_hf.py: strict, memory-mapped loading of the released layout, and clear errors for bad checkpoints."""
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import bsq
import files
import load_hf
from conftest import ROOT, golden_dir


def test_vision_part_loads_like_a_strict_state_dict(golden):
    m = load_hf.load_vision(golden.dir)  # resolves <root>/bsq_encoder
    ref = bsq.VisionModel(bsq.VisionConfig.from_dict(golden.config["vision_config"]))
    ref.load_state_dict(load_file(str(golden.dir / "bsq_encoder" / "model.safetensors")), strict=True)
    for (k, a), (_, b) in zip(m.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k


def test_decoder_only_vision_loads_just_the_output_projections(golden):
    m = load_hf.load_vision(golden.dir / "bsq_encoder", decoder_only=True)
    assert m.patch_embed.proj.weight.is_meta and not m.bsq_output_proj.linear_fc1.weight.is_meta
    full = load_hf.load_vision(golden.dir / "bsq_encoder")
    bits = golden["dec.bits"]
    assert torch.equal(m.bits_to_decoder_features(bits), full.bits_to_decoder_features(bits))


def test_dtype_conversion_keeps_integer_buffers(golden):
    """Floating weights are cast to the asked dtype (values rounded from the file), integer buffers keep theirs."""
    m = load_hf.load_vision(golden.dir, dtype=torch.bfloat16)
    full = load_hf.load_vision(golden.dir)
    sd = load_file(str(golden.dir / "bsq_encoder" / "model.safetensors"))
    assert torch.equal(m.pos_embed.weight, sd["pos_embed.weight"].bfloat16())
    assert m.bsq.basis.dtype == torch.int64 and torch.equal(m.bsq.basis, full.bsq.basis)


def test_sharded_checkpoint(tmp_path, golden):
    sd = load_file(str(golden.dir / "bsq_encoder" / "model.safetensors"))
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / name))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    shutil.copy(golden.dir / "bsq_encoder" / "config.json", tmp_path / "config.json")
    m = load_hf.load_vision(tmp_path)
    assert torch.equal(m.pos_embed.weight, sd["pos_embed.weight"])


# ----- bad checkpoints -----

def _copy_part(golden, tmp_path):
    dst = tmp_path / "bsq_encoder"
    shutil.copytree(golden.dir / "bsq_encoder", dst)
    return dst


def test_missing_folder_and_part(tmp_path):
    with pytest.raises(load_hf.CheckpointError) as e:
        load_hf.load_vision(tmp_path / "nowhere")
    assert str(e.value) == (f"checkpoint folder not found: {tmp_path / 'nowhere'}; give the folder a checkpoint was "
                            f"downloaded to (expected layout: {load_hf.LAYOUT})")
    with pytest.raises(load_hf.CheckpointError) as e:
        load_hf.load_vision(tmp_path)
    assert str(e.value) == (f"{tmp_path}: not a UniAR checkpoint folder (part 'bsq_encoder' not found: neither "
                            f"{tmp_path / 'bsq_encoder' / 'config.json'} nor {tmp_path / 'config.json'} exists); give "
                            f"the folder a checkpoint was downloaded to (expected layout: {load_hf.LAYOUT})")


def test_truncated_and_corrupt_files(tmp_path, golden):
    part = _copy_part(golden, tmp_path)
    f = part / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(load_hf.CheckpointError, match=r"model\.safetensors.*corrupt or truncated"):
        load_hf.load_vision(part)
    f.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(load_hf.CheckpointError, match=r"model\.safetensors.*corrupt or truncated"):
        load_hf.load_vision(part)
    (part / "config.json").write_text("{ not json")
    with pytest.raises(load_hf.CheckpointError, match=r"config\.json is not valid JSON"):
        load_hf.load_vision(part)


def test_missing_unexpected_and_mismatched_keys_reported_together(tmp_path, golden):
    part = _copy_part(golden, tmp_path)
    sd = load_file(str(part / "model.safetensors"))
    del sd["pos_embed.weight"]
    sd["extra.weight"] = torch.zeros(3)
    sd["merger.linear_fc2.bias"] = torch.zeros(sd["merger.linear_fc2.bias"].shape[0] + 1)
    save_file(sd, str(part / "model.safetensors"))
    with pytest.raises(load_hf.CheckpointError) as e:
        load_hf.load_vision(part)
    msg = str(e.value)
    assert "1 missing keys: pos_embed.weight" in msg
    assert "1 unexpected keys: extra.weight" in msg
    assert "merger.linear_fc2.bias: file" in msg


# ----- configs checked like tensors: the message names the file and the field -----

RESTORE = "restore it from the checkpoint's original file"


def _edit_json(path, change):
    """Apply `change` to the JSON file (in place; a returned value replaces the whole content)."""
    d = json.loads(path.read_text())
    out = change(d)
    path.write_text(json.dumps(d if out is None or not isinstance(out, list) else out))


def _checkpoint_copy(src, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("golden*"))
    return root


def _tc(d):
    return d["text_config"]


DISAGREE = "the config and the tokenizer files disagree: restore them from the checkpoint's original files"
AR_DEFECTS = {  # change of the root config.json -> the message after "<file>: " (values read from the fixture)
    "missing rope_theta": (lambda d: _tc(d).pop("rope_theta"),
                           f"required field 'text_config.rope_theta' is missing: it must be a finite number > 0; "
                           f"{RESTORE}"),
    "missing hidden_size": (lambda d: _tc(d).pop("hidden_size"),
                            f"required field 'text_config.hidden_size' is missing: it must be an integer >= 1; "
                            f"{RESTORE}"),
    "missing text_config": (lambda d: d.pop("text_config"),
                            "required field 'text_config' is missing: it must be a JSON object holding "
                            f"'text_config.hidden_size'; {RESTORE}"),
    "missing token id": (lambda d: d.pop("image_token_id"),
                         f"required field 'image_token_id' is missing: it must be an integer >= 0; {RESTORE}"),
    "int as string": (lambda d: _tc(d).update(num_hidden_layers=str(_tc(d)["num_hidden_layers"])),
                      "field 'text_config.num_hidden_layers' must be an integer >= 1, got \"{num_hidden_layers}\""),
    "int as float": (lambda d: _tc(d).update(num_hidden_layers=float(_tc(d)["num_hidden_layers"])),
                     "field 'text_config.num_hidden_layers' must be an integer >= 1, got {num_hidden_layers}.0"),
    "list for object": (lambda d: d.update(text_config=[1, 2]),
                        "field 'text_config' must be a JSON object, got [1, 2]"),
    "bool as string": (lambda d: d["vision_config"].update(bsq_skip_final_layernorm="yes"),
                       "field 'vision_config.bsq_skip_final_layernorm' must be true or false, got \"yes\""),
    "zero eps": (lambda d: _tc(d).update(rms_norm_eps=0),
                 "field 'text_config.rms_norm_eps' must be a finite number > 0, got 0"),
    "NaN rope_theta": (lambda d: _tc(d).update(rope_theta=float("nan")),
                       "field 'text_config.rope_theta' must be a finite number > 0, got NaN"),
    "short mrope section": (lambda d: _tc(d)["rope_scaling"].update(mrope_section=[1, 2]),
                            "field 'text_config.rope_scaling.mrope_section' must be a list of 3 integers >= 0, got "
                            "[1, 2]"),
    "other rope type": (lambda d: _tc(d)["rope_scaling"].update(rope_type="yarn"),
                        "field 'text_config.rope_scaling.rope_type' must be \"default\" (the only RoPE supported: "
                        "plain interleaved MRoPE), got \"yarn\""),
    "token id beyond the vocabulary": (lambda d: d.update(image_token_id=_tc(d)["vocab_size"]),
                                       "field 'image_token_id' must be a token id below text_config.vocab_size "
                                       "{vocab_size}, got {vocab_size}"),
    # rules that relate several fields (config_schema; the config dataclasses only assert them)
    "heads not a multiple of the key/value heads": (lambda d: _tc(d).update(num_attention_heads=3,
                                                                            num_key_value_heads=2),
                                                    "invalid config (num_attention_heads 3 is not a multiple of "
                                                    "num_key_value_heads 2)"),
    "mrope sections not half a head": (lambda d: _tc(d).update(head_dim=32, rope_scaling={
                                           **_tc(d)["rope_scaling"], "mrope_section": [1, 2, 3]}),
                                       "invalid config (mrope_section (1, 2, 3) must sum to head_dim / 2 = 16)"),
    "vision heads": (lambda d: d["vision_config"].update(hidden_size=30, num_heads=4),
                     "invalid config (vision hidden_size 30 is not a multiple of num_heads 4)"),
    "vision position grid not square": (lambda d: d["vision_config"].update(num_position_embeddings=50),
                                        "invalid config (num_position_embeddings 50 is not a square grid)"),
    "DeepStack tap beyond the depth": (lambda d: d["vision_config"].update(depth=3, deepstack_visual_indexes=[0, 3]),
                                       "invalid config (deepstack_visual_indexes (0, 3) outside depth 3)"),
    "vision width not the text width": (lambda d: d["vision_config"].update(out_hidden_size=7),
                                        "invalid config (vision out_hidden_size 7 != text hidden_size {hidden_size})"),
    "generation off": (lambda d: d.update(visual_transformer_decoder=False),
                       "field 'visual_transformer_decoder' must be true (UniAR generation needs the visual-decoder "
                       "stack), got false"),
    # token ids that are valid ids, but not the ids the tokenizer files give those tokens (the fixture's config and
    # tokenizer agree: {image_token_id} is the tokenizer's <|image_pad|>, ...): formerly wrong images, exit code 0
    "image token id of <|vision_start|>": (lambda d: d.update(image_token_id=d["vision_start_token_id"]),
                                           "field 'image_token_id' is {vision_start_token_id}, but the tokenizer "
                                           "(tokenizer.json) gives <|image_pad|> the id {image_token_id}; " + DISAGREE),
    "image token id of an ordinary token": (lambda d: d.update(image_token_id=_ordinary_token_id()),
                                            "field 'image_token_id' is {ordinary}, but the tokenizer (tokenizer.json) "
                                            "gives <|image_pad|> the id {image_token_id}; " + DISAGREE),
    "video token id of <|image_pad|>": (lambda d: d.update(video_token_id=d["image_token_id"]),
                                        "field 'video_token_id' is {image_token_id}, but the tokenizer "
                                        "(tokenizer.json) gives <|video_pad|> the id {video_token_id}; " + DISAGREE),
    "vision start and end swapped": (lambda d: d.update(vision_start_token_id=d["vision_end_token_id"],
                                                        vision_end_token_id=d["vision_start_token_id"]),
                                     "field 'vision_start_token_id' is {vision_end_token_id}, but the tokenizer "
                                     "(tokenizer.json) gives <|vision_start|> the id {vision_start_token_id}; "
                                     + DISAGREE),
}


def _ordinary_token_id() -> int:
    """The smallest id of the fixture tokenizer's own vocabulary (an ordinary token, not an added one)."""
    return min(json.loads((golden_dir() / "tokenizer.json").read_text())["model"]["vocab"].values())


def _config_values(golden) -> dict:
    """The fixture config's values by field name (text_config's and the top level's) for the messages."""
    return {**golden.config, **golden.config["text_config"], "ordinary": _ordinary_token_id()}


@pytest.mark.parametrize("defect", list(AR_DEFECTS))
def test_ar_config_defects_name_the_file_and_field(tmp_path, golden, defect):
    change, message = AR_DEFECTS[defect]
    root = _checkpoint_copy(golden.dir, tmp_path)
    _edit_json(root / "config.json", change)
    with pytest.raises(load_hf.CheckpointError) as e:
        load_hf.load_ar(root)
    assert str(e.value) == f"{root / 'config.json'}: " + message.format(**_config_values(golden))


def test_config_that_is_not_an_object(tmp_path, golden):
    root = _checkpoint_copy(golden.dir, tmp_path)
    (root / "config.json").write_text("[1, 2]")
    with pytest.raises(load_hf.CheckpointError) as e:
        load_hf.load_ar(root)
    assert str(e.value) == f"{root / 'config.json'} must hold a JSON object (a config), got [1, 2]"


DECODER_DEFECTS = {  # file under the checkpoint, change -> the message after "<file>: "
    "transformer size missing": ("sd3_transformer/config.json", lambda d: d.pop("num_layers"),
                                 f"required field 'num_layers' is missing: it must be an integer >= 1; {RESTORE}"),
    "transformer qk norm": ("sd3_transformer/config.json", lambda d: d.update(qk_norm="layer_norm"),
                            "field 'qk_norm' must be \"rms_norm\" or null (the q/k norms supported), got "
                            "\"layer_norm\""),
    "dual attention beyond the layers": ("sd3_transformer/config.json",
                                         lambda d: d.update(dual_attention_layers=[d["num_layers"]]),
                                         "field 'dual_attention_layers' names layers [{num_layers}] beyond "
                                         "num_layers {num_layers}"),
    "scheduler shift missing": ("sd3_pipeline/scheduler/scheduler_config.json", lambda d: d.pop("shift"),
                                f"required field 'shift' is missing: it must be a finite number > 0; {RESTORE}"),
    "scheduler option on": ("sd3_pipeline/scheduler/scheduler_config.json",
                            lambda d: d.update(use_dynamic_shifting=True),
                            "field 'use_dynamic_shifting' must be false (the released scheduler has it off; the only "
                            "value supported), got true"),
    "VAE scaling missing": ("sd3_pipeline/vae/config.json", lambda d: d.pop("scaling_factor"),
                            f"required field 'scaling_factor' is missing: it must be a finite number > 0; {RESTORE}"),
    "VAE channels as a string": ("sd3_pipeline/vae/config.json", lambda d: d.update(block_out_channels="16,32"),
                                 "field 'block_out_channels' must be a non-empty list of integers >= 1, got "
                                 "\"16,32\""),
    "tokenizer BSQ size": ("bsq_encoder/config.json", lambda d: d.update(bsq_dim=32),
                           "field 'bsq_dim' must be 64 (the only size supported: a code is a 64-bit index), got 32"),
    "tokenizer heads": ("bsq_encoder/config.json", lambda d: d.update(hidden_size=30, num_heads=4),
                        "invalid vision config (vision hidden_size 30 is not a multiple of num_heads 4)"),
    "transformer caption width": ("sd3_transformer/config.json",
                                  lambda d: d.update(caption_projection_dim=7, num_attention_heads=2,
                                                     attention_head_dim=16),
                                  "invalid config (caption_projection_dim 7 must equal heads * head_dim 32)"),
}


@pytest.mark.parametrize("defect", list(DECODER_DEFECTS))
def test_decoder_config_defects_name_the_file_and_field(tmp_path, golden, defect):
    rel, change, message = DECODER_DEFECTS[defect]
    root = _checkpoint_copy(golden.dir, tmp_path)
    transformer = json.loads((root / "sd3_transformer" / "config.json").read_text())
    _edit_json(root / rel, change)
    with pytest.raises(load_hf.CheckpointError) as e:
        load_hf.load_decoder(root, cache_dir=tmp_path / "cache")
    assert str(e.value) == f"{root / rel}: " + message.format(**transformer)


def test_prediction_type_required_only_for_a_pixel_space_decoder(tmp_path, golden):
    """The released layout has no prediction_type (its decoder predicts velocity); the project's pixel-space
    decoder (no sd3_pipeline/vae/) predicts x0 and must say so: without it the sampler would read x0 as a
    velocity and draw noise."""
    assert "prediction_type" not in json.loads((golden.dir / "sd3_transformer" / "config.json").read_text())
    assert load_hf.transformer_config(golden.dir).prediction_type == "velocity"
    root = tmp_path / "toy"
    shutil.copytree(ROOT / "checkpoints" / "toy", root)
    assert load_hf.transformer_config(root).prediction_type == "sample"
    _edit_json(root / "sd3_transformer" / "config.json", lambda d: d.pop("prediction_type"))
    with pytest.raises(load_hf.CheckpointError) as e:
        load_hf.load_decoder(root)
    assert str(e.value) == (f"{root / 'sd3_transformer' / 'config.json'}: required field 'prediction_type' is "
                            "missing: it must be one of \"velocity\", \"sample\" (a pixel-space decoder, without "
                            f"sd3_pipeline/vae/, must say which); {RESTORE}")


@pytest.mark.parametrize("encoder, field", [("text_encoder", "eos_token_id"), ("text_encoder_3", "feed_forward_proj")])
def test_text_encoder_config_defects(tmp_path, golden, encoder, field):
    """The pipeline's text encoders: their transformers class defaults differ from SD3's (CLIP's eos_token_id
    49407 vs 2, T5's feed_forward_proj "relu" vs "gated-gelu"), so the fields are required."""
    import dataclasses

    import text_encoders as TE

    root = _checkpoint_copy(golden.dir, tmp_path)
    for name, cfg in (("text_encoder", TE.CLIPTextConfig.tiny()), ("text_encoder_2", TE.CLIPTextConfig.tiny()),
                      ("text_encoder_3", TE.T5Config.tiny())):
        d = {k: v for k, v in dataclasses.asdict(cfg).items() if not (name == encoder and k == field)}
        (root / "sd3_pipeline" / name).mkdir()
        (root / "sd3_pipeline" / name / "config.json").write_text(json.dumps(d))
    want = {"eos_token_id": "an integer >= 0",
            "feed_forward_proj": "\"gated-gelu\" (T5 v1.1, the only feed-forward supported)"}[field]
    path = root / "sd3_pipeline" / encoder / "config.json"
    with pytest.raises(load_hf.CheckpointError) as e:
        load_hf.load_decoder(root, cache_dir=tmp_path / "cache")
    assert str(e.value) == f"{path}: required field '{field}' is missing: it must be {want}; {RESTORE}"


# ----- the tokenizer files, and the parts of a checkpoint: through sample.py as a user runs it -----

def _sample(root, tmp_path, capsys, *extra) -> tuple:
    """`sample.py --ckpt root --prompt ...` at the fixture's e2e size -> (exit code, stdout, stderr)."""
    import sample

    from conftest import Golden
    from test_sample import valid_upsample

    g = Golden(golden_dir())
    s = g.scenario("e2e")
    up = valid_upsample(g, s["ar_height"], s["ar_width"])[0]  # a ratio the fixture's decoder accepts at that size
    rc = sample.main(["--ckpt", str(root), "--prompt", "a cube", "--ar-size", f"{s['ar_height']}x{s['ar_width']}",
                      "--upsample", repr(up), "--device", "cpu", "--out", str(tmp_path / "out"), *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _write(text: str):
    return lambda path: path.write_text(text)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit(change):
    return lambda path: _edit_json(path, change)


UNREADABLE = r"is not a readable tokenizer file \(.+\); restore it from the checkpoint's original file \(download " \
             r"it again\)"
RESTORE_TOK = "restore it from the checkpoint's original file (download it again)"
TOKENIZER_DEFECTS = {  # file, damage -> the message after "<root>/<file>" (a regex: the library's words vary)
    "tokenizer not JSON": ("tokenizer.json", _write("{ not json"), " " + UNREADABLE),
    "tokenizer JSON list": ("tokenizer.json", _write("[1, 2]"), " " + UNREADABLE),
    "tokenizer wrong shape": ("tokenizer.json", _write('{"model": 3}'), " " + UNREADABLE),
    "tokenizer without model": ("tokenizer.json", _write("{}"), " " + UNREADABLE),
    "tokenizer truncated": ("tokenizer.json", _truncate, " " + UNREADABLE),
    "tokenizer empty": ("tokenizer.json", _write(""), " " + UNREADABLE),
    "tokenizer binary": ("tokenizer.json", lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), " " + UNREADABLE),
    "tokenizer missing": ("tokenizer.json", lambda p: p.unlink(),
                          re.escape(" not found (the AR model's tokenizer); the checkpoint is incomplete: download "
                                    "it again")),
    "special tokens not JSON": ("special_tokens_map.json", _write("{ bad"),
                                r" is not valid JSON \(.+\); " + re.escape(RESTORE_TOK)),
    "special token of the wrong shape": ("special_tokens_map.json", _edit(lambda d: d.update(pad_token={"x": 1})),
                                         re.escape(': field \'pad_token\' must be a token string or an object '
                                                   '{"content": token string} or null, got {"x": 1}; ' + RESTORE_TOK)),
    "tokenizer config a list": ("tokenizer_config.json", _write("[1]"),
                                re.escape(" must hold a JSON object (a config), got [1]; " + RESTORE_TOK)),
    "eos token a number": ("tokenizer_config.json", _edit(lambda d: d.update(eos_token=5)),
                           re.escape(": field 'eos_token' must be a token string or an object {\"content\": token "
                                     "string} or null, got 5; " + RESTORE_TOK)),
    "added tokens a list": ("added_tokens.json", _write("[1]"),
                            re.escape(" must hold a JSON object {token: id}, got [1]; " + RESTORE_TOK)),
    "added token id a string": ("added_tokens.json", _edit(lambda d: d.update({"<|image_pad|>": "x"})),
                                re.escape(': the id of "<|image_pad|>" must be an integer >= 0, got "x"; '
                                          + RESTORE_TOK)),
    "generation config truncated": ("generation_config.json", _truncate,
                                    r" is not valid JSON \(.+\); " + re.escape(RESTORE_TOK)),
    "generation eos a string": ("generation_config.json", _edit(lambda d: d.update(eos_token_id="a")),
                                re.escape(": field 'eos_token_id' must be a token id >= 0 or a list of them or null, "
                                          "got \"a\"; " + RESTORE_TOK)),
}


@pytest.mark.parametrize("defect", list(TOKENIZER_DEFECTS))
def test_damaged_tokenizer_files_are_one_error_line(tmp_path, golden, capsys, defect):
    """A tokenizer file that is not JSON, JSON of the wrong shape or truncated: formerly a traceback from the
    tokenizers library (or from a missing key); now one line naming the file, before anything loads, from sample.py
    and from load_hf.load_ar alike."""
    name, damage, message = TOKENIZER_DEFECTS[defect]
    root = _checkpoint_copy(golden.dir, tmp_path)
    damage(root / name)
    line = re.escape(str(root / name)) + message
    rc, out, err = _sample(root, tmp_path, capsys)
    assert (rc, out) == (2, "") and re.fullmatch(f"error: {line}\n", err), err
    assert not (tmp_path / "out").exists()
    with pytest.raises(load_hf.CheckpointError) as e:
        load_hf.load_ar(root)
    assert re.fullmatch(line, str(e.value)), str(e.value)


@pytest.mark.parametrize("field, token", [("image_token_id", "vision_start_token_id"),
                                          ("image_token_id", "ordinary"), ("vision_end_token_id", "image_token_id")])
def test_token_id_disagreeing_with_the_tokenizer_is_refused_by_sample(tmp_path, golden, capsys, field, token):
    """config.json naming another valid token as <|image_pad|> (or <|vision_end|>): formerly sample.py ran and drew
    from a wrong prompt layout; now one line naming the field and the tokenizer's id, before the AR model loads."""
    values = _config_values(golden)
    tokens = {"image_token_id": "<|image_pad|>", "vision_end_token_id": "<|vision_end|>"}
    root = _checkpoint_copy(golden.dir, tmp_path)
    _edit_json(root / "config.json", lambda d: d.update({field: values[token]}))
    rc, out, err = _sample(root, tmp_path, capsys)
    assert (rc, out, err) == (2, "", f"error: {root / 'config.json'}: field '{field}' is {values[token]}, but the "
                                     f"tokenizer (tokenizer.json) gives {tokens[field]} the id {values[field]}; "
                                     f"{DISAGREE}\n")


def test_tokenizer_ids_beyond_the_embedding_are_refused(tmp_path, golden):
    """A tokenizer with ids the model's embedding has no row for (text_config.vocab_size): formerly an index error
    in the middle of a run when such a token came up."""
    root = _checkpoint_copy(golden.dir, tmp_path)
    vocab_size = golden.config["text_config"]["vocab_size"]
    vocab = json.loads((root / "tokenizer.json").read_text())["model"]["vocab"]
    top = max(vocab, key=vocab.get)  # the ordinary token of the largest id gets the first id beyond the embedding
    _edit_json(root / "tokenizer.json", lambda d: d["model"]["vocab"].update({top: vocab_size}))
    with pytest.raises(load_hf.CheckpointError) as e:
        load_hf.load_ar(root)
    assert str(e.value) == (f"{root / 'config.json'}: field 'text_config.vocab_size' is {vocab_size}, but the "
                            f"tokenizer has token ids up to {vocab_size} ({top!r} in tokenizer.json), which the "
                            f"embedding has no row for; {DISAGREE}")


def test_added_tokens_disagreeing_with_tokenizer_json(tmp_path, golden):
    root = _checkpoint_copy(golden.dir, tmp_path)
    ids = json.loads((root / "added_tokens.json").read_text())
    _edit_json(root / "added_tokens.json", lambda d: d.update({"<|image_pad|>": ids["<|vision_start|>"]}))
    with pytest.raises(load_hf.CheckpointError) as e:
        load_hf.load_ar(root)
    assert str(e.value) == (f"{root / 'added_tokens.json'} gives <|image_pad|> the id {ids['<|vision_start|>']}, but "
                            f"{root / 'tokenizer.json'} gives it {ids['<|image_pad|>']}; the tokenizer files are from "
                            "different checkpoints: restore them from the checkpoint's original files")


INCOMPLETE = "the checkpoint is incomplete: download it again"
MISSING_PARTS = {  # what is deleted -> (the path the message starts with, the rest)
    "bsq_encoder/": ("", ": the checkpoint has no bsq_encoder/ folder (the decoder's copy of the visual tokenizer: "
                         f"bsq_encoder/config.json + model.safetensors); {INCOMPLETE}, or copy bsq_encoder/ from a "
                         "complete copy"),
    "bsq_encoder/config.json": ("bsq_encoder/config.json",
                                " not found (the decoder's copy of the visual tokenizer: bsq_encoder/config.json + "
                                f"model.safetensors); {INCOMPLETE}, or copy bsq_encoder/ from a complete copy"),
    "sd3_transformer/": ("", ": the checkpoint has no sd3_transformer/ folder (the diffusion decoder: "
                             "sd3_transformer/config.json + diffusion_pytorch_model.safetensors); "
                             f"{INCOMPLETE}, or copy sd3_transformer/ from a complete copy"),
    "sd3_transformer/config.json": ("sd3_transformer/config.json",
                                    " not found (the diffusion decoder: sd3_transformer/config.json + "
                                    f"diffusion_pytorch_model.safetensors); {INCOMPLETE}, or copy sd3_transformer/ "
                                    "from a complete copy"),
    "sd3_pipeline/": ("", ": the checkpoint has no sd3_pipeline/ folder (the decoder's scheduler/ and vae/); "
                          f"{INCOMPLETE}, or copy sd3_pipeline/ from a complete copy"),
    "sd3_pipeline/scheduler/": ("sd3_pipeline", ": no scheduler/ folder (the decoder's sampling schedule: "
                                                "scheduler/scheduler_config.json); "
                                                f"{INCOMPLETE}, or copy sd3_pipeline/scheduler/ from a complete copy"),
    "sd3_pipeline/scheduler/scheduler_config.json": ("sd3_pipeline/scheduler/scheduler_config.json",
                                                     " not found (the decoder's sampling schedule); "
                                                     f"{INCOMPLETE}, or copy sd3_pipeline/scheduler/ from a complete "
                                                     "copy"),
    "sd3_pipeline/vae/": ("sd3_pipeline", ": no vae/ folder, but {root}/sd3_transformer/config.json decodes "
                                          "{out_channels}-channel latents, which need the VAE "
                                          "(sd3_pipeline/vae/config.json + diffusion_pytorch_model.safetensors); "
                                          f"{INCOMPLETE}, or copy sd3_pipeline/vae/ from a complete copy"),
    "sd3_pipeline/vae/config.json": ("sd3_pipeline/vae/config.json", f" not found; {INCOMPLETE}"),
}


@pytest.mark.parametrize("part", list(MISSING_PARTS))
def test_missing_part_is_named(tmp_path, golden, capsys, part):
    """A checkpoint without one of its parts: formerly the root's config.json was read in its place (a message about
    the wrong file, after the AR model had run) or several lines; now one line naming the missing folder or file,
    from sample.py before anything loads and from load_hf.load_decoder."""
    root = _checkpoint_copy(golden.dir, tmp_path)
    target = root / part
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    start, rest = MISSING_PARTS[part]
    tr = json.loads((golden.dir / "sd3_transformer" / "config.json").read_text())
    message = f"{root / start if start else root}" + rest.format(root=root, **tr)
    rc, out, err = _sample(root, tmp_path, capsys)
    assert (rc, out, err) == (2, "", f"error: {message}\n")
    with pytest.raises(load_hf.CheckpointError) as e:
        load_hf.load_decoder(root, cache_dir=tmp_path / "cache")
    assert str(e.value) == message


PIPELINE_TOKENIZER_DEFECTS = {  # folder, file, damage -> the message after "<folder>/<file>"
    "CLIP-L tokenizer.json not JSON": ("tokenizer", "tokenizer.json", _write("{ not json"), " " + UNREADABLE),
    "CLIP-G tokenizer config a list": ("tokenizer_2", "tokenizer_config.json", _write("[1]"),
                                       re.escape(f" must hold a JSON object, got [1]; {RESTORE_TOK}")),
    "CLIP-G special tokens not JSON": ("tokenizer_2", "special_tokens_map.json", _write("{ bad"),
                                       r" is not valid JSON \(.+\); " + re.escape(RESTORE_TOK)),
    "T5 tokenizer.json truncated": ("tokenizer_3", "tokenizer.json", _truncate, " " + UNREADABLE),
    "CLIP-L length beyond any": ("tokenizer", "tokenizer_config.json", _edit(lambda d: d.update(model_max_length=1e30)),
                                 re.escape(": field 'model_max_length' must be an integer >= 1, got 1e+30; "
                                           + RESTORE_TOK)),
}


@pytest.mark.parametrize("defect", list(PIPELINE_TOKENIZER_DEFECTS))
def test_damaged_pipeline_tokenizer_is_named(tmp_path, golden, defect):
    """The SD3 pipeline's tokenizer folders (read once, to cache the decoder prompt's embeddings): a damaged file is
    one error naming it, before any text-encoder weights are read (formerly a traceback from the tokenizers library
    or the json module, after the weights)."""
    import dataclasses

    import text_encoders as TE

    folder, name, damage, message = PIPELINE_TOKENIZER_DEFECTS[defect]
    root = _checkpoint_copy(golden.dir, tmp_path)
    pipe = root / "sd3_pipeline"
    for enc, cfg in (("text_encoder", TE.CLIPTextConfig.tiny()), ("text_encoder_2", TE.CLIPTextConfig.tiny()),
                     ("text_encoder_3", TE.T5Config.tiny())):
        (pipe / enc).mkdir()
        (pipe / enc / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))  # no weights: never read
    for tok in ("tokenizer", "tokenizer_2", "tokenizer_3"):  # the fixture's own tokenizer files stand in for them
        (pipe / tok).mkdir()
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(golden.dir / f, pipe / tok / f)
        _edit_json(pipe / tok / "tokenizer_config.json", lambda d: d.update(model_max_length=77))  # as CLIP's
    damage(pipe / folder / name)
    with pytest.raises(load_hf.CheckpointError) as e:
        load_hf.load_decoder(root, cache_dir=tmp_path / "cache")
    assert re.fullmatch(re.escape(str(pipe / folder / name)) + message, str(e.value)), str(e.value)


# ----- tensors: shard index, dtypes, finiteness -----

def _shard(folder, sd, wrong_key=None):
    """Split `sd` into two shards + model.safetensors.index.json; `wrong_key` is mapped to the other shard."""
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(folder / name))
    wmap = {k: n for n, ks in shards.items() for k in ks}
    if wrong_key is not None:
        wmap[wrong_key] = next(n for n in shards if n != wmap[wrong_key])
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    return wmap


def test_shard_index_must_agree_with_the_shards(tmp_path, golden):
    root = _checkpoint_copy(golden.dir, tmp_path)
    sd = load_file(str(root / "model.safetensors"))
    (root / "model.safetensors").unlink()
    key = sorted(sd)[0]
    wmap = _shard(root, sd, wrong_key=key)
    index = root / "model.safetensors.index.json"
    with pytest.raises(load_hf.CheckpointError) as e:
        load_hf.load_ar(root)
    assert str(e.value) == (f"{index}: weight_map maps '{key}' to {wmap[key]}, but that shard does not hold it (it is "
                            "in model-00001-of-00002.safetensors); the index does not belong to these shards: "
                            "re-download the index and the shards")
    index.write_text(json.dumps({"weight_map": [key]}))
    with pytest.raises(load_hf.CheckpointError) as e:
        load_hf.load_ar(root)
    assert str(e.value) == (f"{index}: field 'weight_map' must be a non-empty JSON object {{tensor key: shard file}}, "
                            f'got ["{key}"]')
    _shard(root, sd)
    net, _ = load_hf.load_ar(root)  # the same shards with a right index load
    assert torch.equal(net.state_dict()[key], sd[key])


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_non_float_tensor_for_a_weight(tmp_path, golden, dtype):
    part = _copy_part(golden, tmp_path)
    sd = load_file(str(part / "model.safetensors"))
    sd["pos_embed.weight"] = sd["pos_embed.weight"].to(dtype)
    save_file(sd, str(part / "model.safetensors"))
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(load_hf.CheckpointError) as e:
        load_hf.load_vision(part)
    assert str(e.value) == (f"cannot load {part}: 'pos_embed.weight' in model.safetensors is {name}, but it is a "
                            "floating-point weight: store it as float32, float16 or bfloat16 (quantized checkpoints "
                            "are not supported)")


def test_float_tensor_for_an_integer_buffer(tmp_path, golden):
    part = _copy_part(golden, tmp_path)
    sd = load_file(str(part / "model.safetensors"))
    sd["bsq.basis"] = sd["bsq.basis"].float()
    save_file(sd, str(part / "model.safetensors"))
    with pytest.raises(load_hf.CheckpointError) as e:
        load_hf.load_vision(part)
    assert str(e.value) == (f"cannot load {part}: 'bsq.basis' in model.safetensors is float32, but it is an integer "
                            "buffer: store it as int64")


def _poison(path, key, value):
    sd = load_file(str(path))
    sd[key] = sd[key].clone()
    sd[key].view(-1)[sd[key].numel() // 2] = value
    save_file(sd, str(path))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_an_error_naming_the_tensor(tmp_path, golden, monkeypatch, value):
    """NaN / inf weights would give `<unk>` answers and black images with exit code 0; they are an error naming
    the tensor, for the AR model and the decoder alike. UNIAR_SKIP_FINITE_CHECK=1 skips the check."""
    from test_sample import poisonable_key

    root = _checkpoint_copy(golden.dir, tmp_path)
    ar_key = poisonable_key(load_file(str(root / "model.safetensors")))  # a key this fixture's file holds
    _poison(root / "model.safetensors", ar_key, value)
    tr = root / "sd3_transformer" / "diffusion_pytorch_model.safetensors"
    key = sorted(load_file(str(tr)))[-1]
    _poison(tr, key, value)
    with pytest.raises(load_hf.CheckpointError) as e:
        load_hf.load_ar(root)
    assert str(e.value) == (f"cannot load {root}: NaN or inf values in '{ar_key}' in model.safetensors; the "
                            "checkpoint is damaged: download it again")
    with pytest.raises(load_hf.CheckpointError) as e:
        load_hf.load_decoder(root, cache_dir=tmp_path / "cache")
    assert str(e.value) == (f"cannot load {root / 'sd3_transformer'}: NaN or inf values in '{key}' in "
                            "diffusion_pytorch_model.safetensors; the checkpoint is damaged: download it again")
    monkeypatch.setenv("UNIAR_SKIP_FINITE_CHECK", "1")
    net, _ = load_hf.load_ar(root)
    bad = [k for k, t in net.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert bad, f"the poisoned {ar_key} was not loaded"


def test_overflow_on_conversion_is_named(tmp_path, golden):
    part = _copy_part(golden, tmp_path)
    _poison(part / "model.safetensors", "pos_embed.weight", 1e6)  # finite in float32, beyond float16's 65504
    load_hf.load_vision(part)
    with pytest.raises(load_hf.CheckpointError) as e:
        load_hf.load_vision(part, dtype=torch.float16)
    assert str(e.value) == (f"cannot load {part}: values beyond the range of float16 in 'pos_embed.weight' in "
                            "model.safetensors (they became inf on conversion); load in bfloat16 or float32")


def test_golden_dir_helper_points_at_fixtures():
    assert (golden_dir() / "golden.json").exists()


# ----- the key maps against the full-size manifests -----

def _manifest_cases():
    import decoder
    import model
    import text_encoders as TE

    return {
        "ar_model": (lambda: model.UniAR(model.UniARConfig()), load_hf.AR_KEYMAP),
        "bsq_encoder": (lambda: bsq.VisionModel(bsq.VisionConfig()), load_hf.KeyMap()),
        "sd3_transformer.sd35_medium": (lambda: decoder.MMDiT(decoder.MMDiTConfig.sd35_medium()), load_hf.KeyMap()),
        "sd3_transformer.sd3_medium": (lambda: decoder.MMDiT(decoder.MMDiTConfig.sd3_medium()), load_hf.KeyMap()),
        "vae": (lambda: decoder.VAE(decoder.VAEConfig()), load_hf.VAE_KEYMAP),
        "text_encoder.clip_l": (lambda: TE.CLIPTextModel(TE.CLIPTextConfig()), load_hf.KeyMap()),
        "text_encoder_2.clip_g": (lambda: TE.CLIPTextModel(TE.CLIPTextConfig.bigg()), load_hf.KeyMap()),
        "text_encoder_3.t5_xxl": (lambda: TE.T5Encoder(TE.T5Config()), load_hf.T5_KEYMAP),
    }


@pytest.mark.parametrize("name", list(_manifest_cases()))
def test_key_maps_account_for_every_manifest_key(name):
    from conftest import load_manifest

    factory, keymap = _manifest_cases()[name]
    module = load_hf.build_on_meta(factory)
    manifest = load_manifest(name)
    plan = load_hf.plan_load(load_hf.module_shapes(module), manifest, keymap, name)  # raises on any mismatch
    used = set(plan.values())
    assert all(k in used or keymap.dropped(k) for k in manifest), name
    assert set(plan) == set(load_hf.module_shapes(module))


def test_t5_tied_embedding_from_either_name():
    import text_encoders as TE

    module = load_hf.build_on_meta(lambda: TE.T5Encoder(TE.T5Config()))
    shapes = load_hf.module_shapes(module)
    for keep in ("shared.weight", "encoder.embed_tokens.weight"):
        other = ({"shared.weight", "encoder.embed_tokens.weight"} - {keep}).pop()
        plan = load_hf.plan_load(shapes, {k: v for k, v in shapes.items() if k != other}, load_hf.T5_KEYMAP)
        assert plan[other] == keep


# ----- the AR stage end to end through the public API -----

def test_e2e_indices_through_load_hf_and_generate_bits(golden):
    import pipeline

    net, tok = load_hf.load_ar(golden.dir)
    s = golden.scenario("e2e")
    ids, mask = tok.batch(s["rendered"])
    assert torch.equal(ids, golden["e2e.prefix_ids"]) and torch.equal(mask, golden["e2e.attention_mask"])
    bits = pipeline.generate_bits(net, tok, s["prompt"], ar_height=s["ar_height"], ar_width=s["ar_width"], cfg_scale=s["cfg"],
                               temperature=s["temperature"], seed=golden.seed("e2e.indices", "e2e"))
    assert torch.equal(bsq.bits_to_indexes(bits), golden["e2e.indices"])


def test_unknown_head_variant(tmp_path, golden):
    root = tmp_path / "ckpt"
    shutil.copytree(golden.dir, root, ignore=shutil.ignore_patterns("golden*", "sd3_*", "bsq_encoder"))
    sd = load_file(str(root / "model.safetensors"))
    last = sorted(k for k in sd if k.startswith("output_layer_vistok."))[-1]  # the fixture's head, any variant
    sd["output_layer_vistok.7.weight"] = sd.pop(last)
    save_file(sd, str(root / "model.safetensors"))
    with pytest.raises(load_hf.CheckpointError, match="unknown bit-head variant.*output_layer_vistok.7.weight"):
        load_hf.load_ar(root)


def test_missing_text_encoders_named(golden, tmp_path):
    with pytest.raises(load_hf.CheckpointError, match=r"sd3_pipeline: missing text_encoder/"):
        load_hf.load_decoder(golden.dir, cache_dir=tmp_path)


# ----- the project's own checkpoints (train.py / rl.py write the released layout) -----

def _toy_parts(tmp_path):
    import decoder
    import model
    import pipeline
    import toy

    torch.manual_seed(0)
    tok_dir = toy.save_tokenizer(tmp_path / "tok")
    tok = pipeline.Tokenizer(tok_dir)
    cfg = model.UniARConfig.tiny()
    cfg.text.vocab_size = tok.tk.get_vocab_size()
    cfg = model.UniARConfig(**{**cfg.__dict__, "image_token_id": tok.token_id(pipeline.IMAGE_PAD),
                               "vision_start_token_id": tok.token_id(pipeline.VISION_START),
                               "vision_end_token_id": tok.token_id(pipeline.VISION_END),
                               "video_token_id": tok.token_id("<|video_pad|>")})
    net = model.UniAR(cfg).eval()
    dec = decoder.Decoder.toy(net.visual).eval()
    return net, tok_dir, dec


def test_project_checkpoint_round_trip(tmp_path):
    import pipeline

    net, tok_dir, dec = _toy_parts(tmp_path)
    v = net.cfg.vision
    net.image_processor = pipeline.ImageProcessorConfig(min_pixels=3000, max_pixels=9000, patch_size=v.patch_size,
                                                        merge_size=v.spatial_merge_size)
    root = load_hf.save_checkpoint(tmp_path / "ckpt", ar=net, tokenizer_dir=tok_dir, vision=net.visual, decoder=dec,
                                   sample_defaults={"ar_size": [64, 64], "upsample": 1.0})
    net2, tok2 = load_hf.load_ar(root)
    assert net2.image_processor == net.image_processor  # preprocessor_config.json
    for (k, a), (_, b) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert torch.equal(a, b), k
    dec2 = load_hf.load_decoder(root)
    assert dec2.vae is None  # pixel space
    bits = pipeline.generate_bits(net2, tok2, "a red square at the top left", ar_height=64, ar_width=64, cfg_scale=2.0,
                               seed=0)
    kw = dict(upsampling_ratio=1.0, steps=2, guidance=1.5, seed=0)
    with torch.no_grad():
        assert torch.equal(dec.decode(bits, 64, 64, **kw), dec2.decode(bits, 64, 64, **kw))


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    net, tok_dir, dec = _toy_parts(tmp_path)
    root = load_hf.save_checkpoint(tmp_path / "ckpt", ar=net, tokenizer_dir=tok_dir)
    before = (root / "model.safetensors").read_bytes()

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(load_hf, "_write_weights", crash)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        load_hf.save_checkpoint(root, ar=net, tokenizer_dir=tok_dir)
    assert (root / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tok"]  # no temporary folder left behind


# ----- a save killed after its journal commit is finished before anything is read -----

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child (POSIX)")


def _killed_at(k: int, fn, log=None) -> bool:
    """fn in a forked child SIGKILLed at its k-th file-system call (tests/killpoints.py; k = 0: never, each call
    listed in the file `log`) -> whether it was killed."""
    import signal

    import killpoints

    pid = os.fork()
    if pid == 0:  # the child: no cleanup code runs, as after a real kill
        try:
            with open(log or os.devnull, "w") as f:
                killpoints.install(k, f)
                fn()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _files(folder) -> dict:
    """Every file under folder, hidden ones included -> its bytes."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(Path(folder).rglob("*")) if f.is_file()}


def _put(files: dict):
    """A writer of `files`: {name: bytes, or a file to link to}."""
    def write(folder):
        for name, data in files.items():
            (Path(folder) / name).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, Path):
                (Path(folder) / name).symlink_to(data)
            else:
                (Path(folder) / name).write_bytes(data)
    return write


@needs_fork
def test_sample_finishes_an_interrupted_save_before_reading(tmp_path, golden, capsys, monkeypatch):
    """A checkpoint saved again with new sample settings (uniar_sample.json: 4 decoder steps; the old one has none:
    the official 28), the save (files.replace_folder, what train.py's save_checkpoint writes through) killed at each of
    its file-system calls after the journal commit. sample.py finishes the switch before it reads anything, so it
    draws with the new settings; formerly it read uniar_sample.json first and drew with 28 steps. At the other kill
    points read_sample_settings alone (train.py --eval, rl.py) finishes the switch and reads the new settings."""
    import cli
    import decoder

    src = _checkpoint_copy(golden.dir, tmp_path)
    save_file({"prompt_embeds": golden["dec.pipe_prompt_embeds"], "pooled": golden["dec.pipe_pooled"]},
              str(src / "sd3_pipeline" / load_hf.PROMPT_EMBEDS_FILE))  # the decoder prompt without text encoders
    settings = json.dumps({"steps": 4}).encode()
    want = {**_files(src), cli.SAMPLE_JSON: settings}
    old = {n: src / n if len(data) > 2**16 else data for n, data in _files(src).items()}  # weights: links
    new = {**old, cli.SAMPLE_JSON: settings}
    assert cli.read_sample_settings(src)["steps"] == 28
    steps = []
    real = decoder.Decoder.decode
    monkeypatch.setattr(decoder.Decoder, "decode", lambda self, *a, **kw: steps.append(kw["steps"]) or
                        real(self, *a, **kw))
    root, log = tmp_path / "ckpt2", tmp_path / "calls.log"
    _put(old)(root)
    assert not _killed_at(0, lambda: files.replace_folder(root, _put(new)), log)  # the calls of a whole save
    calls = [line.split(" ", 2) for line in log.read_text().splitlines()]
    journal_tmp = "." + Path(files.JOURNAL).stem + "."  # the journal's temporary file (files.temp_name)
    k = next(int(n) for n, name, arg in calls if name == "replace" and Path(arg).name.startswith(journal_tmp))
    committed = runs = 0  # k: the journal's rename, the commit point; every later call is killed in turn
    while True:
        k += 1
        shutil.rmtree(root)
        _put(old)(root)
        if not _killed_at(k, lambda: files.replace_folder(root, _put(new))) or not (root / files.JOURNAL).is_file():
            break  # the switch was done before the kill
        committed += 1
        if committed == 1 or (runs == 1 and not (root / "config.json").exists()):  # nothing moved yet; half moved
            rc, out, err = _sample(root, tmp_path, capsys)
            assert rc == 0 and steps[-1] == 4, (k, rc, steps, err[-500:])
            runs += 1
        else:
            assert cli.read_sample_settings(root)["steps"] == 4, k
        assert _files(root) == want, k  # the switch finished; no journal, lock, staging folder or temporary file
    assert committed > 10 and runs == 2


def test_interrupted_save_in_a_folder_the_user_cannot_write(tmp_path, golden, capsys, monkeypatch):
    """An interrupted save must be finished before the checkpoint is read, which takes a lock file in the folder: in
    a folder the user cannot write that is one line saying so (formerly a PermissionError traceback). The lock is
    refused as a read-only folder refuses it to a user that permissions apply to (the suite runs as root too)."""
    import errno

    import cli

    root = _checkpoint_copy(golden.dir, tmp_path)

    def killed(*a, **k):
        raise KeyboardInterrupt  # as a kill right after the journal commit

    with monkeypatch.context() as m:
        m.setattr(files, "_finish_switch", killed)
        with pytest.raises(KeyboardInterrupt):
            files.replace_folder(root, _put({cli.SAMPLE_JSON: b'{"steps": 4}'}))
    assert (root / files.JOURNAL).is_file()
    def no_lock(folder, timeout=60.0):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(Path(folder) / files.LOCK))

    monkeypatch.setattr(files, "folder_lock", no_lock)
    rc, out, err = _sample(root, tmp_path, capsys)
    assert (rc, out, err) == (2, "", f"error: {root / files.JOURNAL}: a save into {root} was interrupted and must be "
                                     f"finished before the checkpoint can be read, but {root / files.LOCK} cannot be "
                                     f"written ({os.strerror(errno.EACCES)}); run this once as a user who may write "
                                     "the folder (or make it writable), or save the checkpoint again\n")


def _unusual_config(cfg):
    """The same weight shapes with every config value the forward reads changed away from the fixture's (and the
    defaults): rope_theta, eps, mrope section, deepstack order, position budget; a head variant other than it."""
    import dataclasses

    t, v = cfg.text, cfg.vision
    text = dataclasses.replace(t, rope_theta=12345.678, rms_norm_eps=t.rms_norm_eps * 3.7,
                               mrope_section=t.mrope_section[1:] + t.mrope_section[:1],
                               max_position_embeddings=t.max_position_embeddings + 7)
    vision = dataclasses.replace(v, deepstack_visual_indexes=tuple((i + 1) % v.depth
                                                                   for i in v.deepstack_visual_indexes))
    other = next(h for h in ("linear", "rmsnorm_linear") if h != cfg.head_variant)
    return dataclasses.replace(cfg, text=text, vision=vision, vistok_mlp_dim=cfg.vistok_mlp_dim + 1)\
        .with_head_variant(other)


def test_ar_checkpoint_round_trip_keeps_every_config_field(tmp_path, golden):
    """save_checkpoint writes every config field (an unusual rope_theta, mrope section, head variant, vision fields,
    ...) into config.json, load_ar reads back an equal config, the same weights and generation_config.json, and the
    reloaded model's logits on the golden prompt are bit-identical (and differ from the fixture config's)."""
    import dataclasses

    import model

    base, _ = load_hf.load_ar(golden.dir)
    cfg = _unusual_config(base.cfg)
    torch.manual_seed(0)
    net = model.UniAR(cfg).eval()
    head = {k for k in net.state_dict() if k.startswith("output_layer_vistok.")}
    missing, unexpected = net.load_state_dict(base.state_dict(), strict=False)
    assert set(missing) == head and all(k.startswith("output_layer_vistok.") for k in unexpected)
    tok_dir = tmp_path / "tok"
    shutil.copytree(golden.dir, tok_dir, ignore=shutil.ignore_patterns("golden*", "sd3_*", "bsq_encoder", "model*",
                                                                        "config.json"))
    added = {t["content"]: t["id"] for t in json.loads((tok_dir / "tokenizer.json").read_text())["added_tokens"]}
    ends = [added["<|im_end|>"], added["<|endoftext|>"]]  # as in Qwen3-VL's generation_config.json
    (tok_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": ends}))
    root = load_hf.save_checkpoint(tmp_path / "ckpt", ar=net, tokenizer_dir=tok_dir)

    raw = json.loads((root / "config.json").read_text())
    plain = lambda x: list(x) if isinstance(x, tuple) else x  # noqa: E731
    for f in dataclasses.fields(cfg.text):
        got = raw["text_config"]["rope_scaling"] if f.name == "mrope_section" else raw["text_config"]
        assert got[f.name] == plain(getattr(cfg.text, f.name)), f.name
    for f in dataclasses.fields(cfg.vision):
        assert raw["vision_config"][f.name] == plain(getattr(cfg.vision, f.name)), f.name
    for f in dataclasses.fields(cfg):
        if f.name not in ("text", "vision"):
            assert raw[f.name] == getattr(cfg, f.name), f.name

    net2, tok2 = load_hf.load_ar(root)
    assert net2.cfg == cfg and net2.language_model.cfg == cfg.text and net2.visual.cfg == cfg.vision
    assert net2.cfg.head_variant == cfg.head_variant != base.cfg.head_variant
    sd, sd2 = net.state_dict(), net2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert set(ends) <= set(tok2.end_ids)
    args = (golden["und.input_ids"], None, golden["vision.patches"], golden["vision.grid_thw"])
    with torch.no_grad():
        logits = net.text_logits(*args)
        assert torch.equal(net2.text_logits(*args), logits)
        assert (logits - base.text_logits(*args)).abs().max() > 1e-3  # the changed config matters
        bits = golden["t2i.codes"]
        tf_args = (golden["t2i.prefix_ids"][:1], golden["t2i.attention_mask"][:1], bits, (bits.shape[1], 1))
        assert torch.equal(net2.teacher_forced_logits(*tf_args), net.teacher_forced_logits(*tf_args))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="reads and resets /proc "
                    "counters (Linux only)")
def test_load_memory_benchmark_runs():
    """`python bench.py load-memory` loads a synthetic checkpoint in a fresh process and prints its peak memory and
    the load times with and without the finiteness check."""
    import re
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "bench.py"), "load-memory", "--gib", "0.02", "--dtype",
                          "bfloat16"], capture_output=True, text=True, check=True, cwd=ROOT).stdout.splitlines()
    assert len(out) == 3, out
    assert re.fullmatch(r"synthetic checkpoint 0\.06 GiB \(1 x Linear\(4096, 4096\), float32\) loaded as bfloat16: "
                        r"peak RSS above baseline \d+\.\d\d GiB = \d+\.\d{3} x file size .*", out[0]), out[0]
    assert all(re.fullmatch(r"  load.* onto cpu \(best of 3\): \d+\.\d{3} s without the finiteness check, \d+\.\d{3} s "
                            r"with it \([+-]\d+%\)", line) for line in out[1:]), out[1:]
