"""Model level: every builder against its torchvision twin with the same weights."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torchvision
from helpers import assert_close_to_ref, randomize_model_bn
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fused

BUILDERS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
    "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
]


def twins(name, dtype=torch.float32, **kwargs):
    """(torchvision model, fused model) with identical randomized weights and BN statistics."""
    tv = getattr(torchvision.models, name)(**kwargs)
    randomize_model_bn(tv)
    fused = getattr(resnet_fused, name)(**kwargs)
    fused.load_state_dict(tv.state_dict(), strict=True)
    return tv.to(dtype), fused.to(dtype)


def train_steps(model, inputs, lr=1e-3):
    """Two SGD steps; returns per step (logits, {param name: grad})."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    record = []
    for x in inputs:
        opt.zero_grad()
        out = model(x)
        out.square().mean().backward()
        record.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        opt.step()
    return record


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", BUILDERS)
def test_builder_matches_torchvision_float64(name):
    """Logic check in float64: eval logits, then two SGD steps (logits, every gradient,
    running statistics and parameters).

    Step 0 must agree to float64 rounding. After one SGD step a deep ResNet with
    small-batch BatchNorm is chaotic: torchvision itself, with its parameters perturbed by
    1e-15 (relative), moves by ~1e-7. That perturbed twin is the yardstick for step 1;
    a logic error shows up as O(1)."""
    tv, fused = twins(name, torch.float64, num_classes=10)
    tv_perturbed = copy.deepcopy(tv)
    with torch.no_grad():
        for p in tv_perturbed.parameters():
            p.mul_(1 + 1e-15 * torch.randn_like(p))
    # 32x32 keeps the deep models quick on CPU; batch 4 gives layer4's BatchNorm 4 values per channel.
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    tv.eval(), fused.eval()
    with torch.no_grad():
        assert _rel_err(fused(x), tv(x)) <= 1e-12, "eval logits"
    inputs = [torch.randn(4, 3, 32, 32, dtype=torch.float64) for _ in range(2)]
    r_tv, r_f, r_p = train_steps(tv, inputs), train_steps(fused, inputs), train_steps(tv_perturbed, inputs)
    checks = [("logits", r_tv[s][0], r_f[s][0], r_p[s][0], s) for s in range(2)]
    checks += [(f"grad {key}", r_tv[s][1][key], r_f[s][1][key], r_p[s][1][key], s) for s in range(2) for key in r_tv[s][1]]
    states = zip(tv.state_dict().items(), fused.state_dict().values(), tv_perturbed.state_dict().values())
    checks += [(key, a, b, c, 1) for (key, a), b, c in states if a.is_floating_point()]
    for what, expected, actual, perturbed, step in checks:
        bound = 1e-9 if step == 0 else 10 * _rel_err(perturbed, expected) + 1e-12
        err = _rel_err(actual, expected)
        assert err <= bound, f"step {step} {what}: relative error {err:.2e} > {bound:.2e}"


def _aggregate_rel_l2(tensors, refs):
    """sqrt(sum_k ||t_k - r_k||^2 / ||r_k||^2): one error figure for all of a model's tensors.
    Per-tensor maxima in float32 are dominated by ReLU masks flipping where a pre-activation
    is ~0 (float64 and float32 disagree on its sign), which is luck; the aggregate is stable."""
    total = 0.0
    for t, r in zip(tensors, refs):
        norm = torch.linalg.vector_norm(r).item()
        if norm > 0:
            total += (torch.linalg.vector_norm(t.double() - r).item() / norm) ** 2
    return total**0.5


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_builder_float32_error_within_eager(name):
    """float32: the fused model's error against float64 is at most 2x torchvision's own."""
    tv64, fused = twins(name, torch.float32, num_classes=10)
    tv32 = copy.deepcopy(tv64)
    tv64 = tv64.double()
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    for model in (tv64, tv32, fused):
        model.eval()
    with torch.no_grad():
        assert_close_to_ref(fused(x.float()), tv32(x.float()), tv64(x), "eval logits", metric="l2")
    inputs = [torch.randn(4, 3, 64, 64, dtype=torch.float64) for _ in range(2)]
    r64 = train_steps(tv64, inputs)
    r32 = train_steps(tv32, [x.float() for x in inputs])
    rf = train_steps(fused, [x.float() for x in inputs])
    floor = 16 * torch.finfo(torch.float32).eps
    for step in range(2):
        assert_close_to_ref(rf[step][0], r32[step][0], r64[step][0], f"step {step} logits", metric="l2")
        keys = list(r64[step][1])
        refs = [r64[step][1][k] for k in keys]
        err_f = _aggregate_rel_l2([rf[step][1][k] for k in keys], refs)
        err_e = _aggregate_rel_l2([r32[step][1][k] for k in keys], refs)
        assert err_f <= 2 * err_e + floor, f"step {step} gradients: error {err_f:.2e} > 2x eager's {err_e:.2e}"
    states = [(a, b, c) for a, b, c in zip(tv64.state_dict().values(), tv32.state_dict().values(),
                                          fused.state_dict().values()) if a.is_floating_point()]
    err_f = _aggregate_rel_l2([c for _, _, c in states], [a for a, _, _ in states])
    err_e = _aggregate_rel_l2([b for _, b, _ in states], [a for a, _, _ in states])
    assert err_f <= 2 * err_e + floor, f"parameters and running stats: error {err_f:.2e} > 2x eager's {err_e:.2e}"


def test_same_seed_same_init_as_torchvision():
    for kwargs in ({}, {"zero_init_residual": True}):
        torch.manual_seed(1)
        tv = torchvision.models.resnet50(**kwargs)
        torch.manual_seed(1)
        fused = resnet_fused.resnet50(**kwargs)
        for (key, a), b in zip(tv.state_dict().items(), fused.state_dict().values()):
            assert torch.equal(a, b), key


def test_state_dict_round_trip_strict():
    tv = torchvision.models.resnext50_32x4d()
    fused = resnet_fused.resnext50_32x4d()
    assert list(tv.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(tv.state_dict(), strict=True)
    back = torchvision.models.resnext50_32x4d()
    back.load_state_dict(fused.state_dict(), strict=True)
    for (key, a), b in zip(tv.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), key


def test_from_and_to_torchvision():
    tv = randomize_model_bn(torchvision.models.resnet34(num_classes=7)).eval()
    fused = resnet_fused.from_torchvision(tv)
    assert type(fused) is resnet_fused.ResNet and type(tv) is torchvision.models.ResNet  # copy by default
    assert type(fused.layer1[0]) is resnet_fused.nn.BasicBlock
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), tv(x), rtol=1e-4, atol=1e-4)
    back = resnet_fused.to_torchvision(fused)
    assert all(type(m).__module__.startswith(("torchvision", "torch.nn")) for m in back.modules())
    for (key, a), b in zip(tv.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), key
    same = resnet_fused.from_torchvision(tv, inplace=True)
    assert same is tv and type(tv) is resnet_fused.ResNet


def test_user_edits_cifar_stem_fc_swap_and_frozen_bn():
    """The edits users make to torchvision ResNets work unchanged on the fused model."""
    tv, fused = twins("resnet18", torch.float64)  # a logic test: float64 leaves no rounding to argue with
    for model in (tv, fused):
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        model.fc = nn.Linear(512, 10)
        model.double()
    fused.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    for model in (tv, fused):  # freeze every BN by eval() while the rest trains
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    out_tv, out_f = tv(x), fused(x)
    torch.testing.assert_close(out_f, out_tv, rtol=1e-10, atol=1e-10)
    out_tv.sum().backward(), out_f.sum().backward()
    for (key, a), b in zip(tv.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-10, msg=key)
    for (key, a), b in zip(tv.state_dict().items(), fused.state_dict().values()):
        assert torch.equal(a, b), f"{key} changed although BN is frozen"


@pytest.mark.parametrize("norm", ["frozen", "groupnorm"])
def test_norm_layer_argument(norm):
    norm_layer = FrozenBatchNorm2d if norm == "frozen" else (lambda c: nn.GroupNorm(8, c))
    torch.manual_seed(3)
    tv = torchvision.models.resnet50(norm_layer=norm_layer, num_classes=5)
    torch.manual_seed(3)
    fused = resnet_fused.resnet50(norm_layer=norm_layer, num_classes=5)
    if norm == "frozen":
        for m in tv.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_var.uniform_(0.5, 1.5), m.running_mean.uniform_(-0.5, 0.5), m.weight.uniform_(0.5, 1.5)
    fused.load_state_dict(tv.state_dict(), strict=True)
    tv.double(), fused.double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    out_tv, out_f = tv(x), fused(x)
    torch.testing.assert_close(out_f, out_tv, rtol=1e-10, atol=1e-10)


def test_replace_stride_with_dilation():
    kwargs = dict(replace_stride_with_dilation=[False, True, True], num_classes=3)
    tv, fused = twins("resnet50", torch.float64, **kwargs)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    tv.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), tv(x), rtol=1e-10, atol=1e-10)


def test_builder_arguments_match_torchvision():
    with pytest.raises(ValueError, match="groups"):
        resnet_fused.resnext50_32x4d(groups=8)  # torchvision fixes it for this builder too
    with pytest.raises(TypeError, match="weights="):
        resnet_fused.resnet18(pretrained=True)
    with pytest.raises((ValueError, KeyError)):  # what torchvision's WeightsEnum.verify raises
        resnet_fused.resnet18(weights="NOT_A_WEIGHT")


def _hub_checkpoint(tmp_path, monkeypatch, weights):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = tmp_path / "hub" / "checkpoints" / os.path.basename(weights.url)
    return path


def test_weights_load_from_local_hub_cache(tmp_path, monkeypatch):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    path = _hub_checkpoint(tmp_path, monkeypatch, weights)
    path.parent.mkdir(parents=True)
    source = randomize_model_bn(torchvision.models.resnet18())
    torch.save(source.state_dict(), path)
    for spec in (weights, "IMAGENET1K_V1", "DEFAULT"):
        model = resnet_fused.resnet18(weights=spec)
        assert model.fc.out_features == 1000
        for (key, a), b in zip(source.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), key


def test_weights_missing_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    path = _hub_checkpoint(tmp_path, monkeypatch, weights)

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError) as info:
        resnet_fused.resnet50(weights=weights)
    message = str(info.value)
    assert weights.url in message and str(path) in message
