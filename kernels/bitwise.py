"""Parallel bitwise sampling in one launch per AR step (paper: parallel bitwise prediction with CFG).

Each AR step of UniAR predicts every bit of a 32-px token at once: levels x 2x2 x 64 = 1024 independent two-way
distributions. This kernel takes the bit logits of all rows ([cond; uncond] with classifier-free guidance), applies
guidance g = u + cfg (c - u) (model.guide) and temperature, draws each bit as a Bernoulli of the two-way softmax
p(1) = sigmoid((g1 - g0) / T), and writes the bits and their codes (2 b - 1) * code_scale (the AR loop keeps only the
bits: the next step re-embeds them through the tokenizer's output projections). Both halves of a guided batch draw
independently from the same guided distribution, as the official loop does.

Random numbers are counter-based (Philox via `tl.rand(seed, offset)`, offset = (step * rows + row) * K + bit), so a
step needs no generator state; the reference can instead be fed explicit uniforms, and then the kernel gives exactly
the reference's bits. This is a different random stream from the model's reference sampler (`model.MultinomialSampler`,
one `torch.multinomial` over all bits, which reproduces the official draws): seeded outputs of the two differ, and
the fast path is checked statistically.

Dispatch: `sample_bits` runs the Triton kernel on CUDA tensors and the PyTorch reference elsewhere;
UNIAR_KERNELS=triton|torch|auto forces a backend (tests set triton under TRITON_INTERPRET=1 on CPU).
"""
from __future__ import annotations

import os
import time

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs no Triton
    triton = None


def backend_for(t: torch.Tensor, backend: str | None = None) -> str:
    """'triton' or 'torch': the argument, else UNIAR_KERNELS, else Triton on CUDA tensors only."""
    choice = backend or os.environ.get("UNIAR_KERNELS", "auto")
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"UNIAR_KERNELS must be auto, triton or torch, got {choice!r}")
    if choice == "auto":
        choice = "triton" if (t.is_cuda and triton is not None) else "torch"
    if choice == "triton" and triton is None:
        raise ValueError("the Triton backend was asked for but triton is not installed")
    return choice


def _check(logits: torch.Tensor, cfg: float, temperature: float) -> None:
    if logits.ndim != 3 or logits.shape[-1] != 2:
        raise ValueError(f"logits must be (rows, bits, 2), got {tuple(logits.shape)}")
    if cfg > 1.0 and logits.shape[0] % 2:
        raise ValueError(f"with cfg > 1 the rows must be [cond; uncond], got an odd {logits.shape[0]}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def guided_p1(logits: torch.Tensor, cfg: float, temperature: float) -> torch.Tensor:
    """(rows, K, 2) logits -> p(bit = 1) (rows, K) in float32, guidance applied to both halves (`model.guide`'s
    formula, written out here: the kernels do not import the model)."""
    x = logits.float()
    if cfg > 1.0:
        cond, uncond = x.chunk(2)
        g = uncond + cfg * (cond - uncond)
        x = torch.cat([g, g])
    d = (x[..., 1] - x[..., 0]) / temperature
    return 1.0 / (1.0 + torch.exp(-d))


def sample_bits_reference(logits: torch.Tensor, cfg: float, temperature: float, uniforms: torch.Tensor,
                          code_scale: float = 0.125, code_dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch reference: bit = 1 where uniform < p(1). -> bits int64 (rows, K), codes (rows, K)."""
    _check(logits, cfg, temperature)
    bits = (uniforms.float() < guided_p1(logits, cfg, temperature)).to(torch.int64)
    return bits, ((2 * bits - 1) * code_scale).to(code_dtype)


if triton is not None:

    @triton.jit
    def _bitwise_kernel(logit_ptr, unif_ptr, bits_ptr, code_ptr, K, half, cfg, inv_t, code_scale, seed, step,
                        GUIDED: tl.constexpr, HAS_U: tl.constexpr, BLOCK: tl.constexpr):
        # one program = one row pair (cond b, uncond b + half) x BLOCK bits; rows = 2 * half when GUIDED
        b = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < K
        c0 = tl.load(logit_ptr + (b * K + offs) * 2, mask=m, other=0.0).to(tl.float32)
        c1 = tl.load(logit_ptr + (b * K + offs) * 2 + 1, mask=m, other=0.0).to(tl.float32)
        if GUIDED:
            u0 = tl.load(logit_ptr + ((b + half) * K + offs) * 2, mask=m, other=0.0).to(tl.float32)
            u1 = tl.load(logit_ptr + ((b + half) * K + offs) * 2 + 1, mask=m, other=0.0).to(tl.float32)
            c0 = u0 + cfg * (c0 - u0)
            c1 = u1 + cfg * (c1 - u1)
        p1 = 1.0 / (1.0 + tl.exp(-(c1 - c0) * inv_t))
        n_rows = 2 * half if GUIDED else half
        for r in tl.static_range(2 if GUIDED else 1):
            row = b + r * half
            if HAS_U:
                rnd = tl.load(unif_ptr + row * K + offs, mask=m, other=1.0)
            else:
                rnd = tl.rand(seed, (step * n_rows + row) * K + offs)
            bit = (rnd < p1).to(tl.int64)
            tl.store(bits_ptr + row * K + offs, bit, mask=m)
            code = (2 * bit - 1).to(tl.float32) * code_scale
            tl.store(code_ptr + row * K + offs, code.to(code_ptr.dtype.element_ty), mask=m)


def sample_bits_triton(logits: torch.Tensor, cfg: float, temperature: float, *, seed: int = 0, step: int = 0,
                       uniforms: torch.Tensor | None = None, code_scale: float = 0.125,
                       code_dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    _check(logits, cfg, temperature)
    R, K, _ = logits.shape
    guided = cfg > 1.0
    half = R // 2 if guided else R
    logits = logits.contiguous()
    bits = torch.empty(R, K, dtype=torch.int64, device=logits.device)
    codes = torch.empty(R, K, dtype=code_dtype, device=logits.device)
    if uniforms is not None:
        if tuple(uniforms.shape) != (R, K):
            raise ValueError(f"uniforms must be {(R, K)}, got {tuple(uniforms.shape)}")
        uniforms = uniforms.float().contiguous()
    BLOCK = 1024
    grid = (half, triton.cdiv(K, BLOCK))
    _bitwise_kernel[grid](logits, uniforms if uniforms is not None else logits, bits, codes, K, half, float(cfg),
                          1.0 / float(temperature), float(code_scale), int(seed), int(step), GUIDED=guided,
                          HAS_U=uniforms is not None, BLOCK=BLOCK)
    return bits, codes


def sample_bits(logits: torch.Tensor, cfg: float, temperature: float, *, seed: int = 0, step: int = 0,
                uniforms: torch.Tensor | None = None, code_scale: float = 0.125, code_dtype=torch.float32,
                backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One AR step's bits and codes from its bit logits (rows, K, 2) (rows = [cond; uncond] when cfg > 1).

    Uniforms: given, or counter-based from (seed, step) on the Triton path, or `torch.rand` from a generator seeded
    with (seed, step) on the reference path (a different stream).
    """
    if backend_for(logits, backend) == "triton":
        return sample_bits_triton(logits, cfg, temperature, seed=seed, step=step, uniforms=uniforms,
                                  code_scale=code_scale, code_dtype=code_dtype)
    if uniforms is None:
        g = torch.Generator(device=logits.device).manual_seed(int(seed) * 1_000_003 + int(step))
        uniforms = torch.rand(logits.shape[:2], generator=g, device=logits.device)
    return sample_bits_reference(logits, cfg, temperature, uniforms, code_scale, code_dtype)


def _bench() -> None:
    if not torch.cuda.is_available():
        print("bitwise benchmark: no CUDA device here; the kernel runs on CPU only through TRITON_INTERPRET=1 (tests)")
        return
    dev = torch.device("cuda")
    for rows in (2, 8, 32):
        logits = torch.randn(rows, 1024, 2, device=dev, dtype=torch.bfloat16)
        ref = lambda: sample_bits(logits, 2.0, 1.0, seed=0, step=1, backend="torch")  # noqa: E731
        fast = lambda: sample_bits(logits, 2.0, 1.0, seed=0, step=1, backend="triton")  # noqa: E731
        times = []
        for fn in (ref, fast):
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / 200)
        print(f"rows {rows:3d} x 1024 bits: torch {1e6 * times[0]:7.1f} us, triton {1e6 * times[1]:7.1f} us, "
              f"speed-up {times[0] / times[1]:5.2f} x")


if __name__ == "__main__":
    _bench()
