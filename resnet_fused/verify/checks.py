"""What the verifier checks in a backend's worker process: a model's layer calls, each layer
type's ops against float64 under the package's rule (resnet_fused.tolerances), the whole model
against torchvision's, and (on a GPU) each layer shape's time against the reference's.

Every op is judged on the same inputs for the backend, for eager PyTorch (the reference ops in
the same dtype: F.conv2d, float32 BatchNorm arithmetic) and for float64, as the test suite's op
tests do: error at most 2x eager's against float64 plus a few ulps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from .. import _library, backends
from .._batchnorm import update_running_stats
from ..backends import auto
from ..tolerances import FLOOR_ULPS, Judgement, aggregate_rel_l2, judge, tf32_emulation

# --precision names: the dtype of the convolutions' operands (autocast's for bf16/fp16) and TF32.
PRECISIONS = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False), "fp32": (torch.float32, False),
              "fp32-tf32": (torch.float32, True)}
MODES = ("infer", "train")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A recorded tensor argument without its values."""

    shape: tuple
    stride: tuple
    dtype: torch.dtype
    requires_grad: bool


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One fused-op call a model makes (arguments as the backend receives them)."""

    op: str
    args: tuple
    precision: str
    mode: str

    @property
    def label(self) -> str:
        """E.g. 'train bf16 conv 3x3/2 64->128 56x56 +res relu'."""
        names = _library.argument_names(self.op)
        at = dict(zip(names, self.args))
        x = at["x"]
        if self.op == "add_relu":
            return f"{self.mode} {self.precision} add_relu {x.shape[1]}ch {x.shape[2]}x{x.shape[3]}"
        w = at["weight"]
        text = (f"{self.mode} {self.precision} conv {w.shape[2]}x{w.shape[3]}/{at['stride'][0]} "
                f"{x.shape[1]}->{w.shape[0]} {x.shape[2]}x{x.shape[3]}")
        if at.get("residual") is not None:
            text += " +res"
        return text + (" relu" if at["relu"] else "")

    @property
    def layer_type(self) -> tuple:
        """What distinguishes the kernels' code paths (not the channel counts or sizes)."""
        at = dict(zip(_library.argument_names(self.op), self.args))
        if self.op == "add_relu":
            return (self.op, self.precision, self.mode)
        return (self.op, self.precision, self.mode, tuple(at["weight"].shape[2:]), tuple(at["stride"]),
                tuple(at["padding"]), tuple(at["dilation"]), at["groups"], at.get("residual") is not None,
                at.get("bias") is not None, at["relu"])


def _spec(a):
    if isinstance(a, torch.Tensor):
        return TensorSpec(tuple(a.shape), a.stride(), a.dtype, a.requires_grad)
    return tuple(a) if isinstance(a, list) else a


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device):
    """autocast (bf16/fp16) and TF32 as the precision names them, for the block."""
    dtype, allow_tf32 = PRECISIONS[precision]
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16)):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


def build_models(model_name: str, device: torch.device):
    """(torchvision's or the other library's model, its fused copy), random weights with
    non-trivial BatchNorm, channels_last on `device` (the main job's models)."""
    from ..benchmark.models import fused_copy, torchvision_model

    base = torchvision_model(model_name, device)
    return base, fused_copy(base)


def record_layer_calls(fused: torch.nn.Module, x: torch.Tensor, precision: str, mode: str) -> list[LayerCall]:
    """The distinct fused-op calls (by auto's shape key) one forward of the fused model makes in
    `mode`, run on the reference backend (on a copy: a training forward updates running statistics)."""
    import copy

    fused = copy.deepcopy(fused)
    calls, seen = [], set()

    def record(op_name, op_args, backend):
        key = auto._shape_key(op_name, op_args)
        if key not in seen:
            seen.add(key)
            calls.append(LayerCall(op_name, tuple(_spec(a) for a in op_args), precision, mode))

    fused.train(mode == "train")
    grad = torch.enable_grad() if mode == "train" else torch.no_grad()
    with backends.use_backend("reference"), backends.record_calls(record), precision_context(precision, x.device), grad:
        fused(x)
    return calls


def layer_types(calls: list[LayerCall]) -> list[LayerCall]:
    """The first call of each layer type."""
    first: dict[tuple, LayerCall] = {}
    for call in calls:
        first.setdefault(call.layer_type, call)
    return list(first.values())


# ---------------------------------------------------------------------------------------
# Inputs: fresh random values with the recorded shapes, strides and dtypes.


def _materialize(spec: TensorSpec, device, gen: torch.Generator, kind: str) -> torch.Tensor:
    values = torch.randn(spec.shape, generator=gen, dtype=torch.float32)
    if kind == "weight":
        fan_in = math.prod(spec.shape[1:]) or 1
        values = values / fan_in**0.5
    elif kind == "positive":
        values = torch.rand(spec.shape, generator=gen) + 0.5
    elif kind == "small":
        values = values * 0.1
    t = torch.empty_strided(spec.shape, spec.stride, dtype=spec.dtype, device=device)
    return t.copy_(values)


_KINDS = {"weight": "weight", "scale": "positive", "bn_weight": "positive", "bias": "small"}


def materialize(call: LayerCall, device, seed: int, requires_grad: bool = False) -> tuple:
    """call's arguments as tensors of fresh random values on `device`."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name, a in zip(_library.argument_names(call.op), call.args):
        if isinstance(a, TensorSpec):
            t = _materialize(a, device, gen, _KINDS.get(name, "normal"))
            a = t.requires_grad_(a.requires_grad and requires_grad)
        elif isinstance(a, tuple):
            a = list(a)
        out.append(a)
    return tuple(out)


def as64(args) -> tuple:
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


# ---------------------------------------------------------------------------------------
# The op checks.


@dataclasses.dataclass
class CheckResult:
    """What one layer's checks found: the worst error ratio (error / allowed; > 1 fails) and the
    tensors over their bar."""

    label: str
    worst: float = 0.0
    worst_tensor: str = ""
    failures: list[str] = dataclasses.field(default_factory=list)
    fallback: str | None = None  # why the backend did not run this layer (the reference would)

    def add(self, judgement: Judgement, message: str | None = None) -> None:
        ratio = judgement.ratio if not math.isnan(judgement.err) else math.inf
        if ratio > self.worst or not self.worst_tensor:
            self.worst, self.worst_tensor = max(ratio, self.worst), judgement.name
        if not judgement.passed:
            self.failures.append(message or judgement.message())


def _judge(name, actual, eagers, exact, scale=None) -> Judgement:
    """The rule against the most lenient of several stand-ins for eager (TF32: cuDNN's TF32 and
    the float64 op on operands rounded or truncated to tf32, as different tensor-core paths do)."""
    judgements = [judge(actual, e, exact, name, scale) for e in eagers]
    return max(judgements, key=lambda j: j.bar)


def _add_stat(result: CheckResult, name, actual, exact64, rtol, atol) -> None:
    """A float32 statistic against float64 statistics of the same stored z (the op tests'
    rtol/atol bound), added to `result` as a Judgement whose ratio is the worst element's
    error over its bound."""
    diff = (actual.double() - exact64).abs()
    bound = atol + rtol * exact64.abs()
    ratio = (diff / bound).max().item() if diff.numel() else 0.0
    judgement = Judgement(name, ratio, 0.5, 0.0)  # bar 1.0: passes iff every element is within its bound
    result.add(judgement, f"{name}: error up to {ratio:.2f}x its bound (rtol {rtol:g}, atol {atol:.1e}) against "
                          "float64 statistics of the stored z")


def _eagers(op, args, tf32: bool, operands) -> list:
    eagers = [op(*args)]
    if tf32:  # the tensor-core paths: tf32 operands rounded to nearest or truncated
        eagers += [tf32_emulation(op, args, rounding, operands) for rounding in ("round", "truncate")]
    return eagers


def _compare(result, what, ours, eagers, exact, reduction_scale=None):
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    eagers = [e if isinstance(e, (tuple, list)) else (e,) for e in eagers]
    exact = exact if isinstance(exact, (tuple, list)) else (exact,)
    if len(ours) != len(exact):
        result.failures.append(f"{what}: {len(ours)} outputs, expected {len(exact)}")
        return
    for i, (a, e, r) in enumerate(zip(ours, eagers[0], exact)):
        if a.numel() == 0 and r.numel() == 0:  # a gradient not asked for
            continue
        if a.shape != r.shape or a.dtype != e.dtype:
            result.failures.append(f"{what}[{i}]: {tuple(a.shape)} {a.dtype}, expected {tuple(r.shape)} {e.dtype}")
            continue
        if any(n > 1 and s != t for n, s, t in zip(a.shape, a.stride(), e.stride())):  # size-1 dims: any stride
            result.failures.append(f"{what}[{i}]: strides {a.stride()}, eager's {e.stride()} (layout not kept)")
        scale = reduction_scale if a.dim() == 1 and reduction_scale is not None else None
        result.add(_judge(f"{what}[{i}]", a, [e[i] for e in eagers], r.double(), scale))


def check_layer(call: LayerCall, backend: str, device, seed: int) -> CheckResult:
    """Backend `backend`'s ops on one layer type: forward, every gradient and, in training, the
    batch and running statistics."""
    result = CheckResult(call.label)
    ref, ns = torch.ops.resnet_fused, getattr(torch.ops, backends.BACKENDS[backend][0].NAMESPACE)
    tf32 = PRECISIONS[call.precision][1]
    args = materialize(call, device, seed)
    reason = backends.unsupported_reason(backend, call.op, *args)
    if reason is not None:
        result.fallback = reason
        return result
    gen = torch.Generator().manual_seed(seed + 1)

    def like(t):
        return torch.randn(t.shape, generator=gen).to(device, t.dtype).contiguous(
            memory_format=torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
            and not t.is_contiguous() else torch.contiguous_format)

    with precision_context(call.precision, torch.device(device)), torch.no_grad(), torch.autocast(
            torch.device(device).type, enabled=False):
        if call.op == "add_relu":
            _compare(result, "add_relu", ns.add_relu(*args), [ref.add_relu(*args)], ref.add_relu(*as64(args)))
            return result
        at = dict(zip(_library.argument_names(call.op), args))
        conv = (at["stride"], at["padding"], at["dilation"], at["groups"])
        relu, x, w = at["relu"], at["x"], at["weight"]
        if call.op == "conv_bn_eval":
            y = ns.conv_bn_eval(*args)
            _compare(result, "conv_bn_eval", y, _eagers(ref.conv_bn_eval, args, tf32, (0, 1)),
                     ref.conv_bn_eval(*as64(args)))
            grad_y = like(y)
            mask = [True, True, True, True, at["residual"] is not None]
            bargs = (grad_y, x, w, at["scale"], y if relu else None, *conv, relu, mask)
            _compare(result, "conv_bn_eval_backward", ns.conv_bn_eval_backward(*bargs),
                     _eagers(ref.conv_bn_eval_backward, bargs, tf32, (0, 1, 2)), ref.conv_bn_eval_backward(*as64(bargs)),
                     _reduction_scale(grad_y, y.double(), None, None))
            return result
        # conv_bn_train
        y, z, mean, var = ns.conv_bn_train(*args)
        eagers = _eagers(ref.conv_bn_train, args, tf32, (0, 1))
        _compare(result, "conv_bn_train", (y, z), [e[:2] for e in eagers], ref.conv_bn_train(*as64(args))[:2])
        # The float32 statistics against float64 statistics of the z this kernel stored.
        z64 = z.double()
        mean64, var64 = z64.mean(dim=(0, 2, 3)), z64.var(dim=(0, 2, 3), unbiased=False)
        _add_stat(result, "batch mean", mean, mean64, 1e-5, 1e-5 * max(z64.abs().max().item(), 1e-30))
        _add_stat(result, "batch var", var, var64, 1e-4, 1e-6)
        count = z.shape[0] * z.shape[2] * z.shape[3]
        if count > 1:
            running = [torch.rand(mean.shape, generator=gen).to(device, mean.dtype) for _ in range(2)]
            running64 = [r.double() for r in running]
            update_running_stats(*running, mean, var, count, 0.1)
            update_running_stats(*running64, mean64, var64, count, 0.1)
            _add_stat(result, "running_mean", running[0], running64[0], 1e-5, 1e-5 * max(z64.abs().max().item(), 1e-30))
            _add_stat(result, "running_var", running[1], running64[1], 1e-4, 1e-6)
        grad_y = like(y)
        mask = [True, True, at["bias"] is not None, True, True, at["residual"] is not None]
        bargs = (grad_y, x, w, z, y if relu else None, mean, var, at["bn_weight"], *conv, at["eps"], relu, mask)
        _compare(result, "conv_bn_train_backward", ns.conv_bn_train_backward(*bargs),
                 _eagers(ref.conv_bn_train_backward, bargs, tf32, (0, 1, 2)),
                 ref.conv_bn_train_backward(*as64(bargs)), _reduction_scale(grad_y, z64, mean, var))
    return result


def _reduction_scale(grad_y, z64, mean, var) -> float:
    """Bound on the summed terms of the per-channel gradients: sum |g| times the largest factor
    (the floor of a sum that cancels, e.g. a conv bias's gradient under BatchNorm)."""
    factor = max(1.0, z64.abs().max().item())
    if mean is not None:
        xhat = (z64 - mean.double().view(1, -1, 1, 1)) / (var.double().view(1, -1, 1, 1) + 1e-5).sqrt()
        factor = max(factor, xhat.abs().max().item())
    return grad_y.double().abs().sum(dim=(0, 2, 3)).max().item() * factor


# ---------------------------------------------------------------------------------------
# The whole model against torchvision's.


def check_model(base: torch.nn.Module, fused: torch.nn.Module, backend: str, x: torch.Tensor,
                precision: str) -> CheckResult:
    """Eval logits of the fused model on `backend` against torchvision's on the same input,
    both judged against torchvision's float64 logits: relative L2 error at most 2x
    torchvision's plus a few ulps. Under TF32 torchvision's error is the larger of cuDNN's and
    that of the float64 model fed tf32-rounded or -truncated conv operands (tensor-core paths
    differ: the op checks' bar, model-wide). (Training-mode BatchNorm at the verifier's small
    batches is too ill-conditioned for a model-level comparison; the op checks cover training.)"""
    result = CheckResult(f"model eval logits {precision}")
    base.eval()
    fused.eval()
    dtype, tf32 = PRECISIONS[precision]
    with torch.no_grad():
        exact = _float64_model(base)(x.double())
        with precision_context(precision, x.device):
            theirs = [base(x).float()]
            with backends.use_backend(backend), backends.record_selections() as ran:
                ours = fused(x).float()
        if tf32:
            theirs += [_float64_model(base, rounding)(x.double()) for rounding in ("round", "truncate")]
    err = aggregate_rel_l2([ours], [exact])
    err_base = max(aggregate_rel_l2([t], [exact]) for t in theirs)
    floor = FLOOR_ULPS * torch.finfo(dtype).eps
    judgement = Judgement("logits", err, err_base, floor)
    result.add(judgement, f"logits: relative L2 error {err:.3e} vs float64 exceeds 2x torchvision's {err_base:.3e}"
                          f" + floor {floor:.1e}")
    if not ran.get(backend):
        result.fallback = f"no layer of the model ran on {backend}"
    return result


def _float64_model(base: torch.nn.Module, tf32_rounding: str | None = None) -> torch.nn.Module:
    """A float64 copy of `base`; with tf32_rounding, each convolution's input and weight turned
    into tf32 ('round' or 'truncate') first, as a TF32 tensor-core path does."""
    import copy

    from ..tolerances import tf32_operand

    model = copy.deepcopy(base).double()
    if tf32_rounding is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.copy_(tf32_operand(module.weight.float(), tf32_rounding).double())
                module.register_forward_pre_hook(
                    lambda _, args: (tf32_operand(args[0].float(), tf32_rounding).double(), *args[1:]))
    return model


# ---------------------------------------------------------------------------------------
# Timing (GPU): each distinct layer call on the backend and on the reference.


def time_layer(call: LayerCall, ns_names: list[str], device, seed: int) -> tuple[str, dict[str, float]]:
    """(repr of auto's shape key for this call, {backend: median ms}) with auto's own timer:
    forward for inference, forward + backward for training."""
    grad = torch.enable_grad() if call.mode == "train" else torch.no_grad()
    args = materialize(call, device, seed, requires_grad=call.mode == "train")
    ms = {}
    with grad, precision_context(call.precision, torch.device(device)):
        key = repr(auto._shape_key(call.op, args))
        for name in ns_names:
            ms[name] = auto._time_call(call.op, args, getattr(torch.ops, backends.BACKENDS[name][0].NAMESPACE))
    return key, ms
