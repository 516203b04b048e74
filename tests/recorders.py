"""Recorders of the ops that reach the kernels, and checks of which backend ran them."""

from __future__ import annotations

import contextlib
import dataclasses

from torch.utils._python_dispatch import TorchDispatchMode

from resnet_fused import backends

from backend_under_test import OP_SUITE_BACKENDS

NAMESPACES = {"reference": "resnet_fused", "triton": "resnet_fused_triton", "cuda": "resnet_fused_cuda"}


@dataclasses.dataclass
class OpCall:
    namespace: str
    op: str  # the op's name without namespace and overload
    args: tuple


class OpRecorder(TorchDispatchMode):
    """Records every op that reaches the kernels (below autograd): `names` as
    'namespace::op.overload', `calls` the resnet_fused* ops with their arguments."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.calls: list[OpCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.names.append(f"{func.namespace}::{func._opname}.{func._overloadname}")
        if func.namespace.startswith("resnet_fused"):
            self.calls.append(OpCall(func.namespace, func._opname, args))
        return func(*args, **kwargs)


class ExpandingRecorder(OpRecorder):
    """Also records the aten ops a resnet_fused* op's Python implementation issues (the
    reference's, and the Triton backend's, whose kernels launch directly as its triton_op
    does): the mode re-enters itself around the implementation. The CUDA backend's ops are
    C++ kernels: what they do inside is not visible here."""

    def __init__(self):
        super().__init__()
        self.impls = {}
        for name in OP_SUITE_BACKENDS:
            module = backends.BACKENDS[name][0]
            if module is not None and hasattr(module, "_IMPLS"):
                self.impls[module.NAMESPACE] = (name, module._IMPLS)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in self.impls:
            return super().__torch_dispatch__(func, types, args, kwargs)
        self.names.append(f"{func.namespace}::{func._opname}.{func._overloadname}")
        self.calls.append(OpCall(func.namespace, func._opname, args))
        name, impls = self.impls[func.namespace]
        context = contextlib.nullcontext()
        if name == "triton":
            from torch._library.triton import set_wrap_triton_enabled

            context = set_wrap_triton_enabled(False)
        with self, context:
            return impls[func._opname](*args, **kwargs)


def expected_backend(name: str, op_name: str, *op_args) -> tuple[str, str | None]:
    """(the backend a call of op `op_name` runs on with backend `name` selected, why it is not
    `name`): `name` itself when its kernels cover the call, else the reference."""
    reason = backends.unsupported_reason(name, op_name, *op_args)
    return (name if reason is None else "reference"), reason


def assert_ran_on(recorder: OpRecorder, name: str, ops: tuple[str, ...]) -> None:
    """The resnet_fused ops recorded are `ops` (in any order, each at least once), all in the
    namespace of the backend that covers the first call under backend `name` selected."""
    assert recorder.calls, "no resnet_fused op ran"
    first = recorder.calls[0]
    expected, reason = expected_backend(name, first.op, *first.args)
    namespace = backends.BACKENDS[expected][0].NAMESPACE
    ran = {(c.namespace, c.op) for c in recorder.calls}
    assert {ns for ns, _ in ran} == {namespace}, (
        f"expected every op on {expected}"
        + (f" ({name} does not cover the call: {reason})" if reason else "") + f", ran {sorted(ran)}")
    assert {op for _, op in ran} == set(ops), f"expected ops {sorted(ops)}, ran {sorted(ran)}"


def assert_model_ran_on(recorder: OpRecorder, backend: str, *ops: str) -> None:
    """Each op in `ops` ran in `backend`'s namespace; for a fused backend, no conv unit took
    the reference path (every resnet18/resnet50 unit is covered by both fused backends)."""
    ns = NAMESPACES[backend]
    ran = {(c.namespace, c.op) for c in recorder.calls}
    for op in ops:
        assert (ns, op) in ran, f"{ns}::{op} did not run; ran: {sorted(ran)}"
    if backend != "reference":
        fallen_back = sorted(op for n, op in ran if n == "resnet_fused" and op.startswith("conv_bn"))
        assert not fallen_back, f"{backend}: these units ran on the reference instead: {fallen_back}"
