"""Triton kernels with PyTorch references and a dispatch (see each file), and the two small formulas that the
kernels and the model files share: classifier-free guidance and RoPE's half rotation. They live here because every
model file can import this package without a cycle."""
import torch


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans, 2022): uncond + scale * (cond - uncond); scale 1 gives cond."""
    return uncond + scale * (cond - uncond)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's rotation of the two halves of the last axis: (x1, x2) -> (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)
