"""Ecosystem integration on the GPU (issue 6, GPU parts), on every GPU backend.

What is covered, each test parametrized over the backends `reference`, `triton` and `cuda`
(a backend unavailable here is skipped with `available_backends()`'s reason, e.g. the CUDA
extension not built):

  * CUDA graphs, following the PyTorch docs' recipe (warm-up on a side stream, capture with
    `torch.cuda.graph` on that stream, new data copied into the static input, `replay()`):
    - inference: fused resnet18 and resnet50 in eval, channels_last, bfloat16 and float32;
      each replay equals the eager run of the same model on the same data, bitwise;
    - training: a whole step (forward, loss, backward, SGD step with momentum) captured once
      and replayed for 3 steps equals the same steps run eagerly on a deep copy, bitwise:
      loss, gradients, parameters, BatchNorm running statistics and num_batches_tracked.
    Nothing in the captured region synchronizes with the host: the capture runs under
    `torch.cuda.set_sync_debug_mode("error")`, which raises on a synchronizing call (checked
    to raise on `.item()` first, so the guard is not vacuous). Known limit, not tested:
    SyncBatchNorm with a process group reads the global count on the host (see README).
    Why bitwise: the replay launches the kernels the eager run launches (Triton configs
    from the autotune cache the warm-up filled, cuDNN plans from torch's plan cache, with
    cudnn.deterministic on so no algorithm uses atomics; our kernels reduce in a fixed
    order) on the same data, so any difference is a capture bug (a stale buffer, a value
    frozen on the host at capture time), not rounding.
  * torch.compile(fullgraph=True) with Inductor: fused resnet18 in eval and one training
    step (logits, every gradient, running statistics) against the eager fused model; one
    Dynamo graph whose nodes call the selected backend's ops, and Inductor's generated code
    runs them (reference/cuda: the custom op is called from the wrapper; triton: the
    triton_op is traced into and our Triton kernels appear in the code).
  * CUDA autocast, float16 and bfloat16, eval and train: block outputs, logits, gradients and
    running statistics have torchvision-under-autocast's dtypes, and errors against float64
    are at most 2x torchvision-under-autocast's (as test_integration's CPU bfloat16 test).
  * Determinism: with torch.use_deterministic_algorithms(True) (and CUBLAS_WORKSPACE_CONFIG
    set, which deterministic cuBLAS requires), two identical fused training steps are
    bitwise equal, float32 and bfloat16.
Every test also checks, with a TorchDispatchMode, that the selected backend's kernels ran
(for triton/cuda: no conv unit fell back to the reference).

Tolerance rule (tests/helpers.py): a result is compared with a float64 reference; its error
may be at most 2x the error of the eager computation in the same dtype, plus a floor of a
few ulps (FLOOR_ULPS). Whole-model gradients and statistics use the aggregate relative L2
error of test_models._aggregate_rel_l2 (a per-tensor maximum is dominated by ReLU masks that
flip where a pre-activation is ~0).

Run (needs a CUDA GPU, every test is marked needs_cuda and skipped without one):

    pytest -m needs_cuda tests/test_gpu_integration.py

The test bodies are helpers taking `backend` and `device` (and the CUDA-graph helpers go
through `_warm_up` / `_capture`), so their non-graph logic also runs on CPU with the
reference backend.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from helpers import FLOOR_ULPS, assert_close_to_ref, randomize_model_bn
from test_integration import _block_dtypes, _float_state, _sgd_steps
from test_models import _aggregate_rel_l2, twins
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fused

def _assert_within_2x(what, got, baseline, ref64, floor):
    """Aggregate relative L2 error of the tensors `got` against `ref64` at most 2x that of
    `baseline` (eager, or torchvision) plus `floor`."""
    err, err_base = _aggregate_rel_l2(got, ref64), _aggregate_rel_l2(baseline, ref64)
    assert err <= 2 * err_base + floor, f"{what}: error {err:.2e} > 2x the baseline's {err_base:.2e}"


BACKENDS = ["reference", "triton", "cuda"]
NAMESPACES = {"reference": "resnet_fused", "triton": "resnet_fused_triton", "cuda": "resnet_fused_cuda"}
# The Triton kernels (resnet_fused/backends/triton/kernels/) Inductor emits when it traces into the
# triton_ops: the forward implicit-GEMM conv, the training backward's dz pass and dgrad.
TRITON_KERNELS = {"forward": "_conv_fwd_kernel", "backward": ("_bn_bwd_dz_kernel", "_conv_dgrad_kernel")}
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The backend's name; skipped, with the reason, when it cannot run here."""
    reason = resnet_fused.available_backends()[request.param]
    if reason is not None:
        pytest.skip(f"{request.param} backend unavailable: {reason}")
    return request.param


# ------------------------------------------------------------------------------------------
# Shared pieces


class FusedOpRecorder(TorchDispatchMode):
    """Records (namespace, op name) of every resnet_fused* op that reaches the kernels
    (below autograd, so backward ops are seen too)."""

    def __init__(self):
        super().__init__()
        self.calls: set[tuple[str, str]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace.startswith("resnet_fused"):
            self.calls.add((func.namespace, func._opname))
        return func(*args, **(kwargs or {}))

    def assert_ran(self, backend: str, *ops: str) -> None:
        """Each op in `ops` ran on `backend`; for a fused backend, no conv unit took the reference
        path (every resnet18/resnet50 unit is covered by both fused backends)."""
        ns = NAMESPACES[backend]
        for op in ops:
            assert (ns, op) in self.calls, f"{ns}::{op} did not run; ran: {sorted(self.calls)}"
        if backend != "reference":
            fallen_back = sorted(op for n, op in self.calls if n == "resnet_fused" and op.startswith("conv_bn"))
            assert not fallen_back, f"{backend}: these units ran on the reference instead: {fallen_back}"


def _fused_model(name: str, dtype: torch.dtype, device, num_classes: int = 10) -> torch.nn.Module:
    """Fused `name` with randomized BatchNorm parameters and statistics, channels_last."""
    model = randomize_model_bn(getattr(resnet_fused, name)(num_classes=num_classes))
    return model.to(device=device, dtype=dtype).to(memory_format=torch.channels_last)


def _images(batch: int, hw: int, dtype: torch.dtype, device) -> torch.Tensor:
    x = torch.randn(batch, 3, hw, hw, device=device)
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def _loss(out: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean (or sum) of the squared logits, in float32 (float64 for a float64 model). The mean
    keeps several SGD steps at lr 1e-2 stable; the sum keeps float16 gradients clear of underflow."""
    squares = (out if out.dtype == torch.float64 else out.float()).square()
    return squares.mean() if reduction == "mean" else squares.sum()


def _buffers(model):
    return [(k, b) for k, b in model.named_buffers()]


@contextlib.contextmanager
def _cudnn_deterministic():
    """cuDNN without benchmarking and without nondeterministic (atomic) algorithms."""
    previous = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous


@contextlib.contextmanager
def _deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for the block, then the previous setting."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


# ------------------------------------------------------------------------------------------
# CUDA graphs


@contextlib.contextmanager
def _host_sync_is_an_error():
    """torch.cuda.set_sync_debug_mode('error') for the block: a synchronizing CUDA call
    (.item(), .cpu(), a blocking copy, stream synchronize) raises. Restored afterwards."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _assert_sync_guard_works(device) -> None:
    """The guard is not vacuous: under it, a host read of a CUDA tensor raises."""
    t = torch.ones(1, device=device)
    with pytest.raises(RuntimeError, match="synchroniz"), _host_sync_is_an_error():
        t.sum().item()


def _side_stream():
    return torch.cuda.Stream()


def _warm_up(fn, iterations: int, stream) -> None:
    """The docs' recipe: run fn eagerly on a side stream before capture (lazy initialization,
    Triton autotuning and JIT, cuDNN plan selection, optimizer state all happen here)."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(iterations):
            fn()
    torch.cuda.current_stream().wait_stream(stream)


def _capture(fn, stream):
    """Capture one call of fn into a CUDA graph, on the warm-up stream (cuBLAS keeps a
    workspace per stream, created there during the warm-up), with host synchronization an
    error inside the captured region. Returns (replay, fn's static output)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream), _host_sync_is_an_error():
        static_out = fn()
    return graph.replay, static_out


def _first_difference(pairs) -> str:
    for name, a, b in pairs:
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item() if a.shape == b.shape else float("nan")
            return f"{name}: max |difference| {diff:.3e}"
    return ""


def cuda_graph_inference(name, backend, dtype, device="cuda", batch=8, hw=64, replays=2, warmup=3):
    """Fused `name` in eval, captured once; each replay on new data copied into the static input
    equals the eager run of the same model on that data, bitwise."""
    model = _fused_model(name, dtype, device).eval()
    static_x = _images(batch, hw, dtype, device)
    stream = _side_stream()
    with torch.no_grad(), _cudnn_deterministic(), resnet_fused.use_backend(backend):
        _assert_sync_guard_works(device)
        _warm_up(lambda: model(static_x), warmup, stream)
        replay, static_y = _capture(lambda: model(static_x), stream)
        for step in range(replays):
            x = _images(batch, hw, dtype, device)
            static_x.copy_(x)
            replay()
            rec = FusedOpRecorder()
            with rec:
                expected = model(x)
            rec.assert_ran(backend, "conv_bn_eval")
            assert static_y.dtype == expected.dtype == dtype
            assert torch.equal(static_y, expected), f"replay {step}: " + _first_difference(
                [("logits", static_y, expected)])


def cuda_graph_training(backend, dtype, device="cuda", batch=8, hw=64, steps=3, warmup=3):
    """A whole training step (forward, loss, backward, SGD step) of fused resnet18 captured once
    and replayed `steps` times equals the same steps run eagerly on a deep copy, bitwise: loss,
    gradients, parameters, running statistics and num_batches_tracked."""
    model = _fused_model("resnet18", dtype, device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    static_x = _images(batch, hw, dtype, device)

    def train_step(m, o, x):
        loss = _loss(m(x))
        loss.backward()
        o.step()
        return loss.detach()

    def graphed_step():
        return train_step(model, opt, static_x)

    def warm_up_step():
        opt.zero_grad(set_to_none=True)
        return graphed_step()

    stream = _side_stream()
    with _cudnn_deterministic(), resnet_fused.use_backend(backend):
        _assert_sync_guard_works(device)
        _warm_up(warm_up_step, warmup, stream)  # also creates SGD's momentum buffers
        # The eager twin starts from the same state: weights, buffers and momentum.
        eager = copy.deepcopy(model)
        eager_opt = torch.optim.SGD(eager.parameters(), lr=1e-2, momentum=0.9)
        eager_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        # As the docs: grads set to None before capture, so the captured backward allocates
        # them from the graph's pool and every replay refills them (no zero_grad needed).
        opt.zero_grad(set_to_none=True)
        replay, static_loss = _capture(graphed_step, stream)
        for step in range(steps):
            x = _images(batch, hw, dtype, device)
            static_x.copy_(x)
            replay()
            eager_opt.zero_grad(set_to_none=True)
            rec = FusedOpRecorder()
            with rec:
                loss = train_step(eager, eager_opt, x)
            rec.assert_ran(backend, "conv_bn_train", "conv_bn_train_backward")
            assert torch.isfinite(loss), f"step {step}: eager loss {loss.item()}"
            pairs = [("loss", static_loss, loss)]
            for (key, p), q in zip(model.named_parameters(), eager.parameters()):
                assert p.grad is not None and q.grad is not None, f"step {step}: no gradient for {key}"
                pairs += [(f"grad {key}", p.grad, q.grad), (key, p.detach(), q.detach())]
            pairs += [(key, a, b) for (key, a), (_, b) in zip(_buffers(model), _buffers(eager))]
            counted = int(model.bn1.num_batches_tracked)
            assert counted == warmup + step + 1, f"step {step}: num_batches_tracked is {counted} after the replay"
            mismatch = _first_difference(pairs)
            assert not mismatch, f"step {step}: replay differs from eager: {mismatch}"


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_cuda_graph_inference_equals_eager(backend, name, dtype):
    """Eval, channels_last: a captured forward replayed on new data equals eager, bitwise,
    with no host synchronization in the captured region."""
    cuda_graph_inference(name, backend, dtype)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DTYPE_IDS.get)
def test_cuda_graph_training_step_equals_eager(backend, dtype):
    """A captured forward + backward + SGD step replayed 3 times equals 3 eager steps on a deep
    copy, bitwise (loss, gradients, parameters, running statistics, num_batches_tracked), with
    no host synchronization in the captured region."""
    cuda_graph_training(backend, dtype)


# ------------------------------------------------------------------------------------------
# torch.compile


def _assert_in_code(code: str, backend: str, op: str, phase: str) -> None:
    """Inductor's generated code runs `op` on `backend`: reference and cuda ops are extern
    calls of the custom op; a triton_op is traced into, so its Triton kernels appear instead
    (the op's name is accepted too, should Inductor keep it as an extern call)."""
    ns = NAMESPACES[backend]
    markers = [f"{ns}.{op}.default("]  # the call of the op in the wrapper code
    if backend == "triton":
        kernels = TRITON_KERNELS[phase]
        markers += [kernels] if isinstance(kernels, str) else list(kernels)
    assert any(m in code for m in markers), f"{phase}: none of {markers} in Inductor's code"
    if backend != "reference":
        assert "resnet_fused.conv_bn" not in code, f"{phase}: a unit fell back to the reference op"
        assert "aten.convolution" not in code and "extern_kernels.convolution" not in code, (
            f"{phase}: an aten convolution in the compiled code")


def compile_check(backend, training, device="cuda", dtype=torch.float32, batch=4, hw=64, compiler="inductor"):
    """torch.compile(fused resnet18, fullgraph=True) against the eager fused model: logits and,
    in training, one step's gradients and running statistics, within 2x eager's error against
    float64; one graph calling `backend`'s ops; Inductor's code runs them."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._inductor.utils import run_and_get_code

    model = _fused_model("resnet18", dtype, device).train(training)
    eager, ref64 = copy.deepcopy(model), copy.deepcopy(model).double()
    counter = CompileCounterWithBackend(compiler)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = _images(batch, hw, dtype, device)

    def run(m, inp):
        with torch.set_grad_enabled(training):
            out = m(inp)
            if training:
                _loss(out).backward()
        return out.detach()

    op = "conv_bn_train" if training else "conv_bn_eval"
    with resnet_fused.use_backend(backend):
        if compiler == "inductor":
            out_c, codes = run_and_get_code(run, compiled, x)  # (resets Dynamo first)
        else:
            torch._dynamo.reset()
            out_c, codes = run(compiled, x), None
        rec = FusedOpRecorder()
        with rec:
            out_e = run(eager, x)
        rec.assert_ran(backend, op, *([f"{op}_backward"] if training else []))
    with resnet_fused.use_backend("reference"):
        out_64 = run(ref64, x.double())

    assert counter.frame_count == 1, f"{counter.frame_count} graphs (a graph break or a recompile)"
    targets = {str(node.target) for g in counter.graphs for node in g.graph.nodes if node.op == "call_function"}
    assert any(f"{NAMESPACES[backend]}.{op}" in t for t in targets), f"{op} of {backend} not in the graph: {targets}"
    if codes is not None:
        code = "\n".join(codes)
        assert codes, "Inductor generated no code"
        _assert_in_code(code, backend, op, "forward")
        if training:
            _assert_in_code(code, backend, f"{op}_backward", "backward")

    assert_close_to_ref(out_c, out_e, out_64, "logits", metric="l2")
    if not training:
        return
    floor = FLOOR_ULPS * torch.finfo(dtype).eps
    grads = [[p.grad for p in m.parameters()] for m in (model, eager, ref64)]
    assert all(g is not None for g in grads[0]), "a parameter of the compiled model got no gradient"
    _assert_within_2x("gradients", grads[0], grads[1], grads[2], floor)
    states = [[v for _, v in _float_state(m)] for m in (model, eager, ref64)]
    _assert_within_2x("parameters and running statistics", states[0], states[1], states[2], floor)
    for (key, a), (_, b) in zip(_buffers(model), _buffers(eager)):
        if not a.is_floating_point():
            assert torch.equal(a, b), key  # num_batches_tracked


@pytest.mark.needs_cuda
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_compile_fullgraph_resnet18(backend, training):
    """torch.compile(fullgraph=True) with Inductor, float32: eval logits, or one training step,
    as the eager fused model; the compiled graph runs the selected backend's ops."""
    compile_check(backend, training)


# ------------------------------------------------------------------------------------------
# CUDA autocast


def autocast_check(backend, device, dtype, training, batch=4, hw=48):
    """Fused resnet18 under torch.autocast(device, dtype) against torchvision under the same
    autocast: the same dtypes (block outputs, logits, gradients, running statistics) and at
    most 2x torchvision's error against float64 (logits, gradients, running statistics)."""
    tv, fused = twins("resnet18", torch.float32, num_classes=10)
    tv64 = copy.deepcopy(tv).double()
    tv, fused, tv64 = (m.to(device).train(training) for m in (tv, fused, tv64))
    x = torch.randn(batch, 3, hw, hw, device=device)  # hw 48: layer4's BatchNorm sees 2x2 values per image
    ref = tv64(x.double())
    rec = FusedOpRecorder()
    with torch.autocast(device, dtype=dtype):
        out_tv, dtypes_tv = _block_dtypes(tv, x)
        with resnet_fused.use_backend(backend), rec:
            out_f, dtypes_f = _block_dtypes(fused, x)
    assert dtypes_f == dtypes_tv and out_f.dtype == out_tv.dtype == dtype, (dtypes_f, dtypes_tv)
    floor = FLOOR_ULPS * torch.finfo(dtype).eps
    _assert_within_2x("logits", [out_f], [out_tv], [ref], floor)
    _loss(out_tv, "sum").backward()
    _loss(ref, "sum").backward()
    with rec:
        _loss(out_f, "sum").backward()
    op = "conv_bn_train" if training else "conv_bn_eval"
    rec.assert_ran(backend, op, f"{op}_backward")
    grads = [[p.grad for p in m.parameters()] for m in (tv, fused, tv64)]
    assert [g.dtype for g in grads[1]] == [g.dtype for g in grads[0]]
    _assert_within_2x("gradients", grads[1], grads[0], grads[2], floor)
    states = [[v for _, v in _float_state(m)] for m in (tv, fused, tv64)]
    assert [v.dtype for v in states[1]] == [v.dtype for v in states[0]]
    _assert_within_2x("running statistics", states[1], states[0], states[2], floor)
    for (key, a), (_, b) in zip(_buffers(tv), _buffers(fused)):
        if not a.is_floating_point():
            assert torch.equal(a, b), key  # num_batches_tracked


@pytest.mark.needs_cuda
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_autocast_cuda_matches_torchvision(backend, dtype, training):
    """Under torch.autocast('cuda', float16/bfloat16): torchvision's dtypes, and errors at most
    2x torchvision-under-autocast's against float64."""
    autocast_check(backend, "cuda", dtype, training)


# ------------------------------------------------------------------------------------------
# Determinism


def determinism_check(backend, device, dtype, batch=4, hw=64, steps=2):
    """Two identical fused resnet18s trained for `steps` SGD steps on the same data under
    torch.use_deterministic_algorithms(True): logits, gradients and the final state (parameters,
    running statistics, num_batches_tracked) bitwise equal."""
    a = _fused_model("resnet18", dtype, device)
    b = copy.deepcopy(a)
    inputs = [_images(batch, hw, dtype, device) for _ in range(steps)]
    rec = FusedOpRecorder()
    with _deterministic_algorithms(), resnet_fused.use_backend(backend), rec:
        r_a = _sgd_steps(a, inputs, loss_fn=_loss)
        r_b = _sgd_steps(b, inputs, loss_fn=_loss)
    rec.assert_ran(backend, "conv_bn_train", "conv_bn_train_backward")
    for step in range(steps):
        assert torch.equal(r_a[step][0], r_b[step][0]), f"step {step}: logits differ"
        for (key, _), x, y in zip(a.named_parameters(), r_a[step][1], r_b[step][1]):
            assert torch.equal(x, y), f"step {step}: gradient of {key} differs"
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), f"{key} differs after {steps} steps"


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_training_bitwise_deterministic(backend, dtype, monkeypatch):
    """Two identical fused training steps on the GPU are bitwise equal (deterministic algorithms
    on; cuBLAS needs CUBLAS_WORKSPACE_CONFIG for that, else torch raises)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    determinism_check(backend, "cuda", dtype)
