"""Triton kernels of the resnet_fused Triton backend (see resnet_fused/triton_backend.py)."""
