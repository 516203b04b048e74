"""CUDA graphs (GPU only, needs_cuda), on every backend, following the PyTorch docs' recipe
(warm-up on a side stream, capture with `torch.cuda.graph` on that stream, new data copied
into the static input, `replay()`):

  * inference: fused resnet18 and resnet50 in eval, channels_last, bfloat16 and float32; each
    replay equals the eager run of the same model on the same data, bitwise;
  * training: a whole step (forward, loss, backward, SGD step with momentum) captured once and
    replayed for 3 steps equals the same steps run eagerly on a deep copy, bitwise: loss,
    gradients, parameters, BatchNorm running statistics and num_batches_tracked.

Nothing in the captured region synchronizes with the host: the capture runs under
`torch.cuda.set_sync_debug_mode("error")`, which raises on a synchronizing call (checked to
raise on `.item()` first, so the guard is not vacuous). (SyncBatchNorm's synchronized path
without host reads: test_distributed.py, on gloo.)

Why bitwise: the replay launches the kernels the eager run launches (Triton configs from the
autotune cache the warm-up filled, cuDNN plans from torch's plan cache, with
cudnn.deterministic on so no algorithm uses atomics; our kernels reduce in a fixed order) on
the same data, so any difference is a capture bug (a stale buffer, a value frozen on the host
at capture time), not rounding. Each eager run also checks, with an OpRecorder, that the
selected backend's kernels ran (for triton/cuda: no conv unit fell back to the reference).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from backend_under_test import sm90_launch_counter
from model_twins import fused_model, images
from recorders import OpRecorder, assert_model_ran_on
from training_loops import float_loss

import resnet_fused

DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16"}


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
    model = fused_model(name, dtype, device).eval()
    static_x = images(batch, hw, dtype, device)
    stream = _side_stream()
    with torch.no_grad(), _cudnn_deterministic(), resnet_fused.use_backend(backend):
        _assert_sync_guard_works(device)
        _warm_up(lambda: model(static_x), warmup, stream)
        replay, static_y = _capture(lambda: model(static_x), stream)
        for step in range(replays):
            x = images(batch, hw, dtype, device)
            static_x.copy_(x)
            replay()
            rec = OpRecorder()
            with rec:
                expected = model(x)
            assert_model_ran_on(rec, backend, "conv_bn_eval")
            assert static_y.dtype == expected.dtype == dtype
            assert torch.equal(static_y, expected), f"replay {step}: " + _first_difference(
                [("logits", static_y, expected)])


def cuda_graph_training(backend, dtype, device="cuda", batch=8, hw=64, steps=3, warmup=3):
    """A whole training step (forward, loss, backward, SGD step) of fused resnet18 captured once
    and replayed `steps` times equals the same steps run eagerly on a deep copy, bitwise: loss,
    gradients, parameters, running statistics and num_batches_tracked."""
    model = fused_model("resnet18", dtype, device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    static_x = images(batch, hw, dtype, device)

    def train_step(m, o, x):
        loss = float_loss(m(x))
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
            x = images(batch, hw, dtype, device)
            static_x.copy_(x)
            replay()
            eager_opt.zero_grad(set_to_none=True)
            rec = OpRecorder()
            with rec:
                loss = train_step(eager, eager_opt, x)
            assert_model_ran_on(rec, backend, "conv_bn_train", "conv_bn_train_backward")
            assert torch.isfinite(loss), f"step {step}: eager loss {loss.item()}"
            pairs = [("loss", static_loss, loss)]
            for (key, p), q in zip(model.named_parameters(), eager.parameters()):
                assert p.grad is not None and q.grad is not None, f"step {step}: no gradient for {key}"
                pairs += [(f"grad {key}", p.grad, q.grad), (key, p.detach(), q.detach())]
            pairs += [(key, a, b) for (key, a), (_, b) in zip(model.named_buffers(), eager.named_buffers())]
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
    if backend.interpreted:
        pytest.skip("the Triton interpreter runs CPU tensors only")
    # bf16 on the CUDA backend on an H100/H200: the convolutions past the stem are the sm90
    # CUTLASS kernels (its launch counter grows), not the sm80 fallback.
    hopper = backend.name == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability() == (9, 0)
    launches = sm90_launch_counter() if hopper else None
    before = launches() if hopper else 0
    cuda_graph_inference(name, backend.name, dtype)
    if hopper:
        assert launches() > before, f"{name} bf16 on the cuda backend ran no sm90 kernel"


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DTYPE_IDS.get)
def test_cuda_graph_training_step_equals_eager(backend, dtype):
    """A captured forward + backward + SGD step replayed 3 times equals 3 eager steps on a deep
    copy, bitwise (loss, gradients, parameters, running statistics, num_batches_tracked), with
    no host synchronization in the captured region."""
    if backend.interpreted:
        pytest.skip("the Triton interpreter runs CPU tensors only")
    cuda_graph_training(backend.name, dtype)


@pytest.mark.needs_cuda
def test_captured_inference_reads_running_statistics_changed_after_capture(backend):
    """A captured eval unit reads the statistics and affine parameters from their storage: a
    replay after they change in place (further training, load_state_dict) computes with the
    new ones, as eager does. Nothing is kept between eager calls either."""
    if backend.interpreted:
        pytest.skip("the Triton interpreter runs CPU tensors only")
    unit = resnet_fused.nn.ConvBNReLU2d(16, 16, 3, padding=1).cuda().eval()
    x = torch.randn(2, 16, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    stream = _side_stream()
    with torch.no_grad(), _cudnn_deterministic(), resnet_fused.use_backend(backend.name):
        _warm_up(lambda: unit(x), 3, stream)
        replay, static_y = _capture(lambda: unit(x), stream)
        unit.bn.running_mean.add_(0.5)
        unit.bn.running_var.mul_(3.0)
        unit.bn.weight.mul_(2.0)
        replay()
        expected = unit(x)
    torch.cuda.synchronize()
    assert torch.equal(static_y, expected)
