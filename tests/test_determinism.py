"""Determinism: with torch.use_deterministic_algorithms(True), two identical fused training
runs (same weights, same inputs) are bitwise equal: logits, gradients and the final state
(parameters, running statistics, num_batches_tracked). On CPU with the reference backend; on
a GPU (needs_cuda) on every backend, float32 and bfloat16.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from model_twins import fused_model, images
from recorders import OpRecorder, assert_model_ran_on
from training_loops import float_loss, sgd_steps

import resnet_fused

DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@contextlib.contextmanager
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for the block, then the previous setting."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def determinism_check(backend, device, dtype, batch=4, hw=64, steps=2):
    """Two identical fused resnet18s trained for `steps` SGD steps on the same data under
    torch.use_deterministic_algorithms(True): logits, gradients and the final state (parameters,
    running statistics, num_batches_tracked) bitwise equal."""
    a = fused_model("resnet18", dtype, device)
    b = copy.deepcopy(a)
    inputs = [images(batch, hw, dtype, device) for _ in range(steps)]
    rec = OpRecorder()
    with deterministic_algorithms(), resnet_fused.use_backend(backend), rec:
        r_a = sgd_steps(a, inputs, loss_fn=float_loss)
        r_b = sgd_steps(b, inputs, loss_fn=float_loss)
    assert_model_ran_on(rec, backend, "conv_bn_train", "conv_bn_train_backward")
    for step in range(steps):
        assert torch.equal(r_a[step][0], r_b[step][0]), f"step {step}: logits differ"
        for (key, _), x, y in zip(a.named_parameters(), r_a[step][1], r_b[step][1]):
            assert torch.equal(x, y), f"step {step}: gradient of {key} differs"
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), f"{key} differs after {steps} steps"


def test_training_bitwise_deterministic_cpu():
    """Reference backend, float32, on CPU."""
    determinism_check("reference", "cpu", torch.float32, hw=32)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_training_bitwise_deterministic(backend, dtype, monkeypatch):
    """Two identical fused training steps on the GPU are bitwise equal (deterministic algorithms
    on; cuBLAS needs CUBLAS_WORKSPACE_CONFIG for that, else torch raises)."""
    if backend.interpreted:
        pytest.skip("the Triton interpreter runs CPU tensors only")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    determinism_check(backend.name, "cuda", dtype)
