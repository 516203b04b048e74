import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present.
# It must be chosen before any @triton.jit runs, i.e. before resnet_fused is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
