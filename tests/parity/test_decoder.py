"""decoder.py: parity with the official decoder outputs (golden `dec.*`), with diffusers / transformers on tiny random
configs, full-size key manifests, the prompt cache, the toy configuration and bad input."""
import copy
import dataclasses
import functools
import json
import math
import os
import re

import pytest
import torch
from conftest import load_manifest, read_json
from safetensors.torch import load_file

import bsq
import decoder
import load_hf
import pipeline
import text_encoders

ATOL = 1e-4  # absolute for values up to 16 in magnitude (the shipped fixtures' stay below 13), relative beyond: _tol


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------

def _max_err(a, b):
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.double() - b.double()).abs().max().item()


def _tol(expected, atol=ATOL):
    """atol for expected values up to 16 in magnitude, the same relative bound beyond: float32 rounding grows with
    the values, and another fixture set may have larger latents or velocities than the shipped ones."""
    return atol * max(1.0, expected.double().abs().max().item() / 16)


def _seed(golden):
    """The decoder sampling's seed: the `dec` settings, else the description of its noise (conftest.Golden.seed)."""
    return golden.seed("dec.pipe_noise", "dec")


def _load(module, path, keep=lambda k: True):
    sd = load_file(str(path))
    module.load_state_dict({k: v for k, v in sd.items() if keep(k)}, strict=True)
    return module.eval()


@pytest.fixture(scope="module")
def parts(golden):
    """The decoder built by hand from the golden parts with plain strict state-dict loads (independent of load_hf)."""
    d = golden.dir
    vision = _load(bsq.VisionModel(bsq.VisionConfig.from_dict(read_json(d / "bsq_encoder" / "config.json"))),
                   d / "bsq_encoder" / "model.safetensors")
    tr = _load(decoder.MMDiT(decoder.MMDiTConfig.from_dict(read_json(d / "sd3_transformer" / "config.json"))),
               d / "sd3_transformer" / "diffusion_pytorch_model.safetensors")
    vd = d / "sd3_pipeline" / "vae"
    vae = _load(decoder.VAE(decoder.VAEConfig.from_dict(read_json(vd / "config.json"))),
                vd / "diffusion_pytorch_model.safetensors", lambda k: k.startswith("decoder."))
    sch = decoder.SchedulerConfig.from_dict(read_json(d / "sd3_pipeline" / "scheduler" / "scheduler_config.json"))
    dec = decoder.Decoder(vision, tr, vae, sch, golden["dec.pipe_prompt_embeds"], golden["dec.pipe_pooled"]).eval()
    return dec


def test_load_hf_decoder_equals_hand_built(golden, parts):
    """load_hf.load_decoder (meta build, output projections only, VAE encoder half dropped) decodes identically."""
    s = golden.scenario("dec")
    dec = load_hf.load_decoder(golden.dir, prompt_embeds=(golden["dec.pipe_prompt_embeds"], golden["dec.pipe_pooled"]))
    assert dec.vision.patch_embed.proj.weight.is_meta  # only the output projections were read
    kw = dict(upsampling_ratio=s["upsampling_ratio"], steps=s["steps"], guidance=s["guidance_scale"],
              seed=_seed(golden), output="float")
    got = dec.decode(golden["dec.indices"], s["ar_height"], s["ar_width"], **kw)
    assert _max_err(got, golden["dec.pipe_image"]) <= _tol(golden["dec.pipe_image"])


def _ar_grid(golden, dec):
    s = golden.scenario("dec")
    P = dec.vision.cfg.patch_size
    return s, (s["ar_height"] // P, s["ar_width"] // P)


def _random_bits(vision, n_tokens, batch=1, seed=0):
    c = vision.cfg
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (batch, n_tokens, c.levels, c.merge_unit, c.bsq_dim), generator=g)


# ---------------------------------------------------------------------------------------------------------------------
# golden parity (official decoder outputs)
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["dec.indices", "dec.bits"])
def test_condition_matches_golden(golden, parts, source):
    s, _ = _ar_grid(golden, parts)
    with torch.no_grad():
        cond = decoder.bits_to_condition(parts.vision, golden[source], s["ar_height"], s["ar_width"])
    err = _max_err(cond, golden["dec.siglip_tensor"])
    assert err <= _tol(golden["dec.siglip_tensor"]), f"conditioning from {source}: max abs err {err:.3e}"


def test_pos_embed_table_equals_checkpoint(golden, parts):
    cfg = parts.transformer.cfg
    sd = load_file(str(golden.dir / "sd3_transformer" / "diffusion_pytorch_model.safetensors"))
    table = decoder.sincos_2d_table(cfg.inner_dim, cfg.pos_embed_max_size, cfg.sample_size / cfg.patch_size)
    assert _max_err(table[None], sd["pos_embed.pos_embed"]) <= 1e-6


def test_transformer_forward_matches_golden(golden, parts):
    _, grid = _ar_grid(golden, parts)
    feats = golden["dec.siglip_tensor"]
    cond = torch.cat([feats, torch.zeros_like(feats)])  # as recorded: siglip = [features, zeros]
    with torch.no_grad():
        out = parts.transformer(golden["dec.tr_latents_in"], golden["dec.tr_prompt_embeds"], golden["dec.tr_pooled"],
                                golden["dec.tr_timestep"], cond, grid)
    err = _max_err(out, golden["dec.tr_out"])
    assert err <= _tol(golden["dec.tr_out"]), f"transformer output: max abs err {err:.3e}"
    if grid[0] == grid[1]:  # without the grid the official inference applies (square when token counts differ)
        with torch.no_grad():
            again = parts.transformer(golden["dec.tr_latents_in"], golden["dec.tr_prompt_embeds"],
                                      golden["dec.tr_pooled"], golden["dec.tr_timestep"], cond)
        assert torch.equal(again, out)


def test_sampled_latents_match_golden(golden, parts):
    s, grid = _ar_grid(golden, parts)
    lat = parts.sample_latents(golden["dec.siglip_tensor"], grid, (s["height"], s["width"]), steps=s["steps"],
                               guidance=s["guidance_scale"], noise=golden["dec.pipe_noise"])
    err = _max_err(lat, golden["dec.pipe_latents"])
    assert err <= _tol(golden["dec.pipe_latents"]), f"{s['steps']}-step latents: max abs err {err:.3e}"


def test_decode_from_indices_matches_golden_image(golden, parts):
    """End to end: indices -> condition -> noise from the seed -> Euler with guidance -> VAE -> image."""
    s, _ = _ar_grid(golden, parts)
    kw = dict(upsampling_ratio=s["upsampling_ratio"], steps=s["steps"], guidance=s["guidance_scale"],
              seed=_seed(golden))
    img = parts.decode(golden["dec.indices"], s["ar_height"], s["ar_width"], output="float", **kw)
    assert (s["height"], s["width"]) == tuple(img.shape[-2:])
    err = _max_err(img, golden["dec.pipe_image"])
    assert err <= _tol(golden["dec.pipe_image"]), f"decoded image: max abs err {err:.3e}"
    u8 = parts.decode(golden["dec.indices"], s["ar_height"], s["ar_width"], **kw)
    # the conversion contract, exactly: uint8 (B, H, W, 3) = round(own float image * 255)
    assert u8.dtype == torch.uint8
    assert torch.equal(u8, (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1))
    # against the golden image: equal, except where the golden value lies within the float error just measured
    # (<= ATOL) of a rounding boundary k + 0.5; there the float error may flip the rounding, by one level at most
    gold = golden["dec.pipe_image"].double().permute(0, 2, 3, 1) * 255
    gold_u8 = gold.round().to(torch.int64)
    near = ((gold - gold.floor() - 0.5).abs() <= 255 * err + 1e-4)  # (+ float32 rounding of img * 255)
    assert near.float().mean().item() < 0.01  # the exemption is a handful of pixels, not the image
    diff = (u8.to(torch.int64) - gold_u8).abs()
    assert diff[~near].max().item() == 0, f"{int((diff[~near] > 0).sum())} pixels off away from a rounding boundary"
    assert diff.max().item() <= 1


def test_vae_decode_matches_golden_image(golden, parts):
    err = _max_err(parts.latents_to_image(golden["dec.pipe_latents"]), golden["dec.pipe_image"])
    assert err <= _tol(golden["dec.pipe_image"]), f"VAE decode: max abs err {err:.3e}"


# ---------------------------------------------------------------------------------------------------------------------
# conditioning layout and non-square grids
# ---------------------------------------------------------------------------------------------------------------------

def test_condition_layout_on_non_square_grid(parts):
    """2x2 blocks land at raster (2 bi + dy, 2 bj + dx), levels interleaved per channel, for a 3x2 block grid."""
    vision = parts.vision
    c = vision.cfg
    unit = c.patch_size * c.spatial_merge_size
    bh, bw = 3, 2
    bits = _random_bits(vision, bh * bw, batch=2)
    with torch.no_grad():
        cond = decoder.bits_to_condition(vision, bits, bh * unit, bw * unit)
        feats = vision.bits_to_decoder_features(bits)  # (B, N, U, C*L)
    gw = bw * c.spatial_merge_size
    for n in range(bh * bw):
        bi, bj = divmod(n, bw)
        for m in range(c.merge_unit):
            dy, dx = divmod(m, c.spatial_merge_size)
            r, col = bi * c.spatial_merge_size + dy, bj * c.spatial_merge_size + dx
            assert torch.equal(cond[:, r * gw + col], feats[:, n, m])


RATIOS = (1.5, 2.0, 1.25, 1.75, 1.0, *(1 + k / 1000 for k in range(1, 1001)))  # preferred ones first


def _ratios(dec, ar_height: int, ar_width: int):
    """The upsampling ratios the decoder accepts for this AR size (an output size on its grid, within its position
    table), preferred ones first: which ones depends on the fixture's patch, VAE and transformer sizes."""
    for r in RATIOS:
        try:
            pipeline.decoder_output_size(dec, ar_height, ar_width, r)
        except ValueError:
            continue
        yield r


def _non_square_case(parts) -> tuple[int, int, float]:
    """(AR height, AR width, upsampling ratio): a non-square AR grid (3 x 2 merged tokens at ratio 1.5 where the
    decoder allows it) whose output token grid differs from the AR patch grid, so that the condition is resampled,
    and fits the decoder's position table."""
    vc, tr = parts.vision.cfg, parts.transformer.cfg
    unit = vc.patch_size * vc.spatial_merge_size
    for bh, bw in ((3, 2), (2, 1), (1, 2), (2, 3), (3, 1)):
        for ratio in _ratios(parts, bh * unit, bw * unit):
            H, W = pipeline.decoder_output_size(parts, bh * unit, bw * unit, ratio)
            tok = (H // parts.scale // tr.patch_size, W // parts.scale // tr.patch_size)
            if tok != (bh * unit // vc.patch_size, bw * unit // vc.patch_size):
                return bh * unit, bw * unit, ratio
    raise AssertionError("no non-square AR size with a resampled condition fits this decoder")


def test_non_square_upsampling_equals_resampled_condition(golden, parts):
    """A non-square AR grid resampled inside the transformer gives exactly what the official transformer computes
    when handed the condition already on the token grid (its only working non-square path)."""
    tr = parts.transformer
    vc = parts.vision.cfg
    unit = vc.patch_size * vc.spatial_merge_size
    ar_h, ar_w, ratio = _non_square_case(parts)
    H, W = pipeline.decoder_output_size(parts, ar_h, ar_w, ratio)
    bits = _random_bits(parts.vision, (ar_h // unit) * (ar_w // unit), seed=1)
    grid = (ar_h // vc.patch_size, ar_w // vc.patch_size)
    tok = (H // parts.scale // tr.cfg.patch_size, W // parts.scale // tr.cfg.patch_size)
    assert grid[0] != grid[1] and tok != grid
    with torch.no_grad():
        cond = decoder.bits_to_condition(parts.vision, bits, ar_h, ar_w)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, tr.cfg.in_channels, H // parts.scale, W // parts.scale, generator=g)
        t = golden["dec.tr_timestep"][:1]
        pe, pooled = golden["dec.tr_prompt_embeds"][:1], golden["dec.tr_pooled"][:1]
        ours = tr(x, pe, pooled, t, cond, grid)
        ref_cond = torch.nn.functional.interpolate(cond.reshape(1, *grid, -1).permute(0, 3, 1, 2), size=tok,
                                                   mode="bicubic", align_corners=False)
        ref_cond = ref_cond.permute(0, 2, 3, 1).reshape(1, tok[0] * tok[1], -1)
        ref = tr(x, pe, pooled, t, ref_cond)  # areas equal -> no resampling needed
        base = tr(x, pe, pooled, t, torch.zeros_like(cond), grid)
    assert torch.equal(ours, ref)
    assert _max_err(ours, base) > 1e-3 * base.abs().max().item(), "the condition must change the output"
    img = parts.decode(bits, ar_h, ar_w, upsampling_ratio=ratio, steps=1, guidance=1.5, seed=0)
    assert img.shape == (1, H, W, 3)


# ---------------------------------------------------------------------------------------------------------------------
# scheduler and flow matching
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 4, 14, 28])
def test_sigmas_equal_diffusers_scheduler(golden, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    conf = read_json(golden.dir / "sd3_pipeline" / "scheduler" / "scheduler_config.json")
    ref = FlowMatchEulerDiscreteScheduler.from_config(conf)
    ref.set_timesteps(steps)
    sigmas, timesteps = decoder.flow_sigmas(decoder.SchedulerConfig.from_dict(conf), steps)
    assert torch.equal(sigmas, ref.sigmas) and torch.equal(timesteps, ref.timesteps)


def test_flow_matching_loss_is_the_rectified_flow_objective():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    seen = {}

    def perfect(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return eps - x0

    assert decoder.flow_matching_loss(perfect, x0, sigma, eps).item() == 0.0
    s = sigma.view(-1, 1, 1, 1)
    assert torch.allclose(seen["x_t"], (1 - s) * x0 + s * eps) and torch.allclose(seen["t"], sigma * 1000)
    zero = decoder.flow_matching_loss(lambda x, t: torch.zeros_like(x), x0, sigma, eps)
    assert torch.allclose(zero, ((eps - x0) ** 2).mean())
    # Euler with the exact velocity transports noise (sigma 1) to x0 (sigma 0) for any schedule
    sig, ts = decoder.flow_sigmas(decoder.SchedulerConfig(), 5)
    out = decoder.euler_sample(lambda x, t: eps - x0, eps.clone(), sig, ts)
    assert _max_err(out, x0) < 1e-5


def test_flow_matching_loss_sample_prediction_targets_x0():
    """prediction_type="sample": the target is x0 (an exact x0 predictor has loss 0, a zero predictor mean x0^2)."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    assert decoder.flow_matching_loss(lambda x, t: x0, x0, sigma, eps, prediction_type="sample").item() == 0.0
    zero = decoder.flow_matching_loss(lambda x, t: torch.zeros_like(x), x0, sigma, eps, prediction_type="sample")
    assert abs(zero.item() - (x0.double() ** 2).mean().item()) <= 1e-6


class _X0Oracle(torch.nn.Module):
    """A stand-in transformer for prediction_type="sample": predicts the true x0, offset by `off` on the guidance
    rows with a zero condition and by off (g - 1) / g on the conditioned rows, so only the guided combination
    u + g (c - u) is exactly x0."""

    def __init__(self, cfg, x0, off, g):
        super().__init__()
        self.cfg, self.x0, self.off, self.g = cfg, x0, off, g
        self.proj_out = torch.nn.Linear(1, 1)  # the decoder reads the model dtype from here
        self.calls = 0

    def forward(self, x, prompt_embeds, pooled, t, cond=None, cond_grid=None):
        self.calls += 1
        is_uncond = (cond.flatten(1) == 0).all(1).view(-1, 1, 1, 1)
        shift = self.off * ((self.g - 1) / self.g if self.g > 1 else 0.0)
        return self.x0 + torch.where(is_uncond, self.off, shift)


@pytest.mark.parametrize("steps, guidance", [(1, 1.0), (3, 2.0), (None, None)])
def test_x0_prediction_euler_with_exact_x0_reaches_x0(golden, parts, steps, guidance):
    """Decoder with prediction_type="sample": an exact x0 predictor (guided) carries the noise to x0 in any number
    of Euler steps (v = (x - x0_hat) / sigma makes every step land on the line to x0, and the last sigma is 0)."""
    s, grid = _ar_grid(golden, parts)
    steps, guidance = steps or s["steps"], guidance or s["guidance_scale"]
    cfg = dataclasses.replace(parts.transformer.cfg, prediction_type="sample")
    noise = golden["dec.pipe_noise"]
    x0 = torch.randn(noise.shape, generator=torch.Generator().manual_seed(1))
    oracle = _X0Oracle(cfg, x0, 0.7, guidance)
    dec = decoder.Decoder(parts.vision, oracle, parts.vae, parts.scheduler, parts.prompt_embeds, parts.pooled)
    lat = dec.sample_latents(golden["dec.siglip_tensor"], grid, (s["height"], s["width"]), steps=steps,
                             guidance=guidance, noise=noise)
    assert oracle.calls == steps
    assert _max_err(lat, x0) <= 1e-5 * x0.abs().max().item()
    # the same oracle read as a velocity (the released path) does not land on x0
    vel = decoder.Decoder(parts.vision, _X0Oracle(parts.transformer.cfg, x0, 0.7, guidance), parts.vae,
                          parts.scheduler, parts.prompt_embeds, parts.pooled)
    assert _max_err(vel.sample_latents(golden["dec.siglip_tensor"], grid, (s["height"], s["width"]), steps=steps,
                                       guidance=guidance, noise=noise), x0) > 0.1


def test_x0_prediction_velocity_is_x_minus_x0_over_sigma(golden, parts):
    """With the real transformer: the sample-prediction velocity is (x - [u + g (c - u)]) / sigma, sigma = t / T,
    where u, c are the raw outputs with a zero and with the real condition."""
    s, grid = _ar_grid(golden, parts)
    tr = copy.deepcopy(parts.transformer)
    tr.cfg = dataclasses.replace(tr.cfg, prediction_type="sample")
    dec = decoder.Decoder(parts.vision, tr, parts.vae, parts.scheduler, parts.prompt_embeds, parts.pooled).eval()
    cond, x = golden["dec.siglip_tensor"], golden["dec.pipe_noise"]
    t = golden["dec.tr_timestep"][0]
    g = s["guidance_scale"]
    with torch.no_grad():
        v = dec.velocity_fn(cond, grid, g)(x, t)
        pe, pooled = parts.prompt_embeds, parts.pooled
        u = parts.transformer(x, pe, pooled, t.expand(1), torch.zeros_like(cond), grid).double()
        c = parts.transformer(x, pe, pooled, t.expand(1), cond, grid).double()
    sigma = t.double() / parts.scheduler.num_train_timesteps
    want = (x.double() - (u + g * (c - u))) / sigma
    assert _max_err(v, want) <= 1e-5 * want.abs().max().item()


def test_condition_dropout_keeps_a_row_with_probability_1_minus_p(golden, parts):
    """drop_image_token_prob_for_cfg = p (training only): each row's whole condition is zeroed with probability p
    and kept unchanged otherwise; the keep count of B rows is within 5 binomial std of B (1 - p)."""
    p, B = 0.3, 3000
    tr = copy.deepcopy(parts.transformer)
    tr.cfg = dataclasses.replace(tr.cfg, drop_image_token_prob_for_cfg=p)
    Dc = tr.cfg.siglip_channels
    grid = (2, 3)
    cond = torch.randn(B, grid[0] * grid[1], Dc, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = tr.eval().condition(cond, grid, grid)  # eval: never dropped
        assert full.flatten(1).abs().amax(1).min() > 0
        with torch.random.fork_rng():
            torch.manual_seed(0)  # train.py seeds the global generator for this draw
            out = tr.train().condition(cond, grid, grid)
            torch.manual_seed(0)
            out2 = tr.condition(cond, grid, grid)
    kept = (out == full).flatten(1).all(1)
    dropped = (out == 0).flatten(1).all(1)
    assert torch.equal(kept, ~dropped), "every row is either kept unchanged or dropped entirely"
    assert torch.equal(out, out2)  # reproducible under the global seed
    n = kept.sum().item()
    assert abs(n - B * (1 - p)) <= 5 * math.sqrt(B * p * (1 - p)), (n, B * (1 - p))


# ---------------------------------------------------------------------------------------------------------------------
# reference libraries on tiny random configs
# ---------------------------------------------------------------------------------------------------------------------

def _perturb(module, seed, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def test_vae_decoder_matches_diffusers():
    from diffusers import AutoencoderKL

    ref = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=1.3, shift_factor=0.1)
    _perturb(ref, 0, 0.1)
    ours = decoder.VAE(decoder.VAEConfig.from_dict(dict(ref.config)))
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k.startswith("decoder.")}, strict=True)
    z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expect = ref.decode(z).sample
        got = ours.decoder(z)
        img = ours.decode(z)
        expect_img = (ref.decode(z / 1.3 + 0.1).sample / 2 + 0.5).clamp(0, 1)
    assert _max_err(got, expect) <= 1e-5 and _max_err(img, expect_img) <= 1e-5


def _hf_clip(vocab, eos_token_id, hidden, proj, act, seed):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=proj,
                         num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77, hidden_act=act,
                         eos_token_id=eos_token_id, bos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    return _perturb(CLIPTextModelWithProjection(cfg), seed, 0.1)


def _hf_t5(vocab, seed, max_distance=128, d_model=32):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", relative_attention_max_distance=max_distance, dropout_rate=0.0)
    torch.manual_seed(seed)
    return _perturb(T5EncoderModel(cfg), seed, 0.1)


@pytest.mark.parametrize("eos_token_id, act", [(2, "quick_gelu"), (40, "gelu")])
def test_clip_matches_transformers(eos_token_id, act):
    ref = _hf_clip(48, eos_token_id, 16, 12, act, seed=eos_token_id)
    ours = text_encoders.CLIPTextModel(text_encoders.CLIPTextConfig.from_dict(ref.config.to_dict()))
    ours.load_state_dict(ref.state_dict(), strict=True)
    ids = torch.randint(3, 40, (2, 77), generator=torch.Generator().manual_seed(2))
    ids[0, 9:], ids[1, 30:] = 40, 40  # EOS then EOS padding (CLIP-L style); 40 is also the largest id
    ids[1, 31:] = 0 if eos_token_id == 40 else 40
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        hs, emb = ours(ids)
    assert _max_err(hs, out.hidden_states[-2]) <= 1e-5 and _max_err(emb, out.text_embeds) <= 1e-5


def test_t5_matches_transformers():
    ref = _hf_t5(50, seed=3, max_distance=20)  # short max_distance: the logarithmic and clamped buckets are used
    ours = text_encoders.T5Encoder(text_encoders.T5Config.from_dict(ref.config.to_dict()))
    ours.load_state_dict(ref.state_dict(), strict=True)
    ids = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        err = _max_err(ours(ids), ref(ids).last_hidden_state)
    assert err <= 1e-5


PROMPT_WORDS = decoder.DECODER_PROMPT.lower().replace(".", " .").split()


def _write_tokenizer(folder, specials, pad, bos, eos, max_length):
    """A tiny word-level tokenizer.json (lower-casing, whitespace split, bos/eos added) as the pipeline stores it."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(specials + sorted(set(PROMPT_WORDS)) + ["extra", "words"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    single = " ".join(([bos] if bos else []) + ["$A"] + [eos])
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, vocab[t]) for t in (bos, eos) if t])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    with open(folder / "tokenizer_config.json", "w") as f:
        json.dump({"pad_token": pad, "model_max_length": max_length}, f)
    return len(vocab)


def _write_clip_bpe(folder, pad):
    """A tiny CLIP byte-level BPE folder without tokenizer.json (vocab.json + merges.txt, as CLIPTokenizer saves)."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for w in sorted({w for w in PROMPT_WORDS if w.isalpha()}):
        parts, cur = list(w[:-1]) + [w[-1] + "</w>"], w[0]
        for p in parts[1:]:
            if (cur, p) not in merges:
                merges.append((cur, p))
            cur += p
            if cur not in vocab:
                vocab.append(cur)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    with open(folder / "vocab.json", "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(folder / "merges.txt", "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    with open(folder / "tokenizer_config.json", "w") as f:
        json.dump({"pad_token": pad, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "model_max_length": 77}, f)
    return len(vocab)


def test_clip_bpe_tokenizer_matches_transformers(tmp_path):
    from transformers import CLIPTokenizer

    _write_clip_bpe(tmp_path / "tok", "!")
    ref = CLIPTokenizer(str(tmp_path / "tok" / "vocab.json"), str(tmp_path / "tok" / "merges.txt"), pad_token="!")
    prompts = [decoder.DECODER_PROMPT, "  Restore ALL the details, please!! 42 " * 6]
    expect = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(text_encoders.Tokenizer(tmp_path / "tok")(prompts), expect)


def _build_pipeline_folder(root, joint_dim, pooled_dim, with_t5):
    n1 = _write_tokenizer(root / "tokenizer", ["<unk>", "<bos>", "<eos>"], "<eos>", "<bos>", "<eos>", 77)
    n2 = _write_clip_bpe(root / "tokenizer_2", "!")  # CLIP-G pads with "!", as SD3's tokenizer_2
    p1, h1, h2 = pooled_dim // 3, 2 * max(1, joint_dim // 8), 2 * max(1, joint_dim // 4)  # h1 + h2 <= joint_dim
    clip_l = _hf_clip(n1, 2, h1, p1, "quick_gelu", seed=5)  # legacy eos_token_id 2: pooled at argmax(ids)
    clip_g = _hf_clip(n2, n2 - 1, h2, pooled_dim - p1, "gelu", seed=6)  # eos id = <|endoftext|>
    clip_l.save_pretrained(root / "text_encoder", safe_serialization=True)
    clip_g.save_pretrained(root / "text_encoder_2", safe_serialization=True)
    t5 = None
    if with_t5:
        n3 = _write_tokenizer(root / "tokenizer_3", ["<pad>", "</s>", "<unk>"], "<pad>", None, "</s>", 512)
        t5 = _hf_t5(n3, seed=7, d_model=joint_dim)  # SD3: the T5 width is the joint dim
        t5.save_pretrained(root / "text_encoder_3", safe_serialization=True)
    return clip_l, clip_g, t5


def _hf_tok(folder):
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast

    conf = read_json(folder / "tokenizer_config.json")
    if (folder / "vocab.json").is_file():
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=conf["pad_token"])
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token=conf["pad_token"],
                                   model_max_length=conf["model_max_length"])


@pytest.mark.parametrize("with_t5", [True, False])
def test_prompt_embeddings_match_diffusers_encode_prompt(tmp_path, with_t5):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    joint_dim, pooled_dim, T = 32, 24, 20
    root = tmp_path / "sd3_pipeline"
    clip_l, clip_g, t5 = _build_pipeline_folder(root, joint_dim, pooled_dim, with_t5)
    tr = SD3Transformer2DModel(sample_size=8, num_layers=1, attention_head_dim=8, num_attention_heads=2,
                               joint_attention_dim=joint_dim, caption_projection_dim=16,
                               pooled_projection_dim=pooled_dim, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                    text_encoder=clip_l, tokenizer=_hf_tok(root / "tokenizer"),
                                    text_encoder_2=clip_g, tokenizer_2=_hf_tok(root / "tokenizer_2"),
                                    text_encoder_3=t5, tokenizer_3=_hf_tok(root / "tokenizer_3") if with_t5 else None)
    prompts = [decoder.DECODER_PROMPT, "extra words " * 50]  # the second one is truncated
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device="cpu",
                                              do_classifier_free_guidance=False, max_sequence_length=T)
    enc = load_hf.load_text_encoders(root, max_sequence_length=T)
    assert (enc["t5"] is None) == (not with_t5)
    ours_pe, ours_pooled = text_encoders.encode_prompt(enc, prompts, joint_dim, T)
    assert _max_err(ours_pe, pe) <= 1e-5 and _max_err(ours_pooled, pooled) <= 1e-5


def test_prompt_cache_second_decode_never_loads_text_encoders(golden, tmp_path, monkeypatch):
    """load_hf.load_decoder on a checkpoint folder: the first build encodes the prompt and writes the cache, the
    second reads it (text-encoder loading is made to fail) and decodes identically."""
    root = tmp_path / "ckpt"
    root.mkdir()
    for part in ("bsq_encoder", "sd3_transformer"):
        os.symlink(golden.dir / part, root / part)
    (root / "sd3_pipeline").mkdir()
    for part in ("vae", "scheduler"):
        os.symlink(golden.dir / "sd3_pipeline" / part, root / "sd3_pipeline" / part)
    tr_cfg = decoder.MMDiTConfig.from_dict(read_json(golden.dir / "sd3_transformer" / "config.json"))
    _build_pipeline_folder(root / "sd3_pipeline", tr_cfg.joint_attention_dim, tr_cfg.pooled_projection_dim, True)
    cache = tmp_path / "cache"
    calls = []
    real = load_hf.load_text_encoders
    monkeypatch.setattr(load_hf, "load_text_encoders", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = load_hf.load_decoder(root, cache_dir=cache)
    assert calls == [1] and len(list(cache.glob("*.safetensors"))) == 1
    expect = text_encoders.encode_prompt(real(root / "sd3_pipeline"), [decoder.DECODER_PROMPT],
                                   tr_cfg.joint_attention_dim)
    assert torch.equal(first.prompt_embeds, expect[0]) and torch.equal(first.pooled, expect[1])

    def refuse(*a, **k):
        raise AssertionError("text encoders loaded although the prompt cache exists")

    monkeypatch.setattr(load_hf, "load_text_encoders", refuse)
    second = load_hf.load_decoder(root, cache_dir=cache)
    s = golden.scenario("dec")
    args = (golden["dec.indices"], s["ar_height"], s["ar_width"])
    kw = dict(upsampling_ratio=s["upsampling_ratio"], steps=2, guidance=s["guidance_scale"], seed=0)
    assert torch.equal(first.decode(*args, **kw), second.decode(*args, **kw))


# ---------------------------------------------------------------------------------------------------------------------
# full-size builds on the meta device vs the manifests
# ---------------------------------------------------------------------------------------------------------------------

def _meta_shapes(factory):
    with torch.device("meta"):
        m = factory()
    return {k: list(v.shape) for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name, factory", [
    ("sd3_transformer.sd35_medium", lambda: decoder.MMDiT(decoder.MMDiTConfig.sd35_medium())),
    ("sd3_transformer.sd3_medium", lambda: decoder.MMDiT(decoder.MMDiTConfig.sd3_medium())),
    ("text_encoder.clip_l", lambda: text_encoders.CLIPTextModel(text_encoders.CLIPTextConfig())),
    ("text_encoder_2.clip_g", lambda: text_encoders.CLIPTextModel(text_encoders.CLIPTextConfig.bigg())),
    ("text_encoder_3.t5_xxl", lambda: text_encoders.T5Encoder(text_encoders.T5Config())),
])
def test_full_size_keys_equal_manifest(name, factory):
    assert _meta_shapes(factory) == load_manifest(name)


def test_vae_decoder_keys_equal_manifest_decoder_part():
    """The VAE file also holds the encoder: every manifest key outside `decoder.*` must be an `encoder.*` key (what
    load_hf's VAE key map drops), and the decoder part must equal the module exactly."""
    manifest = load_manifest("vae")
    dec_part = {k: v for k, v in manifest.items() if k.startswith("decoder.")}
    assert all(k.startswith("encoder.") for k in manifest if k not in dec_part)
    assert _meta_shapes(lambda: decoder.VAE(decoder.VAEConfig())) == dec_part
    plan = load_hf.plan_load(dec_part, manifest, load_hf.VAE_KEYMAP)
    assert set(plan) == set(dec_part)


# ---------------------------------------------------------------------------------------------------------------------
# toy configuration
# ---------------------------------------------------------------------------------------------------------------------

def test_toy_decoder_trains_and_decodes():
    torch.manual_seed(0)
    vision = bsq.VisionModel(bsq.VisionConfig.tiny()).eval()
    dec = decoder.Decoder.toy(vision)
    c = vision.cfg
    unit = c.patch_size * c.spatial_merge_size
    bits = _random_bits(vision, 2, batch=2)  # 2 x 1 blocks: a non-square 64 x 32 image
    with torch.no_grad():
        cond = decoder.bits_to_condition(vision, bits, 2 * unit, unit)
    grid = (2 * unit // c.patch_size, unit // c.patch_size)
    x0 = torch.rand(2, 3, 2 * unit, unit) * 2 - 1
    params = [p for n, p in dec.named_parameters() if not n.startswith("vision.")]
    opt = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    sigma, eps = torch.rand(2, generator=g), torch.randn(x0.shape, generator=g)

    def v(x, t):
        pe, pooled = dec.text(2)
        return dec.transformer(x, pe, pooled, t, cond, grid)

    losses = []
    for _ in range(12):
        loss = decoder.flow_matching_loss(v, x0, sigma, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert dec.context.prompt_embeds.grad.abs().sum() > 0  # the learned context trains too
    assert dec.transformer.siglip_embed_add_latent.weight.grad.abs().sum() > 0
    img = dec.decode(bits, 2 * unit, unit, upsampling_ratio=1.0, steps=2, seed=0)
    f = dec.decode(bits, 2 * unit, unit, upsampling_ratio=1.0, steps=2, seed=0, output="float")
    assert f.shape == (2, 3, 2 * unit, unit)  # pixel space: the latents are the image
    assert torch.equal(img, (f * 255).round().to(torch.uint8).permute(0, 2, 3, 1))


# ---------------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------------

def test_bad_input_raises_clear_errors(golden, parts):
    """Clear errors for bad sizes, bits, noise (pipeline.decode_bits, the user's path: Decoder.decode only asserts),
    and a transformer config whose dual-attention layers disagree with the checkpoint (derived from this fixture's
    sd3_transformer/config.json)."""
    decode = functools.partial(pipeline.decode_bits, parts)
    s = golden.scenario("dec")
    idx = golden["dec.indices"]
    ar_h, ar_w = s["ar_height"], s["ar_width"]
    need = math.lcm(16, parts.scale * parts.transformer.cfg.patch_size)
    ratios = (1.1, 1.2, 1.3, 1.4, 1.05, 1.15, 1.25, 1.35, 1.45, *(1 + k / 1000 for k in range(1, 1000)))
    bad_ratio = next(r for r in ratios if round(ar_h * r) % need or round(ar_w * r) % need)  # any AR size has one
    with pytest.raises(ValueError, match=f"multiple of {need}"):
        decode(idx, ar_h, ar_w, upsampling_ratio=bad_ratio, steps=1)
    for r in (0.5, 2.5):
        with pytest.raises(ValueError, match=r"upsampling_ratio must be in \[1, 2\]"):
            decode(idx, ar_h, ar_w, upsampling_ratio=r, steps=1)
    bits = golden["dec.bits"]
    ratio = s["upsampling_ratio"]  # a valid output size: only the defect named below is wrong
    with pytest.raises(ValueError, match="bits must be"):
        decode(bits[:, :-1], ar_h, ar_w, upsampling_ratio=ratio, steps=1)  # one token short for the grid
    with pytest.raises(ValueError, match="bits must be"):
        decode(bits[..., :-1], ar_h, ar_w, upsampling_ratio=ratio, steps=1)  # wrong bsq_dim
    P = parts.vision.cfg.patch_size
    with pytest.raises(ValueError, match="AR size"):  # half a block, at a ratio whose output size is valid
        decode(bits, ar_h + P, ar_w, upsampling_ratio=next(_ratios(parts, ar_h + P, ar_w)), steps=1)
    with pytest.raises(ValueError, match="noise must be"):
        decode(bits, ar_h, ar_w, upsampling_ratio=ratio, steps=1, noise=golden["dec.pipe_noise"][..., :-1])
    with pytest.raises(ValueError, match="steps must be >= 1"):
        decode(bits, ar_h, ar_w, upsampling_ratio=ratio, steps=0)
    with pytest.raises(ValueError, match="output must be"):
        decode(bits, ar_h, ar_w, upsampling_ratio=ratio, steps=1, output="png")
    conf = read_json(golden.dir / "sd3_transformer" / "config.json")
    dual = list(conf.get("dual_attention_layers") or [])
    path = golden.dir / "sd3_transformer" / "diffusion_pytorch_model.safetensors"
    if dual:  # drop the first dual layer: the file has its attn2 weights, the model not
        wrong = decoder.MMDiTConfig.from_dict({**conf, "dual_attention_layers": dual[1:]})
        pattern = rf"unexpected keys: transformer_blocks\.{dual[0]}\.attn2\."
    else:  # add layer 0: the model wants attn2 weights the file lacks
        wrong = decoder.MMDiTConfig.from_dict({**conf, "dual_attention_layers": [0]})
        pattern = r"missing keys: transformer_blocks\.0\.attn2\."
    layer = dual[0] if dual else 0
    with pytest.raises(load_hf.CheckpointError, match=r"cannot load .*diffusion_pytorch_model") as e:
        load_hf.load_weights(decoder.MMDiT(wrong), [path])
    assert re.search(pattern, str(e.value)), str(e.value)
    assert re.search(rf"shape mismatches: .*transformer_blocks\.{layer}\.norm1\.linear\.weight", str(e.value))


def test_prompt_cache_write_leaves_nothing_behind_when_killed(tmp_path, monkeypatch):
    """safetensors' save_file puts its own temporary file (`.tmpXXXXXX`, no owner in its name) beside its target, so
    the cache write targets a private folder of this process, never the cache folder itself; what a killed write left
    (a folder of a process that is gone) is removed by the next write, and the cache then reads back whole."""
    from pathlib import Path

    import safetensors.torch as st

    import files

    cache = tmp_path / "cache"
    path = cache / "prompt_0123456789abcdef.safetensors"
    cache.mkdir()
    dead = cache / f".{path.stem}.999999999-0badcafe.tmp{path.suffix}"  # pid far beyond any pid_max
    dead.mkdir()
    (dead / ".tmpAbC123").write_bytes(b"half a file")
    targets = []

    def spy(t, f, *a, **k):
        targets.append(Path(f))
        return st.save_file(t, f, *a, **k)

    for module in (files, load_hf):  # each imports save_file by name
        monkeypatch.setattr(module, "save_file", spy)
    pe, pooled = torch.randn(1, 5, 8), torch.randn(1, 6)
    load_hf.write_prompt_cache(path, pe, pooled)
    assert targets and all(t.parent != cache for t in targets), targets
    assert sorted(p.name for p in cache.iterdir()) == [path.name]
    got = load_file(str(path))
    assert torch.equal(got["prompt_embeds"], pe) and torch.equal(got["pooled"], pooled)
