"""kernels/: the Triton kernels equal their PyTorch references. On CPU they run through TRITON_INTERPRET=1 (set by
the README's test command, and by conftest when no GPU is present); each test calls the Triton path explicitly,
never the fallback."""
import pytest
import torch

from kernels import attention as A
from kernels import bitwise as BW

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(B, H, Hk, Lq, Lk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g)
    k = torch.randn(B, Hk, Lk, D, generator=g)
    v = torch.randn(B, Hk, Lk, D, generator=g)
    return (t.to(DEV, dtype) for t in (q, k, v))


def _left_pad(B, L, n_pad):
    m = torch.ones(B, L, dtype=torch.bool)
    m[-1, :n_pad] = False  # the last row is left padded (an unconditional CFG row)
    return m.to(DEV)


# ----- attention -----

@pytest.mark.parametrize("D", [64, 72, 128])
@pytest.mark.parametrize("Lq, Lk", [(37, 37), (1, 45), (6, 45)])  # prefill, decode against a cache, a chunk
def test_causal_padded_gqa_equals_reference(D, Lq, Lk):
    q, k, v = _qkv(2, 4, 2, Lq, Lk, D, seed=D + Lq)
    pad = _left_pad(2, Lk, 11)
    got = A.attention(q, k, v, causal=True, key_padding_mask=pad, backend="triton")
    ref = A.attention_reference(q, k, v, causal=True, key_padding_mask=pad)
    assert (got - ref).abs().max().item() <= 1e-5
    assert torch.isfinite(got).all()  # padded query rows included


@pytest.mark.parametrize("D", [64, 72, 128])
def test_varlen_bidirectional_equals_reference(D):
    cu = torch.tensor([0, 16, 48, 84])  # three images / frames of different lengths
    q, k, v = _qkv(1, 2, 2, 84, 84, D, seed=D)
    got = A.attention(q, k, v, cu_seqlens=cu, backend="triton")
    ref = A.attention_reference(q, k, v, cu_seqlens=cu)
    assert (got - ref).abs().max().item() <= 1e-5
    per_image = torch.cat([torch.nn.functional.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e])
                           for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=2)
    assert (ref - per_image).abs().max().item() <= 1e-5  # the reference's mask is the per-image split


def test_padding_row_sees_only_itself():
    q, k, v = _qkv(1, 2, 2, 8, 8, 64)
    pad = torch.zeros(1, 8, dtype=torch.bool, device=DEV)
    pad[0, 5:] = True
    got = A.attention(q, k, v, causal=True, key_padding_mask=pad, backend="triton")
    assert torch.allclose(got[0, :, 2], v[0, :, 2], atol=1e-6)  # a padded query's only key is its own


@pytest.mark.parametrize("D", [64, 72, 128])
def test_bf16_against_fp32_reference(D):
    q, k, v = _qkv(2, 4, 1, 33, 33, D, dtype=torch.bfloat16, seed=D)
    pad = _left_pad(2, 33, 5)
    got = A.attention(q, k, v, causal=True, key_padding_mask=pad, backend="triton")
    ref = A.attention_reference(q.float(), k.float(), v.float(), causal=True, key_padding_mask=pad)
    assert got.dtype == torch.bfloat16 and (got.float() - ref).abs().max().item() <= 3e-2


def test_model_attention_equals_kernel():
    """The model's attention (explicit causal + key-padding mask) is the kernel's reference case."""
    import model

    q, k, v = _qkv(2, 4, 2, 6, 20, 64, seed=3)
    pad = _left_pad(2, 20, 7)
    mask = model.attention_mask(14, 6, pad)
    ref = model.attention(q, k, v, mask)
    got = A.attention(q, k, v, causal=True, key_padding_mask=pad, backend="triton")
    assert (got - ref).abs().max().item() <= 1e-5


# ----- bitwise sampling -----

@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_bitwise_exact_with_same_uniforms(cfg):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1024, 2, generator=g).to(DEV) * 3
    u = torch.rand(4, 1024, generator=g).to(DEV)
    bits, codes = BW.sample_bits(logits, cfg, 0.7, uniforms=u, backend="triton")
    rbits, rcodes = BW.sample_bits_reference(logits, cfg, 0.7, u)
    assert torch.equal(bits, rbits) and torch.equal(codes, rcodes)
    assert set(codes.unique().tolist()) <= {-0.125, 0.125}
    if cfg > 1:  # both halves use the guided distribution
        p = BW.guided_p1(logits, cfg, 0.7)
        assert torch.equal(p[:2], p[2:])


def test_bitwise_frequencies_match_probabilities():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1024, 2, generator=g).to(DEV) * 2
    p = BW.guided_p1(logits, 1.5, 1.0)
    n = 64
    ones = sum(BW.sample_bits(logits, 1.5, 1.0, seed=3, step=s, backend="triton")[0] for s in range(n)).float()
    # all bits together, and per probability decile: counts within 3 standard errors
    for sel in [torch.ones_like(p, dtype=torch.bool)] + [(p >= a / 10) & (p < (a + 1) / 10) for a in range(10)]:
        expect, var = n * p[sel].sum(), n * (p[sel] * (1 - p[sel])).sum()
        if var > 0:
            assert abs(ones[sel].sum() - expect) <= 3 * var.sqrt(), (expect.item(), ones[sel].sum().item())
    # counter-based: the same (seed, step) repeats, another step differs
    a = BW.sample_bits(logits, 1.5, 1.0, seed=3, step=0, backend="triton")[0]
    assert torch.equal(a, BW.sample_bits(logits, 1.5, 1.0, seed=3, step=0, backend="triton")[0])
    assert not torch.equal(a, BW.sample_bits(logits, 1.5, 1.0, seed=3, step=1, backend="triton")[0])


def test_dispatch_switch(monkeypatch):
    logits = torch.randn(2, 16, 2)
    monkeypatch.setenv("UNIAR_KERNELS", "torch")
    assert BW.backend_for(logits) == "torch"
    monkeypatch.setenv("UNIAR_KERNELS", "triton")
    assert BW.backend_for(logits) == "triton"
    monkeypatch.setenv("UNIAR_KERNELS", "auto")
    assert BW.backend_for(logits) == ("triton" if logits.is_cuda else "torch")
    monkeypatch.setenv("UNIAR_KERNELS", "fast")
    with pytest.raises(ValueError, match="UNIAR_KERNELS must be"):
        BW.backend_for(logits)


def test_bad_input():
    with pytest.raises(ValueError, match="logits must be"):
        BW.sample_bits(torch.zeros(2, 16), 1.0, 1.0)
    with pytest.raises(ValueError, match="odd"):
        BW.sample_bits(torch.zeros(3, 16, 2), 2.0, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        BW.sample_bits(torch.zeros(2, 16, 2), 1.0, 0.0)
    q, k, v = _qkv(1, 3, 2, 4, 4, 64)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        A.attention(q, k, v, causal=True, backend="triton")


# ----- the model through the dispatch -----

def test_golden_rollout_with_the_attention_kernel(golden, monkeypatch):
    """UNIAR_KERNELS=triton: every attention of the tower, the backbone and the visual-decoder stack runs the flash
    kernel; the seeded golden rollout is unchanged."""
    import bsq
    import load_hf
    import model

    monkeypatch.setenv("UNIAR_KERNELS", "triton")
    net, tok = load_hf.load_ar(golden.dir)
    s = golden.scenario("e2e")
    bits = model.generate_bits(net, tok, s["prompt"], ar_height=s["ar_height"], ar_width=s["ar_width"], cfg=s["cfg"],
                               temperature=s["temperature"], seed=s["seed"])
    assert torch.equal(bsq.bits_to_indexes(bits), golden["e2e.indices"])


def test_model_kernel_sampler_matches_its_reference(golden, monkeypatch):
    """sampler="kernel" draws every step with the Triton bitwise kernel: bits of the right shape, and the same seed
    repeats exactly (counter-based random numbers, no generator state)."""
    import load_hf
    import model

    net, tok = load_hf.load_ar(golden.dir)
    s = golden.scenario("e2e")
    kw = dict(ar_height=s["ar_height"], ar_width=s["ar_width"], cfg=s["cfg"], temperature=s["temperature"], seed=1,
              sampler="kernel")
    monkeypatch.setenv("UNIAR_KERNELS", "triton")
    a = model.generate_bits(net, tok, s["prompt"], **kw)
    assert torch.equal(a, model.generate_bits(net, tok, s["prompt"], **kw))
    assert a.shape == (1, s["ar_height"] // 32 * (s["ar_width"] // 32), *net.bits_shape)
    assert set(a.unique().tolist()) <= {0, 1}
