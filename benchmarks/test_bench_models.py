"""Model-level throughput, fused vs torchvision, in images/s from one pytest-benchmark run.

    python -m pytest benchmarks/test_bench_models.py --benchmark-only [-k "resnet50 and train"]

GPU cases (224x224, channels_last): resnet50 inference (eval, inference_mode) at batch 1,
32 and 256 in bf16, fp16 and fp32/TF32 autocast, and a full training step (forward,
backward, SGD step; bf16 AMP) at batch 256; resnet18 and resnet101 at 256 in bf16. Each
fused backend, `auto`, torchvision eager and torch.compile of torchvision (default,
max-autotune, and for inference max-autotune with inductor freezing) on the same input.
CPU cases: small inputs through the reference backend and torchvision eager (a smoke test
of the harness). extra_info: images/s, peak GPU memory, the largest |logit difference|
against torchvision eager, the first call's time (compile/autotune) and which backend the
fused ops ran on. No test asserts a time.
"""

from __future__ import annotations

import pytest
import torch

import bench_models as bm
from resnet_fused import benchmark as mb

HAS_GPU = torch.cuda.is_available()
PARAMS = [
    pytest.param(config, provider, id=f"{config.label}-{provider}",
                 marks=pytest.mark.skipif(not HAS_GPU, reason="GPU case (no CUDA GPU here)"))
    for config in bm.gpu_configs() for provider in config.providers
] + [
    pytest.param(config, provider, id=f"cpu-{config.label}-{provider}",
                 marks=pytest.mark.skipif(HAS_GPU, reason="CPU smoke case (the GPU cases cover it)"))
    for config in bm.cpu_configs() for provider in config.providers
]


@pytest.mark.parametrize(("config", "provider"), PARAMS)
def test_model(benchmark, device, on_gpu, timed, record_median, config, provider):
    reason = bm.skip_reason(config, provider, device)
    if reason is not None:
        pytest.skip(reason)
    tv_model, x, reference_logits = bm.prepare(config, device)
    step, info = mb.prepare_provider(provider, tv_model, x, config.mode, config.precision, reference_logits,
                                     warmup=5 if on_gpu else 1)
    del tv_model
    info.pop("seconds_per_call")
    benchmark.extra_info.update(config.to_dict(), provider=provider, device=str(device), **info)
    if on_gpu:
        mb.release_memory(device)
        torch.cuda.reset_peak_memory_stats(device)
    benchmark.pedantic(timed(step), rounds=(50 if config.batch < 256 else 20) if on_gpu else 3,
                       warmup_rounds=1, iterations=1)
    if on_gpu:
        benchmark.extra_info["peak_memory_mib"] = mb.max_memory_mib(device)
    record_median(images_per_s=config.batch)
