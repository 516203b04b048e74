"""Model level: every builder against its torchvision twin with the same weights.

Two kinds of numerical comparison, each in a regime where it is stable on any machine:

  * the composition, exactly: in float64 on the reference backend every builder matches
    torchvision (eval logits; logits, every parameter gradient and the running statistics
    over two SGD steps) to 1e-11 relative, tensor by tensor;
  * float32 through a whole model, per backend: errors against float64, in aggregate, at
    most 2x eager float32's own (eval logits, a training step's logits, gradients and
    running statistics), on inputs where no float32 run flips a ReLU.

The float32 kernels themselves are judged tensor by tensor at unit level (test_ops.py).

Both regimes randomize BatchNorm (model_twins.model_twins) with the last BatchNorm weight of each
residual branch scaled by 0.2 (model_twins.scale_residual_branches): with unit-scale branches
the deep models' gradients explode at initialization and one SGD step makes training
chaotic, which no float64 or float32 comparison survives.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torchvision
from model_twins import MODEL_NAMES, model_twins, scale_residual_branches
from random_bn import randomize_model_bn
from recorders import OpRecorder, assert_model_ran_on
from resnet_fused.tolerances import FLOOR_ULPS, aggregate_rel_l2, rel_err
from training_loops import sgd_steps
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fused

RESIDUAL_SCALE = 0.2

# ---------------------------------------------------------------------------------------
# The composition in float64: exact to rounding on every tensor.

# Batch 2 at 33x33: layer4's maps are 2x2 (1x1 at 32x32), so every BatchNorm sees at least 8
# values per channel. With 2 values a channel's normalized outputs are +-1 whatever its
# inputs: the gradient into that BatchNorm is a pure cancellation, its relative error
# unbounded even in float64 (measured for resnet50 at batch 2, 32x32: 2e-8 at step 0, 9e-3 at
# step 1). At 2x33x33 the largest error over all builders, steps and tensors is 5e-13.
EXACT_BATCH, EXACT_HW = 2, 33
EXACT_RTOL = 1e-11


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_builder_exact_in_float64(name):
    """float64, reference backend: eval logits, then two SGD steps (momentum 0.9, lr 1e-3):
    each step's logits and every parameter's gradient, and after them every parameter and
    running statistic, within 1e-11 of torchvision's (max |error| / max |torchvision's|, per
    tensor); num_batches_tracked equal. A wiring error anywhere (a unit's arguments, a
    residual, a running-statistics update, a gradient left out) shows up as O(1). Then the
    same twins in float32 eval: torchvision's bits, and frozen within float32 rounding."""
    tv, fused = model_twins(name, torch.float64, residual_scale=RESIDUAL_SCALE, num_classes=10)
    g = torch.Generator().manual_seed(1)
    x_eval, *inputs = (torch.randn(EXACT_BATCH, 3, EXACT_HW, EXACT_HW, generator=g, dtype=torch.float64)
                       for _ in range(3))
    with resnet_fused.use_backend("reference"):
        tv.eval(), fused.eval()
        with torch.no_grad():
            errors = [("eval logits", rel_err(fused(x_eval), tv(x_eval)))]
        r_f = sgd_steps(fused, inputs)
    r_tv = sgd_steps(tv, inputs)
    names = [n for n, _ in tv.named_parameters()]
    for step in range(2):
        errors.append((f"step {step} logits", rel_err(r_f[step][0], r_tv[step][0])))
        errors += [(f"step {step} grad {n}", rel_err(b, a)) for n, a, b in zip(names, r_tv[step][1], r_f[step][1])]
    state_tv, state_f = tv.state_dict(), fused.state_dict()
    assert list(state_f) == list(state_tv)
    for key, a in state_tv.items():
        if a.is_floating_point():
            errors.append((f"after 2 steps {key}", rel_err(state_f[key], a)))
        else:
            assert torch.equal(state_f[key], a), key  # num_batches_tracked
    worst = max(errors, key=lambda e: e[1])
    bad = [f"{what}: {err:.2e}" for what, err in errors if not err <= EXACT_RTOL]
    assert not bad, f"{len(bad)} of {len(errors)} tensors above {EXACT_RTOL:.0e}: " + "; ".join(bad[:10])
    print(f"{name}: {len(errors)} tensors, worst {worst[0]} {worst[1]:.2e}")
    _float32_eval_is_torchvisions(tv, fused, x_eval)


def _float32_eval_is_torchvisions(tv, fused, x64):
    """The same twins (trained two steps, so the running statistics are not their initial
    values) in float32 eval on the default backend: torchvision's logits bitwise, as torchvision's
    own model tests (stored outputs at atol 1e-5) and feature extraction expect. Frozen
    (resnet_fused.freeze: the BatchNorm folded into the conv weights), the logits are within
    float32 rounding: at most 2x eager float32's error against float64, plus 8 ulps."""
    tv.eval(), fused.eval()
    with torch.no_grad():
        ref64 = tv(x64)
        tv.float(), fused.float()
        x = x64.float()
        eager, got = tv(x), fused(x)
        frozen = resnet_fused.freeze(fused)(x)
    assert torch.equal(got, eager), f"float32 eval differs from torchvision's by {(got - eager).abs().max():.3g}"
    err, err_eager = aggregate_rel_l2([frozen], [ref64]), aggregate_rel_l2([eager], [ref64])
    assert err <= 2 * err_eager + F32_FLOOR, f"frozen: error {err:.2e} vs float64 exceeds 2x eager's {err_eager:.2e}"


# ---------------------------------------------------------------------------------------
# float32 through a whole model, on each backend.

# Batch 4 at 33x33: layer4's maps are 2x2, so every BatchNorm sees at least 16 values per
# channel (layer3: 144, layer2: 400), the smallest input that does.
F32_BATCH, F32_HW = 4, 33
# Inputs tried until one trains without a ReLU flip (see _flip_free_step). Measured on CPU, a
# flip in either float32 run: resnet18 and resnet14_bottleneck about 1 input in 10, so 8 all
# flipping is a 1e-8 event; resnet50 (1.3M ReLU values at this size) 1 input in 2, hence 24
# for it (1e-7).
MAX_DRAWS = {"resnet50": 24}
DEFAULT_DRAWS = 8
F32_FLOOR = FLOOR_ULPS * torch.finfo(torch.float32).eps


class ReluMasks(TorchDispatchMode):
    """The ReLU masks (output > 0, what the backward's mask is made of) of the resnet_fused
    forward ops that apply a ReLU, in call order: the stem, then per block the units and the
    residual add, as torchvision calls its nn.ReLU modules."""

    def __init__(self):
        super().__init__()
        self.masks: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace.startswith("resnet_fused") and func._opname in ("conv_bn_train", "conv_bn_eval", "add_relu"):
            names = [a.name for a in func._schema.arguments]
            relu = True if func._opname == "add_relu" else kwargs.get("relu", args[names.index("relu")])
            if relu:
                y = out[0] if isinstance(out, (tuple, list)) else out
                self.masks.append(y > 0)
        return out


def _torchvision_relu_masks(model, x):
    """(output, the masks of model's nn.ReLU calls in call order)."""
    masks = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: masks.append(out > 0))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return out, masks


def _flips(masks, ref_masks) -> int:
    assert len(masks) == len(ref_masks), f"{len(masks)} ReLU masks, float64 has {len(ref_masks)}"
    return sum(int((a != b).sum()) for a, b in zip(masks, ref_masks))


def _flip_free_step(tv32, fused, tv64, device, seed=2, draws=DEFAULT_DRAWS):
    """A training forward and backward of the three models (fresh copies) on the first of up
    to `draws` inputs on which neither float32 model's ReLU masks differ from float64's.

    Why: a ReLU's gradient is discontinuous at 0. Where a pre-activation lies within float32
    rounding of 0, a float32 run may take the other branch than float64; that one element's
    gradient then changes by its full size, and in a training-mode BatchNorm with 16 values
    per channel it moves the whole channel's gradient and everything upstream of it (measured:
    one flip in resnet50's layer2 puts every upstream gradient 4e-3 off, against 5e-5 without).
    Such a flip is a tie broken differently, not an accuracy; eager float32 makes them as
    often as the fused models do. Returns (models, outputs, the fused forward's OpRecorder,
    (eager, fused) flips of each input tried)."""
    g = torch.Generator().manual_seed(seed)
    tried = []
    for _ in range(draws):
        x = torch.randn(F32_BATCH, 3, F32_HW, F32_HW, generator=g).to(device)
        models = [copy.deepcopy(m).train() for m in (tv64, tv32, fused)]
        out64, masks64 = _torchvision_relu_masks(models[0], x.double())
        out_e, masks_e = _torchvision_relu_masks(models[1], x)
        recorder, masks = OpRecorder(), ReluMasks()
        with recorder, masks:
            out_f = models[2](x)
        flips = (_flips(masks_e, masks64), _flips(masks.masks, masks64))
        tried.append(flips)
        if flips != (0, 0):
            continue
        for model, out in zip(models, (out64, out_e, out_f)):
            out.square().mean().backward()
        return models, (out64, out_e, out_f), recorder, tried
    pytest.fail(f"every one of {draws} inputs flipped a ReLU (eager, fused flips per input: {tried})")


def _float32_twins(name):
    """(torchvision, fused) float32 models as model_twins makes them; "resnet14_bottleneck" is
    torchvision's ResNet with one Bottleneck per stage (a downsampling Bottleneck in each),
    converted by from_torchvision: the Bottleneck's units at a quarter of resnet50's cost."""
    if name != "resnet14_bottleneck":
        return model_twins(name, torch.float32, residual_scale=RESIDUAL_SCALE, num_classes=10)
    tv = torchvision.models.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=10)
    scale_residual_branches(randomize_model_bn(tv), RESIDUAL_SCALE)
    return tv, resnet_fused.from_torchvision(tv)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet14_bottleneck",
                                  pytest.param("resnet50", marks=pytest.mark.needs_cuda)])
def test_float32_model_within_eager(backend, name):
    """float32 through the whole model on `backend` (Triton: under the interpreter on CPU),
    against float64 (the same weights and float32 input): the fused model's error is at most
    2x eager float32 torchvision's plus 8 ulps, each judged in aggregate (relative L2 of each
    tensor, summed in quadrature: tolerances.aggregate_rel_l2) over the eval logits, and a
    training step's logits, all parameter gradients and the running statistics (on an input
    without ReLU flips: _flip_free_step). BasicBlocks (resnet18) and Bottlenecks
    (resnet14_bottleneck), every unit type of the builders but the grouped 3x3 (unit level:
    test_ops.py; composition: test_builder_exact_in_float64); resnet50 itself on a GPU (in
    the GPU kit's tests phase, not its smoke check: see GPU_SMOKE in conftest.py)."""
    device = backend.device()
    tv32, fused = _float32_twins(name)
    tv32, fused = tv32.to(device), fused.to(device)
    tv64 = copy.deepcopy(tv32).double()

    x = torch.randn(F32_BATCH, 3, F32_HW, F32_HW, generator=torch.Generator().manual_seed(1)).to(device)
    recorder = OpRecorder()
    with torch.no_grad():
        ref, eager = tv64.eval()(x.double()), tv32.eval()(x)
        with recorder:
            got = fused.eval()(x)
    assert_model_ran_on(recorder, backend.name, "conv_bn_eval")
    results = {"eval logits": ([got], [eager], [ref])}

    (m64, m32, mf), (out64, out32, outf), recorder, tried = _flip_free_step(
        tv32, fused, tv64, device, draws=MAX_DRAWS.get(name, DEFAULT_DRAWS))
    assert_model_ran_on(recorder, backend.name, "conv_bn_train")
    results["train logits"] = ([outf], [out32], [out64])
    results["gradients"] = tuple([p.grad for p in m.parameters()] for m in (mf, m32, m64))
    results["running statistics"] = tuple(
        [b for b in m.buffers() if b.is_floating_point()] for m in (mf, m32, m64))
    for (key, a), b in zip(m32.named_buffers(), mf.buffers()):
        if not a.is_floating_point():
            assert torch.equal(a, b), key  # num_batches_tracked
    report = []
    for what, (ours, eager_, ref64) in results.items():
        err, err_eager = aggregate_rel_l2(ours, ref64), aggregate_rel_l2(eager_, ref64)
        report.append(f"{what} {err:.2e} (eager {err_eager:.2e})")
        assert err <= 2 * err_eager + F32_FLOOR, (
            f"{what}: error {err:.2e} vs float64 exceeds 2x eager's {err_eager:.2e} + {F32_FLOOR:.1e}")
    print(f"{backend.name} {name}: " + "; ".join(report) + f"; (eager, fused) ReLU flips per input: {tried}")


# ---------------------------------------------------------------------------------------
# Construction, state_dicts and the arguments users pass, as torchvision's.


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
    tv, fused = model_twins("resnet18", torch.float64)  # a logic test: float64 leaves no rounding to argue with
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
    tv, fused = model_twins("resnet50", torch.float64, **kwargs)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    tv.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), tv(x), rtol=1e-10, atol=1e-10)


def test_builder_arguments_match_torchvision():
    """(The legacy pretrained= argument: test_ecosystem.test_legacy_pretrained_argument_behaves_as_torchvisions.)"""
    with pytest.raises(ValueError, match="groups"):
        resnet_fused.resnext50_32x4d(groups=8)  # torchvision fixes it for this builder too
    with pytest.raises((ValueError, KeyError)):  # what torchvision's WeightsEnum.verify raises
        resnet_fused.resnet18(weights="NOT_A_WEIGHT")


def _hub_checkpoint(tmp_path, monkeypatch, weights):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path / "hub" / "checkpoints" / os.path.basename(weights.url)


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
