"""What only the Triton backend has; its ops run the shared op suite (tests/test_ops.py),
compiled on a GPU or in the Triton CPU interpreter (conftest sets TRITON_INTERPRET=1 when
no GPU is present).

  * Coverage (`unsupported_reason`, the README's support matrix): the calls handed to the
    reference path, each with a reason.
  * On a GPU (@needs_cuda): float32 units with TF32 allowed (PyTorch's default for
    convolutions, and then the kernels' tl.dot precision), against eager under TF32 too.
"""

from __future__ import annotations

import pytest
import torch
from helpers import CONFIGS, interpreted, run_unit_case, tf32

import resnet_fused
from resnet_fused import backends
from resnet_fused.backends import triton as triton_backend

REASON = backends.unavailable_reason("triton")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"triton backend unavailable: {REASON}")

DEVICE = "cpu" if interpreted("triton") else "cuda"


def test_uncovered_calls_give_a_reason():
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    w, v = torch.randn(6, 4, 3, 3, device=DEVICE), torch.rand(6, device=DEVICE) + 0.5
    conv = ([1, 1], [1, 1], [1, 1], 1)
    assert triton_backend.unsupported_reason("conv_bn_eval", x, w, v, v, None, *conv, True) is None
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
