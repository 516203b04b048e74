"""The backend a test of the op suite runs on (the `backend` fixture of conftest.py yields a
BackendUnderTest), dtype parameters, and device settings: TF32, the sm90 launch counter.

Imported after tests/conftest.py has chosen TRITON_INTERPRET (it imports resnet_fused).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import pytest
import torch

from resnet_fused import backends

OP_SUITE_BACKENDS = ("reference", "triton", "cuda")
HALF_DTYPES = (torch.float16, torch.bfloat16)


def interpreted(name: str) -> bool:
    """Whether backend `name` runs its kernels in the Triton CPU interpreter here."""
    return name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


@dataclasses.dataclass(frozen=True)
class BackendUnderTest:
    """The backend a test of the op suite runs on, selected (use_backend) by the fixture."""

    name: str

    @property
    def namespace(self) -> str:
        return backends.BACKENDS[self.name][0].NAMESPACE

    @property
    def ops(self):
        """The backend's torch.ops namespace (its ops called directly, without selection)."""
        return getattr(torch.ops, self.namespace)

    @property
    def interpreted(self) -> bool:
        return interpreted(self.name)

    @property
    def fused(self) -> bool:
        return self.name != "reference"

    def device(self, dtype: torch.dtype = torch.float32) -> str:
        """Where this backend's tests put tensors of `dtype`: the fused backends' devices
        (CUDA; CPU for Triton under the interpreter); the reference on CPU, and on a GPU for
        float16/bfloat16 (half precision is a GPU case for every backend)."""
        if self.name == "cuda":
            return "cuda"
        if self.name == "triton":
            return "cpu" if self.interpreted else "cuda"
        return "cuda" if dtype in HALF_DTYPES else "cpu"

    @property
    def unit_steps(self) -> int:
        """Training steps per unit case: 3, or 1 under the Triton interpreter (slow); there
        test_unit_running_statistics_over_steps runs the 3 steps on one case."""
        return 1 if self.interpreted else 3

    def unsupported_reason(self, op_name: str, *op_args) -> str | None:
        return backends.unsupported_reason(self.name, op_name, *op_args)

    def require(self, op_name: str, *op_args) -> None:
        """Skip a test that calls this backend's op directly on inputs its kernels do not cover
        (through the public API such a call takes the reference path; tested separately)."""
        reason = self.unsupported_reason(op_name, *op_args)
        if reason is not None:
            pytest.skip(f"{self.name} does not cover this {op_name} call: {reason}")


def dtype_params(*dtypes: torch.dtype) -> list:
    """pytest params for `dtypes`, float16/bfloat16 marked needs_cuda: every backend runs them
    on a GPU only (the Triton interpreter path is tested in float32)."""
    return [pytest.param(d, id=str(d).removeprefix("torch."),
                         marks=pytest.mark.needs_cuda if d in HALF_DTYPES else ())
            for d in dtypes]


def sm90_launch_counter():
    """resnet_fused_sm90_launches from the CUDA extension (ctypes): how many sm90 CUTLASS kernels
    this process launched, so a test can tell they ran rather than the sm80 kernel."""
    import ctypes

    from resnet_fused.backends import cuda_sass

    fn = ctypes.CDLL(cuda_sass.extension_path()).resnet_fused_sm90_launches
    fn.restype = ctypes.c_int64
    return fn


@contextlib.contextmanager
def tf32(allowed: bool):
    """Set TF32 for convolutions and matmuls for the block (exact float32 comparisons need it
    off; a no-op on CPU)."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = allowed
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous
