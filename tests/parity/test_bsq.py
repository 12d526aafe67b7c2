"""The shared visual tokenizer (bsq.py) against the official outputs (`bsq.*`, `vision.*`), closed forms written
here in float64, and the manifests."""
import dataclasses
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import bsq
import pipeline as P
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

def quantizer_weights(golden) -> tuple[float, float]:
    """(gamma0, gamma) of the recorded quantizer, as golden.json states them (`bsq.train.loss`: "gamma0=1, gamma=0.5"
    in the shipped sets, the released quantizer's; a weight a description leaves out is the released one)."""
    text = golden.meta["tensors"]["bsq.train.loss"]["what"] + " " + golden.meta["tensors"]["bsq.z"]["what"]
    found = {k: float(v) for k, v in re.findall(r"\b(gamma0?)\s*=\s*(\d*\.?\d+(?:[eE][+-]?\d+)?)", text)}
    return found.get("gamma0", 1.0), found.get("gamma", 0.5)


def test_bsq_quantizer_loss_and_gradient(golden):
    z_in = F.normalize(golden["bsq.z"], dim=-1).requires_grad_(True)  # the quantizer's (unit-norm) input
    gamma0, gamma = quantizer_weights(golden)
    q = bsq.BSQ(z_in.shape[-1], gamma0=gamma0, gamma=gamma)
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


def test_sign_of_zero_is_minus_one_everywhere(tower):
    """Documented convention: sign(0) = -1 (bit 0), for +0.0 and -0.0, in the quantiser, the index and the tower."""
    d = tower.cfg.bsq_dim
    z = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.25, -3.0]).requires_grad_(True)
    q = bsq.bsq_sign(z)
    assert q.tolist() == [-1.0, -1.0, 1.0, -1.0, 1.0, -1.0]
    q.sum().backward()
    assert z.grad.tolist() == [1.0] * 6  # straight-through: d q / d z = 1, also at 0
    zq, _, info = bsq.BSQ(d)(torch.zeros(3, d))
    assert torch.equal(zq, torch.full((3, d), -1 / math.sqrt(d)))
    assert torch.equal(info["bits"], torch.zeros(3, d, dtype=torch.int64))
    assert torch.equal(bsq.codes_to_indexes(torch.zeros(d)), bsq.bits_to_indexes(torch.zeros(d, dtype=torch.int64)))
    # a level whose input projection outputs exactly 0 on the odd code coordinates: the eval path and the training
    # path read bit 0 there (the even coordinates stay random, away from the index quirk of the all-zero code)
    m = bsq.VisionModel(tower.cfg).eval()
    m.load_state_dict(tower.state_dict())
    lvl = tower.cfg.levels - 1
    with torch.no_grad():
        m.input_proj(lvl).linear_fc2.weight[1::2] = 0
        m.input_proj(lvl).linear_fc2.bias[1::2] = 0
        n = m.cfg.merge_unit * 3
        x = torch.randn(n, m.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
        bits = m.quantize_level(x, lvl)[0]
        assert not bits[:, 1::2].any() and bits[:, 2::2].any()
        bits = m.training_forward(*_image(m)).bits[:, lvl]
        assert not bits[..., 1::2].any() and bits[..., 2::2].any()


def _image(m):
    """Patch rows of a random image of 2 x 3 merged tokens, and its grid, for tower `m`."""
    c = m.cfg
    gh, gw = 2 * c.spatial_merge_size, 3 * c.spatial_merge_size
    pv = torch.randn(gh * gw, c.patch_dim, generator=torch.Generator().manual_seed(3))
    return pv, torch.tensor([[1, gh, gw]])


def entropy_closed_form(z, gamma0, gamma, zeta, inv_temperature):
    """The BSQ soft entropy penalty written from its definition in float64: each bit's code c in {-1, +1}/sqrt(d)
    has q(c | z) = softmax_c(-inv_temperature * (z - c)^2); H_sample = mean over samples of the summed per-bit
    entropies; H_codebook = summed entropies of the sample-averaged q;
    penalty = zeta (gamma0 H_sample - gamma H_codebook) / inv_temperature."""
    d = z.shape[-1]
    z = z.double().reshape(-1, d)
    c = torch.tensor([-1.0, 1.0], dtype=torch.float64) / math.sqrt(d)
    q = torch.softmax(-inv_temperature * (z[..., None] - c) ** 2, dim=-1)  # (N, d, 2)
    h_sample = -torch.special.xlogy(q, q).sum((-1, -2)).mean()
    avg = q.mean(0)
    h_codebook = -torch.special.xlogy(avg, avg).sum()
    return zeta * (gamma0 * h_sample - gamma * h_codebook) / inv_temperature, h_sample, h_codebook


@pytest.mark.parametrize("gamma0, gamma, zeta, inv_t", [(1.0, 0.5, 1.0, 1.0), (0.7, 1.3, 2.0, 3.0),
                                                        (1.0, 0.5, 1.0, 0.25)])
def test_entropy_loss_equals_closed_form(golden, tower, gamma0, gamma, zeta, inv_t):
    """bsq_entropy_loss (value and gradient) equals the float64 closed form, for any weights and temperature."""
    d = tower.cfg.bsq_dim
    z = F.normalize(torch.randn(3, 7, d, generator=torch.Generator().manual_seed(0)), dim=-1).requires_grad_(True)
    got = bsq.bsq_entropy_loss(z, gamma0, gamma, zeta, inv_t)
    z64 = z.detach().double().requires_grad_(True)
    want = entropy_closed_form(z64, gamma0, gamma, zeta, inv_t)
    scale = want[1].item()  # the terms are O(d ln 2); the penalty is their difference
    for name, a, b in zip(("penalty", "per_sample", "codebook"), got, want):
        assert abs(a.item() - b.item()) <= 2e-6 * scale, (name, a.item(), b.item())
    got[0].backward()
    want[0].backward()
    assert_close_rel(z.grad, z64.grad, 1e-5, "entropy gradient")
    # the quantiser's loss is the same penalty (beta = 0) on the golden input
    zg = F.normalize(golden["bsq.z"], dim=-1)
    loss = bsq.BSQ(zg.shape[-1], gamma0, gamma, zeta)(zg)[1]
    ref = entropy_closed_form(zg, gamma0, gamma, zeta, 1.0)[0].item()
    assert abs(loss.item() - ref) <= 2e-6 * zg.shape[-1]


def test_entropy_loss_limits(tower):
    """Saturated bits: per-sample entropy 0; bits used half the time each: codebook entropy d ln 2; a constant code:
    codebook entropy 0; z = 0 (every bit undecided): both d ln 2."""
    d = tower.cfg.bsq_dim
    signs = torch.where(torch.randint(0, 2, (5, d), generator=torch.Generator().manual_seed(1)) > 0, 1.0, -1.0)
    z = signs / math.sqrt(d)
    balanced = torch.cat([z, -z])  # every bit is +1 in exactly half the samples
    pen, h_s, h_cb = bsq.bsq_entropy_loss(balanced, 1.0, 0.5, 2.0, inv_temperature=1e4)  # saturating temperature
    assert abs(h_s.item()) <= 1e-6
    assert abs(h_cb.item() - d * math.log(2)) <= 1e-5 * d
    assert abs(pen.item() - 2.0 * (0 - 0.5 * d * math.log(2)) / 1e4) <= 1e-8 * d
    _, h_s, h_cb = bsq.bsq_entropy_loss(z[:1].expand(4, d), inv_temperature=1e4)  # one code repeated
    assert abs(h_s.item()) <= 1e-6 and abs(h_cb.item()) <= 1e-6
    _, h_s, h_cb = bsq.bsq_entropy_loss(1000 * balanced)  # saturated by magnitude at temperature 1
    assert abs(h_s.item()) <= 1e-6 and abs(h_cb.item() - d * math.log(2)) <= 1e-5 * d
    pen, h_s, h_cb = bsq.bsq_entropy_loss(torch.zeros(4, d), 1.0, 0.5, 1.0)
    for h in (h_s, h_cb):
        assert abs(h.item() - d * math.log(2)) <= 1e-5 * d
    assert abs(pen.item() - 0.5 * d * math.log(2)) <= 1e-5 * d


# ----- preprocessing (the tokenizer's input: bsq.smart_resize, bsq.patch_rows; images read by pipeline.py) -----

def test_preprocess_matches_processor_rows(golden):
    img = golden["vision.image_uint8"].numpy()
    v = golden.config["vision_config"]
    pv, grid = P.preprocess_image(img, resize=False, patch_size=v["patch_size"], merge_size=v["spatial_merge_size"],
                                  temporal_patch_size=v["temporal_patch_size"])
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
        pv, grid = P.preprocess_image(img, min_pixels=4096, max_pixels=40960)
        assert torch.equal(grid, ref["image_grid_thw"]), (h, w)
        assert (pv - ref["pixel_values"]).abs().max().item() < 1e-5, (h, w)


def test_preprocess_forced_size():
    """size=(H, W) is a PIL bicubic resize to exactly H x W, then the no-resize path (checked against the golden)."""
    from PIL import Image

    img = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    pv, grid = P.preprocess_image(img, size=(64, 96))
    resized = np.asarray(Image.fromarray(img).resize((96, 64), resample=Image.BICUBIC))
    want_pv, want_grid = P.preprocess_image(resized, resize=False)
    assert grid.tolist() == [[1, 4, 6]] == want_grid.tolist()
    assert torch.equal(pv, want_pv)


def _over_white(rgb, alpha):
    """Alpha over white, by hand, in exact integers: round(c a / 255 + 255 (1 - a / 255)) (never a tie)."""
    rgb, alpha = rgb.astype(np.int64), alpha.astype(np.int64)[..., None]
    return ((2 * (255 * 255 - alpha * (255 - rgb)) + 255) // 510).astype(np.uint8)


def test_rgba_is_composited_over_white():
    """RGBA (numpy uint8, numpy float in [0, 1], PIL) -> RGB = alpha over white, pixel for pixel, through
    load_image and preprocess_image; also for images whose composite is dark (all values <= 1)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (64, 96, 4), dtype=np.uint8)
    rgba[0, :4] = [[10, 200, 0, 0], [10, 200, 0, 255], [10, 200, 0, 128], [255, 0, 17, 1]]
    want = _over_white(rgba[..., :3], rgba[..., 3])
    assert want[0, :4].tolist() == [[255, 255, 255], [10, 200, 0], [132, 227, 127], [255, 254, 254]]
    assert np.array_equal(P.load_image(rgba), want)
    assert np.array_equal(P.load_image(Image.fromarray(rgba, mode="RGBA")), want)
    pv, _ = P.preprocess_image(rgba, resize=False)
    assert torch.equal(pv, P.preprocess_image(want, resize=False)[0])
    assert pv[0, 0].item() == (want[0, 0, 0] / 255 - 0.5) / 0.5 == 1.0  # transparent corner -> white
    # float RGBA in [0, 1]: the same composite on the [0, 1] scale
    f = rgba.astype(np.float64) / 255
    want_f = np.clip(np.round((f[..., :3] * f[..., 3:] + (1 - f[..., 3:])) * 255), 0, 255).astype(np.uint8)
    assert np.array_equal(P.load_image(f), want_f)
    # a dark opaque image stays dark (values 0 and 1, not rescaled as if it were a [0, 1] float image)
    dark = np.zeros((64, 64, 4), np.uint8)
    dark[..., 3] = 255
    dark[::2, :, 0] = 1
    assert np.array_equal(P.load_image(dark), dark[..., :3])


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


def test_training_loss_is_the_per_level_composition(golden, tower):
    """training_forward's loss = sum over levels of the closed-form BSQ penalty of
    L2-normalise_over_the_code_axis(input_proj(level)(tower state)); its LLM features are the golden ones."""
    pv, grid = golden["vision.patches"], golden["vision.grid_thw"]
    gamma0, gamma, zeta = 1.0, 0.5, 1.0  # the released quantiser's weights (golden `bsq.*`), beta = 0
    with torch.no_grad():
        main, deep, dec, loss, bits = tower.training_forward(pv, grid)
        states = tower.tower(pv, grid)
        assert len(states) == tower.cfg.levels
        want = 0.0
        for lvl, x in enumerate(states):
            y = tower.input_proj(lvl)(x).double()  # (Np, d)
            z = y / y.norm(dim=-1, keepdim=True)
            want += entropy_closed_form(z, gamma0, gamma, zeta, 1.0)[0].item()
            assert torch.equal(bits[:, lvl].reshape(-1, tower.cfg.bsq_dim), (z > 0).long()), lvl
    assert abs(loss.item() - want) <= 1e-6 * tower.cfg.levels * tower.cfg.bsq_dim, (loss.item() - want, want)
    assert_close_rel(main, golden["vision.merged"], RTOL, "merged")
    for k, dk in enumerate(deep):
        assert_close_rel(dk, golden[f"vision.deepstack.{k}"], RTOL, f"deepstack.{k}")
    with torch.no_grad():
        assert_close_rel(dec, tower.bits_to_decoder_features(bits), RTOL, "decoder features")


def _record_output_proj_inputs(m):
    """Hooks recording every input of each level's output projection: {level: [codes, ...]}."""
    seen = {lvl: [] for lvl in range(m.cfg.levels)}
    handles = [m.output_proj(lvl).register_forward_pre_hook(
        lambda mod, args, lvl=lvl: seen[lvl].append(args[0].detach().clone())) for lvl in range(m.cfg.levels)]
    return seen, handles


def test_bit_flips_reach_only_the_decoder_features(golden, tower):
    """flip_prob flips code bits of the decoder branch only: LLM features, bits and loss equal the no-flip run
    exactly; the decoder branch reads codes negated in about flip_prob of the bits (binomial bound), and its
    features are the decoder features of exactly those flipped bits."""
    pv, grid = golden["vision.patches"], golden["vision.grid_thw"]
    c = tower.cfg
    p = 0.2
    seen, handles = _record_output_proj_inputs(tower)
    try:
        with torch.no_grad():
            clean = tower.training_forward(pv, grid)
            clean_in = {lvl: v[:] for lvl, v in seen.items()}
            for v in seen.values():
                v.clear()
            noisy = tower.training_forward(pv, grid, flip_prob=p, generator=torch.Generator().manual_seed(0))
            again = tower.training_forward(pv, grid, flip_prob=p, generator=torch.Generator().manual_seed(0))
    finally:
        for h in handles:
            h.remove()
    main, deep, dec, loss, bits = noisy
    assert torch.equal(main, clean[0]) and all(torch.equal(a, b) for a, b in zip(deep, clean[1]))
    assert torch.equal(loss, clean[3]) and torch.equal(bits, clean[4])
    assert torch.equal(dec, again[2])  # the generator makes the flips reproducible
    flipped, n, n_flip = [], 0, 0
    for lvl in range(c.levels):
        ref = clean_in[lvl][0]
        assert all(torch.equal(r, ref) for r in clean_in[lvl]), "without flips every branch reads the same codes"
        calls = seen[lvl][:len(seen[lvl]) // 2]  # the first of the two identical runs
        changed = [r for r in calls if not torch.equal(r, ref)]
        assert len(changed) == 1 and len(calls) == 2, f"level {lvl}: one branch (the decoder's) must read flips"
        r = changed[0]
        assert torch.equal(r.abs(), ref.abs()), "a flip negates the code, nothing else"
        flip = (r > 0) != (ref > 0)
        flipped.append((r > 0).long().view(-1, c.merge_unit, c.bsq_dim))
        n, n_flip = n + flip.numel(), n_flip + flip.sum().item()
    assert abs(n_flip - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (n_flip, n * p)
    with torch.no_grad():
        want = tower.bits_to_decoder_features(torch.stack(flipped, dim=1))
    assert_close_rel(dec, want, RTOL, "decoder features of the flipped bits")
    assert (dec - clean[2]).abs().max() > 1e-3 * clean[2].abs().max()  # the flips change the features


# ----- full-size shapes -----

def test_full_size_keys_match_manifests():
    with torch.device("meta"):
        m = bsq.VisionModel(bsq.VisionConfig())
    got = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert got == load_manifest("bsq_encoder")
    ar = load_manifest("ar_model")
    assert got == {k[len("model.visual."):]: v for k, v in ar.items() if k.startswith("model.visual.")}


def test_config_reads_released_format(golden):
    """Every VisionConfig field written in bsq_encoder/config.json is read as written (lists as tuples), the
    derived sizes follow, and the separately packaged encoder has the AR root's vision config."""
    raw = read_json(golden.dir / "bsq_encoder" / "config.json")
    cfg = bsq.VisionConfig.from_dict(raw)
    read = 0
    for f in dataclasses.fields(cfg):
        if f.name in raw:
            v = raw[f.name]
            assert getattr(cfg, f.name) == (tuple(v) if isinstance(v, list) else v), f.name
            read += 1
    assert read >= 10  # the sizes are in the file, not taken from the defaults
    assert cfg.levels == 1 + len(raw["deepstack_visual_indexes"])
    assert cfg.merge_unit == raw["spatial_merge_size"] ** 2
    assert cfg.patch_dim == raw["in_channels"] * raw["temporal_patch_size"] * raw["patch_size"] ** 2
    assert cfg == bsq.VisionConfig.from_dict(golden.config["vision_config"])


# ----- bad input -----

def test_bad_images(tmp_path):
    from PIL import Image

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        P.preprocess_image(bad)
    with pytest.raises(ValueError, match="not found"):
        P.preprocess_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="zero size"):
        P.preprocess_image(np.zeros((0, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="smaller than one merged patch"):
        P.preprocess_image(np.zeros((20, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="aspect ratio 201.0 exceeds 200"):
        P.preprocess_image(np.zeros((32, 32 * 201, 3), np.uint8))
    nan = np.full((64, 64, 3), 0.5, np.float32)
    nan[3, 4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        P.preprocess_image(nan)
    # grayscale and RGBA are converted to RGB
    gray = Image.fromarray(np.full((64, 64), 200, np.uint8), mode="L")
    pv_gray, _ = P.preprocess_image(gray, resize=False)
    rgb = Image.fromarray(np.full((64, 64, 3), 200, np.uint8))
    assert torch.equal(pv_gray, P.preprocess_image(rgb, resize=False)[0])
    rgba = np.zeros((64, 64, 4), np.uint8)  # fully transparent -> white
    pv_rgba, _ = P.preprocess_image(Image.fromarray(rgba, mode="RGBA"), resize=False)
    assert torch.equal(pv_rgba, torch.ones_like(pv_rgba))


def test_bad_tensors(tower):
    """Inside the model the tensors' invariants are asserts (the user's images are checked where they are read)."""
    cfg = tower.cfg
    with pytest.raises(AssertionError, match="patch rows"):
        tower(torch.zeros(8, cfg.patch_dim), torch.tensor([[1, 4, 4]]))
    with pytest.raises(AssertionError, match="pixel_values must be"):
        tower(torch.zeros(16, 7), torch.tensor([[1, 4, 4]]))
    x = torch.zeros(16, cfg.patch_dim)
    x[0, 0] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        tower(x, torch.tensor([[1, 4, 4]]))
    with pytest.raises(AssertionError, match="must end in"):
        tower.bits_to_llm_features(torch.zeros(2, cfg.levels, cfg.merge_unit, cfg.bsq_dim + 1))
