"""kernels/: the Triton kernels equal their PyTorch references. On CPU they run through TRITON_INTERPRET=1 (set by
the README's test command, and by conftest when no GPU is present); each test calls the Triton path explicitly,
never the fallback. Where triton is not installed (macOS, Windows: it has no wheels there) the tests that need it
are skipped with that reason; CI installs it (.ci/run checks), so there they always run."""
import inspect
import math

import pytest
import torch

from kernels import attention as A
from kernels import bitwise as BW
from conftest import assert_unchanged, fingerprint, own_copy
from bench import Recorder

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_N = inspect.signature(A.attention_triton).parameters["block_n"].default  # the kernel's key tile

needs_triton = pytest.mark.skipif(BW.triton is None, reason="triton is not installed (it has no wheels for macOS or "
                                  "Windows): the kernels cannot run, the model uses their PyTorch references")

if BW.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _rand_at(out_ptr, off_ptr, seed, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + i, tl.rand(seed, tl.load(off_ptr + i, mask=i < n, other=0)), mask=i < n)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These tests are small tensor ops around interpreted kernels: one intra-op thread is much faster than
    several when the CPU is shared (restored after the file)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _counter_uniforms(seed, step, rows, K):
    """The bitwise kernel's documented stream: u[row, bit] = tl.rand(seed, (step * rows + row) * K + bit)."""
    offs = ((step * rows + torch.arange(rows)[:, None]) * K + torch.arange(K)[None]).to(DEV, torch.int32)
    out = torch.empty(rows, K, device=DEV)
    _rand_at[(triton.cdiv(rows * K, 1024),)](out, offs, int(seed), rows * K, BLOCK=1024)
    return out


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

@needs_triton
@pytest.mark.parametrize("D", [64, 72, 128])
@pytest.mark.parametrize("Lq, Lk", [(37, 37), (1, 45), (6, 45)])  # prefill, decode against a cache, a chunk
def test_causal_padded_gqa_equals_reference(D, Lq, Lk):
    """One key tile (Lk < BLOCK_N): causal + left padding + GQA equal the reference for each head dim, padded rows
    finite."""
    q, k, v = _qkv(2, 4, 2, Lq, Lk, D, seed=D + Lq)
    pad = _left_pad(2, Lk, 11)
    got = A.attention(q, k, v, causal=True, key_padding_mask=pad, backend="triton")
    ref = A.attention_reference(q, k, v, causal=True, key_padding_mask=pad)
    assert (got - ref).abs().max().item() <= 1e-5
    assert torch.isfinite(got).all()  # padded query rows included


def _plain_softmax_attention(q, k, v, valid):
    """Independent float64 attention: query i (absolute position p = Lk - Lq + i) attends keys j <= p that are valid,
    and always key p; query head h reads kv head h // (H / Hk)."""
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    allowed = torch.zeros(B, 1, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        for i in range(Lq):
            p = Lk - Lq + i
            allowed[b, 0, i, : p + 1] = valid[b, : p + 1].cpu()
            allowed[b, 0, i, p] = True
    heads = [h // (H // Hk) for h in range(H)]
    k, v = k.double().cpu()[:, heads], v.double().cpu()[:, heads]
    s = (q.double().cpu() @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


# Lq: a prefill, a chunk spanning two query tiles, decode steps against a KV cache (queries are the last Lq keys)
@needs_triton
@pytest.mark.parametrize("D, Lq", [(64, 2 * BLOCK_N + 22), (64, BLOCK_N + 6), (72, 5), (64, 1)])
def test_causal_over_several_key_tiles(D, Lq):
    """Keys span three BLOCK_N tiles (queries are the last Lq of them): the online softmax across tiles, the causal
    bound of every tile, key padding inside and across tiles and grouped-query heads equal both the PyTorch reference
    and a plain float64 masked softmax built here. Scores are spread (q x 3) so a missed rescale or key shows."""
    Lk = 2 * BLOCK_N + 22
    q, k, v = _qkv(2, 4, 2, Lq, Lk, D, seed=D + Lq)
    q = q * 3
    valid = torch.ones(2, Lk, dtype=torch.bool)
    valid[0, 3::7] = False  # scattered holes in every tile
    valid[0, BLOCK_N + 10: BLOCK_N + 20] = False
    valid[1, :BLOCK_N + 6] = False  # left padding past the first tile
    valid = valid.to(DEV)
    got = A.attention(q, k, v, causal=True, key_padding_mask=valid, backend="triton")
    ref = A.attention_reference(q, k, v, causal=True, key_padding_mask=valid)
    plain = _plain_softmax_attention(q, k, v, valid)
    assert (got - ref).abs().max().item() <= 1e-5
    assert (got.double().cpu() - plain).abs().max().item() <= 1e-5
    assert (ref.double().cpu() - plain).abs().max().item() <= 1e-5  # the reference is the model's mask


@needs_triton
@pytest.mark.parametrize("D", [64, 72, 128])
def test_varlen_bidirectional_equals_reference(D):
    """Per-image bidirectional attention (an image crosses the key-tile boundary) equals SDPA image by image."""
    cu = torch.tensor([0, 16, 48, 84])  # three images / frames of different lengths
    q, k, v = _qkv(1, 2, 2, 84, 84, D, seed=D)
    got = A.attention(q, k, v, cu_seqlens=cu, backend="triton")
    ref = A.attention_reference(q, k, v, cu_seqlens=cu)
    assert (got - ref).abs().max().item() <= 1e-5
    per_image = torch.cat([torch.nn.functional.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e])
                           for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=2)
    assert (ref - per_image).abs().max().item() <= 1e-5  # the reference's mask is the per-image split


@needs_triton
def test_padding_row_sees_only_itself():
    """A query at a padded position (no valid key) returns its own value instead of NaN."""
    q, k, v = _qkv(1, 2, 2, 8, 8, 64)
    pad = torch.zeros(1, 8, dtype=torch.bool, device=DEV)
    pad[0, 5:] = True
    got = A.attention(q, k, v, causal=True, key_padding_mask=pad, backend="triton")
    assert torch.allclose(got[0, :, 2], v[0, :, 2], atol=1e-6)  # a padded query's only key is its own


@needs_triton
@pytest.mark.parametrize("D", [64, 72, 128])
def test_bf16_against_fp32_reference(D):
    """bfloat16 inputs give a bfloat16 output within bf16 rounding of the float32 reference."""
    q, k, v = _qkv(2, 4, 1, 33, 33, D, dtype=torch.bfloat16, seed=D)
    pad = _left_pad(2, 33, 5)
    got = A.attention(q, k, v, causal=True, key_padding_mask=pad, backend="triton")
    ref = A.attention_reference(q.float(), k.float(), v.float(), causal=True, key_padding_mask=pad)
    assert got.dtype == torch.bfloat16 and (got.float() - ref).abs().max().item() <= 3e-2


@needs_triton
def test_model_attention_equals_kernel():
    """The model's attention (explicit causal + key-padding mask) is the kernel's reference case."""
    import model

    q, k, v = _qkv(2, 4, 2, 6, 20, 64, seed=3)
    pad = _left_pad(2, 20, 7)
    mask = A.build_mask(6, 20, causal=True, key_padding_mask=pad)
    ref = model.attention(q, k, v, mask)
    got = A.attention(q, k, v, causal=True, key_padding_mask=pad, backend="triton")
    assert (got - ref).abs().max().item() <= 1e-5


# ----- bitwise sampling -----

@needs_triton
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_bitwise_exact_with_same_uniforms(cfg):
    """Given uniforms, kernel bits and codes equal the reference's exactly (each row reads its own uniforms); with
    cfg > 1 both halves use the guided p(1)."""
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


@needs_triton
def test_bitwise_frequencies_match_probabilities():
    """Statistical: over 64 seeded steps the count of ones per p(1) decile is within 3 s.e. of the guided p(1); a
    (seed, step) repeats, another step differs."""
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


@needs_triton
@pytest.mark.parametrize("cfg, rows", [(2.0, 4), (1.0, 3)])
def test_bitwise_counter_stream_per_row_and_step(cfg, rows):
    """Seeded kernel draws are exactly the reference fed the documented counter uniforms
    u[row, bit] = tl.rand(seed, (step * rows + row) * K + bit): cond and uncond rows, every row and every step have
    their own counters. K spans two kernel blocks."""
    K = 1100
    logits = torch.randn(rows, K, 2, generator=torch.Generator().manual_seed(rows)).to(DEV) * 2
    for step in (0, 3):
        bits, codes = BW.sample_bits(logits, cfg, 0.8, seed=11, step=step, backend="triton")
        rbits, rcodes = BW.sample_bits_reference(logits, cfg, 0.8, _counter_uniforms(11, step, rows, K))
        assert torch.equal(bits, rbits) and torch.equal(codes, rcodes), step


@needs_triton
def test_bitwise_cond_and_uncond_rows_draw_their_own_numbers():
    """With cfg > 1 both halves sample the same guided p(1) but with their own random numbers: at p = 1/2 a cond row
    and its uncond row (and two cond rows, and one row at two steps) agree on about half the bits (5 s.d.), not all."""
    logits = torch.zeros(4, 1024, 2, device=DEV)
    a = BW.sample_bits(logits, 3.0, 1.0, seed=5, step=0, backend="triton")[0]
    b = BW.sample_bits(logits, 3.0, 1.0, seed=5, step=1, backend="triton")[0]
    for x, y in [(a[0], a[2]), (a[1], a[3]), (a[0], a[1]), (a[0], b[0]), (a[2], b[2])]:
        agree = (x == y).double().mean().item()
        assert abs(agree - 0.5) <= 5 * math.sqrt(0.25 / 1024), agree


def test_dispatch_switch(monkeypatch):
    """UNIAR_KERNELS picks the backend (auto: Triton on CUDA only) and rejects anything else (triton stood in for,
    so that the rule is checked where it is not installed too)."""
    monkeypatch.setattr(BW, "triton", BW.triton or object())
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


def test_without_triton_auto_is_pytorch_and_forcing_triton_is_a_clear_error(monkeypatch):
    """Where triton is missing, auto picks the PyTorch references even for CUDA tensors, and UNIAR_KERNELS=triton
    says that triton is not installed."""
    from types import SimpleNamespace

    monkeypatch.setattr(BW, "triton", None)
    on_cuda = SimpleNamespace(is_cuda=True)  # all the dispatch reads of a tensor
    monkeypatch.delenv("UNIAR_KERNELS", raising=False)
    assert BW.backend_for(on_cuda) == "torch"
    monkeypatch.setenv("UNIAR_KERNELS", "triton")
    with pytest.raises(ValueError, match="the Triton backend was asked for but triton is not installed"):
        BW.backend_for(on_cuda)


def test_bad_input():
    """Malformed logits, odd rows under guidance and temperature 0 are refused."""
    with pytest.raises(ValueError, match="logits must be"):
        BW.sample_bits(torch.zeros(2, 16), 1.0, 1.0)
    with pytest.raises(ValueError, match="odd"):
        BW.sample_bits(torch.zeros(3, 16, 2), 2.0, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        BW.sample_bits(torch.zeros(2, 16, 2), 1.0, 0.0)


@needs_triton
def test_attention_kernel_refuses_uneven_gqa_heads():
    """Query heads that are not a multiple of the key/value heads are refused by the kernel."""
    q, k, v = _qkv(1, 3, 2, 4, 4, 64)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        A.attention(q, k, v, causal=True, backend="triton")


# ----- the model through the dispatch -----

@pytest.fixture(scope="module")
def golden_ar(golden):
    """The golden AR model and tokenizer, loaded once for this file; no test changes it (checked at teardown)."""
    import load_hf

    net, tok = load_hf.load_ar(golden.dir)
    before = fingerprint(net)
    yield net, tok
    assert_unchanged(net, before, "golden_ar")


@needs_triton
def test_golden_rollout_with_the_attention_kernel(golden, golden_ar, monkeypatch):
    """UNIAR_KERNELS=triton: every attention of the tower, the backbone and the visual-decoder stack runs the flash
    kernel; the seeded golden rollout is unchanged."""
    import bsq
    import pipeline

    monkeypatch.setenv("UNIAR_KERNELS", "triton")
    net, tok = golden_ar
    s = golden.scenario("e2e")
    bits = pipeline.generate_bits(net, tok, s["prompt"], ar_height=s["ar_height"], ar_width=s["ar_width"], cfg_scale=s["cfg"],
                               temperature=s["temperature"], seed=golden.seed("e2e.indices", "e2e"))
    assert torch.equal(bsq.bits_to_indexes(bits), golden["e2e.indices"])


def _kernel_sampler_only(monkeypatch, backend):
    """sampler="kernel" on `backend` while attention stays on SDPA (fast under the interpreter)."""
    import model

    monkeypatch.setenv("UNIAR_KERNELS", backend)
    monkeypatch.setattr(model, "use_kernel", lambda x: False)


@needs_triton
def test_model_kernel_sampler_matches_its_reference(golden, golden_ar, monkeypatch):
    """Exact, step by step: generate_image with the KernelSampler on the Triton sampler gives, for every row (cond and
    uncond) at every AR step i, the bits of the PyTorch reference `sample_bits_reference` on that step's logits with
    the rollout's cfg and temperature and the counter uniforms of (seed, step = i): guidance is applied, the counter
    moves every step, one seed per rollout. The same generator seed repeats; another seed differs."""
    import model
    import pipeline

    net, tok = golden_ar
    s = golden.scenario("e2e")
    H, W, cfg, T = s["ar_height"], s["ar_width"], 3.0, 0.8  # guidance and temperature both move p(1)
    _kernel_sampler_only(monkeypatch, "triton")
    calls, real = [], BW.sample_bits

    def spy(*a, **kw):
        out = real(*a, **kw)
        calls.append((kw["seed"], out[0]))
        return out

    monkeypatch.setattr(BW, "sample_bits", spy)
    dev = next(net.parameters()).device
    ids, mask = (t.to(dev) for t in pipeline.build_generation_batch(net, tok, [s["prompt"]], H, W, cfg)[:2])

    def rollout(seed):
        calls.clear()
        rec = Recorder(pipeline.make_sampler("kernel", cfg, T, seed, dev))
        out = model.generate_image(net, ids, mask, H, W, rec)
        out.step_logits = rec.step_logits
        return out

    out = rollout(1)
    R, N = ids.shape[0], out.step_logits.shape[1]
    B = R // 2
    assert len(calls) == N and len({seed for seed, _ in calls}) == 1
    seed, guidance_matters = calls[0][0], False
    for i in range(N):
        logits = out.step_logits[:, i].reshape(R, -1, 2)
        u = _counter_uniforms(seed, i, R, logits.shape[1]).to(logits.device)
        ref = BW.sample_bits_reference(logits, cfg, T, u)[0]
        assert torch.equal(calls[i][1], ref), f"step {i}: kernel-path bits != reference"
        assert torch.equal(out.bits[:, i].reshape(B, -1), ref[:B]), f"step {i}: returned bits != reference"
        guidance_matters |= not torch.equal(ref[:B], BW.sample_bits_reference(logits[:B], 1.0, T, u[:B])[0])
    assert guidance_matters  # the comparison can see a sampler that ignores cfg
    assert torch.equal(rollout(1).bits, out.bits)
    assert not torch.equal(rollout(2).bits, out.bits)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_model_kernel_sampler_new_numbers_every_step_and_guided(golden_ar, monkeypatch, backend):
    """Statistical (the two backends draw different streams): a bit head with the SAME logits at every step, chosen
    so that the guided p(1) is 1/2 (cond d = 2, uncond d = 3, cfg = 3: 3 + 3 (2 - 3) = 0) while the unguided cond p(1)
    is 0.88. sampler="kernel" must give about half ones (guidance applied) and two steps must agree on about half
    the bits (a fresh random counter every step), within 5 s.d., on the Triton kernel and on its torch fallback."""
    import pipeline

    net, tok = own_copy(golden_ar[0]), golden_ar[1]
    ds, K = net.cfg.downsample, math.prod(net.bits_shape)
    _kernel_sampler_only(monkeypatch, backend)
    d = torch.zeros(2, K, 2)
    d[0, :, 1], d[1, :, 1] = 2.0, 3.0  # (cond; uncond) logit of bit = 1, logit of 0 is 0

    class SameEveryStep(torch.nn.Module):
        def forward(self, h):
            return d.repeat_interleave(h.shape[0] // 2, 0).reshape(h.shape[0], -1).to(h)

    net.output_layer_vistok = SameEveryStep()
    bits = pipeline.generate_bits(net, tok, "a red cube", ar_height=ds, ar_width=3 * ds, cfg_scale=3.0, temperature=1.0,
                               seed=0, sampler="kernel").reshape(3, K)  # 3 steps, one cond row
    assert abs(bits.double().mean().item() - 0.5) <= 5 * math.sqrt(0.25 / bits.numel())
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        assert abs((bits[i] == bits[j]).double().mean().item() - 0.5) <= 5 * math.sqrt(0.25 / K), (i, j)
