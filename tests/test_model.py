"""Parity of model.py (the unified AR model) with the official outputs in the golden fixtures.

Sizes, seeds and settings come from the fixture folder (config.json, golden.json), never from constants.
"""
import re

import pytest
import torch
from safetensors.torch import load_file

import bsq
import model as M
from conftest import load_manifest

TOL = 1e-4  # absolute, float32


@pytest.fixture(scope="module")
def cfg(golden):
    return M.UniARConfig.from_dict(golden.config)


@pytest.fixture(scope="module")
def ar(golden, cfg):
    m = M.UniAR(cfg)
    m.load_state_dict(load_file(str(golden.dir / "model.safetensors")), strict=True)
    return m.eval()


@pytest.fixture(scope="module")
def tok(golden):
    return M.Tokenizer(golden.dir)


def seed_of(golden, name: str, scenario: str | None = None) -> int:
    """The seed set right before the call: from the scenario settings, else from the tensor's description."""
    if scenario and scenario in golden.meta and "seed" in golden.meta[scenario]:
        return int(golden.meta[scenario]["seed"])
    return int(re.search(r"manual_seed\((\d+)\)", golden.meta["tensors"][name]["what"]).group(1))


def out_grid(pos_ids_all: torch.Tensor, n: int) -> tuple[int, int]:
    """The generated image's token grid (h, w), read from the h/w axes of its position ids (last n entries)."""
    p = pos_ids_all[:, 0, -n:]
    return int(p[1].max() - p[1].min()) + 1, int(p[2].max() - p[2].min()) + 1


def abs_err(a, e):
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    return (a.double() - e.double()).abs().max().item()


# ----- structure -----

def meta_model(variant: str) -> M.UniAR:
    with torch.device("meta"):
        return M.UniAR(M.UniARConfig().with_head_variant(variant))


def test_full_size_keys_and_shapes_match_manifest():
    manifest = load_manifest("ar_model")
    variant = M.head_variant_from_keys(manifest)
    sd = meta_model(variant).state_dict()
    got = {k: list(v.shape) for k, v in sd.items()}
    assert sorted(set(got) ^ set(manifest)) == []
    bad = {k: (got[k], manifest[k]) for k in manifest if got[k] != manifest[k]}
    assert bad == {}


def test_other_head_variants_key_sets():
    manifest = load_manifest("ar_model")
    base = {k for k in manifest if not k.startswith("output_layer_vistok.")}
    D = M.TextConfig().hidden_size
    O = M.UniARConfig().head_out
    mid = M.UniARConfig().vistok_mlp_dim
    expected = {
        "linear": {"output_layer_vistok.weight": [O, D]},
        "rmsnorm_linear": {"output_layer_vistok.0.weight": [D], "output_layer_vistok.1.weight": [O, D]},
        "rmsnorm_mlp": {"output_layer_vistok.0.weight": [D], "output_layer_vistok.1.weight": [mid, D],
                        "output_layer_vistok.3.weight": [O, mid]},
    }
    for variant, head in expected.items():
        sd = meta_model(variant).state_dict()
        assert set(sd) == base | set(head), variant
        assert {k: list(sd[k].shape) for k in head} == head, variant
        assert M.head_variant_from_keys(sd) == variant


def test_config_from_dict(golden, cfg):
    c = golden.config
    assert cfg.text.hidden_size == c["text_config"]["hidden_size"]
    assert cfg.text.mrope_section == tuple(c["text_config"]["rope_scaling"]["mrope_section"])
    assert cfg.vision.deepstack_visual_indexes == tuple(c["vision_config"]["deepstack_visual_indexes"])
    assert cfg.image_token_id == c["image_token_id"]
    assert cfg.visual_transformer_decoder_depth == c["visual_transformer_decoder_depth"]
    d = dict(c, vistok_pred_use_mlp=True, vistok_pred_layernorm=False, some_unknown_key=1)
    assert M.UniARConfig.from_dict(d).head_variant == "rmsnorm_mlp"
    d = dict(c, vistok_pred_use_mlp=False, vistok_pred_layernorm=False)
    assert M.UniARConfig.from_dict(d).head_variant == "linear"
    assert M.head_variant_from_keys(load_file(str(golden.dir / "model.safetensors"))) == cfg.head_variant
    M.UniAR(M.UniARConfig.tiny())  # the preset builds


# ----- understanding -----

def test_understanding_logits(golden, ar):
    logits = ar.text_logits(golden["und.input_ids"], None, golden["vision.patches"], golden["vision.grid_thw"])
    assert abs_err(logits, golden["und.logits"]) <= TOL


def test_text_decode_cached_equals_recompute(golden, ar, tok):
    args = (ar, golden["und.input_ids"], None, golden["vision.patches"], golden["vision.grid_thw"])
    greedy = M.generate_text(*args, max_new_tokens=6)
    assert greedy == M.generate_text(*args, max_new_tokens=6, use_cache=False)
    assert greedy[0][0] == int(golden["und.logits"][0, -1].argmax())
    # stops at a stop token (kept in the output)
    assert M.generate_text(*args, max_new_tokens=6, stop_ids=[greedy[0][0]]) == [greedy[0][:1]]
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    sampled = M.generate_text(*args, max_new_tokens=6, temperature=1.0, generator=g1)
    assert sampled == M.generate_text(*args, max_new_tokens=6, temperature=1.0, generator=g2, use_cache=False)
    assert isinstance(M.answer(ar, tok, golden["vision.image_uint8"].numpy(), "what?", max_new_tokens=3), str)


# ----- positions -----

@pytest.mark.parametrize("scenario", ["t2i", "edit", "e2e"])
def test_rope_index(golden, ar, cfg, scenario):
    ids, mask = golden[f"{scenario}.prefix_ids"], golden[f"{scenario}.attention_mask"]
    pos = golden[f"{scenario}.pos_ids_all"]
    n = pos.shape[-1] - ids.shape[1]
    gh, gw = out_grid(pos, n)
    grid = torch.cat([golden["vision.grid_thw"]] * ids.shape[0]) if scenario == "edit" else None
    ids_all, mask_all, grids = ar.append_image_placeholders(ids, mask, n, gh, gw, grid)
    assert torch.equal(M.get_rope_index(ids_all, grids, mask_all, cfg), pos)


# ----- text-to-image -----

@pytest.mark.parametrize("vd_cache", [True, False])
def test_t2i_exact(golden, ar, vd_cache):
    sc = golden.scenario("t2i")
    torch.manual_seed(seed_of(golden, "t2i.codes", "t2i"))
    out = M.generate_image(ar, golden["t2i.prefix_ids"], golden["t2i.attention_mask"], sc["ar_height"],
                           sc["ar_width"], cfg=sc["cfg"], temperature=sc["temperature"],
                           visual_decoder_cache=vd_cache, return_step_logits=True)
    assert torch.equal(out.bits, golden["t2i.codes"])
    assert torch.equal(out.indices, golden["t2i.indices"])
    assert abs_err(out.step_logits, golden["t2i.step_logits"]) <= TOL


def test_visual_decoder_cache_equals_recompute(golden, ar):
    """Same logits with and without the visual-decoder KV cache, here on a fresh seed and without guidance."""
    sc = golden.scenario("t2i")
    outs = []
    for vd_cache in (True, False):
        out = M.generate_image(ar, golden["t2i.prefix_ids"], golden["t2i.attention_mask"], sc["ar_height"],
                               sc["ar_width"], cfg=1.0, temperature=sc["temperature"], visual_decoder_cache=vd_cache,
                               generator=torch.Generator().manual_seed(123), return_step_logits=True)
        outs.append(out)
    assert torch.equal(outs[0].bits, outs[1].bits)
    assert abs_err(outs[0].step_logits, outs[1].step_logits) <= 1e-5


def test_teacher_forced_logits(golden, ar):
    codes = golden["t2i.codes"]
    ids, mask = golden["t2i.prefix_ids"][:1], golden["t2i.attention_mask"][:1]
    gh, gw = out_grid(golden["t2i.pos_ids_all"], codes.shape[1])
    logits = ar.teacher_forced_logits(ids, mask, codes, (gh, gw))
    assert abs_err(logits, golden["t2i.teacher_forced_logits"]) <= TOL
    # and it equals the conditional row's generation logits (before guidance)
    step = golden["t2i.step_logits"][:1].view(logits.shape)
    assert abs_err(logits, step) <= TOL


# ----- editing -----

def test_edit_exact(golden, ar):
    ids, mask = golden["edit.prefix_ids"], golden["edit.attention_mask"]
    pos, codes = golden["edit.pos_ids_all"], golden["edit.codes"]
    gh, gw = out_grid(pos, codes.shape[1])
    sc = golden.meta.get("edit", golden.scenario("t2i"))  # golden.json records the edit call with t2i's settings
    ds = M.UniARConfig.from_dict(golden.config).downsample
    pv = torch.cat([golden["vision.patches"]] * ids.shape[0])
    grid = torch.cat([golden["vision.grid_thw"]] * ids.shape[0])
    torch.manual_seed(seed_of(golden, "edit.codes", "edit"))
    out = M.generate_image(ar, ids, mask, gh * ds, gw * ds, cfg=sc["cfg"], temperature=sc["temperature"],
                           pixel_values=pv, image_grid_thw=grid, return_step_logits=True)
    assert torch.equal(out.bits, codes)
    # teacher forcing with the input image in the prefix gives the conditional row's generation logits
    n_rows = codes.shape[0]
    n_patches = golden["vision.patches"].shape[0]
    tf = ar.teacher_forced_logits(ids[:n_rows], mask[:n_rows], codes, (gh, gw), pv[: n_rows * n_patches],
                                  grid[:n_rows])
    assert abs_err(tf, out.step_logits[:n_rows].view(tf.shape)) <= TOL


# ----- from text -----

def test_e2e_prompt_to_indices(golden, ar, tok):
    sc = golden.scenario("e2e")
    ds = ar.cfg.downsample
    gh, gw = sc["ar_height"] // ds, sc["ar_width"] // ds
    texts = [M.render_generation_prompt(sc["prompt"], gh, gw), M.render_generation_prompt("", gh, gw)]
    assert texts == sc["rendered"]
    ids, mask = tok.batch(texts)
    assert torch.equal(ids, golden["e2e.prefix_ids"])
    assert torch.equal(mask, golden["e2e.attention_mask"])
    assert (ids[mask == 0] == tok.pad_id).all()
    bits = M.generate_bits(ar, tok, [sc["prompt"]], ar_height=sc["ar_height"], ar_width=sc["ar_width"],
                           cfg=sc["cfg"], temperature=sc["temperature"], seed=seed_of(golden, "e2e.indices", "e2e"))
    assert torch.equal(bsq.bits_to_indexes(bits), golden["e2e.indices"])


def test_edit_from_prompt_and_image(golden, ar, tok):
    """The high-level edit path: every row carries the input image (resized to the AR size), seeded runs repeat."""
    sc = golden.scenario("e2e")
    v = ar.cfg.vision
    img = golden["vision.image_uint8"].numpy()
    ids, mask, pv, grid = M.build_generation_batch(ar, tok, [sc["prompt"]], sc["ar_height"], sc["ar_width"],
                                                   sc["cfg"], [img])
    n_tokens = (sc["ar_height"] // ar.cfg.downsample) * (sc["ar_width"] // ar.cfg.downsample)
    assert ((ids == ar.cfg.image_token_id).sum(1) == n_tokens).all()  # input image at the AR size, in every row
    assert pv.shape[0] == ids.shape[0] * n_tokens * v.merge_unit
    kw = dict(ar_height=sc["ar_height"], ar_width=sc["ar_width"], cfg=sc["cfg"], temperature=sc["temperature"],
              seed=0, input_images=[img])
    a = M.generate_bits(ar, tok, [sc["prompt"]], **kw)
    torch.manual_seed(0)
    b = M.generate_image(ar, ids, mask, sc["ar_height"], sc["ar_width"], cfg=sc["cfg"], temperature=sc["temperature"],
                         pixel_values=pv, image_grid_thw=grid).bits
    assert torch.equal(a, b)


# ----- bad input -----

def test_bad_inputs(golden, ar, tok):
    sc = golden.scenario("t2i")
    ids, mask = golden["t2i.prefix_ids"], golden["t2i.attention_mask"]
    H, W = sc["ar_height"], sc["ar_width"]
    ds = ar.cfg.downsample
    budget = ar.cfg.text.max_position_embeddings
    long = torch.zeros(2, budget, dtype=torch.int64)
    with pytest.raises(ValueError, match="position budget"):
        M.generate_image(ar, long, torch.ones_like(long), H, W, cfg=sc["cfg"])
    with pytest.raises(ValueError, match=f"multiples of {ds}"):
        M.generate_image(ar, ids, mask, H + ds // 2, W, cfg=sc["cfg"])
    with pytest.raises(ValueError, match=f"multiples of {ds}"):
        M.generate_bits(ar, tok, ["x"], ar_height=H, ar_width=W - 1)
    with pytest.raises(ValueError, match="cfg must be >= 1"):
        M.generate_image(ar, ids, mask, H, W, cfg=0.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        M.generate_image(ar, ids, mask, H, W, cfg=sc["cfg"], temperature=0.0)
    # an image where none is expected: pixels for a prompt without placeholders, placeholders without pixels
    with pytest.raises(ValueError, match="none is expected"):
        M.generate_image(ar, ids, mask, H, W, cfg=sc["cfg"], pixel_values=golden["vision.patches"],
                         image_grid_thw=golden["vision.grid_thw"])
    with pytest.raises(ValueError, match="no pixel_values"):
        M.generate_image(ar, golden["edit.prefix_ids"], golden["edit.attention_mask"], H, W, cfg=sc["cfg"])
    with pytest.raises(ValueError, match="prompts must be"):
        M.generate_bits(ar, tok, [], ar_height=H, ar_width=W)
    with pytest.raises(ValueError, match="bits must be"):
        ar.teacher_forced_logits(ids[:1], mask[:1], golden["t2i.codes"][:, :1], out_grid(golden["t2i.pos_ids_all"],
                                                                                        golden["t2i.codes"].shape[1]))


@pytest.mark.parametrize("variant", M.HEAD_VARIANTS)
def test_head_variants_generation_matches_teacher_forcing(golden, cfg, variant):
    """Every bit-head variant: cached rollout == recompute rollout, and teacher forcing on its bits gives its logits."""
    torch.manual_seed(0)
    m = M.UniAR(cfg.with_head_variant(variant)).eval()
    sc = golden.scenario("t2i")
    ids, mask = golden["t2i.prefix_ids"], golden["t2i.attention_mask"]
    outs = [M.generate_image(m, ids, mask, sc["ar_height"], sc["ar_width"], cfg=1.0, visual_decoder_cache=c,
                             generator=torch.Generator().manual_seed(1), return_step_logits=True) for c in (True, False)]
    assert torch.equal(outs[0].bits, outs[1].bits)
    assert abs_err(outs[0].step_logits, outs[1].step_logits) <= 1e-5
    gh, gw = out_grid(golden["t2i.pos_ids_all"], outs[0].bits.shape[1])
    tf = m.teacher_forced_logits(ids, mask, outs[0].bits, (gh, gw))
    assert abs_err(tf, outs[0].step_logits.view(tf.shape)) <= TOL
