"""Backend selection and argument validation."""

from __future__ import annotations

import contextlib

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from unit_cases import CONFIGS, run_unit_case

import resnet_fused
from resnet_fused import backends, ops
from resnet_fused.benchmark import record_backends


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


def test_reference_is_used_on_cpu_by_default():
    x = torch.randn(1, 3, 4, 4)
    assert resnet_fused.backends.resolved_backend("add_relu", x, x) == "reference"  # auto on CPU
    with resnet_fused.use_backend("reference"):
        assert resnet_fused.backends.resolved_backend("add_relu", x, x) == "reference"


# ---------------------------------------------------------------------------------------
# auto's per-shape choice between two covering backends. On CPU, two fake fused backends
# stand in for cuda and triton: they run the reference and the Triton (interpreter)
# namespaces, and a fake timer says which is faster.


@pytest.fixture
def two_auto_backends(monkeypatch):
    """auto sees 'cuda' and 'triton' (both verified here; they run torch.ops.resnet_fused and
    torch.ops.resnet_fused_triton) and the reference on CPU tensors; returns the fake timer's
    table {backend: ms} and its call log."""
    reason = backends.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(f"the fake 'triton' runs the Triton ops, unavailable here: {reason}")
    table = {"cuda": 2.0, "triton": 1.0, "reference": 3.0}
    calls = []

    def fake_time(op_name, op_args, backend):
        calls.append((op_name, backend.NAME))
        return table[backend.NAME]

    for name, ns in (("cuda", "resnet_fused"), ("triton", backends.BACKENDS["triton"][0].NAMESPACE)):
        monkeypatch.setitem(backends.BACKENDS, name, (SimpleNamespace(
            NAME=name, NAMESPACE=ns, DIRECT=None, DIRECT_WITH_GRAD=None,
            unsupported_reason=lambda *a: None), None))
    monkeypatch.setattr(backends, "unavailable_reason", lambda name: None)
    monkeypatch.setattr(backends, "_auto_candidates", lambda x: ("cuda", "triton"))
    monkeypatch.setattr(backends, "_verified_on", lambda device: frozenset({"cuda", "triton"}))
    monkeypatch.setattr(backends.auto, "_time_backend", fake_time)
    monkeypatch.delenv(backends.TIMING_ENV_VAR, raising=False)
    backends.clear_auto_choices()
    resnet_fused.set_backend("auto")
    yield table, calls
    backends.clear_auto_choices()


def _eval_unit(c_in=4, c_out=6, dtype=torch.float32):
    unit = resnet_fused.nn.ConvBNReLU2d(c_in, c_out, 3, padding=1).to(dtype).eval()
    return unit


def test_auto_times_each_shape_once_and_runs_the_faster(two_auto_backends):
    table, calls = two_auto_backends
    unit = _eval_unit()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad(), record_backends() as used:
        y = unit(x)
        unit(x)
    assert dict(used) == {"triton": 2}
    assert calls == [("conv_bn_eval", "cuda"), ("conv_bn_eval", "triton"), ("conv_bn_eval", "reference")], \
        "timed once per candidate (the reference among them), then cached"
    (key, choice), = backends.auto_choices().items()
    assert choice == {"backend": "triton", "ms": {"cuda": 2.0, "triton": 1.0, "reference": 3.0}}
    torch.testing.assert_close(y, torch.relu(unit.bn(unit.conv(x))))
    # a new shape, a new dtype, a new memory layout: timed again; the faster one may differ
    table.update(cuda=0.5)
    with torch.no_grad(), record_backends() as used:
        unit(torch.randn(3, 4, 8, 8))
        unit.double()(torch.randn(2, 4, 8, 8, dtype=torch.float64))
        unit.float()(x.to(memory_format=torch.channels_last))
    assert len(calls) == 12 and len(backends.auto_choices()) == 4
    assert dict(used) == {"cuda": 3}
    # PyTorch's own kernels faster still: auto runs the reference
    table.update(reference=0.1)
    with torch.no_grad(), record_backends() as used:
        unit(torch.randn(5, 4, 8, 8))
    assert dict(used) == {"reference": 1}


def test_auto_times_training_ops_and_backward_follows_forward(two_auto_backends):
    """A training unit: conv_bn_train timed (the key records that autograd runs), its backward runs
    on the backend the forward picked, and the result matches eager."""
    _, calls = two_auto_backends
    unit = _eval_unit().train()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with record_backends() as used:
        y = unit(x)
    y.sum().backward()
    assert calls == [("conv_bn_train", "cuda"), ("conv_bn_train", "triton"), ("conv_bn_train", "reference")]
    assert dict(used) == {"triton": 1}
    (key, _), = backends.auto_choices().items()
    assert key[0] == "conv_bn_train" and key[1] is True  # grad mode is part of the key


@pytest.mark.parametrize("why", ["deterministic", "env", "compile"])
def test_auto_does_not_time_when_it_must_not(two_auto_backends, monkeypatch, why):
    """Under torch.use_deterministic_algorithms, with RESNET_FUSED_AUTO_TIMING=0 and while
    torch.compile traces, auto takes the first candidate (cuda) without timing. With
    RESNET_FUSED_AUTO_TIMING=0 a choice already timed is still used; in deterministic mode
    it is not (the pick must not depend on earlier timings)."""
    _, calls = two_auto_backends
    unit = _eval_unit()
    x = torch.randn(2, 4, 8, 8)
    run = unit
    if why == "env":
        monkeypatch.setenv(backends.TIMING_ENV_VAR, "0")
    if why == "compile":
        run = torch.compile(unit, fullgraph=True, backend="aot_eager")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(why == "deterministic")
    try:
        with torch.no_grad(), record_backends() as used:
            y = run(x)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert calls == [] and backends.auto_choices() == {}
    torch.testing.assert_close(y, torch.relu(unit.bn(unit.conv(x))))
    if why != "compile":  # compiled code does not go through select_ops at run time
        assert dict(used) == {"cuda": 1}
        monkeypatch.delenv(backends.TIMING_ENV_VAR, raising=False)
        with torch.no_grad():
            unit(x)  # timed now: triton is faster
        torch.use_deterministic_algorithms(why == "deterministic")
        if why == "env":
            monkeypatch.setenv(backends.TIMING_ENV_VAR, "0")
        try:
            with torch.no_grad():  # the same key as the call above
                picked = backends.resolved_backend("conv_bn_eval", *_eval_args(unit, x))
            assert picked == ("cuda" if why == "deterministic" else "triton")
        finally:
            torch.use_deterministic_algorithms(previous)


def _eval_args(unit, x):
    bn = unit.bn
    invstd = torch.rsqrt(bn.running_var + bn.eps)
    scale = bn.weight * invstd
    shift = bn.bias - bn.running_mean * scale
    return (x, unit.conv.weight, scale, shift, None, [1, 1], [1, 1], [1, 1], 1, True)


@pytest.mark.parametrize("op_name", ["conv_bn_eval", "conv_bn_train", "add_relu"])
def test_time_call_runs_forward_and_backward_on_cpu(op_name):
    """backends._time_call (the real timer; wall clock on CPU) on the reference ops: a positive
    median, and its backward call, built as autograd builds it, runs."""
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, requires_grad=True)
    c = torch.rand(5, requires_grad=True)
    args = {
        "conv_bn_eval": (x, w, c, c, None, [1, 1], [1, 1], [1, 1], 1, True),
        "conv_bn_train": (x, w, c, c, c, torch.randn(2, 5, 6, 6), [1, 1], [1, 1], [1, 1], 1, 1e-5, True),
        "add_relu": (x, torch.randn(2, 4, 6, 6)),
    }[op_name]
    ops_ns = torch.ops.resnet_fused
    assert backends.auto._time_call(op_name, args, ops_ns) > 0
    with torch.no_grad():
        outputs = getattr(ops_ns, op_name)(*args)
    backward = backends.auto._backward_call(op_name, args, outputs, ops_ns)
    if op_name == "add_relu":
        assert backward is None
    else:
        grads = backward()
        assert grads[0].shape == x.shape and grads[1].shape == w.shape


class _RecordedDevice:
    """Stands in for torch.cuda.device: records the devices entered, in order."""

    entered: list = []

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        self.entered.append(self.device)

    def __exit__(self, *exc):
        self.entered.append("exit")


def test_time_call_times_on_its_tensors_device(monkeypatch):
    """auto's timer runs and records its CUDA events with the current device set to the call's
    tensors' device (cuda:1 here while cuda:0 is current), not on whichever device is current.
    On CPU: torch.cuda.device and the events are recorded stand-ins, the call's first tensor
    reports cuda:1."""
    on_cuda1 = torch.device("cuda", 1)
    seen = []
    monkeypatch.setattr(_RecordedDevice, "entered", [])

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self):
            seen.append(("event", list(_RecordedDevice.entered)))

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 1.0

    class OnCuda1:  # the call's first argument, as the timer reads it
        device = on_cuda1
        requires_grad = False

    class Ops:
        @staticmethod
        def add_relu(*args):
            seen.append(("kernel", list(_RecordedDevice.entered)))

    monkeypatch.setattr(torch.cuda, "device", _RecordedDevice)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    assert backends.auto._time_call("add_relu", (OnCuda1(), OnCuda1()), Ops) == 1.0
    assert seen and all(inside == [on_cuda1] for _, inside in seen), seen
    assert _RecordedDevice.entered == [on_cuda1, "exit"]


def test_main_job_runs_on_its_device(monkeypatch):
    """The main job builds, checks and times every provider inside a device guard for the run's
    device (--device cuda:N sets the current device for events, streams and captures)."""
    import resnet_fused.benchmark as mb

    guarded, inside = [], []
    real_rows = mb._provider_rows

    @contextlib.contextmanager
    def recorded_guard(device):
        guarded.append(device)
        yield

    monkeypatch.setattr(mb, "device_guard", recorded_guard)
    monkeypatch.setattr(mb, "_provider_rows", lambda *a, **k: (inside.append(list(guarded)), real_rows(*a, **k))[1])
    assert mb.main(["--model", "resnet18", "--batch", "2", "--image-size", "32", "--iters", "1", "--warmup", "0",
                    "--providers", "fused-reference", "--device", "cpu", "--no-progress"]) == 0
    assert guarded == [torch.device("cpu")] and inside == [guarded]


@pytest.mark.needs_cuda
def test_auto_per_shape_choice_on_gpu(monkeypatch):
    """With cuda and triton both verified, a training unit's forward and backward on the GPU: each
    shape is timed on both and the reference (real CUDA-event timer), the fastest runs, and the
    result is the eager one's within tolerance (run_unit_case's checks)."""
    reasons = resnet_fused.available_backends()
    for name in ("cuda", "triton"):
        if reasons[name] is not None:
            pytest.skip(f"{name}: {reasons[name]}")
    monkeypatch.setattr(backends, "_verified_on", lambda device: frozenset({"cuda", "triton"}))
    monkeypatch.delenv(backends.TIMING_ENV_VAR, raising=False)
    backends.clear_auto_choices()
    try:
        with resnet_fused.use_backend("auto"):
            run_unit_case(CONFIGS["3x3"], True, residual=True, relu=True, channels_last=True,
                          dtype=torch.bfloat16, device="cuda")
        choices = backends.auto_choices()
        assert choices, "nothing was timed"
        for key, choice in choices.items():
            assert set(choice["ms"]) == {"cuda", "triton", "reference"}, key
            assert choice["backend"] == min(choice["ms"], key=choice["ms"].get), key
    finally:
        backends.clear_auto_choices()
