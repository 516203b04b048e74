"""What only the Triton backend has; its ops run the shared op suite (tests/test_ops.py),
compiled on a GPU or in the Triton CPU interpreter (conftest sets TRITON_INTERPRET=1 when
no GPU is present).

  * Coverage (`unsupported_reason`, docs/design.md's support matrix): the calls handed to the
    reference path, each with a reason.
  * On a GPU (@needs_cuda): float32 units with TF32 allowed (PyTorch's default for
    convolutions, and then the kernels' tl.dot precision), against eager under TF32 too.
"""

from __future__ import annotations

import pytest
import torch
from backend_under_test import interpreted, tf32
from unit_cases import CONFIGS, run_unit_case

import resnet_fused
from resnet_fused import backends
from resnet_fused.backends import triton as triton_backend

REASON = backends.unavailable_reason("triton")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"triton backend unavailable: {REASON}")

DEVICE = "cpu" if interpreted("triton") else "cuda"


def test_coverage():
    """Any geometry and group count, either layout, are covered; the calls handed to the
    reference path each come with a reason."""
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    w, v = torch.randn(6, 4, 3, 3, device=DEVICE), torch.rand(6, device=DEVICE) + 0.5
    conv = ([1, 1], [1, 1], [1, 1], 1)
    x_nhwc, w_grouped = x.contiguous(memory_format=torch.channels_last), torch.randn(6, 2, 3, 3, device=DEVICE)
    covered = {
        "eval": ("conv_bn_eval", x, w, v, v, torch.randn(2, 6, 5, 5, device=DEVICE), *conv, True),
        "eval, channels_last, groups=2": ("conv_bn_eval", x_nhwc, w_grouped, v, v, None, *conv[:3], 2, True),
        "train, dilation 2, stride 2": ("conv_bn_train", x, w, None, v, v, None, [2, 2], [2, 2], [2, 2], 1, 1e-5,
                                        False),
        "add_relu": ("add_relu", x, x),
    }
    for what, (op, *args) in covered.items():
        assert triton_backend.unsupported_reason(op, *args) is None, what
    uncovered = {
        "unknown op": ("no_such_op", x),
        "float64": ("conv_bn_eval", x.double(), w.double(), v.double(), v.double(), None, *conv, True),
        "mixed dtypes": ("add_relu", x, x.half()),
        "residual dtype": ("conv_bn_eval", x, w, v, v, torch.randn(2, 6, 5, 5, device=DEVICE).half(), *conv, True),
        "empty input": ("add_relu", x[:0], x[:0]),
        "other device": ("add_relu", x.to("meta"), x.to("meta")),
    }
    for what, (op, *args) in uncovered.items():
        assert triton_backend.unsupported_reason(op, *args) is not None, what


@pytest.mark.needs_cuda
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_unit_matches_eager_with_tf32(cfg, training):
    with resnet_fused.use_backend("triton"), tf32(True):
        run_unit_case(cfg, training, True, True, True, torch.float32, device="cuda")


def test_ops_run_on_their_tensors_device(monkeypatch):
    """Every Triton op runs with the current CUDA device set to its tensors' device (Triton
    launches on the current device and stream). On CPU: the registered ops are called through
    the dispatcher with their tensors reported as on cuda:1 and torch.cuda.device recorded, so
    the guard is seen entered around the real implementation."""
    entered, seen_inside = [], []

    class RecordedDevice:  # stands in for torch.cuda.device
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    on_cuda1 = torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "device", RecordedDevice)
    monkeypatch.setattr(triton_backend, "_cuda_device_of", lambda t: on_cuda1)
    real_add_relu = triton_backend._k_add_relu.add_relu
    monkeypatch.setattr(triton_backend._k_add_relu, "add_relu",
                        lambda *a: (seen_inside.append(list(entered)), real_add_relu(*a)))
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    w, v = torch.randn(6, 4, 3, 3, device=DEVICE), torch.rand(6, device=DEVICE) + 0.5
    ops = torch.ops.resnet_fused_triton
    y = ops.add_relu(x, x)
    assert seen_inside == [[on_cuda1]], "add_relu's kernel launched outside the device guard"
    torch.testing.assert_close(y, torch.relu(x + x))
    entered.clear()
    ops.conv_bn_eval(x, w, v, v, None, [1, 1], [1, 1], [1, 1], 1, True)
    ops.conv_bn_train(x, w, None, v, v, None, [1, 1], [1, 1], [1, 1], 1, 1e-5, True)
    assert entered == [on_cuda1, "exit"] * 2


@pytest.mark.needs_cuda
def test_ops_on_a_second_gpu_while_the_first_is_current():
    """Tensors on cuda:1 with cuda:0 current: the kernels run on cuda:1 (right results, nothing
    touched on cuda:0) and the current device is cuda:0 again afterwards."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x = torch.randn(2, 64, 9, 9, device="cuda:1").contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 1, 1, device="cuda:1")
    v = torch.rand(64, device="cuda:1") + 0.5
    torch.cuda.set_device(0)
    y = torch.ops.resnet_fused_triton.conv_bn_eval(x, w, v, v, None, [1, 1], [0, 0], [1, 1], 1, True)
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0 and y.device == torch.device("cuda", 1)
    ref = torch.relu(torch.nn.functional.conv2d(x.double(), w.double()) * v.double()[:, None, None]
                     + v.double()[:, None, None])
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
