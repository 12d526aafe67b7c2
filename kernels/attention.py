"""Flash-attention forward in Triton for UniAR's three attention patterns (Dao et al., 2022, "FlashAttention").

The scores never leave on-chip memory: each program owns a block of queries, streams blocks of keys and values, and
keeps a running max m, a running normaliser l and an unnormalised output acc (the online softmax), rescaling both
when the max grows. Cases:
    - causal with key padding and grouped-query heads: the AR prefill, the per-step decode against a KV cache
      (queries are the last Lq of Lk positions), and the visual-decoder stack. The mask is the model's: a query at
      absolute position p sees keys k <= p that are valid, and always its own key (so a left-padding row, which sees
      no valid key, stays finite instead of NaN; its output is never read);
    - bidirectional attention restricted to each image / frame of the vision tower (variable lengths, `cu_seqlens`).
Head dims 64, 72 and 128 (72 is padded to a 128-wide tile), float32 and bfloat16, layout (B, H, L, D) like
`F.scaled_dot_product_attention`.

Dispatch: `attention` runs the kernel on CUDA tensors and `attention_reference` (PyTorch SDPA with the same mask)
elsewhere; UNIAR_KERNELS=triton|torch|auto forces a backend (tests run the kernel on CPU under TRITON_INTERPRET=1).
Forward only: the model calls it when no gradient is needed (`use_kernel`). No separate decode kernel: with one query the work is a matrix-vector product over the cache and the library path
is already bandwidth-bound, so the same kernel (BLOCK_M 16) serves it.
"""
from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from kernels.bitwise import backend_for  # noqa: E402  (one dispatch rule for every kernel)


# ---------------------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------------------


def build_mask(Lq: int, Lk: int, *, causal: bool, key_padding_mask=None, cu_seqlens=None, device=None):
    """The boolean mask (B or 1, 1, Lq, Lk), True = attend, of every case the kernel handles."""
    q_pos = torch.arange(Lk - Lq, Lk, device=device)[:, None]
    k_pos = torch.arange(Lk, device=device)[None, :]
    if cu_seqlens is not None:
        seg = torch.bucketize(torch.arange(Lk, device=device), cu_seqlens[1:].to(device), right=True)
        allowed = (seg[q_pos] == seg[k_pos])[None]
    else:
        allowed = torch.ones(1, Lq, Lk, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & (k_pos <= q_pos)[None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[:, None, :]
    if causal or key_padding_mask is not None:
        allowed = allowed | (k_pos == q_pos)[None]  # a query always sees itself: finite padding rows
    return allowed[:, None]


def attention_reference(q, k, v, *, causal: bool = False, key_padding_mask=None, cu_seqlens=None, scale=None):
    """PyTorch SDPA with the same mask. q (B, H, Lq, D), k / v (B, Hk, Lk, D) -> (B, H, Lq, D)."""
    mask = build_mask(q.shape[2], k.shape[2], causal=causal, key_padding_mask=key_padding_mask,
                      cu_seqlens=cu_seqlens, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


# ---------------------------------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _flash_fwd(Q, K, V, O, KV_VALID, SEG_LO, SEG_HI, SEG_ID,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, skvb,
                   H, HK, Lq, Lk, D, scale,
                   CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, VARLEN: tl.constexpr,
                   DOT_F32: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // (H // HK)  # grouped-query: this query head reads kv head hk
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q_pos = Lk - Lq + offs_m  # absolute positions of the queries (KV cache: the last Lq)
        m_ok = offs_m < Lq
        d_ok = offs_d < D
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lo = 0
        hi = Lk
        if VARLEN:  # only the key range of the images these queries belong to
            lo = tl.load(SEG_LO + pid_m)
            hi = tl.load(SEG_HI + pid_m)
            seg_q = tl.load(SEG_ID + q_pos, mask=m_ok, other=-1)
        if CAUSAL:
            hi = tl.minimum(hi, Lk - Lq + (pid_m + 1) * BLOCK_M)
        lo = (lo // BLOCK_N) * BLOCK_N
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < Lk
            k = tl.load(K + b * skb + hk * skh + offs_n[None, :] * skn + offs_d[:, None],
                        mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
            if DOT_F32:
                k = k.to(tl.float32)
            s = tl.dot(q, k, input_precision=PREC).to(tl.float32) * scale
            allowed = n_ok[None, :] & m_ok[:, None]
            if VARLEN:
                seg_k = tl.load(SEG_ID + offs_n, mask=n_ok, other=-2)
                allowed = allowed & (seg_q[:, None] == seg_k[None, :])
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= q_pos[:, None])
            if HAS_PAD:
                valid = tl.load(KV_VALID + b * skvb + offs_n, mask=n_ok, other=0)
                allowed = allowed & (valid[None, :] != 0)
            if CAUSAL or HAS_PAD:
                allowed = allowed | ((offs_n[None, :] == q_pos[:, None]) & n_ok[None, :])
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_F32:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(tl.float32)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])


# Triton's CPU interpreter multiplies bfloat16 tiles wrongly (numpy has no bfloat16), so there the dot operands are
# upcast to float32; on a GPU bf16 tiles go to the tensor cores with float32 accumulation, and float32 tiles are
# multiplied in full precision ("ieee", not TF32) so that fp32 results match the reference to 1e-5.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def attention_triton(q, k, v, *, causal: bool = False, key_padding_mask=None, cu_seqlens=None, scale=None,
                     block_m: int | None = None, block_n: int = 64):
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    if H % Hk:
        raise ValueError(f"query heads {H} must be a multiple of key/value heads {Hk}")
    if cu_seqlens is not None and (B != 1 or Lq != Lk):
        raise ValueError("cu_seqlens (variable-length images) needs B = 1 and Lq = Lk")
    q, k, v = (t.contiguous() for t in (q, k, v))
    if k.stride(-1) != 1:
        raise ValueError("k must be contiguous in its last dim")
    o = torch.empty_like(q)
    BLOCK_M = block_m or (16 if Lq <= 16 else 64)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    n_m = triton.cdiv(Lq, BLOCK_M)
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    valid = key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None else dummy
    seg_lo = seg_hi = seg_id = dummy
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
        seg_id = (torch.bucketize(torch.arange(Lk, device=q.device), cu[1:], right=True)).to(torch.int32)
        first = torch.arange(n_m, device=q.device) * BLOCK_M
        last = torch.clamp(first + BLOCK_M - 1, max=Lq - 1)
        seg_lo = cu[seg_id[first].long()].to(torch.int32)
        seg_hi = cu[seg_id[last].long() + 1].to(torch.int32)
    _flash_fwd[(n_m, B * H)](q, k, v, o, valid, seg_lo, seg_hi, seg_id,
                             q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                             v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
                             valid.stride(0) if key_padding_mask is not None else 0,
                             H, Hk, Lq, Lk, D, float(scale if scale is not None else 1.0 / math.sqrt(D)),
                             CAUSAL=causal, HAS_PAD=key_padding_mask is not None, VARLEN=cu_seqlens is not None,
                             DOT_F32=_INTERPRETED, PREC="ieee" if q.dtype == torch.float32 else "tf32",
                             BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_D=BLOCK_D)
    return o


def use_kernel(x: torch.Tensor) -> bool:
    """Whether the model should call the kernel for activations like x: the Triton backend is selected and no
    gradient is needed (the kernel is forward-only; training goes through SDPA, which has its own backward)."""
    return backend_for(x) == "triton" and not (torch.is_grad_enabled() and x.requires_grad)


def attention(q, k, v, *, causal: bool = False, key_padding_mask=None, cu_seqlens=None, scale=None,
              backend: str | None = None):
    """Dispatch: the Triton kernel on CUDA (or when forced), the PyTorch reference elsewhere."""
    if backend_for(q, backend) == "triton":
        return attention_triton(q, k, v, causal=causal, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
                                scale=scale)
    return attention_reference(q, k, v, causal=causal, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
                               scale=scale)


# ---------------------------------------------------------------------------------------------------------------------
# Benchmark: python -m kernels.attention
# ---------------------------------------------------------------------------------------------------------------------


def _time(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def _bench() -> None:
    if not torch.cuda.is_available():
        print("attention benchmark: no CUDA device here; the kernel runs on CPU only through TRITON_INTERPRET=1 "
              "(tests)")
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, dt = torch.device("cuda"), torch.bfloat16
    H, Hk, D = 32, 8, 128  # the released backbone
    for L in (1024, 2048, 4096, 8192):
        q = torch.randn(1, H, L, D, device=dev, dtype=dt)
        k, v = (torch.randn(1, Hk, L, D, device=dev, dtype=dt) for _ in range(2))
        kr, vr = k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            t_ref = _time(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True))
        t_tri = _time(lambda: attention_triton(q, k, v, causal=True))
        flops = 2 * 2 * H * L * L * D / 2  # causal: half the score matrix
        print(f"prefill L={L:5d}: SDPA flash {1e3 * t_ref:7.3f} ms, triton {1e3 * t_tri:7.3f} ms "
              f"({flops / t_tri / 1e12:6.1f} TFLOP/s), triton speed / SDPA speed = {t_ref / t_tri:5.2f}")


if __name__ == "__main__":
    _bench()
