import os
import tempfile

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present.
# It must be chosen before any @triton.jit runs, i.e. before resnet_fused is imported
# (backend_under_test imports it, so it is imported below this line).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# auto's verdicts (python -m resnet_fused.verify) come from an empty cache of the test session's
# own, never the machine's: what auto runs in a test must not depend on what was verified here.
os.environ["RESNET_FUSED_CACHE_DIR"] = tempfile.mkdtemp(prefix="resnet_fused_test_cache_")

from backend_under_test import OP_SUITE_BACKENDS, BackendUnderTest, tf32  # noqa: E402


FUSED_BACKENDS = {"triton", "cuda"}
RESNET_UNIT_CONFIGS = {"stem7x7s2", "1x1s2", "3x3", "3x3s2_bias"}  # the ResNet-50 unit types of CONFIGS

# The GPU kit's first correctness check (`pytest -m gpu_smoke`, which benchmarks/gpu_report.py
# runs within 3 minutes before any benchmark; a fused backend with a failure there is not
# benchmarked): per (module, test function), which parametrizations (the parts of the test id)
# belong to it. Every op on every fused backend in fp16/bf16/fp32 over the ResNet-50 layer
# types, units through autograd, the op-level structural checks, and the GPU checks below.
# Not resnet50 in exact float32 (test_float32_model_within_eager): its first run compiles
# about 226 Triton kernels (aot's enumeration at its 4x33x33 input, TF32 off) at seconds
# each, serially in one test, past the per-test limit; it runs in the kit's later GPU tests.
GPU_SMOKE = {
    ("test_ops", "test_conv_ops_vs_reference"): lambda p: bool(p & FUSED_BACKENDS) and "nhwc" in p,
    ("test_ops", "test_add_relu_op"): lambda p: bool(p & FUSED_BACKENDS),
    ("test_ops", "test_unit_matches_eager"): lambda p: (bool(p & FUSED_BACKENDS) and "nhwc" in p and "relu" in p
                                                        and bool(p & RESNET_UNIT_CONFIGS)
                                                        and bool(p & {"bfloat16", "float32"})),
    ("test_ops", "test_fused_forward_runs_no_aten_convolution_batchnorm_or_relu"): lambda p: bool(p & FUSED_BACKENDS),
    ("test_ops", "test_resolved_backend"): lambda p: bool(p & FUSED_BACKENDS),
    ("test_ops", "test_compile_fullgraph_unit"): lambda p: bool(p & FUSED_BACKENDS),
    ("test_edge_cases", "test_nan_and_inf_propagate_as_in_eager"): lambda p: bool(p & FUSED_BACKENDS),
    ("test_edge_cases", "test_nonfinite_statistics_on_a_64_channel_layer"): lambda p: bool(p & FUSED_BACKENDS),
    ("test_edge_cases", "test_strided_input_matches_eager"): lambda p: bool(p & FUSED_BACKENDS),
    ("test_cuda_graphs", "test_cuda_graph_inference_equals_eager"): lambda p: (bool(p & FUSED_BACKENDS)
                                                                               and {"resnet18", "bf16"} <= p),
    # The CUTLASS sm90 kernels against the sm80 kernel and float64; the recompute chain per backend.
    ("test_backend_cuda", "test_sm90_kernels_match_the_sm80_kernel"): lambda p: True,
    ("test_backend_cuda", "test_channels_padded_to_whole_vectors"): lambda p: True,
    # Every sm90 kernel (dtype x epilogue x tile width) on partial/whole tiles, 1x1 and strided.
    ("test_backend_cuda", "test_sm90_kernel_paths"): lambda p: True,
    # Triton ops on a second GPU (skipped with one GPU).
    ("test_backend_triton", "test_ops_on_a_second_gpu_while_the_first_is_current"): lambda p: True,
    ("test_recompute", "test_block_float32_per_tensor"): lambda p: bool(p & FUSED_BACKENDS),
    ("test_ops", "test_bn_act_conv_bn_stats_vs_reference"): lambda p: (bool(p & FUSED_BACKENDS) and "nhwc" in p
                                                                        and bool(p & {"bfloat16", "float32"})),
}


def in_gpu_smoke(item) -> bool:
    rule = GPU_SMOKE.get((item.module.__name__.rpartition(".")[2], getattr(item, "originalname", item.name)))
    if rule is None:
        return False
    callspec = getattr(item, "callspec", None)
    return rule(set(callspec.id.split("-")) if callspec is not None else set())


def pytest_collection_modifyitems(items):
    for item in items:
        if in_gpu_smoke(item):
            item.add_marker(pytest.mark.gpu_smoke)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("needs_cuda"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_backend():
    """Every test starts from seed 0 and restores the backend it found. float32 means float32:
    TF32 is off (PyTorch allows it for convolutions by default, and on a GPU the fused kernels
    follow that switch, as cuDNN does, which would make float32 comparisons against float64
    fail by ~1e-3; the interpreter on CPU computes exact float32 either way). The TF32 paths
    have their own tests, which turn it on with backend_under_test.tf32(True)."""
    import resnet_fused

    torch.manual_seed(0)
    previous = resnet_fused.get_backend()
    with tf32(False):
        yield
    resnet_fused.set_backend(previous)


@pytest.fixture(params=OP_SUITE_BACKENDS)
def backend(request):
    """The op suite's backend (a backend_under_test.BackendUnderTest): each test runs once per backend,
    skipped with `available_backends()`'s reason where that backend cannot run, otherwise
    with it selected (use_backend); TF32 is off, as in every test (_seed_and_backend)."""
    import resnet_fused

    name = request.param
    reason = resnet_fused.available_backends()[name]
    if reason is not None:
        pytest.skip(f"{name} backend unavailable: {reason}")
    with resnet_fused.use_backend(name):
        yield BackendUnderTest(name)
