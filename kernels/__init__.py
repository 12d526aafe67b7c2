"""Triton kernels with PyTorch references and a dispatch (see each file), and RoPE's half rotation, the one small
formula the kernels and the model files share (it lives here because every model file can import this package
without a cycle). Classifier-free guidance is `model.guide`, beside the sampler that uses it; the kernels, the lower
layer, do not import the model and write that formula inline."""
import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's rotation of the two halves of the last axis: (x1, x2) -> (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)
