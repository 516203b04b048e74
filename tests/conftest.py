import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present.
# It must be chosen before any @triton.jit runs, i.e. before resnet_fused is imported
# (helpers imports it, so it is imported below this line).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import OP_SUITE_BACKENDS, BackendUnderTest, tf32  # noqa: E402


def pytest_collection_modifyitems(items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("needs_cuda"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_backend():
    import resnet_fused

    torch.manual_seed(0)
    previous = resnet_fused.get_backend()
    yield
    resnet_fused.set_backend(previous)


@pytest.fixture(params=OP_SUITE_BACKENDS)
def backend(request):
    """The op suite's backend (a helpers.BackendUnderTest): each test runs once per backend,
    skipped with `available_backends()`'s reason where that backend cannot run, otherwise
    with it selected (use_backend). float32 means float32: TF32 is off for the test (the
    TF32 paths have their own tests in the per-backend modules)."""
    import resnet_fused

    name = request.param
    reason = resnet_fused.available_backends()[name]
    if reason is not None:
        pytest.skip(f"{name} backend unavailable: {reason}")
    with resnet_fused.use_backend(name), tf32(False):
        yield BackendUnderTest(name)
