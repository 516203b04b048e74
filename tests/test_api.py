"""Backend selection and argument validation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_ops import CONFIGS, run_unit_case

import resnet_fused
from resnet_fused import ops


def test_backend_selection_api():
    reasons = resnet_fused.available_backends()
    assert set(reasons) == {"auto", "cuda", "triton", "reference"}
    assert reasons["auto"] is None and reasons["reference"] is None
    with resnet_fused.use_backend("reference"):
        assert resnet_fused.get_backend() == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        resnet_fused.set_backend("cudnn")
    for name in ("cuda", "triton"):
        if reasons[name] is not None:
            with pytest.raises(RuntimeError, match=f"backend '{name}' is unavailable: .+"):
                resnet_fused.set_backend(name)


def test_env_var_selects_backend_and_import_queries_no_device():
    code = (
        "import torch, resnet_fused\n"
        "torch.cuda.is_available = lambda: (_ for _ in ()).throw(AssertionError('device queried at import'))\n"
        "import importlib\n"
        "print(resnet_fused.get_backend())\n"
    )
    env = {"RESNET_FUSED_BACKEND": "reference", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"


def _args():
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(8, 4, 3, 3)
    c = torch.ones(8)
    return x, w, c


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.update(x=a["x"].long()), TypeError, "x must be a floating-point tensor"),
        (lambda a: a.update(weight=a["weight"].double()), TypeError, "weight has dtype torch.float64"),
        (lambda a: a.update(x=a["x"][0]), ValueError, "x must be 4-D"),
        (lambda a: a.update(weight=torch.randn(8, 3, 3, 3)), ValueError, "x has 4 channels"),
        (lambda a: a.update(stride=0), ValueError, "stride must be >= 1"),
        (lambda a: a.update(padding=-1), ValueError, "padding must be >= 0"),
        (lambda a: a.update(groups=3), ValueError, "divisible by groups"),
        (lambda a: a.update(bn_weight=torch.ones(7)), ValueError, "bn_weight must have 8 elements"),
        (lambda a: a.update(residual=torch.randn(2, 8, 5, 5)), ValueError, "residual must have the conv output"),
        (lambda a: a.update(x=torch.randn(2, 4, 1, 1), padding=0), ValueError, "too small for kernel"),
        (lambda a: a.update(running_var=None), ValueError, "both be tensors or both be None"),
    ],
)
def test_bad_arguments_raise_clear_errors(mutate, error, match):
    x, w, c = _args()
    kwargs = dict(x=x, weight=w, bn_weight=c, bn_bias=c, running_mean=c.clone(), running_var=c.clone(),
                  training=False, padding=1)
    mutate(kwargs)
    with pytest.raises(error, match=match):
        ops.conv_bn_relu(**kwargs)


def test_batch_of_one_in_training_same_error_as_batchnorm():
    x, w, c = torch.randn(1, 4, 1, 1), torch.randn(8, 4, 1, 1), torch.ones(8)
    with pytest.raises(ValueError) as eager:
        torch.nn.functional.batch_norm(torch.nn.functional.conv2d(x, w), c.clone(), c.clone(), training=True)
    with pytest.raises(ValueError) as ours:
        ops.conv_bn_relu(x, w, c, c, c.clone(), c.clone(), training=True)
    assert str(ours.value) == str(eager.value)


def test_add_relu_rejects_mismatch():
    with pytest.raises(ValueError, match="residual must have x's shape"):
        ops.add_relu(torch.randn(2, 3), torch.randn(3, 2))
    with pytest.raises(TypeError, match="residual has dtype"):
        ops.add_relu(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64))


# The reference in half precision on a GPU (CPU covers float32/float64 in test_ops.py).
@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_reference_half_precision_on_gpu(cfg, training, dtype):
    with resnet_fused.use_backend("reference"):
        run_unit_case(cfg, training, residual=True, relu=True, channels_last=True, dtype=dtype, device="cuda")
