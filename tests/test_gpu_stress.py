"""GPU stress (needs_cuda), on both fused backends: no memory leak over 1000 calls on random
shapes, and autotuning caches that stay bounded over many batch sizes and resolutions.
(Inputs with more than 2^31 elements: test_edge_cases.py.)
"""

from __future__ import annotations

import random

import pytest
import torch

import resnet_fused
from resnet_fused import backends, ops

FUSED = ["triton", "cuda"]


def _require(name):
    reason = backends.unavailable_reason(name)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")


def _random_unit_configs(rng, count):
    configs = []
    for _ in range(count):
        n, c_in, c_out = rng.randint(1, 4), rng.choice([3, 8, 16]), rng.choice([8, 16, 32])
        hw, k, stride = rng.randint(4, 20), rng.choice([1, 3]), rng.choice([1, 2])
        ho = (hw + 2 * (k // 2) - k) // stride + 1
        configs.append(dict(n=n, c_in=c_in, c_out=c_out, hw=hw, k=k, stride=stride, ho=ho,
                            training=rng.random() < 0.5 and n * ho * ho > 1,
                            dtype=rng.choice([torch.float16, torch.float32]),
                            channels_last=rng.random() < 0.5, residual=rng.random() < 0.5))
    return configs


def _call_unit(cfg):
    x = torch.randn(cfg["n"], cfg["c_in"], cfg["hw"], cfg["hw"], device="cuda", dtype=cfg["dtype"])
    if cfg["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(cfg["c_out"], cfg["c_in"], cfg["k"], cfg["k"], device="cuda", dtype=cfg["dtype"],
                    requires_grad=True)
    c = cfg["c_out"]
    gamma, beta = torch.ones(c, device="cuda", requires_grad=True), torch.zeros(c, device="cuda")
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    res = (torch.randn(cfg["n"], c, cfg["ho"], cfg["ho"], device="cuda", dtype=cfg["dtype"])
           if cfg["residual"] else None)
    y = ops.conv_bn_relu(x, w, gamma, beta, rm, rv, training=cfg["training"], stride=cfg["stride"],
                         padding=cfg["k"] // 2, residual=res)
    y.backward(torch.randn_like(y))


@pytest.mark.needs_cuda
@pytest.mark.parametrize("name", FUSED)
def test_no_memory_leak_over_1000_calls(name):
    """1000 forward+backward calls (train and eval, fp16/fp32, NCHW/NHWC, with and without a
    residual) on shapes drawn at random from 24 configurations leave
    torch.cuda.memory_allocated() where it started. Every configuration runs once first
    (kernel compilation, autotuning, cuBLAS/cuDNN workspaces); the pool is bounded so that
    autotuning does not dominate the run."""
    _require(name)
    rng = random.Random(0)
    configs = _random_unit_configs(rng, 24)
    with resnet_fused.use_backend(name):
        for cfg in configs:
            _call_unit(cfg)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        for _ in range(1000):
            _call_unit(rng.choice(configs))
        torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == start, (
        f"{torch.cuda.memory_allocated() - start} bytes still allocated after 1000 calls")


@pytest.mark.needs_cuda
def test_triton_autotune_caches_stay_bounded():
    """Autotuning caches do not grow with every new batch size or resolution: 60 training
    steps on distinct (N, H, W) leave at most 32 entries per autotuned kernel. (An autotune
    key holding the raw GEMM row count M = N * H_out * W_out fails this: one benchmark run
    and one cache entry per new M. Bucketing M, e.g. to a power of two, passes.)"""
    _require("triton")
    from resnet_fused.backends.triton.kernels import batchnorm as k_bn
    from resnet_fused.backends.triton.kernels import conv as k_conv

    kernels = {name: obj for mod in (k_conv, k_bn) for name, obj in vars(mod).items()
               if isinstance(getattr(obj, "cache", None), dict) and hasattr(obj, "configs")}
    assert kernels, "no autotuned kernels found"
    rng = random.Random(1)
    shapes = set()
    while len(shapes) < 60:
        shapes.add((rng.randint(2, 64), rng.randint(4, 56)))
    with resnet_fused.use_backend("triton"):
        for n, hw in sorted(shapes):
            x = torch.randn(n, 16, hw, hw, device="cuda", requires_grad=True)
            w = torch.randn(16, 16, 3, 3, device="cuda", requires_grad=True)
            y = ops.conv_bn_relu(x, w, None, None, None, None, training=True, padding=1)
            y.backward(torch.ones_like(y))
    sizes = {name: len(obj.cache) for name, obj in kernels.items()}
    assert max(sizes.values()) <= 32, sizes
