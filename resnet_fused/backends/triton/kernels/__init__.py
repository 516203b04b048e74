"""Triton kernels of the resnet_fused Triton backend (see resnet_fused/backends/triton/__init__.py)."""
