"""load_hf.py: strict, memory-mapped loading of the released layout, and clear errors for bad checkpoints."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import bsq
import load_hf
from conftest import golden_dir


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
    m = load_hf.load_vision(golden.dir, dtype=torch.bfloat16)
    assert m.pos_embed.weight.dtype == torch.bfloat16 and m.bsq.basis.dtype == torch.int64


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
    with pytest.raises(load_hf.CheckpointError, match="checkpoint folder not found.*\n.*expected layout"):
        load_hf.load_vision(tmp_path / "nowhere")
    with pytest.raises(load_hf.CheckpointError, match="part 'bsq_encoder' not found"):
        load_hf.load_vision(tmp_path)


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


def test_invalid_config_value(tmp_path, golden):
    part = _copy_part(golden, tmp_path)
    cfg = json.loads((part / "config.json").read_text())
    cfg["bsq_dim"] = 32
    (part / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(load_hf.CheckpointError, match="bsq_dim 32"):
        load_hf.load_vision(part)


def test_golden_dir_helper_points_at_fixtures():
    assert (golden_dir() / "golden.json").exists()
