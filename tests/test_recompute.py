"""Training that keeps only the pre-BatchNorm activations (resnet_fused/recompute.py,
`recompute_bn_relu=True`): the activation bytes autograd keeps, exactness in float64 against
torchvision, the float32 rule per tensor on every backend, gradcheck of each link, and the
cases that must not take the chain (eval, frozen norms)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from model_twins import model_twins
from resnet_fused.tolerances import assert_close_to_ref, rel_err
from training_loops import sgd_steps
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fused
from resnet_fused import backends, recompute
from resnet_fused.benchmark import saved_activation_bytes


@pytest.mark.parametrize("name, bound", [("resnet18", 0.80), ("resnet50", 0.85)])
def test_activation_memory_bound(name, bound):
    """The activation bytes autograd keeps (benchmark.saved_activation_bytes: unique saved
    storages, parameters and buffers excluded) for batch 8 at 128 px, float32, channels_last,
    training: at most `bound` x eager's (measured: resnet18 0.647, resnet50 0.791), where the
    plain fused model keeps exactly eager's."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    eager = getattr(torchvision.models, name)().to(memory_format=torch.channels_last).train()
    fused = getattr(resnet_fused, name)().to(memory_format=torch.channels_last).train()
    chained = getattr(resnet_fused, name)(recompute_bn_relu=True).to(memory_format=torch.channels_last).train()
    eager_bytes = saved_activation_bytes(eager, x)
    assert saved_activation_bytes(fused, x) == eager_bytes
    ratio = saved_activation_bytes(chained, x) / eager_bytes
    assert ratio <= bound, f"{name}: {ratio:.3f}x eager's activation bytes"


# As test_models.py's float64 check: batch 2 at 33x33 (every BatchNorm sees at least 8 values
# per channel), randomized BatchNorm, residual branches scaled by 0.2, two SGD steps.
EXACT_BATCH, EXACT_HW, EXACT_RTOL, RESIDUAL_SCALE = 2, 33, 1e-11, 0.2


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_float64_matches_torchvision(name):
    """Reference backend, float64, two SGD steps: each step's logits and every gradient, then
    every parameter and running statistic within 1e-11 of torchvision's (max |error| / max
    |torchvision's|, per tensor); num_batches_tracked equal."""
    tv, ours = model_twins(name, torch.float64, residual_scale=RESIDUAL_SCALE, num_classes=10)
    resnet_fused.nn.set_recompute_bn_relu(ours)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(EXACT_BATCH, 3, EXACT_HW, EXACT_HW, generator=g, dtype=torch.float64) for _ in range(2)]
    with resnet_fused.use_backend("reference"):
        r_ours = sgd_steps(ours, inputs)
    r_tv = sgd_steps(tv, inputs)
    names = [n for n, _ in tv.named_parameters()]
    errors = []
    for step in range(2):
        errors.append((f"step {step} logits", rel_err(r_ours[step][0], r_tv[step][0])))
        errors += [(f"step {step} grad {n}", rel_err(b, a)) for n, a, b in zip(names, r_tv[step][1], r_ours[step][1])]
    state_ours = ours.state_dict()
    for key, a in tv.state_dict().items():
        if a.is_floating_point():
            errors.append((f"after 2 steps {key}", rel_err(state_ours[key], a)))
        else:
            assert torch.equal(state_ours[key], a), key
    bad = [f"{what}: {err:.2e}" for what, err in errors if not err <= EXACT_RTOL]
    assert not bad, bad[:10]


def _bottleneck(dtype, device):
    block = torchvision.models.resnet.Bottleneck(16, 4, downsample=None).to(device, dtype)
    for bn in (block.bn1, block.bn2, block.bn3):  # non-trivial affine parameters and statistics
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_(0.0, 0.5)
    return block


@pytest.mark.slow
def test_block_float32_per_tensor(backend):
    """A Bottleneck in float32 on each backend (16 x 8 x 8 = 1024 values per channel): the output,
    the input gradient, every parameter gradient and the running statistics within 2x eager's
    error against float64."""
    device = backend.device(torch.float32)
    torch.manual_seed(2)
    eager64 = _bottleneck(torch.float64, device).train()
    eager = copy.deepcopy(eager64).float()
    fused = resnet_fused.nn.Bottleneck(16, 4).to(device)
    fused.load_state_dict(eager.state_dict())
    fused.recompute_bn_relu = True
    fused.train()
    x64 = torch.randn(16, 16, 8, 8, dtype=torch.float64, device=device).contiguous(memory_format=torch.channels_last)
    results = []
    for model, x in ((eager64, x64), (eager, x64.float()), (fused, x64.float())):
        x = x.clone().requires_grad_(True)
        with backends.record_selections() as selected:
            out = model(x)
            (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out).to(out.dtype)).sum().backward()
        if model is fused:  # every chain op (forward and backward) ran on the backend under test
            assert selected and set(selected) == {backend.name}, dict(selected)
        results.append([out, x.grad] + [p.grad for p in model.parameters()] + [model.bn1.running_mean,
                        model.bn2.running_var, model.bn3.running_mean])
    for i, (ref, ours, ours_fused) in enumerate(zip(*results)):
        assert_close_to_ref(ours_fused.detach(), ours.detach(), ref.detach(), f"tensor {i}")


def test_links_gradcheck():
    """Each link's backward (conv_stats, bn_act_conv_stats, bn_act with a residual, and the
    stem's bn_act_max_pool) against finite differences, float64."""
    torch.manual_seed(3)
    conv1, conv2 = torch.nn.Conv2d(3, 4, 3, padding=1).double(), torch.nn.Conv2d(4, 4, 3, stride=2).double()
    bn1, bn2 = torch.nn.BatchNorm2d(4).double(), torch.nn.BatchNorm2d(4).double()
    pool = torch.nn.MaxPool2d(3, 2, 1)
    del conv1.weight, conv2.weight  # plain attributes from here on: the gradchecked inputs

    def chain(x, w1, w2, g1, b1, g2, b2, residual):
        conv1.weight, conv2.weight = w1, w2
        pre = recompute.conv_stats(conv1, bn1, x)
        pre = recompute.PreActivation(pre.z, pre.mean, pre.var, g1, b1, pre.eps)
        pre = recompute.bn_act_conv_stats(pre, conv2, bn2)
        pre = recompute.PreActivation(pre.z, pre.mean, pre.var, g2, b2, pre.eps)
        return recompute.bn_act(pre, residual)

    def stem(x, w1, g1, b1):
        conv1.weight = w1
        pre = recompute.conv_stats(conv1, bn1, x)
        return recompute.bn_act_max_pool(recompute.PreActivation(pre.z, pre.mean, pre.var, g1, b1, pre.eps), pool)

    def leaf(*shape, low=None):
        t = torch.rand(*shape, dtype=torch.float64) + low if low is not None else torch.randn(*shape, dtype=torch.float64)
        return t.requires_grad_(True)

    x = leaf(3, 3, 7, 7)
    args = (x, leaf(4, 3, 3, 3), leaf(4, 4, 3, 3), leaf(4, low=0.5), leaf(4), leaf(4, low=0.5), leaf(4),
            leaf(3, 4, 3, 3))
    assert torch.autograd.gradcheck(chain, args, atol=1e-6)
    assert torch.autograd.gradcheck(stem, (x, args[1], args[3], args[4]), atol=1e-6)


def test_eval_and_frozen_norms_take_the_plain_units():
    """Eval mode, and FrozenBatchNorm2d in training, run exactly as without recompute_bn_relu."""
    torch.manual_seed(4)
    x = torch.randn(2, 3, 64, 64)
    plain = resnet_fused.resnet18(num_classes=10)
    chained = copy.deepcopy(plain)
    resnet_fused.nn.set_recompute_bn_relu(chained)
    assert chained.layer1[0].recompute_bn_relu and chained.recompute_bn_relu
    assert torch.equal(plain.eval()(x), chained.eval()(x))
    frozen = resnet_fused.resnet18(num_classes=10, norm_layer=FrozenBatchNorm2d)
    frozen_chained = copy.deepcopy(frozen)
    resnet_fused.nn.set_recompute_bn_relu(frozen_chained)
    assert torch.equal(frozen.train()(x), frozen_chained.train()(x))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the chain (its autograd.Functions over the custom
    ops): a float64 training step of resnet18 as torchvision's, to 1e-11."""
    torch._dynamo.reset()
    tv, ours = model_twins("resnet18", torch.float64, residual_scale=RESIDUAL_SCALE, num_classes=10)
    resnet_fused.nn.set_recompute_bn_relu(ours)
    x = torch.randn(EXACT_BATCH, 3, EXACT_HW, EXACT_HW, generator=torch.Generator().manual_seed(5),
                    dtype=torch.float64)
    with resnet_fused.use_backend("reference"):
        (out, grads), = sgd_steps(torch.compile(ours, fullgraph=True), [x])
    (tv_out, tv_grads), = sgd_steps(tv, [x])
    assert rel_err(out, tv_out) <= EXACT_RTOL
    assert max(rel_err(b, a) for a, b in zip(tv_grads, grads)) <= EXACT_RTOL
