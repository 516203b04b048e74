"""Model-level throughput, fused vs torchvision, measured in one pytest-benchmark run.

    pytest benchmarks/ --benchmark-only [--benchmark-json out.json]

On CPU: small cases through the reference path (a smoke test of the harness, not a
performance claim). On a GPU: batch 32 at 224x224, channels_last, bfloat16 autocast,
each fused backend that is usable there, against torchvision eager at its strongest.
The full GPU report (per-layer shapes, training, torch.compile baselines) is the
benchmark issue's work.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torchvision

import resnet_fused

PROVIDERS = ["torchvision", "fused-reference", "fused-triton", "fused-cuda"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _case(device):
    if device.type == "cuda":
        return dict(batch=32, size=224, autocast=torch.autocast("cuda", dtype=torch.bfloat16))
    return dict(batch=2, size=64, autocast=contextlib.nullcontext())


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("model_name", ["resnet18", "resnet50"])
def test_inference(benchmark, device, model_name, provider):
    backend = provider.removeprefix("fused-") if provider != "torchvision" else None
    if backend is not None:
        reason = resnet_fused.available_backends()[backend]
        if reason is not None:
            pytest.skip(reason)
        if device.type == "cpu" and backend != "reference":
            pytest.skip("fused kernels need a GPU (the interpreter is for tests, not timing)")
    case = _case(device)
    build = getattr(torchvision.models, model_name) if backend is None else getattr(resnet_fused, model_name)
    model = build().eval().to(device, memory_format=torch.channels_last)
    x = torch.randn(case["batch"], 3, case["size"], case["size"], device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    selected = resnet_fused.use_backend(backend) if backend else contextlib.nullcontext()

    def run():
        with torch.inference_mode(), case["autocast"]:
            model(x)
        sync(device)

    with selected:
        run()  # warm-up: cuDNN autotune, Triton compile
        benchmark.extra_info.update(batch=case["batch"], size=case["size"], device=str(device))
        benchmark.pedantic(run, rounds=5 if device.type == "cpu" else 30, iterations=1, warmup_rounds=1)
