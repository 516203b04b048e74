"""Per-op benchmarks: every distinct ResNet-50 conv layer (224x224 input) as one
conv + BatchNorm (+ residual) (+ ReLU) unit, and add_relu, per provider.

    python -m pytest benchmarks/test_bench_ops.py --benchmark-only [-k "eval and b256"]

GPU cases (bfloat16, batch 256 for throughput and 32 for latency): the fused cuda and
triton backends, eager PyTorch (nn.Conv2d + nn.BatchNorm2d + ReLU, channels_last), the
convolution alone (cuDNN: the floor a fused unit is measured against) and torch.compile
of the eager unit. CPU cases (float32, batch 2, three real ResNet-50 layer shapes at
32x32 input): the reference backend and eager, a smoke test of the harness, not a
performance claim. extra_info holds TFLOP/s (convolution FLOPs only; the backward
counts dgrad + wgrad) or GB/s (add_relu: read x and residual, write y) and the largest
|difference| from the eager unit's outputs. See bench_layers.py for what each op and
provider runs.
"""

from __future__ import annotations

import pytest
import torch

import bench_layers as bl

GPU_LAYERS = bl.resnet_conv_layers("resnet50", image_size=224)
GPU_CASES = bl.op_cases(GPU_LAYERS, batches=(256, 32), dtype="bf16", providers=bl.GPU_PROVIDERS)
CPU_CASES = bl.op_cases(bl.cpu_layers(), batches=(2,), dtype="fp32", providers=bl.CPU_PROVIDERS)
HAS_GPU = torch.cuda.is_available()

PARAMS = [
    pytest.param(case, id=case.id, marks=pytest.mark.skipif(not HAS_GPU, reason="GPU case (no CUDA GPU here)"))
    for case in GPU_CASES
] + [
    pytest.param(case, id=f"cpu-{case.id}",
                 marks=pytest.mark.skipif(HAS_GPU, reason="CPU smoke case (the GPU cases cover it)"))
    for case in CPU_CASES
]


@pytest.mark.parametrize("case", PARAMS)
def test_op(benchmark, device, on_gpu, flush_l2, timed, record_median, case):
    reason = bl.skip_reason(case, device)
    if reason is not None:
        pytest.skip(reason)
    tensors = bl.make_tensors(case, device)
    reference = bl.reference_outputs(case, device, tensors) if case.provider != "eager-unit" else None
    unit = bl.make_unit(case, tensors)
    with unit.context():
        outputs = unit.run()  # warm-up: compile, autotune, cuDNN search
        if reference is not None and unit.comparable:
            diff, scale = bl.max_abs_diff(outputs, reference)
            benchmark.extra_info.update(max_abs_diff_vs_eager=diff, eager_max_abs=scale)
        del outputs, reference
        benchmark.extra_info.update(op=case.op, batch=case.batch, dtype=case.dtype, provider=case.provider,
                                    layer=case.layer.name if case.layer else None, device=str(device))
        benchmark.pedantic(timed(unit.run), setup=flush_l2, rounds=50 if on_gpu else 10,
                           warmup_rounds=2, iterations=1)
    flops, moved = case.flops(), case.bytes_moved()
    record_median(tflops=flops / 1e12 if flops else None, gbps=moved / 1e9 if moved else None)
