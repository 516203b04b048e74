"""Distributed training on CPU: 2 processes on gloo.

  * DistributedDataParallel: fused resnet18 against torchvision under DDP, float64;
  * SyncBatchNorm, model level: resnet_fused.convert_sync_batchnorm and torch's converter
    applied to the fused model, 2 processes with uneven batches, against one process training
    torchvision on all images, float64; a process group of one is plain BatchNorm;
  * SyncBatchNorm, unit level, on every backend that runs here (the Triton kernels through
    the interpreter): conv + SyncBatchNorm + residual + ReLU against eager on the union of
    the batches, float32 within 2x eager's error; the synchronized step as under CUDA graph
    capture reads no tensor value on the host;
  * convert_sync_batchnorm in a single process and back to torch's SyncBatchNorm.

One 2-process run (the module fixture `distributed_results`) serves every test: spawning
costs seconds. float64 training is compared as in test_compile: step 0 to rounding, step 1
within 10x what a 1e-15 perturbation of torchvision's own weights does
(tolerances.check_step): at these batch sizes BatchNorm training is chaotic.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from model_twins import float_state, model_twins
from random_bn import randomize_bn
from resnet_fused.tolerances import assert_close_to_ref, check_step, rel_err
from training_loops import perturbed_copy, sgd_steps
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import resnet_fused

pytestmark = pytest.mark.slow

F64 = torch.float64

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, fn, port, out_dir, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = fn(rank, *args)
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _run_distributed(fn, tmp_path, *args):
    mp.spawn(_worker, args=(fn, _free_port(), str(tmp_path), args), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def _both_workers(rank, sizes):
    return {"ddp": _ddp_worker(rank), "sync": _sync_bn_worker(rank, sizes), "sync_unit": _sync_unit_worker(rank)}


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    """One 2-process gloo run (spawning costs seconds) for the DDP and SyncBatchNorm tests."""
    return _run_distributed(_both_workers, tmp_path_factory.mktemp("dist"), SYNC_SIZES)


def _global_batches(sizes, steps=2, hw=32):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(sum(sizes), 3, hw, hw, generator=g, dtype=F64) for _ in range(steps)]


def _ddp_worker(rank):
    torch.manual_seed(0)  # the same models on both ranks (DDP also broadcasts rank 0's)
    tv, fused = model_twins("resnet18", F64, num_classes=10)
    perturbed = perturbed_copy(tv)
    inputs = [x[4 * rank:4 * rank + 4] for x in _global_batches((4, 4), hw=48)]
    result = {}
    for name, model in (("tv", tv), ("fused", fused), ("perturbed", perturbed)):
        record = sgd_steps(DDP(model), inputs)
        result[name] = dict(record=record, state=float_state(model))
    return result


def test_ddp_gloo_two_processes_matches_torchvision(distributed_results):
    """Fused resnet18 under DistributedDataParallel (2 gloo processes, 4 images each): loss
    (logits), DDP-averaged gradients and the parameters after 2 SGD steps as torchvision's
    under DDP, on every rank; the ranks stay in sync."""
    results = [r["ddp"] for r in distributed_results]
    for rank, r in enumerate(results):
        tv, fused, pert = r["tv"]["record"], r["fused"]["record"], r["perturbed"]["record"]
        for step in range(2):
            check_step(f"rank {rank} logits", tv[step][0], fused[step][0], pert[step][0], step)
            for i, (a, b, c) in enumerate(zip(tv[step][1], fused[step][1], pert[step][1])):
                check_step(f"rank {rank} grad {i}", a, b, c, step)
        for (key, a), (_, b), (_, c) in zip(r["tv"]["state"], r["fused"]["state"], r["perturbed"]["state"]):
            check_step(f"rank {rank} {key}", a, b, c, 1)
    params = [dict(r["fused"]["state"]) for r in results]
    for key, value in params[0].items():
        if "running" not in key:  # running statistics are per rank until DDP broadcasts them
            assert torch.equal(value, params[1][key]), f"{key} differs between ranks"


SYNC_SIZES = (1, 4)  # uneven; 1 image alone could not train layer4's BatchNorm (1 value per channel)


def _average_gradients(model):
    """What DDP does, through one flat buffer as DDP's buckets: two parameters' .grad may share
    storage (a broadcast bias's gradient can be a view of the upstream gradient), so
    all-reducing each .grad in place would reduce that storage twice."""
    params = [p for p in model.parameters() if p.grad is not None]
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).clone()


def _sync_bn_worker(rank, sizes):
    torch.manual_seed(0)
    tv, fused = model_twins("resnet18", F64, num_classes=10)
    lo = sum(sizes[:rank])
    inputs = [x[lo:lo + sizes[rank]] for x in _global_batches(sizes)]
    result = {}
    # torch's converter on both models: same modules, same eval output, same training behaviour.
    torch_tv = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(tv))
    torch_f = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(fused))
    assert not any(type(m) is nn.BatchNorm2d for m in torch_f.modules())
    assert type(torch_f.layer1[0]) is resnet_fused.nn.BasicBlock
    with torch.no_grad():
        result["torch_eval"] = [m.eval()(inputs[0]) for m in (torch_tv, torch_f)]
    try:  # torchvision with torch.nn.SyncBatchNorm: no CPU synchronization in torch
        copy.deepcopy(torch_tv).train()(inputs[0])
        result["torch_tv_train_error"] = None
    except ValueError as exc:
        result["torch_tv_train_error"] = str(exc)
    try:  # DDP refuses any SyncBatchNorm on CPU modules (torch's rule)
        DDP(torch_f)
        result["ddp_error"] = None
    except ValueError as exc:
        result["ddp_error"] = str(exc)
    # ours: batch statistics over both ranks' images.
    total = sum(sizes)
    # The ranks' gradients are averaged, as DDP does: this loss makes that the gradient of the
    # global mean.
    loss_fn = lambda out: out.square().sum() * (2 / (total * out.size(1)))  # noqa: E731
    model = resnet_fused.convert_sync_batchnorm(copy.deepcopy(fused))
    assert type(model.bn1) is resnet_fused.SyncBatchNorm and type(model.layer1[0]) is resnet_fused.nn.BasicBlock
    assert isinstance(model.bn1, nn.SyncBatchNorm)
    result["ours"] = sgd_steps(model, inputs, loss_fn, after_backward=_average_gradients)
    result["ours_state"] = float_state(model)
    # torch's converter on the fused model: the same fused synchronized units (CPU included).
    result["torch_converted"] = sgd_steps(torch_f, inputs, loss_fn, after_backward=_average_gradients)
    result["torch_converted_state"] = float_state(torch_f)
    # A process group of one (here: each rank's own) is plain BatchNorm, as torch's is.
    groups = [dist.new_group([0]), dist.new_group([1])]
    alone = resnet_fused.convert_sync_batchnorm(copy.deepcopy(fused), process_group=groups[rank]).train()
    x = _global_batches(sizes)[0][-4:]
    result["alone"] = rel_err(alone(x), tv.train()(x))
    return result


def test_sync_batchnorm_two_processes_uneven(distributed_results):
    """2 gloo processes with 1 and 4 images, fused units with synchronized statistics, made by
    resnet_fused.convert_sync_batchnorm and by torch.nn.SyncBatchNorm.convert_sync_batchnorm
    applied to the fused model: logits, gradients (averaged over the ranks as DDP does; DDP
    itself refuses SyncBatchNorm on CPU), parameters and running statistics of 2 SGD steps
    equal one process training torchvision on all 5 images (what SyncBatchNorm means). In
    eval, torch's converter gives torchvision's results. (torchvision with torch's
    SyncBatchNorm cannot train on CPU: it raises, hence the single-process comparison.)"""
    results = [r["sync"] for r in distributed_results]
    for r in results:
        a, b = r["torch_eval"]
        assert rel_err(b, a) <= 1e-12
        assert r["torch_tv_train_error"] is not None and "GPU" in r["torch_tv_train_error"]
        assert r["ddp_error"] is not None and "SyncBatchNorm" in r["ddp_error"]
    torch.manual_seed(0)
    tv, _ = model_twins("resnet18", F64, num_classes=10)
    perturbed = perturbed_copy(tv)
    inputs = _global_batches(SYNC_SIZES)
    r_tv, r_p = sgd_steps(tv, inputs), sgd_steps(perturbed, inputs)
    for which in ("ours", "torch_converted"):
        for step in range(2):
            logits = torch.cat([r[which][step][0] for r in results])
            check_step(f"{which} logits", r_tv[step][0], logits, r_p[step][0], step)
            for rank, r in enumerate(results):
                for i, (a, b, c) in enumerate(zip(r_tv[step][1], r[which][step][1], r_p[step][1])):
                    check_step(f"{which} rank {rank} grad {i}", a, b, c, step)
        for r in results:
            for (key, a), (_, b), (_, c) in zip(float_state(tv), r[f"{which}_state"], float_state(perturbed)):
                check_step(f"{which} {key}", a, b, c, 1)
    for r in results:
        assert r["alone"] <= 1e-12


# Unit level, on every backend that runs here (the Triton kernels through the interpreter):
# conv (with bias) + SyncBatchNorm + residual + ReLU over 2 processes, against eager PyTorch
# on the whole batch. (0, 4): a process with an empty batch still takes part.
SYNC_UNIT_SIZES = ((1, 3), (0, 4))
SYNC_UNIT_BACKENDS = ("reference", "triton")


def _sync_unit_case(sizes, dtype):
    """(unit with randomized BN, x, residual, grad_y) for the global batch, identical everywhere."""
    g = torch.Generator().manual_seed(7)
    unit = resnet_fused.nn.ConvBNReLU2d(8, 16, 3, padding=1, bias=True)
    with torch.no_grad():
        for p in unit.conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    randomize_bn(unit.bn, generator=g)
    n = sum(sizes)
    x = torch.randn(n, 8, 6, 6, generator=g)
    res = torch.randn(n, 16, 6, 6, generator=g)
    grad_y = torch.randn(n, 16, 6, 6, generator=g)
    return unit.to(dtype), x.to(dtype), res.to(dtype), grad_y.to(dtype)


@contextlib.contextmanager
def _as_if_capturing(monkeypatch_target):
    """The sync path as it runs during CUDA graph capture (`_capturing` True), with every way of
    reading a tensor's value on the host made to raise: a CPU stand-in for
    torch.cuda.set_sync_debug_mode("error"), which gloo cannot use."""
    def forbidden(self, *args):
        raise AssertionError("a host read of a tensor value in the synchronized path")

    saved = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__int__", "__float__")}
    saved_capturing = monkeypatch_target._capturing
    monkeypatch_target._capturing = lambda t: True
    for name in saved:
        setattr(torch.Tensor, name, forbidden)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        monkeypatch_target._capturing = saved_capturing


def _sync_unit_worker(rank):
    out = {}
    for backend in SYNC_UNIT_BACKENDS:
        if resnet_fused.available_backends()[backend] is not None:
            continue
        for sizes in SYNC_UNIT_SIZES:
            unit, x, res, grad_y = _sync_unit_case(sizes, torch.float32)
            unit = resnet_fused.convert_sync_batchnorm(unit).train()
            twin = copy.deepcopy(unit)
            lo, n = sum(sizes[:rank]), sizes[rank]
            xs = x[lo:lo + n].clone().requires_grad_()
            rs = res[lo:lo + n].clone().requires_grad_()
            xs2, rs2 = xs.detach().clone().requires_grad_(), rs.detach().clone().requires_grad_()
            with resnet_fused.use_backend(backend):
                y = unit(xs, rs)
                y.backward(grad_y[lo:lo + n])
                # The same step as under CUDA graph capture: no host reads, the same results.
                with _as_if_capturing(resnet_fused.distributed):
                    y2 = twin(xs2, rs2)
                    y2.backward(grad_y[lo:lo + n])
                pairs = [(y, y2), (xs.grad, xs2.grad), (rs.grad, rs2.grad)]
                pairs += [(a.grad, b.grad) for a, b in zip(unit.parameters(), twin.parameters())]
                pairs += list(zip(unit.buffers(), twin.buffers()))
                same_when_capturing = all(torch.equal(a, b) for a, b in pairs)
                conv = unit.conv
                ran = resnet_fused.backends.resolved_backend(
                    "conv_bn_stats", xs, conv.weight, conv.bias, list(conv.stride), list(conv.padding),
                    list(conv.dilation), conv.groups)
            out[backend, sizes] = dict(ran=ran, same_when_capturing=same_when_capturing,
                y=y.detach(), grad_x=xs.grad, grad_res=rs.grad,
                grads={k: p.grad for k, p in unit.named_parameters()},
                buffers={k: b for k, b in unit.named_buffers() if b.is_floating_point()},
            )
    return out


def _eager_unit(unit, x, res, grad_y):
    """nn.Conv2d + nn.BatchNorm2d (+ residual) + ReLU on the whole batch: outputs and grads."""
    unit = copy.deepcopy(unit).train()
    x = x.clone().requires_grad_()
    res = res.clone().requires_grad_()
    z = unit.conv(x)
    z.retain_grad()
    y = torch.relu(unit.bn(z) + res)
    y.backward(grad_y)
    return dict(y=y.detach(), grad_x=x.grad, grad_res=res.grad, grads={k: p.grad for k, p in unit.named_parameters()},
                buffers={k: b for k, b in unit.named_buffers() if b.is_floating_point()}, grad_z=z.grad)


@pytest.mark.parametrize("sizes", SYNC_UNIT_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", SYNC_UNIT_BACKENDS)
def test_sync_batchnorm_unit_two_processes(distributed_results, backend, sizes):
    """Fused conv + SyncBatchNorm + residual + ReLU on 2 gloo processes (uneven, and one
    empty) equals eager PyTorch on the union of the batches, in float32 with at most 2x
    eager's error against float64: outputs, input and residual gradients, the parameters'
    gradients summed over the processes (each process's are local, as torch.nn.SyncBatchNorm's,
    and DDP averages them) and the running statistics."""
    runs = [r["sync_unit"] for r in distributed_results]
    if (backend, sizes) not in runs[0]:
        pytest.skip(f"{backend} backend unavailable here: {resnet_fused.available_backends()[backend]}")
    unit, x, res, grad_y = _sync_unit_case(sizes, torch.float32)
    e32 = _eager_unit(unit, x, res, grad_y)
    e64 = _eager_unit(unit.double(), x.double(), res.double(), grad_y.double())
    got = [r[backend, sizes] for r in runs]
    for rank, g in enumerate(got):  # the named backend's kernels ran (empty batches go to the reference)
        assert g["ran"] == (backend if sizes[rank] > 0 else "reference"), (rank, g["ran"])
        # as under CUDA graph capture (no host reads of tensor values): identical outputs and state
        assert g["same_when_capturing"], rank
    for key in ("y", "grad_x", "grad_res"):
        assert_close_to_ref(torch.cat([g[key] for g in got]), e32[key], e64[key], key)
    for key in e64["grads"]:
        total = got[0]["grads"][key] + got[1]["grads"][key]
        # The conv bias's gradient under BatchNorm is a cancellation (~0): its rounding floor
        # is set by the magnitude of the summed terms, sum |dL/dz| per channel.
        scale = e64["grad_z"].abs().sum((0, 2, 3)).max().item() if key == "conv.bias" else None
        assert_close_to_ref(total, e32["grads"][key], e64["grads"][key], f"grad {key}", scale=scale)
    for g in got:
        for key in e64["buffers"]:
            assert_close_to_ref(g["buffers"][key], e32["buffers"][key], e64["buffers"][key], key)


def test_convert_sync_batchnorm_single_process_and_back():
    """Without a process group it is BatchNorm2d; to_torchvision gives torch's SyncBatchNorm."""
    tv, fused = model_twins("resnet18", F64, num_classes=10)
    model = resnet_fused.convert_sync_batchnorm(copy.deepcopy(fused))
    x = torch.randn(4, 3, 32, 32, dtype=F64)
    for m in (tv, model):
        m.train()
    assert rel_err(model(x), tv(x)) <= 1e-12
    for (key, a), (_, b) in zip(float_state(tv), float_state(model)):
        assert rel_err(b, a) <= 1e-12, key
    back = resnet_fused.to_torchvision(model)
    assert {type(m) for m in back.modules()} >= {nn.SyncBatchNorm, torchvision.models.resnet.BasicBlock}
    assert resnet_fused.SyncBatchNorm not in {type(m) for m in back.modules()}
