"""Triton kernels with PyTorch references and a dispatch (see each file)."""
