"""Ecosystem integration on CPU (issue 6): torch.compile, autocast, DDP, SyncBatchNorm, export,
detection/segmentation backbones, determinism and module state. Reference backend.

Logic checks run in float64 against torchvision with test_models' bounds: step 0 to float64
rounding; later steps within 10x of what a 1e-15 perturbation of torchvision's own weights
does (small-batch BatchNorm training is chaotic). Lower-precision checks compare errors
against float64 with at most 2x torchvision's own error in the same precision.

GPU-only parts of the issue (CUDA graphs, compile of the triton/cuda backends, CUDA autocast)
are not here. The fused SyncBatchNorm runs here on the reference backend (model level) and on
the Triton kernels through the interpreter (unit level).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import pickle
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from helpers import FLOOR_ULPS, assert_close_to_ref, randomize_bn, randomize_model_bn
from test_models import _aggregate_rel_l2, twins
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fused

F64 = torch.float64


def _rel(actual, expected):
    expected = expected.double()
    scale = expected.abs().max().item()
    return (actual.double() - expected).abs().max().item() / max(scale, 1e-300)


def _perturbed(model, seed=123):
    """model with every parameter multiplied by (1 + 1e-15 N(0,1)): torchvision's own float64
    sensitivity, the yardstick for steps after the first."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 1e-15 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _check(what, expected, actual, perturbed, step):
    bound = 1e-9 if step == 0 else 10 * _rel(perturbed, expected) + 1e-12
    err = _rel(actual, expected)
    assert err <= bound, f"step {step} {what}: relative error {err:.2e} > {bound:.2e}"


def _sgd_steps(model, inputs, loss_fn=lambda out: out.square().mean(), lr=1e-3, after_backward=None):
    """SGD steps; per step (logits, [grads in parameter order]). Works on wrapped models
    (torch.compile, DDP), whose parameter names differ from the module's."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    record = []
    for x in inputs:
        opt.zero_grad()
        out = model(x)
        loss_fn(out).backward()
        if after_backward is not None:
            after_backward(model)
        record.append((out.detach(), [None if p.grad is None else p.grad.clone() for p in model.parameters()]))
        opt.step()
    return record


def _float_state(model):
    return [(k, v) for k, v in model.state_dict().items() if v.is_floating_point()]


# ------------------------------------------------------------------------------------------
# torch.compile


def test_compile_fullgraph_resnet18_eval_and_train():
    """fullgraph=True (a graph break raises) with Inductor on CPU: eval logits and two SGD
    steps (logits, every gradient, parameters, running statistics) as eager. Inductor's
    compile here takes ~35 s with a cold cache, ~5 s warm (2 CPU cores)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    tv, fused = twins("resnet18", F64, num_classes=10)
    perturbed = _perturbed(tv)
    eager = copy.deepcopy(fused)
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(4, 3, 32, 32, dtype=F64)
    start = time.perf_counter()
    for m in (tv, eager, compiled):
        m.eval()
    with torch.no_grad():
        y = compiled(x)
        eval_s = time.perf_counter() - start
        assert _rel(y, tv(x)) <= 1e-12 and _rel(y, eager(x)) <= 1e-12, "eval logits"
    inputs = [torch.randn(4, 3, 32, 32, dtype=F64) for _ in range(2)]
    start = time.perf_counter()
    r_c = _sgd_steps(compiled, inputs)
    train_s = time.perf_counter() - start
    r_tv, r_e, r_p = _sgd_steps(tv, inputs), _sgd_steps(eager, inputs), _sgd_steps(perturbed, inputs)
    for step in range(2):
        _check("logits", r_tv[step][0], r_c[step][0], r_p[step][0], step)
        # The same ops run in the compiled and the eager fused model: equal to rounding at every step.
        assert _rel(r_c[step][0], r_e[step][0]) <= 1e-12, f"step {step} logits vs eager fused"
        for i, (name, _) in enumerate(tv.named_parameters()):
            _check(f"grad {name}", r_tv[step][1][i], r_c[step][1][i], r_p[step][1][i], step)
            assert _rel(r_c[step][1][i], r_e[step][1][i]) <= 1e-12, f"step {step} grad {name} vs eager fused"
    for (key, a), (_, b), (_, c) in zip(_float_state(tv), _float_state(fused), _float_state(perturbed)):
        _check(key, a, b, c, 1)
    for (key, a), b in zip(tv.state_dict().items(), fused.state_dict().values()):
        if not a.is_floating_point():
            assert torch.equal(a, b), key  # num_batches_tracked
    # One graph for eval, one for training; the second training step reuses it (no recompile).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    print(f"compile+first call: eval {eval_s:.1f}s, train (2 steps incl. backward compile) {train_s:.1f}s")


# ------------------------------------------------------------------------------------------
# Autocast (CPU bfloat16)


def _block_dtypes(model, x):
    """dtype of every block's and the stem's output, and of the logits."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, out.dtype))
             for name, m in model.named_modules() if name.startswith("layer") and name.count(".") == 1]
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_autocast_cpu_bfloat16_matches_torchvision(mode):
    """Under torch.autocast('cpu', bfloat16): every block's output, the logits and the gradients
    have torchvision's dtypes (eager BatchNorm keeps a bfloat16 input in bfloat16, with float32
    statistics), and the errors against float64 are at most 2x torchvision-under-autocast's.
    The check is test_gpu_integration's CUDA one, run here on CPU with the reference backend."""
    from test_gpu_integration import autocast_check

    autocast_check("reference", "cpu", torch.bfloat16, mode == "train")


def test_autocast_functional_op_accepts_mixed_dtypes():
    """As F.conv2d under autocast: a bfloat16 input with float32 weights is accepted."""
    unit = resnet_fused.nn.ConvBNReLU2d(8, 8, 3, padding=1).eval()
    x = torch.randn(2, 8, 8, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = unit(x), torch.relu(unit.bn(unit.conv(x)))
    assert y.dtype == y_ref.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtype"):  # outside autocast mixed dtypes stay an error
        unit(x)


def _namespaces():
    """The op namespaces registered in this process (the cuda one when its extension loaded)."""
    names = ["resnet_fused", "resnet_fused_triton"]
    if resnet_fused.backends.cuda._load_error is None:
        names.append("resnet_fused_cuda")
    return names


@pytest.mark.parametrize("namespace", _namespaces())
def test_autocast_rule_registered_per_op(namespace):
    """Autocast is registered at the dispatcher, not left to the fallthrough: the forward ops
    have AutocastCPU and AutocastCUDA kernels on every backend; the backward ops and the
    SyncBatchNorm apply/reduce ops deliberately have none (they run in their inputs' dtypes)."""
    from resnet_fused import _library

    with_rule = set(_library.AUTOCAST_CAST_ARGS) | set(_library.AUTOCAST_PROMOTE_ARGS)
    assert with_rule == {"conv_bn_eval", "conv_bn_train", "conv_bn_stats", "add_relu"}
    for name in _library.OP_NAMES:
        for key in ("AutocastCPU", "AutocastCUDA"):
            has = torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::{name}", key)
            assert has == (name in with_rule), (namespace, name, key)


CONV = ([1, 1], [1, 1], [1, 1], 1)  # stride, padding, dilation, groups


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_autocast_direct_op_calls(backend):
    """torch.ops calls under torch.autocast('cpu', bfloat16), without the functional API: the
    conv operands (x, weight, conv bias, residual) are cast, the BatchNorm vectors are not
    (a float32 scale that bfloat16 cannot represent gives the float32-scale result, bitwise),
    the statistics stay float32, add_relu promotes as `x + residual` does; the backward runs."""
    from resnet_fused.backends import BACKENDS

    if resnet_fused.available_backends()[backend] is not None:
        pytest.skip(f"{backend} backend unavailable: {resnet_fused.available_backends()[backend]}")
    ns = {"reference": torch.ops.resnet_fused, "triton": getattr(torch.ops, BACKENDS["triton"][0].NAMESPACE)}[backend]
    x, w, res = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3), torch.randn(2, 5, 6, 6)
    scale = torch.full((5,), 1 + 2**-12)  # rounds to 1.0 in bfloat16
    shift = torch.rand(5)
    bf = torch.bfloat16
    with torch.autocast("cpu", dtype=bf):
        y = ns.conv_bn_eval(x, w, scale, shift, res, *CONV, True)
        y_train, z, mean, var = ns.conv_bn_train(x, w, shift, scale, shift, res, *CONV, 1e-5, True)
        z_stats, mean_s, var_s = ns.conv_bn_stats(x, w, shift, *CONV)
        r = ns.add_relu(torch.randn(7).to(bf), torch.randn(7))
    assert y.dtype == y_train.dtype == z.dtype == z_stats.dtype == bf
    assert mean.dtype == var.dtype == mean_s.dtype == var_s.dtype == torch.float32
    assert r.dtype == torch.float32
    expected = ns.conv_bn_eval(x.to(bf), w.to(bf), scale, shift, res.to(bf), *CONV, True)
    assert torch.equal(y, expected)
    assert not torch.equal(y, ns.conv_bn_eval(x.to(bf), w.to(bf), scale.to(bf).float(), shift, res.to(bf), *CONV,
                                              True)), "the scale was rounded to bfloat16"
    expected_train = ns.conv_bn_train(x.to(bf), w.to(bf), shift.to(bf), scale, shift, res.to(bf), *CONV, 1e-5, True)
    for got, want in zip((y_train, z, mean, var), expected_train):
        assert torch.equal(got, want)
    # autograd through the autocast kernel: gradients in the leaves' dtypes
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=bf):
        out = ns.conv_bn_eval(xg, wg, scale, shift, None, *CONV, True)
    out.float().sum().backward()
    assert xg.grad.dtype == wg.grad.dtype == torch.float32


def test_autocast_direct_op_call_compiled():
    """The autocast rule also applies in a torch.compile(fullgraph=True) graph: same dtype and
    values as the eager call."""
    x, w = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3)
    scale, shift = torch.rand(5) + 0.5, torch.rand(5)

    def fn(x):
        return torch.ops.resnet_fused.conv_bn_eval(x, w, scale, shift, None, *CONV, True)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, got = fn(x), compiled(x)
    assert got.dtype == eager.dtype == torch.bfloat16
    assert torch.equal(got, eager)


def test_autocast_add_relu_functional_promotes():
    """ops.add_relu under autocast accepts mixed dtypes and promotes, as relu(x + residual);
    outside autocast mixed dtypes stay an error."""
    a, b = torch.randn(2, 3, 4, 4).bfloat16(), torch.randn(2, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = resnet_fused.ops.add_relu(a, b), torch.relu(a + b)
    assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)
    with pytest.raises(TypeError, match="dtype"):
        resnet_fused.ops.add_relu(a, b)


# ------------------------------------------------------------------------------------------
# DDP and SyncBatchNorm: 2 processes on gloo


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
    tv, fused = twins("resnet18", F64, num_classes=10)
    perturbed = _perturbed(tv)
    inputs = [x[4 * rank:4 * rank + 4] for x in _global_batches((4, 4), hw=48)]
    result = {}
    for name, model in (("tv", tv), ("fused", fused), ("perturbed", perturbed)):
        record = _sgd_steps(DDP(model), inputs)
        result[name] = dict(record=record, state=_float_state(model))
    return result


def test_ddp_gloo_two_processes_matches_torchvision(distributed_results):
    """Fused resnet18 under DistributedDataParallel (2 gloo processes, 4 images each): loss
    (logits), DDP-averaged gradients and the parameters after 2 SGD steps as torchvision's
    under DDP, on every rank; the ranks stay in sync."""
    results = [r["ddp"] for r in distributed_results]
    for rank, r in enumerate(results):
        tv, fused, pert = r["tv"]["record"], r["fused"]["record"], r["perturbed"]["record"]
        for step in range(2):
            _check(f"rank {rank} logits", tv[step][0], fused[step][0], pert[step][0], step)
            for i, (a, b, c) in enumerate(zip(tv[step][1], fused[step][1], pert[step][1])):
                _check(f"rank {rank} grad {i}", a, b, c, step)
        for (key, a), (_, b), (_, c) in zip(r["tv"]["state"], r["fused"]["state"], r["perturbed"]["state"]):
            _check(f"rank {rank} {key}", a, b, c, 1)
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
    tv, fused = twins("resnet18", F64, num_classes=10)
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
    result["ours"] = _sgd_steps(model, inputs, loss_fn, after_backward=_average_gradients)
    result["ours_state"] = _float_state(model)
    # torch's converter on the fused model: the same fused synchronized units (CPU included).
    result["torch_converted"] = _sgd_steps(torch_f, inputs, loss_fn, after_backward=_average_gradients)
    result["torch_converted_state"] = _float_state(torch_f)
    # A process group of one (here: each rank's own) is plain BatchNorm, as torch's is.
    groups = [dist.new_group([0]), dist.new_group([1])]
    alone = resnet_fused.convert_sync_batchnorm(copy.deepcopy(fused), process_group=groups[rank]).train()
    x = _global_batches(sizes)[0][-4:]
    result["alone"] = _rel(alone(x), tv.train()(x))
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
        assert _rel(b, a) <= 1e-12
        assert r["torch_tv_train_error"] is not None and "GPU" in r["torch_tv_train_error"]
        assert r["ddp_error"] is not None and "SyncBatchNorm" in r["ddp_error"]
    torch.manual_seed(0)
    tv, _ = twins("resnet18", F64, num_classes=10)
    perturbed = _perturbed(tv)
    inputs = _global_batches(SYNC_SIZES)
    r_tv, r_p = _sgd_steps(tv, inputs), _sgd_steps(perturbed, inputs)
    for which in ("ours", "torch_converted"):
        for step in range(2):
            logits = torch.cat([r[which][step][0] for r in results])
            _check(f"{which} logits", r_tv[step][0], logits, r_p[step][0], step)
            for rank, r in enumerate(results):
                for i, (a, b, c) in enumerate(zip(r_tv[step][1], r[which][step][1], r_p[step][1])):
                    _check(f"{which} rank {rank} grad {i}", a, b, c, step)
        for r in results:
            for (key, a), (_, b), (_, c) in zip(_float_state(tv), r[f"{which}_state"], _float_state(perturbed)):
                _check(f"{which} {key}", a, b, c, 1)
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
    tv, fused = twins("resnet18", F64, num_classes=10)
    model = resnet_fused.convert_sync_batchnorm(copy.deepcopy(fused))
    x = torch.randn(4, 3, 32, 32, dtype=F64)
    for m in (tv, model):
        m.train()
    assert _rel(model(x), tv(x)) <= 1e-12
    for (key, a), (_, b) in zip(_float_state(tv), _float_state(model)):
        assert _rel(b, a) <= 1e-12, key
    back = resnet_fused.to_torchvision(model)
    assert {type(m) for m in back.modules()} >= {nn.SyncBatchNorm, torchvision.models.resnet.BasicBlock}
    assert resnet_fused.SyncBatchNorm not in {type(m) for m in back.modules()}


# ------------------------------------------------------------------------------------------
# Export


def test_torch_export_after_to_torchvision():
    tv, fused = twins("resnet18", torch.float32, num_classes=10)
    fused.eval(), tv.eval()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(resnet_fused.to_torchvision(fused), (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), tv(x), rtol=0, atol=0)


def test_torch_export_fused_model_keeps_custom_ops():
    """The fused model exports as it is, too: its ops appear as custom ops in the graph."""
    tv, fused = twins("resnet18", torch.float32, num_classes=10)
    fused.eval(), tv.eval()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(fused, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "resnet_fused.conv_bn_eval.default" in targets, targets
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), fused(x), rtol=0, atol=0)


def test_onnx_export_after_to_torchvision(tmp_path):
    pytest.importorskip("onnx")
    _, fused = twins("resnet18", torch.float32, num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    torch.onnx.export(resnet_fused.to_torchvision(fused).eval(), (x,), str(tmp_path / "r18.onnx"))
    assert (tmp_path / "r18.onnx").stat().st_size > 0


# ------------------------------------------------------------------------------------------
# Detection and segmentation backbones


def _randomize_frozen(model):
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            c = m.weight.numel()
            m.weight.copy_(torch.rand(c, generator=g) + 0.5), m.bias.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def _fasterrcnn(frozen):
    # box_score_thresh=0: an untrained head's scores are low; keep detections to compare.
    kwargs = dict(weights=None, weights_backbone=None, min_size=96, max_size=96, num_classes=5, box_score_thresh=0.0)
    if not frozen:  # untrained backbone: the builder uses nn.BatchNorm2d
        return torchvision.models.detection.fasterrcnn_resnet50_fpn(**kwargs)
    # What the builder makes with pretrained weights (FrozenBatchNorm2d, layers 2-4 trainable).
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    body = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    kwargs.pop("weights"), kwargs.pop("weights_backbone")
    return torchvision.models.detection.FasterRCNN(_resnet_fpn_extractor(body, 3), **kwargs)


def _converted_blocks(model):
    fused_types = (resnet_fused.nn.Bottleneck, resnet_fused.nn.BasicBlock)
    tv_types = (torchvision.models.resnet.Bottleneck, torchvision.models.resnet.BasicBlock)
    assert not any(type(m) in tv_types for m in model.modules())
    return sum(type(m) in fused_types for m in model.modules())


def _assert_stem_fused(tv_body, fused_body, x):
    """The getter's conv1 -> bn1 -> relu runs as one fused op: their module forwards (which
    torchvision's getter calls) are not called, and the ops of the fused path are."""
    assert type(fused_body) is resnet_fused.models.FusedIntermediateLayerGetter
    for body, expect_calls in ((tv_body, 1), (fused_body, 0)):
        calls = []
        hooks = [getattr(body, name).register_forward_hook(lambda *a, name=name: calls.append(name))
                 for name in ("conv1", "bn1", "relu")]
        try:
            with torch.no_grad():
                body(x)
        finally:
            for h in hooks:
                h.remove()
        # torchvision's relu module is shared with nothing in the getter: 1 call each
        assert calls == (["conv1", "bn1", "relu"] if expect_calls else []), calls


@pytest.mark.parametrize("frozen", [False, True], ids=["batchnorm", "frozen_batchnorm"])
def test_fasterrcnn_resnet50_fpn_backbone(frozen):
    """from_torchvision(inplace=True) converts the 16 Bottlenecks inside the
    IntermediateLayerGetter, whose stem (conv1, bn1, relu as separate modules of the
    getter) runs fused; detections (boxes, scores, labels) in eval stay the same."""
    torch.manual_seed(0)
    tv = _fasterrcnn(frozen).eval()
    randomize_model_bn(tv), _randomize_frozen(tv)
    tv.double()
    fused = resnet_fused.from_torchvision(copy.deepcopy(tv), inplace=True)
    assert _converted_blocks(fused) == 16
    images = [torch.rand(3, 80, 96, dtype=F64), torch.rand(3, 96, 72, dtype=F64)]
    x = torch.rand(1, 3, 64, 64, dtype=F64)
    _assert_stem_fused(tv.backbone.body, fused.backbone.body, x)
    with torch.no_grad():
        out_tv, out_f = tv(images), fused(images)
        feats_tv, feats_f = tv.backbone(x), fused.backbone(x)
    assert list(feats_f) == list(feats_tv)
    for key in feats_tv:
        assert _rel(feats_f[key], feats_tv[key]) <= 1e-12, key
    assert sum(len(o["boxes"]) for o in out_tv) > 0
    for a, b in zip(out_tv, out_f):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(b["scores"], a["scores"], rtol=1e-9, atol=1e-9)


def test_frozen_batchnorm_backbone_under_autocast():
    """A detection backbone (resnet50 body with FrozenBatchNorm2d + FPN) under
    torch.autocast('cpu', bfloat16): every block's, the body's and the FPN's outputs have
    torchvision's dtypes (FrozenBatchNorm2d's float32 buffers make eager's units float32),
    and the FPN maps' error against float64 is at most 2x torchvision-under-autocast's."""
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    torch.manual_seed(0)
    tv = _randomize_frozen(_resnet_fpn_extractor(torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d), 3)).eval()
    fused = resnet_fused.from_torchvision(tv)
    tv64 = copy.deepcopy(tv).double()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = tv64(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (out_tv, dtypes_tv), (out_f, dtypes_f) = _block_dtypes(tv.body, x), _block_dtypes(fused.body, x)
            fpn_tv, fpn_f = tv(x), fused(x)
    assert dtypes_f == dtypes_tv and dtypes_tv["layer1.0"] == torch.float32, (dtypes_f, dtypes_tv)
    assert {k: v.dtype for k, v in out_f.items()} == {k: v.dtype for k, v in out_tv.items()}
    assert {k: v.dtype for k, v in fpn_f.items()} == {k: v.dtype for k, v in fpn_tv.items()}
    floor = FLOOR_ULPS * torch.finfo(torch.bfloat16).eps
    for key in ref:
        err_f, err_tv = _aggregate_rel_l2([fpn_f[key]], [ref[key]]), _aggregate_rel_l2([fpn_tv[key]], [ref[key]])
        assert err_f <= 2 * err_tv + floor, f"{key}: error {err_f:.2e} > 2x torchvision's {err_tv:.2e}"


def test_deeplabv3_resnet50_backbone():
    """deeplabv3_resnet50 (dilated layer3/4 inside an IntermediateLayerGetter): the 16
    Bottlenecks and the stem convert, and the eval output and aux maps stay the same; one
    training step's gradients too (the stem's BatchNorm in training mode, fused);
    to_torchvision gives torchvision's classes back."""
    torch.manual_seed(0)
    tv = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=4,
                                                            aux_loss=True)
    randomize_model_bn(tv)
    tv.double()
    fused = resnet_fused.from_torchvision(tv)
    assert _converted_blocks(fused) == 16
    x = torch.randn(2, 3, 48, 48, dtype=F64)
    tv.eval(), fused.eval()
    _assert_stem_fused(tv.backbone, fused.backbone, x)
    with torch.no_grad():
        out_tv, out_f = tv(x), fused(x)
    for key in ("out", "aux"):
        assert _rel(out_f[key], out_tv[key]) <= 1e-12, key
    tv.train(), fused.train()
    outs = []
    for model in (tv, fused):
        torch.manual_seed(7)  # the ASPP head's Dropout draws the same mask for both
        outs.append(model(x)["out"])
    out_tv, out_f = outs
    out_tv.square().mean().backward(), out_f.square().mean().backward()
    assert _rel(out_f, out_tv) <= 1e-9
    for (name, a), b in zip(tv.named_parameters(), fused.parameters()):
        if a.grad is not None:
            assert _rel(b.grad, a.grad) <= 1e-9, name
    for (key, a), b in zip(tv.state_dict().items(), fused.state_dict().values()):
        assert _rel(b, a) <= 1e-9, key  # running statistics, the stem's included
    back = resnet_fused.to_torchvision(fused)
    assert type(back.backbone) is torchvision.models._utils.IntermediateLayerGetter
    assert _converted_blocks(resnet_fused.from_torchvision(back)) == 16


@pytest.mark.parametrize("return_layers", [{"bn1": "stem_bn", "layer2": "c3"}, {"relu": "stem", "layer1": "c2"},
                                           {"conv1": "stem_conv", "layer1": "c2"}])
def test_intermediate_layer_getter_returning_stem_outputs(return_layers):
    """A getter that returns an intermediate of the stem fuses only what is not returned, and
    every returned map equals torchvision's getter's, in eval and training (BatchNorm2d)."""
    from torchvision.models._utils import IntermediateLayerGetter

    torch.manual_seed(0)
    body = randomize_model_bn(torchvision.models.resnet18()).double()
    tv = IntermediateLayerGetter(body, return_layers=dict(return_layers))
    fused = resnet_fused.from_torchvision(tv)
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    for training in (False, True):
        tv.train(training), fused.train(training)
        out_tv, out_f = tv(x), fused(x)
        assert list(out_f) == list(out_tv) == list(return_layers.values())
        for key in out_tv:
            assert _rel(out_f[key], out_tv[key]) <= 1e-12, (training, key)


# ------------------------------------------------------------------------------------------
# Determinism and module state


def test_training_step_bitwise_reproducible():
    """Two identical fused training steps (same weights, same input) are bitwise equal, with
    torch.use_deterministic_algorithms(True) on."""
    _, fused = twins("resnet18", torch.float32, num_classes=10)
    a, b = fused, copy.deepcopy(fused)
    inputs = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        r_a, r_b = _sgd_steps(a, inputs), _sgd_steps(b, inputs)
    finally:
        torch.use_deterministic_algorithms(previous)
    for step in range(2):
        assert torch.equal(r_a[step][0], r_b[step][0])
        assert all(torch.equal(x, y) for x, y in zip(r_a[step][1], r_b[step][1]))
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), key


def test_pickle_deepcopy_state_dict():
    tv, fused = twins("resnet18", torch.float32, num_classes=10)
    tv.eval(), fused.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = fused(x)
        buffer = io.BytesIO()
        torch.save(fused, buffer)
        buffer.seek(0)
        copies = [pickle.loads(pickle.dumps(fused)), copy.deepcopy(fused),
                  torch.load(buffer, weights_only=False)]
        for c in copies:
            assert type(c) is resnet_fused.ResNet and type(c.layer1[0]) is resnet_fused.nn.BasicBlock
            assert torch.equal(c(x), expected)
        fresh = resnet_fused.resnet18(num_classes=10).eval()
        fresh.load_state_dict(pickle.loads(pickle.dumps(fused.state_dict())), strict=True)
        assert torch.equal(fresh(x), expected)
        torch.testing.assert_close(expected, tv(x), rtol=1e-4, atol=1e-4)


def test_to_dtype_memory_format_and_half():
    tv, fused = twins("resnet18", torch.float32, num_classes=10)
    tv.eval(), fused.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tv64, f64 = copy.deepcopy(tv).to(F64), copy.deepcopy(fused).to(F64)
        out = f64(x.double())
        assert out.dtype == F64 and _rel(out, tv64(x.double())) <= 1e-12
        tv_cl = copy.deepcopy(tv64).to(memory_format=torch.channels_last)
        f_cl = copy.deepcopy(f64).to(memory_format=torch.channels_last)
        assert f_cl.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
        x_cl = x.double().contiguous(memory_format=torch.channels_last)
        assert _rel(f_cl(x_cl), tv_cl(x_cl)) <= 1e-12
        tv_h, f_h = copy.deepcopy(tv).half(), copy.deepcopy(fused).half()
        assert all(p.dtype == torch.float16 for p in f_h.parameters())
        try:
            out_tv = tv_h(x.half())
        except RuntimeError as exc:  # no float16 convolution on this CPU build: fail the same way
            with pytest.raises(RuntimeError):
                f_h(x.half())
            pytest.skip(f"float16 convolution unsupported on CPU here: {exc}")
        out_f = f_h(x.half())
        assert out_f.dtype == out_tv.dtype == torch.float16
        ref = tv64(x.double())
        err_f, err_tv = _aggregate_rel_l2([out_f], [ref]), _aggregate_rel_l2([out_tv], [ref])
        assert err_f <= 2 * err_tv + FLOOR_ULPS * torch.finfo(torch.float16).eps, (err_f, err_tv)


def test_frozen_stem_no_grad_inference_mode():
    tv, fused = twins("resnet18", F64, num_classes=10)
    for m in (tv, fused):
        m.conv1.requires_grad_(False), m.bn1.requires_grad_(False)
    x = torch.randn(4, 3, 32, 32, dtype=F64)
    r_tv, r_f = _sgd_steps(tv, [x]), _sgd_steps(fused, [x])
    assert _rel(r_f[0][0], r_tv[0][0]) <= 1e-9
    assert fused.conv1.weight.grad is None and fused.bn1.weight.grad is None and fused.bn1.bias.grad is None
    assert [g is None for g in r_f[0][1]] == [g is None for g in r_tv[0][1]]
    for (name, a), b in zip(tv.named_parameters(), fused.parameters()):
        if a.requires_grad:
            assert _rel(b.grad, a.grad) <= 1e-9, name
    for (key, a), b in zip(tv.state_dict().items(), fused.state_dict().values()):
        assert _rel(b, a) <= 1e-9, key  # the frozen stem's BN still tracks statistics in train()
    for ctx in (torch.no_grad, torch.inference_mode):
        for mode in (True, False):
            tv.train(mode), fused.train(mode)
            with ctx():
                out_tv, out_f = tv(x), fused(x)
            assert not out_f.requires_grad and out_f.is_inference() == out_tv.is_inference()
            assert _rel(out_f, out_tv) <= 1e-9
    for (key, a), b in zip(tv.state_dict().items(), fused.state_dict().values()):
        assert _rel(b, a) <= 1e-9, key  # running statistics updated under no_grad/inference_mode too
