"""The shared visual tokenizer (bsq.py) against the official outputs (`bsq.*`, `vision.*`) and the manifests."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import bsq
from conftest import assert_close_rel, load_manifest, read_json

RTOL = 1e-5


@pytest.fixture(scope="module")
def tower(golden):
    """The vision tower of the AR checkpoint root (model.visual.*), configured from config.json."""
    cfg = bsq.VisionConfig.from_dict(golden.config["vision_config"])
    m = bsq.VisionModel(cfg).eval()
    sd = load_file(str(golden.dir / "model.safetensors"))
    m.load_state_dict({k[len("model.visual."):]: v for k, v in sd.items() if k.startswith("model.visual.")},
                      strict=True)
    return m


# ----- BSQ conventions -----

def test_bsq_quantizer_loss_and_gradient(golden):
    z_in = F.normalize(golden["bsq.z"], dim=-1).requires_grad_(True)  # the quantizer's (unit-norm) input
    q = bsq.BSQ(z_in.shape[-1], gamma0=1.0, gamma=0.5)
    zq, loss, info = q(z_in)
    assert torch.equal(zq, golden["bsq.train.zq"])
    assert_close_rel(loss.reshape(1), golden["bsq.train.loss"], RTOL, "loss")
    assert_close_rel(info["codebook_entropy"].reshape(1), golden["bsq.train.cb_entropy"], RTOL, "cb_entropy")
    ((zq * golden["bsq.upstream_grad"]).sum() + loss).backward()
    assert_close_rel(z_in.grad, golden["bsq.input_grad"], RTOL, "input_grad")
    assert torch.equal(info["bits"], golden["bsq.group_indices"])


def test_bsq_indices(golden):
    codes = golden["bsq.train.zq"]
    assert torch.equal(bsq.codes_to_indexes(codes), golden["bsq.indices"])
    assert torch.equal(bsq.indexes_to_codes(golden["bsq.indices"]), golden["bsq.indexes_to_codes"])
    bits = (codes > 0).long()
    assert torch.equal(bsq.bits_to_indexes(bits), golden["bsq.indices"])
    assert torch.equal(bsq.indexes_to_bits(golden["bsq.indices"]), bits)


def test_index_wraparound_conventions():
    # the first bit is the int64 sign bit: bits 1000...0 -> INT64_MIN, 0111...1 -> INT64_MAX
    top = torch.zeros(64, dtype=torch.int64)
    top[0] = 1
    assert bsq.bits_to_indexes(top).item() == -(2**63)
    assert bsq.bits_to_indexes(1 - top).item() == 2**63 - 1
    assert bsq.bits_to_indexes(torch.ones(64, dtype=torch.int64)).item() == -1
    # released quirk, kept on purpose: indices 0 and INT64_MIN come back with the first bit inverted
    assert bsq.indexes_to_bits(torch.tensor(0))[0].item() == 1
    assert bsq.indexes_to_bits(torch.tensor(-(2**63)))[0].item() == 0
    # every other code round-trips
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2, (1000, 64), generator=g)
    assert torch.equal(bsq.indexes_to_bits(bsq.bits_to_indexes(bits)), bits)


# ----- preprocessing -----

def test_preprocess_matches_processor_rows(golden):
    img = golden["vision.image_uint8"].numpy()
    pv, grid = bsq.preprocess_image(img, resize=False)
    assert torch.equal(grid, golden["vision.grid_thw"])
    assert_close_rel(pv, golden["vision.patches"], RTOL, "patches")


def test_preprocess_resize_matches_qwen2vl_processor():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor, smart_resize
    from PIL import Image

    proc = Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3, min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 40)
    rng = np.random.default_rng(0)
    for h, w in [(70, 150), (300, 90), (64, 64), (1000, 1200)]:
        assert bsq.smart_resize(h, w, 32, 4096, 40960) == smart_resize(h, w, 32, 4096, 40960)
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = proc(images=Image.fromarray(img), return_tensors="pt")
        pv, grid = bsq.preprocess_image(img, min_pixels=4096, max_pixels=40960)
        assert torch.equal(grid, ref["image_grid_thw"]), (h, w)
        assert (pv - ref["pixel_values"]).abs().max().item() < 1e-5, (h, w)


def test_preprocess_forced_size():
    img = np.zeros((50, 70, 3), np.uint8)
    pv, grid = bsq.preprocess_image(img, size=(64, 96))
    assert grid.tolist() == [[1, 4, 6]] and pv.shape == (24, 1536)


# ----- the vision tower -----

def test_tower_features_and_bits(golden, tower):
    with torch.no_grad():
        main, deep = tower(golden["vision.patches"], golden["vision.grid_thw"])
        bits = tower.encode_bits(golden["vision.patches"], golden["vision.grid_thw"])
    assert_close_rel(main, golden["vision.merged"], RTOL, "merged")
    assert len(deep) == tower.cfg.levels - 1
    for k, d in enumerate(deep):
        assert_close_rel(d, golden[f"vision.deepstack.{k}"], RTOL, f"deepstack.{k}")
    for lvl in range(tower.cfg.levels):
        assert torch.equal(bits[:, lvl].reshape(bits.shape[0], -1), golden[f"vision.bits.{lvl}"]), lvl


def test_generated_bits_read_back_like_encoded_ones(golden, tower):
    """The shared context: re-embedding bits gives exactly what the understanding path feeds the LLM."""
    with torch.no_grad():
        bits = tower.encode_bits(golden["vision.patches"], golden["vision.grid_thw"])
        main, deep = tower.bits_to_llm_features(bits.float()[None])  # any dtype, any leading dims
    assert_close_rel(main, golden["vision.merged"], RTOL, "merged")
    for k, d in enumerate(deep):
        assert_close_rel(d, golden[f"vision.deepstack.{k}"], RTOL, f"deepstack.{k}")


def test_decoder_features_interleave_levels(tower):
    L, U, d, C = tower.cfg.levels, tower.cfg.merge_unit, tower.cfg.bsq_dim, tower.cfg.hidden_size
    bits = torch.randint(0, 2, (2, 3, L, U, d), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f = tower.bits_to_decoder_features(bits)
        codes = bsq.bits_to_codes(bits)
        ref = torch.stack([tower.output_proj(lvl)(codes[:, :, lvl].reshape(-1, d)) for lvl in range(L)], -1)
    assert f.shape == (2, 3, U, C * L)
    assert torch.equal(f.reshape(-1, C, L), ref.reshape(-1, C, L))  # channel c * L + l


def test_training_forward_gradients_reach_the_tower(golden, tower):
    m = bsq.VisionModel(tower.cfg)
    m.load_state_dict(tower.state_dict())
    main, deep, dec, loss, bits = m.training_forward(golden["vision.patches"], golden["vision.grid_thw"])
    assert torch.equal(bits, m.encode_bits(golden["vision.patches"], golden["vision.grid_thw"]))
    (main.square().mean() + dec.square().mean() + loss).backward()
    for name in ["bsq_input_proj.linear_fc2.weight", "blocks.0.attn.qkv.weight", "patch_embed.proj.weight"]:
        g = m.get_parameter(name).grad
        assert g is not None and g.abs().sum() > 0, name


# ----- full-size shapes -----

def test_full_size_keys_match_manifests():
    with torch.device("meta"):
        m = bsq.VisionModel(bsq.VisionConfig())
    got = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert got == load_manifest("bsq_encoder")
    ar = load_manifest("ar_model")
    assert got == {k[len("model.visual."):]: v for k, v in ar.items() if k.startswith("model.visual.")}


def test_config_reads_released_format(golden):
    cfg = bsq.VisionConfig.from_dict(read_json(golden.dir / "bsq_encoder" / "config.json"))
    assert cfg.levels == 1 + len(read_json(golden.dir / "bsq_encoder" / "config.json")["deepstack_visual_indexes"])


# ----- bad input -----

def test_bad_images(tmp_path):
    from PIL import Image

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        bsq.preprocess_image(bad)
    with pytest.raises(ValueError, match="not found"):
        bsq.preprocess_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="zero size"):
        bsq.preprocess_image(np.zeros((0, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="smaller than one merged patch"):
        bsq.preprocess_image(np.zeros((20, 64, 3), np.uint8))
    nan = np.full((64, 64, 3), 0.5, np.float32)
    nan[3, 4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        bsq.preprocess_image(nan)
    # grayscale and RGBA are converted to RGB
    gray = Image.fromarray(np.full((64, 64), 200, np.uint8), mode="L")
    pv_gray, _ = bsq.preprocess_image(gray, resize=False)
    rgb = Image.fromarray(np.full((64, 64, 3), 200, np.uint8))
    assert torch.equal(pv_gray, bsq.preprocess_image(rgb, resize=False)[0])
    rgba = np.zeros((64, 64, 4), np.uint8)  # fully transparent -> white
    pv_rgba, _ = bsq.preprocess_image(Image.fromarray(rgba, mode="RGBA"), resize=False)
    assert torch.equal(pv_rgba, torch.ones_like(pv_rgba))


def test_bad_tensors(tower):
    cfg = tower.cfg
    with pytest.raises(ValueError, match="patch rows"):
        tower(torch.zeros(8, cfg.patch_dim), torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match=r"pixel_values must be"):
        tower(torch.zeros(16, 7), torch.tensor([[1, 4, 4]]))
    x = torch.zeros(16, cfg.patch_dim)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tower(x, torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="must end in"):
        tower.bits_to_llm_features(torch.zeros(2, cfg.levels, cfg.merge_unit, cfg.bsq_dim + 1))
