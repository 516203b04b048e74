"""Validation: bad input fails loudly, before any kernel runs.

  * bad arguments to ops.conv_bn_relu and ops.add_relu raise a Python exception (TypeError or
    ValueError) that names the argument, before any backend op runs, on every backend;
  * an explicitly requested backend that cannot run here (Triton not importable, a stale CUDA
    extension, a GPU older than sm80, an environment variable naming it) gives a clear error
    saying why; `auto` falls back to what can run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from unit_cases import UNIT_TENSOR_ARGS

from resnet_fused import backends, ops

# ---------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument, raised before any backend runs.

def _good_kwargs():
    x = torch.randn(2, 4, 6, 6)
    c = torch.ones(8)
    return dict(x=x, weight=torch.randn(8, 4, 3, 3), bn_weight=c.clone(), bn_bias=c.clone(), running_mean=c.clone(),
                running_var=c.clone(), training=False, padding=1, bias=c.clone(), residual=torch.randn(2, 8, 6, 6))


def _replace(name, fn):
    return lambda kw: kw.update({name: fn(kw[name])})


BAD = {}
for _name in UNIT_TENSOR_ARGS:
    for _dtype in (torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64):
        BAD[f"{_name}-{_dtype}"] = (_replace(_name, lambda t, d=_dtype: t.to(d)), TypeError,
                                    f"{_name} must be a floating-point tensor")
    other = "x" if _name != "x" else "weight"
    BAD[f"{_name}-meta-device"] = (
        _replace(_name, lambda t: t.to("meta")), ValueError,
        f"{_name} is on meta but x is on cpu" if _name != "x" else "weight is on cpu but x is on meta")
    BAD[f"{_name}-not-a-tensor-list"] = (_replace(_name, lambda t: t.tolist()), TypeError,
                                         f"{_name} must be a Tensor, got list")
    BAD[f"{_name}-not-a-tensor-float"] = (_replace(_name, lambda t: 1.0), TypeError,
                                          f"{_name} must be a Tensor, got float")
    BAD[f"{_name}-numpy"] = (_replace(_name, lambda t: t.numpy()), TypeError, f"{_name} must be a Tensor, got ndarray")
for _name in ("weight", "bias", "residual"):  # must match x's dtype (BatchNorm vectors may differ)
    BAD[f"{_name}-float64"] = (_replace(_name, torch.Tensor.double), TypeError,
                               f"{_name} has dtype torch.float64 but x has dtype torch.float32")
BAD.update({
    "x-3d": (_replace("x", lambda t: t[0]), ValueError, r"x must be 4-D, got shape \(4, 6, 6\)"),
    "x-5d": (_replace("x", lambda t: t[None]), ValueError, "x must be 4-D"),
    "weight-3d": (_replace("weight", lambda t: t[0]), ValueError, "weight must be 4-D"),
    "weight-5d": (_replace("weight", lambda t: t[None]), ValueError, "weight must be 4-D"),
    "residual-3d": (_replace("residual", lambda t: t[0]), ValueError, "residual must be 4-D"),
    "residual-5d": (_replace("residual", lambda t: t[None]), ValueError, "residual must be 4-D"),
    "bn_weight-2d": (_replace("bn_weight", lambda t: t[None]), ValueError, "bn_weight must be 1-D"),
    "running_var-0d": (_replace("running_var", lambda t: t[0]), ValueError, "running_var must be 1-D"),
    "bias-2d": (_replace("bias", lambda t: t[:, None]), ValueError, "bias must be 1-D"),
    "weight-in-channels": (_replace("weight", lambda t: t[:, :3]), ValueError, "x has 4 channels but weight"),
    "weight-out-channels": (_replace("weight", lambda t: t[:6]), ValueError, "bias must have 6 elements"),
    "weight-zero-kernel": (_replace("weight", lambda t: t[:, :, :0]), ValueError,
                           "weight must have no zero-size dimension"),
    "weight-zero-out-channels": (lambda kw: kw.update(weight=kw["weight"][:0], bn_weight=None, bn_bias=None,
                                                      running_mean=None, running_var=None, bias=None,
                                                      residual=None),
                                 ValueError, "weight must have no zero-size dimension"),
    "x-zero-channels": (lambda kw: kw.update(x=kw["x"][:, :0], weight=kw["weight"][:, :0]), ValueError,
                        "weight must have no zero-size dimension"),
    "x-zero-height": (lambda kw: kw.update(x=kw["x"][:, :, :0], weight=kw["weight"][:, :, :1, :1], residual=None),
                      ValueError, "x must have non-zero height and width"),
    "running_mean-length": (_replace("running_mean", lambda t: t[:7]), ValueError,
                            "running_mean must have 8 elements"),
    "bias-length": (_replace("bias", lambda t: torch.ones(9)), ValueError, "bias must have 8 elements"),
    "residual-channels": (_replace("residual", lambda t: t[:, :7]), ValueError,
                          r"residual must have the conv output's shape \[2, 8, 6, 6\]"),
    "residual-batch": (_replace("residual", lambda t: t[:1]), ValueError, "residual must have the conv output's"),
    "residual-spatial": (lambda kw: kw.update(stride=2), ValueError, "residual must have the conv output's"),
    "stride-negative": (lambda kw: kw.update(stride=-1), ValueError, "stride must be >= 1"),
    "stride-zero-pair": (lambda kw: kw.update(stride=(1, 0)), ValueError, "stride must be >= 1"),
    "padding-negative": (lambda kw: kw.update(padding=(0, -2)), ValueError, "padding must be >= 0"),
    "dilation-zero": (lambda kw: kw.update(dilation=0), ValueError, "dilation must be >= 1"),
    "dilation-negative": (lambda kw: kw.update(dilation=-1), ValueError, "dilation must be >= 1"),
    "stride-float": (lambda kw: kw.update(stride=1.5), TypeError, "stride must be an int or a pair of ints"),
    "stride-triple": (lambda kw: kw.update(stride=(1, 1, 1)), TypeError, "stride must be an int or a pair"),
    "stride-bool": (lambda kw: kw.update(stride=True), TypeError, "stride must be an int or a pair"),
    "padding-none": (lambda kw: kw.update(padding=None), TypeError, "padding must be an int or a pair"),
    "padding-str": (lambda kw: kw.update(padding="same"), TypeError, "padding must be an int or a pair"),
    "groups-zero": (lambda kw: kw.update(groups=0), ValueError, "groups must be a positive int"),
    "groups-negative": (lambda kw: kw.update(groups=-2), ValueError, "groups must be a positive int"),
    "groups-float": (lambda kw: kw.update(groups=2.0), TypeError, "groups must be an int"),
    "groups-bool": (lambda kw: kw.update(groups=True), TypeError, "groups must be an int"),
    "groups-mismatch": (lambda kw: kw.update(groups=2), ValueError, "x has 4 channels but weight"),
    "training-none": (lambda kw: kw.update(training=None), TypeError, "training must be a bool"),
    "training-str": (lambda kw: kw.update(training="yes"), TypeError, "training must be a bool"),
    "training-tensor": (lambda kw: kw.update(training=torch.tensor(True)), TypeError, "training must be a bool"),
    "relu-int": (lambda kw: kw.update(relu=1), TypeError, "relu must be a bool"),
    "relu-none": (lambda kw: kw.update(relu=None), TypeError, "relu must be a bool"),
    "eps-str": (lambda kw: kw.update(eps="1e-5"), TypeError, "eps must be a real number"),
    "eps-none": (lambda kw: kw.update(eps=None), TypeError, "eps must be a real number"),
    "eps-negative": (lambda kw: kw.update(eps=-1e-5), ValueError, "eps must be a number >= 0"),
    "eps-nan": (lambda kw: kw.update(eps=float("nan")), ValueError, "eps must be a number >= 0"),
    "momentum-str": (lambda kw: kw.update(momentum="0.1", training=True), TypeError, "momentum must be a real"),
    "momentum-tensor": (lambda kw: kw.update(momentum=torch.tensor(0.1)), TypeError, "momentum must be a real"),
    "running-stats-half-given": (lambda kw: kw.update(running_mean=None), ValueError, "both be tensors or both"),
    "process_group-without-init": (lambda kw: kw.update(process_group="world", training=True), RuntimeError,
                                   "process_group was given but torch.distributed is not initialized"),
    "batch-of-one-training": (lambda kw: kw.update(x=kw["x"][:1, :, :1, :1], padding=0, residual=None,
                                                   weight=kw["weight"][:, :, :1, :1], training=True),
                              ValueError, "Expected more than 1 value per channel when training"),
})


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_argument_raises_naming_it(backend, case):
    """On every backend (the `backend` fixture selects it): the exception, and no backend op
    selected (backends.record_selections counts every fused-op call)."""
    mutate, error, match = case
    kwargs = _good_kwargs()
    mutate(kwargs)
    with backends.record_selections() as selected, pytest.raises(error, match=match):
        ops.conv_bn_relu(**kwargs)
    assert not selected, f"validation must happen before any backend op runs; ran {dict(selected)}"


def test_bad_arguments_of_the_good_kwargs_are_good():
    """Control: the unmutated arguments run (so each case above fails for its own reason)."""
    y = ops.conv_bn_relu(**_good_kwargs())
    assert y.shape == (2, 8, 6, 6)


@pytest.mark.parametrize(
    "x, residual, error, match",
    [
        (torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3), TypeError, "x must be a floating-point tensor"),
        (torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), TypeError, "residual must be a floating-point"),
        (torch.ones(2, 3), torch.ones(2, 3, device="meta"), ValueError, "residual is on meta but x is on cpu"),
        (torch.ones(2, 3), [[1.0] * 3] * 2, TypeError, "residual must be a Tensor, got list"),
        ([[1.0] * 3] * 2, torch.ones(2, 3), TypeError, "x must be a Tensor, got list"),
        (torch.ones(2, 3), torch.ones(2, 1), ValueError, "residual must have x's shape"),  # no broadcasting
        (torch.ones(2, 3), torch.ones(2, 3, dtype=torch.float16), TypeError, "residual has dtype torch.float16"),
    ],
)
def test_add_relu_bad_arguments(backend, x, residual, error, match):
    with backends.record_selections() as selected, pytest.raises(error, match=match):
        ops.add_relu(x, residual)
    assert not selected, dict(selected)


# ---------------------------------------------------------------------------------------
# A backend that cannot run: a clear error when requested, `auto` falls back.


def _run_python(code, env_extra=None, drop=("TRITON_INTERPRET",)):
    env = {k: v for k, v in os.environ.items() if k not in drop and k != "RESNET_FUSED_BACKEND"}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_missing_triton_clear_error_and_auto_falls_back():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # import triton -> ImportError
        "import torch, resnet_fused\n"
        "reason = resnet_fused.available_backends()['triton']\n"
        "assert reason and 'Triton is not importable' in reason, reason\n"
        "try:\n"
        "    resnet_fused.set_backend('triton')\n"
        "except RuntimeError as e:\n"
        "    assert \"backend 'triton' is unavailable: Triton is not importable\" in str(e), e\n"
        "else:\n"
        "    raise AssertionError('set_backend(triton) did not raise')\n"
        "assert resnet_fused.get_backend() == 'auto'\n"
        "x = torch.randn(2, 3, 4, 4); w = torch.randn(5, 3, 3, 3)\n"
        "y = resnet_fused.ops.conv_bn_relu(x, w, None, None, None, None, training=True, padding=1)\n"
        "assert y.shape == (2, 5, 4, 4)\n"
        "print('ok')\n"
    )
    assert _run_python(code).strip() == "ok"


def test_extension_built_against_another_torch_clear_message():
    """An extension that fails to load the way one built against another torch does (an
    ImportError naming an undefined C++ symbol) gives a clear reason naming the rebuild
    command; import works, and the reference and triton backends still run."""
    code = (
        "import sys, importlib.abc\n"
        "class Stale(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'resnet_fused._C':\n"
        "            raise ImportError(name + '.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev')\n"
        "sys.meta_path.insert(0, Stale())\n"
        "import torch, resnet_fused\n"
        "reason = resnet_fused.available_backends()['cuda']\n"
        "assert 'failed to load' in reason and 'undefined symbol' in reason and 'another torch' in reason, reason\n"
        "assert 'pip install --no-build-isolation -e .' in reason, reason\n"
        "try:\n"
        "    resnet_fused.set_backend('cuda')\n"
        "except RuntimeError as e:\n"
        "    assert \"backend 'cuda' is unavailable\" in str(e), e\n"
        "else:\n"
        "    raise AssertionError('set_backend(cuda) did not raise')\n"
        "x = torch.randn(2, 3, 4, 4); w = torch.randn(5, 3, 3, 3)\n"
        "for name in ('reference', 'triton'):\n"
        "    if name == 'triton' and resnet_fused.available_backends()['triton'] is not None:\n"
        "        continue  # e.g. a torch whose wrap_triton rejects interpreted kernels\n"
        "    with resnet_fused.use_backend(name):\n"
        "        y = resnet_fused.ops.conv_bn_relu(x, w, None, None, None, None, training=True, padding=1)\n"
        "    assert y.shape == (2, 5, 4, 4)\n"
        "print('ok')\n"
    )
    assert _run_python(code, {"TRITON_INTERPRET": "1"}, drop=()).strip() == "ok"


def test_env_var_naming_an_unavailable_backend_fails_clearly():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import resnet_fused\n"
        "try:\n"
        "    resnet_fused.get_backend()\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    out = _run_python(code, {"RESNET_FUSED_BACKEND": "triton"})
    assert "resnet_fused backend 'triton' is unavailable: Triton is not importable" in out, out


@pytest.mark.skipif(backends.triton._IMPORT_ERROR is not None,
                    reason="Triton is not importable here, so the Triton backend's reason is that, not the GPU's")
def test_unsupported_gpu_architecture_clear_error_and_auto_falls_back():
    """A pre-sm80 GPU (simulated: torch.cuda reports a 7.5 device): both fused backends say
    why when requested; `auto` still runs (CPU tensors take the reference)."""
    code = (
        "import torch, resnet_fused\n"
        "torch.cuda.is_available = lambda: True\n"
        "torch.cuda.get_device_capability = lambda *a: (7, 5)\n"
        "torch.cuda.get_device_name = lambda *a: 'Fake T4'\n"
        "reasons = resnet_fused.available_backends()\n"
        "print(reasons)\n"
        "for name in ('triton', 'cuda'):\n"
        "    try:\n"
        "        resnet_fused.set_backend(name)\n"
        "    except RuntimeError as e:\n"
        "        print(name, 'ERROR', e)\n"
        "    else:\n"
        "        print(name, 'ACCEPTED')\n"
        "resnet_fused.set_backend('auto')\n"
        "x = torch.randn(2, 3, 4, 4)\n"
        "print('auto', resnet_fused.backends.resolved_backend('add_relu', x, x))\n"
    )
    out = _run_python(code)
    assert "triton ERROR resnet_fused backend 'triton' is unavailable: the GPU has compute capability 7.5" in out, out
    cuda_line = next(line for line in out.splitlines() if line.startswith("cuda "))
    assert "cuda ERROR resnet_fused backend 'cuda' is unavailable: " in cuda_line, out
    if "is not built" not in cuda_line and "failed" not in cuda_line:
        assert "sm80+" in cuda_line and "7.5" in cuda_line, cuda_line
    assert "auto reference" in out, out
