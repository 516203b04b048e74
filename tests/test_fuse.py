"""resnet_fused.fuse(model): timm's and transformers' ResNets (and torchvision's) with their
conv -> BatchNorm (-> ReLU) and conv -> BatchNorm -> add -> ReLU units running fused.

The oracle is the model itself, unfused, in float64 on the reference backend: a training step
(outputs, every gradient, every buffer) and eval within 1e-9 relative, after randomizing every
BatchNorm's affine parameters and running statistics (timm zero-initializes each block's last
BatchNorm, which would hide a wrong residual branch). Dispatch counts prove the units run
fused: one resnet_fused op per unit of each kind fuse_summary reports, aten convolutions only
for the convs without a BatchNorm, no aten BatchNorm.

timm and transformers are test extras (pyproject.toml); their tests skip where they are not
importable.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import copy
import importlib
import inspect
import io
import sys
import textwrap
import warnings

import pytest
import torch
import torchvision
from torch import nn

import resnet_fused
from random_bn import randomize_model_bn
from recorders import OpRecorder
from resnet_fused.tolerances import assert_close_to_ref, rel_err
from resnet_fused import backends
from resnet_fused.fuse import FuseSummary, fuse, fuse_summary

FUSE_MODULE = sys.modules["resnet_fused.fuse"]  # (resnet_fused.fuse is the function)
TOLERANCE = 1e-9  # relative, float64
HW = 48  # images: layer4 of the ResNets is 2x2, 8 values per channel with BATCH 2
BATCH = 2


def _importable(name: str):
    try:
        return importlib.import_module(name), None
    except ImportError as exc:
        return None, f"{name} is not importable ({exc}); it is a test extra: pip install -e '.[test]'"


timm, _NO_TIMM = _importable("timm")
transformers, _NO_TRANSFORMERS = _importable("transformers")
needs_timm = pytest.mark.skipif(timm is None, reason=_NO_TIMM or "")
needs_transformers = pytest.mark.skipif(transformers is None, reason=_NO_TRANSFORMERS or "")


@pytest.fixture(autouse=True)
def _reference_backend():
    with resnet_fused.use_backend("reference"):
        yield


# ---------------------------------------------------------------------------------------
# Helpers.


def _tensor(output) -> torch.Tensor:
    """A model's main output: the tensor, or a transformers ModelOutput's last_hidden_state/logits."""
    if isinstance(output, torch.Tensor):
        return output
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state


def _images(batch: int = BATCH, hw: int = HW, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, hw, hw, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _train_step(model: nn.Module, x: torch.Tensor, seed: int = 0, recorder=None) -> torch.Tensor:
    """One forward (under `recorder`) and backward of a random projection of the output, with
    the global RNG at `seed` (drop_path, DropBlock draw from it)."""
    model.train()
    torch.manual_seed(seed)
    with recorder or contextlib.nullcontext():
        out = _tensor(model(x))
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(7))
    (out * weights).sum().backward()
    return out.detach()


def _assert_same_state(stock: nn.Module, fused: nn.Module) -> None:
    """Same parameter and buffer names; gradients and buffers within TOLERANCE (integers equal)."""
    params, fused_params = dict(stock.named_parameters()), dict(fused.named_parameters())
    assert list(params) == list(fused_params)
    for name, p in params.items():
        q = fused_params[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert rel_err(q.grad, p.grad) <= TOLERANCE, f"gradient of {name}: {rel_err(q.grad, p.grad):.1e}"
    buffers, fused_buffers = dict(stock.named_buffers()), dict(fused.named_buffers())
    assert list(buffers) == list(fused_buffers)
    for name, b in buffers.items():
        c = fused_buffers[name]
        if b.is_floating_point():
            assert rel_err(c, b) <= TOLERANCE, f"{name}: {rel_err(c, b):.1e}"
        else:
            assert torch.equal(c, b), name
    assert list(stock.state_dict()) == list(fused.state_dict())


def _assert_trains_the_same(stock: nn.Module, fused: nn.Module, x: torch.Tensor, seed: int = 0) -> OpRecorder:
    """A training step of each from the same RNG state: outputs, gradients, buffers. Returns the
    fused forward's dispatch recorder."""
    recorder = OpRecorder()
    expected = _train_step(stock, x, seed)
    got = _train_step(fused, x, seed, recorder)
    assert rel_err(got, expected) <= TOLERANCE, f"training output: {rel_err(got, expected):.1e}"
    _assert_same_state(stock, fused)
    return recorder


def _assert_evaluates_the_same(stock: nn.Module, fused: nn.Module, x: torch.Tensor) -> OpRecorder:
    recorder = OpRecorder()
    stock.eval(), fused.eval()
    with torch.no_grad():
        expected = _tensor(stock(x))
        with recorder:
            got = _tensor(fused(x))
    assert rel_err(got, expected) <= TOLERANCE, f"eval output: {rel_err(got, expected):.1e}"
    return recorder


def _dispatched_kinds(recorder: OpRecorder) -> dict[str, int]:
    """Fused units per kind as dispatched: conv_bn_train/conv_bn_eval calls by their residual
    and relu arguments, add_relu calls."""
    kinds = collections.Counter()
    for call in recorder.calls:
        assert call.namespace == "resnet_fused", call  # the reference backend's ops
        if call.op in ("conv_bn_train", "conv_bn_eval"):
            residual = call.args[5] if call.op == "conv_bn_train" else call.args[4]
            kinds["conv+bn" + ("+add" if residual is not None else "") + ("+relu" if call.args[-1] else "")] += 1
        elif call.op == "add_relu":
            kinds["add+relu"] += 1
    return dict(kinds)


def _assert_dispatch_matches(recorder: OpRecorder, summary: FuseSummary) -> None:
    """The forward dispatched one resnet_fused op per unit of the summary, and aten
    convolutions and BatchNorms only for the convs without a BatchNorm and the unfused pairs."""
    assert _dispatched_kinds(recorder) == summary.counts
    convolutions = [n for n in recorder.names if n.startswith("aten::") and "convolution" in n]
    assert len(convolutions) == len(summary.convs_without_norm) + len(summary.unfused), convolutions
    batch_norms = [n for n in recorder.names if "batch_norm" in n]
    assert len(batch_norms) == len(summary.unfused), batch_norms


def _small_timm_resnet(block: str = "Bottleneck", **kwargs) -> nn.Module:
    """timm's ResNet class with one block per stage and narrow channels (a deep stem and
    average-pool downsampling unless overridden): every unit type at a fraction of the cost."""
    from timm.models import resnet as timm_resnet

    kwargs = dict(dict(channels=(8, 16, 32, 64), stem_width=8, stem_type="deep", avg_down=True, num_classes=10),
                  **kwargs)
    return timm_resnet.ResNet(getattr(timm_resnet, block), [1, 1, 1, 1], **kwargs)


def _twins(stock: nn.Module) -> tuple[nn.Module, nn.Module]:
    stock = randomize_model_bn(stock).double()
    return stock, fuse(stock)


# ---------------------------------------------------------------------------------------
# The models of the table (docs/fuse.md), each fused, exactly.

# name: (fused units per kind, convs without a BatchNorm). docs/fuse.md has this table.
TABLE = {
    "resnet50": ({"conv+bn+relu": 33, "conv+bn": 4, "conv+bn+add+relu": 16}, 0),
    "resnet50d": ({"conv+bn+relu": 35, "conv+bn": 4, "conv+bn+add+relu": 16}, 0),
    "seresnet50": ({"conv+bn+relu": 33, "conv+bn": 20, "add+relu": 16}, 32),
    "resnext50_32x4d": ({"conv+bn+relu": 33, "conv+bn": 4, "conv+bn+add+relu": 16}, 0),
    "resnet26t": ({"conv+bn+relu": 19, "conv+bn": 4, "conv+bn+add+relu": 8}, 0),
    "resnetrs50": ({"conv+bn+relu": 36, "conv+bn": 20, "add+relu": 16}, 32),
    "regnety_016": ({"conv+bn+relu": 55, "conv+bn": 4, "conv+bn+add+relu": 27}, 54),
    "transformers-ResNetModel": ({"conv+bn+relu": 33, "conv+bn": 4, "conv+bn+add+relu": 16}, 0),
}


def _table_model(name: str) -> nn.Module:
    if name.startswith("transformers-"):
        if transformers is None:
            pytest.skip(_NO_TRANSFORMERS)
        return transformers.ResNetModel(transformers.ResNetConfig())
    if timm is None:
        pytest.skip(_NO_TIMM)
    return timm.create_model(name, num_classes=10)


@pytest.mark.parametrize("name", list(TABLE))
def test_table_model_fuses_exactly(name):
    """Every conv+BatchNorm pair fused (the residual epilogue wherever nothing sits between the
    BatchNorm and the add); a training step and eval equal the model's own within 1e-9; the
    dispatched ops are the summary's units; names, class and API attributes unchanged."""
    counts, convs_without_norm = TABLE[name]
    stock, fused = _twins(_table_model(name))
    summary = fuse_summary(fused)
    assert summary.counts == counts, str(summary)
    assert not summary.unfused and not summary.norms_without_conv, str(summary)
    assert len(summary.convs_without_norm) == convs_without_norm
    assert type(fused).__name__ == type(stock).__name__ and isinstance(fused, type(stock))
    for attr in ("pretrained_cfg", "feature_info", "config"):
        if hasattr(stock, attr):
            assert getattr(fused, attr) == getattr(stock, attr), attr

    x = _images()
    _assert_dispatch_matches(_assert_trains_the_same(stock, fused, x), summary)
    _assert_dispatch_matches(_assert_evaluates_the_same(stock, fused, x), summary)


# ---------------------------------------------------------------------------------------
# The models' APIs.


@needs_timm
def test_timm_api_kept():
    """A fused timm ResNet keeps timm's API: forward_features, forward_head, forward_intermediates,
    reset_classifier and set_grad_checkpointing (a training step through checkpoint_seq equals
    timm's), the same as the model's own, with the stem fused on every path."""
    stock, fused = _twins(_small_timm_resnet())
    x = _images()
    stock.eval(), fused.eval()
    with torch.no_grad():
        features, fused_features = stock.forward_features(x), fused.forward_features(x)
        assert rel_err(fused_features, features) <= TOLERANCE
        for pre_logits in (False, True):
            assert rel_err(fused.forward_head(fused_features, pre_logits=pre_logits),
                           stock.forward_head(features, pre_logits=pre_logits)) <= TOLERANCE
        recorder = OpRecorder()
        with recorder:
            got = fused.forward_intermediates(x, indices=[0, 2, 4])
        expected = stock.forward_intermediates(x, indices=[0, 2, 4])
        assert len(got[1]) == len(expected[1]) == 3
        for a, b in zip([got[0], *got[1]], [expected[0], *expected[1]]):
            assert rel_err(a, b) <= TOLERANCE
        assert not [n for n in recorder.names if "batch_norm" in n]  # the stem too runs fused
        only = fused.forward_intermediates(x, indices=1, intermediates_only=True, stop_early=True)
        assert rel_err(only[0], stock.forward_intermediates(x, indices=1, intermediates_only=True)[0]) <= TOLERANCE

    for model in (stock, fused):
        torch.manual_seed(3)
        model.reset_classifier(5)
        model.double()
    assert fused.num_classes == 5 and fused.get_classifier().out_features == 5
    for model in (stock, fused):
        model.set_grad_checkpointing(True)
    assert fused.grad_checkpointing
    _assert_trains_the_same(stock, fused, x)


@needs_transformers
@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_transformers_api_kept(tmp_path, layer_type):
    """A fused ResNetForImageClassification keeps transformers' API: its config, ModelOutputs
    (loss with labels, hidden states), and a save_pretrained/from_pretrained round trip (the
    saved architecture is the model's own class); fusing the reloaded model gives the same."""
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 2, 1, 1],
                                       layer_type=layer_type, num_labels=3)
    stock, fused = _twins(transformers.ResNetForImageClassification(config))
    assert fused.config is not stock.config and fused.config.to_dict() == stock.config.to_dict()
    assert fuse_summary(fused).fused_pairs == len(fuse_summary(fused).units) > 0
    assert not fuse_summary(fused).unfused
    x, labels = _images(), torch.tensor([0, 2])
    _assert_trains_the_same(stock, fused, x)
    stock.eval(), fused.eval()
    with torch.no_grad():
        expected = stock(x, labels=labels, output_hidden_states=True)
        got = fused(x, labels=labels, output_hidden_states=True)
    assert type(got) is type(expected) is transformers.modeling_outputs.ImageClassifierOutputWithNoAttention
    assert rel_err(got.loss, expected.loss) <= TOLERANCE and rel_err(got.logits, expected.logits) <= TOLERANCE
    assert len(got.hidden_states) == len(expected.hidden_states) == 5
    for a, b in zip(got.hidden_states, expected.hidden_states):
        assert rel_err(a, b) <= TOLERANCE

    fused.save_pretrained(tmp_path)
    assert transformers.PretrainedConfig.from_pretrained(tmp_path).architectures == ["ResNetForImageClassification"]
    reloaded = transformers.ResNetForImageClassification.from_pretrained(tmp_path, torch_dtype=torch.float64).eval()
    refused = fuse(reloaded)
    with torch.no_grad():
        assert rel_err(reloaded(x).logits, expected.logits) <= TOLERANCE
        assert rel_err(refused(x).logits, expected.logits) <= TOLERANCE
    assert fuse_summary(refused).counts == fuse_summary(fused).counts


# ---------------------------------------------------------------------------------------
# The traps of an FX rewrite, each met by running the model's own forward with fused units.


@needs_timm
def test_mode_switch_after_fuse_regnet():
    """RegNet's BatchNormAct2d (ReLU inside the norm) in a model fused in eval mode, then
    trained, then evaluated again: each mode as the model's own (an FX graph would have frozen
    the mode it was traced in)."""
    stock = randomize_model_bn(timm.create_model("regnety_002", num_classes=10)).double().eval()
    fused = fuse(stock)
    summary = fuse_summary(fused)
    assert not summary.unfused and summary.counts == {"conv+bn+relu": 27, "conv+bn": 4, "conv+bn+add+relu": 13}
    x = _images()
    _assert_evaluates_the_same(stock, fused, x)
    _assert_dispatch_matches(_assert_trains_the_same(stock, fused, x), summary)
    _assert_dispatch_matches(_assert_evaluates_the_same(stock, fused, x), summary)  # with the updated statistics


@needs_timm
@pytest.mark.parametrize("drop", ["drop_path", "drop_block"])
def test_stochastic_regularizers_in_training(drop):
    """drop_path (stochastic depth: its mask and in-place rescaling) and DropBlock (which FX
    cannot trace) in training: the fused step equals the model's own from the same RNG state,
    and the regularizer is active (the step differs without it). drop_path sits between bn3 and
    the add: those units fuse as conv+bn, the add and ReLU as one add+relu op; DropBlock sits
    between bn2 and act2: conv2 fuses as conv+bn."""
    kwargs = {"drop_path": dict(drop_path_rate=0.5), "drop_block": dict(drop_block_rate=0.5)}[drop]
    stock, fused = _twins(_small_timm_resnet(**kwargs))
    summary = fuse_summary(fused)
    assert not summary.unfused
    if drop == "drop_path":  # the first block has drop_prob 0 (timm's linear rule): no DropPath
        assert summary.counts == {"conv+bn+relu": 11, "conv+bn": 7, "conv+bn+add+relu": 1, "add+relu": 3}
        assert "DropPath between bn3 and the residual add" in str(summary)
    else:  # DropBlock in the last two stages
        assert summary.counts == {"conv+bn+relu": 9, "conv+bn": 6, "conv+bn+add+relu": 4}
        assert "DropBlock2d and ReLU run after it" in str(summary)
    x = _images(batch=4)
    _assert_dispatch_matches(_assert_trains_the_same(stock, fused, x, seed=11), summary)
    without = copy.deepcopy(stock)
    for block in without.modules():
        if hasattr(block, "drop_path"):
            block.drop_path, block.drop_block = None, nn.Identity()
    assert rel_err(_train_step(without, x, seed=11), _train_step(stock, x, seed=11)) > 1e-3


@needs_timm
@needs_transformers
@pytest.mark.parametrize("library", ["timm", "transformers"])
def test_non_relu_activation_fuses_conv_bn_only(library):
    """SiLU (torch's in timm, transformers' own SiLUActivation): each unit fuses conv+BN (and
    the residual add), SiLU runs after it; equal to the model's own."""
    if library == "timm":
        model = _small_timm_resnet("BasicBlock", act_layer=nn.SiLU)
        expected = {"conv+bn": 11, "conv+bn+add": 4}
    else:
        config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                           hidden_act="silu")
        model = transformers.ResNetModel(config)
        # hidden_act sets the stem's and each layer's output activation; the layers' inner
        # ResNetConvLayers keep transformers' default, ReLU.
        expected = {"conv+bn+relu": 8, "conv+bn": 4, "conv+bn+add": 4}
    stock, fused = _twins(model)
    summary = fuse_summary(fused)
    assert summary.counts == expected and not summary.unfused
    assert "runs after it (the fused ops apply ReLU only)" in str(summary)
    x = _images()
    _assert_dispatch_matches(_assert_trains_the_same(stock, fused, x), summary)
    _assert_dispatch_matches(_assert_evaluates_the_same(stock, fused, x), summary)


@needs_timm
@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")  # deprecated in torch 2.10+, still supported
def test_tracing_and_scripting_see_the_model_s_own_forward():
    """FX symbolic tracing (timm's feature extraction, torchvision's create_feature_extractor),
    jit.trace, torch.jit.script and ONNX export of a fused model record the model's own forward,
    as the fused torchvision models do; the fused model itself stays fused."""
    stock, fused = _twins(_small_timm_resnet())
    stock.eval(), fused.eval()
    x = _images()
    graph, fused_graph = torch.fx.symbolic_trace(stock).graph, torch.fx.symbolic_trace(fused).graph
    assert [(n.op, n.name, n.target) for n in fused_graph.nodes] == [(n.op, n.name, n.target) for n in graph.nodes]
    assert not [n for n in fused_graph.nodes if "resnet_fused" in str(n.target)]
    with torch.no_grad():
        traced = torch.jit.trace(fused, x)
        assert "resnet_fused::" not in str(traced.inlined_graph)
        assert rel_err(traced(x), stock(x)) <= TOLERANCE
    scripted = torch.jit.script(fused)
    with torch.no_grad():
        assert rel_err(scripted(x), stock(x)) <= TOLERANCE
    assert "resnet_fused::" not in str(scripted.inlined_graph)
    assert fuse_summary(fused).counts == {"conv+bn+relu": 11, "conv+bn": 4, "conv+bn+add+relu": 4}
    onnx, _ = _importable("onnx")
    if onnx is not None:  # the ONNX export (TorchScript-based exporter) has the model's own operators
        operators = []
        for model in (stock, fused):
            buffer = io.BytesIO()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's own deprecation notes
                torch.onnx.export(model.float(), (x.float(),), buffer, dynamo=False)
            operators.append([node.op_type for node in onnx.load_from_string(buffer.getvalue()).graph.node])
        assert operators[0] == operators[1] and "Conv" in operators[0]


@needs_timm
def test_torch_compile_fullgraph():
    """torch.compile (dynamo and AOT autograd, fullgraph: no graph break) of fused timm units
    (ConvNormAct with BatchNormAct2d, RegNet and ResNet Bottlenecks): a training step and eval
    equal the model's own."""
    from timm.layers import ConvNormAct
    from timm.models import regnet, resnet as timm_resnet

    stock, fused = _twins(nn.Sequential(ConvNormAct(3, 8, 3), regnet.Bottleneck(8, 16, stride=2, group_size=4),
                                        timm_resnet.Bottleneck(16, 4)))
    assert fuse_summary(fused).counts == {"conv+bn+relu": 5, "conv+bn": 1, "conv+bn+add+relu": 2}
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = _images(hw=16)
    try:
        assert rel_err(_train_step(compiled, x), _train_step(stock, x)) <= TOLERANCE
        _assert_same_state(stock, fused)
        stock.eval(), compiled.eval()
        with torch.no_grad():
            assert rel_err(compiled(x), stock(x)) <= TOLERANCE
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------
# What fuse() leaves alone, and says so.


def test_nothing_to_fuse_returns_the_model_unchanged():
    """A VGG without BatchNorm: an unchanged copy, and a summary saying there is nothing to fuse."""
    model = nn.Sequential(torchvision.models.vgg.make_layers([8, "M", 16, "M"]), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(1, 3, 16, 16))  # materialize the lazy layer
    fused = fuse(model)
    assert fused is not model
    assert [type(m) for m in fused.modules()] == [type(m) for m in model.modules()]
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), model.state_dict().values()))
    summary = fuse_summary(fused)
    assert not summary.units and not summary.unfused and len(summary.convs_without_norm) == 2
    assert "nothing to fuse" in str(summary)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(fused(x), model(x))


def test_torchvision_model_fuses_as_from_torchvision():
    """A torchvision ResNet converts to from_torchvision's classes, with the summary's count;
    fuse() knows every class from_torchvision converts."""
    assert {k.fused for k in FUSE_MODULE._KNOWN.values() if k.fused} == set(resnet_fused.models._TO_FUSED.values())
    model = torchvision.models.resnet18(num_classes=10)
    fused, converted = fuse(model), resnet_fused.from_torchvision(model)
    assert [type(m) for m in fused.modules()] == [type(m) for m in converted.modules()]
    summary = fuse_summary(fused)
    assert summary.counts == {"conv+bn+relu": 9, "conv+bn": 3, "conv+bn+add+relu": 8} and not summary.unfused
    assert fuse_summary(converted).counts == summary.counts


def test_unfused_pairs_are_reported_with_their_reason():
    """Pairs fuse() cannot fuse appear in the summary with the reason, and run as the modules
    themselves: a conv with reflect padding and a BatchNorm2d subclass (known containers); a
    pair inside a container whose forward fuse() does not know (traced with FX for the report),
    and inside one FX cannot trace (paired by the order of its children)."""

    class MyBatchNorm(nn.BatchNorm2d):
        pass

    class Unknown(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + x)

    class Untraceable(Unknown):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent: FX cannot trace it
                return self.bn(self.conv(x))
            return self.bn(self.conv(-x))

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect", bias=False), nn.BatchNorm2d(4),
                          nn.ReLU(), nn.Conv2d(4, 4, 1, bias=False), MyBatchNorm(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), Unknown(), Untraceable())
    stock, fused = _twins(model)
    summary = fuse_summary(fused)
    assert summary.counts == {"conv+bn+relu": 1}
    reasons = {(p.conv, p.norm): p.reason for p in summary.unfused}
    assert set(reasons) == {("0", "1"), ("3", "4"), ("9.conv", "9.bn"), ("10.conv", "10.bn")}
    assert "padding_mode='reflect'" in reasons["0", "1"]
    assert "MyBatchNorm" in reasons["3", "4"] and "subclass" in reasons["3", "4"]
    assert "Unknown), whose forward fuse() does not know" in reasons["9.conv", "9.bn"]
    assert "could not be traced" in reasons["10.conv", "10.bn"]
    for text in ("1 of 5 conv+BatchNorm pairs fused", "left unfused (4)", "padding_mode='reflect'"):
        assert text in str(summary)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    _assert_dispatch_matches(_assert_trains_the_same(stock, fused, x), summary)


@needs_timm
def test_timm_features_only_reports_the_stem_pair_it_cannot_fuse():
    """timm's features_only wrapper (FeatureListNet) calls the stem's modules itself, which
    fuse() does not know: that one pair is reported; the blocks inside run fused."""
    stock, fused = _twins(timm.create_model("resnet26t", features_only=True))
    summary = fuse_summary(fused)
    assert [(p.conv, p.norm) for p in summary.unfused] == [("conv1.6", "bn1")]
    assert "FeatureListNet" in summary.unfused[0].reason
    assert summary.counts == {"conv+bn+relu": 18, "conv+bn": 4, "conv+bn+add+relu": 8}
    x = _images()
    stock.eval(), fused.eval()
    with torch.no_grad():
        for a, b in zip(fused(x), stock(x), strict=True):
            assert rel_err(a, b) <= TOLERANCE


@needs_timm
def test_changed_upstream_forward_is_left_alone(monkeypatch):
    """A timm version whose Bottleneck.forward differs from the one fuse() knows (its
    fingerprint): the Bottlenecks keep their class and run their own forward, their pairs are
    reported with that reason; the rest still fuses and the model is unchanged in what it computes."""
    key = "timm.models.resnet.Bottleneck"
    changed = dict(FUSE_MODULE._KNOWN, **{key: FUSE_MODULE.dataclasses.replace(
        FUSE_MODULE._KNOWN[key], fingerprints={"forward": frozenset({"0000000000000000"})})})
    monkeypatch.setattr(FUSE_MODULE, "_KNOWN", changed)
    monkeypatch.setattr(FUSE_MODULE, "_REFUSALS", {})
    stock, fused = _twins(_small_timm_resnet())
    assert all(type(m) is type(s) for m, s in zip(fused.layer1, stock.layer1))
    summary = fuse_summary(fused)
    refused = [p for p in summary.unfused if "Bottleneck.forward (installed timm" in p.reason]
    assert len(refused) == 12 and "differs from the versions fuse() knows" in refused[0].reason
    assert summary.counts == {"conv+bn+relu": 3, "conv+bn": 4}  # the stem, and the downsamples (nn.Sequential)
    _assert_dispatch_matches(_assert_trains_the_same(stock, fused, _images()), summary)


# ---------------------------------------------------------------------------------------
# Arguments, copies, pickling.


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        fuse("resnet50")
    with pytest.raises(TypeError, match="model must be an nn.Module, got NoneType"):
        fuse_summary(None)
    with pytest.raises(TypeError, match="inplace must be a bool, got 'yes'"):
        fuse(nn.Conv2d(1, 1, 1), inplace="yes")
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)))
    with pytest.raises(TypeError, match="TorchScript module; .* call it before torch.jit.script"):
        fuse(scripted)


def test_copy_inplace_and_idempotent():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    fused = fuse(model)
    assert fused is not model and type(model) is nn.Sequential and type(fused) is not nn.Sequential
    assert isinstance(fused, nn.Sequential) and type(fused).__name__ == "Sequential"
    assert fuse(model, inplace=True) is model and type(model) is type(fused)
    again = fuse(fused)
    assert type(again) is type(fused) and fuse_summary(again).counts == fuse_summary(fused).counts == {
        "conv+bn+relu": 1}
    assert "fuse() not applied" in fuse_summary(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).unfused[0].reason


@needs_timm
def test_fused_model_pickles(monkeypatch):
    """torch.save of a whole fused model loads back fused, also where the fused classes are not
    made yet (a fresh process: resnet_fused.fuse makes them on first lookup)."""
    stock, fused = _twins(_small_timm_resnet())
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    name = type(fused.layer1[0]).__qualname__
    monkeypatch.delitem(FUSE_MODULE.__dict__, name)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.layer1[0]).__qualname__ == name and type(loaded.layer1[0]) is not type(fused.layer1[0])
    assert fuse_summary(loaded).counts == fuse_summary(fused).counts
    _assert_evaluates_the_same(stock, loaded, _images())


# ---------------------------------------------------------------------------------------
# float32 on the Triton backend (under the Triton interpreter without a GPU).


@needs_timm
@pytest.mark.parametrize("unit", ["Bottleneck", "ConvNormAct"])
def test_triton_float32_units_within_eager(unit):
    """A small timm model's units in float32 on the Triton backend (its kernels ran: the
    backend's selections), in training: a Bottleneck with a strided conv downsample (conv+bn+relu,
    conv+bn, conv+bn+add+relu), and a RegNet ConvNormAct whose BatchNormAct2d carries the ReLU.
    The output, the input gradient, every parameter gradient and the running statistics within 2x
    eager float32's error against float64, per tensor."""
    if resnet_fused.available_backends()["triton"] is not None:
        pytest.skip(f"triton backend unavailable: {resnet_fused.available_backends()['triton']}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from timm.layers import ConvNormAct
    from timm.models import resnet as timm_resnet

    torch.manual_seed(2)
    if unit == "Bottleneck":
        eager64 = timm_resnet.Bottleneck(16, 8, stride=2, downsample=timm_resnet.downsample_conv(16, 32, 1, stride=2))
        x64 = torch.randn(8, 16, 8, 8, dtype=torch.float64)
    else:
        eager64 = ConvNormAct(16, 24, 3, padding=1)
        x64 = torch.randn(8, 16, 8, 8, dtype=torch.float64)
    eager64 = randomize_model_bn(eager64).double().to(device).train()
    x64 = x64.to(device)
    eager = copy.deepcopy(eager64).float()
    fused = fuse(eager)
    assert not fuse_summary(fused).unfused
    results, scales = [], _batch_norm_reduction_scales(eager64)
    for model, x in ((eager64, x64), (eager, x64.float()), (fused, x64.float())):
        x = x.clone().requires_grad_(True)
        with resnet_fused.use_backend("triton"), backends.record_selections() as selected:
            out = model(x)
            (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out).to(out.dtype)).sum().backward()
        if model is fused:
            assert selected and set(selected) == {"triton"}, dict(selected)
        results.append([("output", out), ("input gradient", x.grad)]
                       + [(f"gradient of {n}", p.grad) for n, p in model.named_parameters()]
                       + [(n, b) for n, b in model.named_buffers() if b.is_floating_point()])
    for (name, ref), (_, ours), (_, ours_fused) in zip(*results, strict=True):
        scale = scales.get(name.removeprefix("gradient of "))
        assert_close_to_ref(ours_fused.detach(), ours.detach(), ref.detach(), name, scale=scale() if scale else None)


def _batch_norm_reduction_scales(model: nn.Module) -> dict:
    """For each BatchNorm's weight and bias (by parameter name): a function giving, after the
    model's backward, the largest per-channel sum of the magnitudes of the terms its gradient
    sums (|g * x_hat|, |g| over N*H*W, g the gradient at the BatchNorm's output): the scale of
    the floor for such a reduction, whose rounding depends on the order of summation."""
    scales, seen = {}, {}
    for module in model.modules():
        if hasattr(module, "inplace"):  # the hooked BatchNorm outputs stay as they are
            module.inplace = False
    for name, module in model.named_modules():
        if not isinstance(module, nn.BatchNorm2d):
            continue

        def capture_gradient(grad, name=name, module=module):
            g = grad if type(module) is nn.BatchNorm2d else grad * (seen[name]["output"] > 0)  # BatchNormAct2d: ReLU
            seen[name]["weight"] = (g * seen[name]["x_hat"]).abs().sum((0, 2, 3)).max().item()
            seen[name]["bias"] = g.abs().sum((0, 2, 3)).max().item()

        def forward_hook(module, inputs, output, name=name, capture_gradient=capture_gradient):
            z = inputs[0].detach()
            mean, var = z.mean((0, 2, 3), keepdim=True), z.var((0, 2, 3), unbiased=False, keepdim=True)
            seen[name] = {"x_hat": (z - mean) / torch.sqrt(var + module.eps), "output": output.detach()}
            output.register_hook(capture_gradient)

        module.register_forward_hook(forward_hook)
        for param in ("weight", "bias"):
            scales[f"{name}.{param}"] = lambda name=name, param=param: seen[name][param]
    return scales


def test_batch_norm_act_is_taken_as_itself(monkeypatch):
    """A fused BatchNormAct2d unit hands the module itself to the BatchNorm rules, as
    BatchNorm2d's normalization (norm_kind), building nothing per call: torch 2.11's compiler
    could not follow the BatchNorm2d view fuse() used to build in traced code (fullgraph failed
    with "'BatchNorm2d' object has no attribute 'momentum'"). The results are the model's own."""
    import resnet_fused.nn as fused_nn
    from timm.layers import ConvNormAct

    stock, fused = _twins(nn.Sequential(ConvNormAct(3, 8, 3)))
    norm = fused[0].bn
    taken = []
    real = fused_nn.batch_norm_args
    monkeypatch.setattr(fused_nn, "batch_norm_args",
                        lambda n, kind=None: (taken.append((n, kind)), real(n, kind))[1])
    x = _images(hw=16)
    for training in (True, False):
        stock.train(training), fused.train(training)
        assert rel_err(fused(x), stock(x)) <= TOLERANCE
    assert len(taken) == 2 and all(n is norm and kind is nn.BatchNorm2d for n, kind in taken)


# ---------------------------------------------------------------------------------------
# Fingerprints: what a method does, not how its names read.


def _known_methods():
    """(key, method name, the installed upstream function) for every fingerprinted method."""
    found = []
    entries = [(k.key, k.fingerprints) for k in FUSE_MODULE._KNOWN_LIST] + list(FUSE_MODULE._NORMS.items())
    for key, fingerprints in entries:
        module_name, _, class_name = key.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except ImportError:
            continue
        found += [(key, method, getattr(cls, method)) for method in fingerprints]
    return found


class _Rename(ast.NodeTransformer):
    """Every parameter and local renamed, annotated, with a docstring: what must not count."""

    def __init__(self, bound):
        self.bound = bound

    def visit_FunctionDef(self, node):
        self.generic_visit(node)
        node.returns = ast.Constant("Any")
        node.body.insert(0, ast.Expr(ast.Constant("A docstring added by a new release.")))
        return node

    def visit_arg(self, node):
        node.arg = "renamed_" + node.arg if node.arg in self.bound else node.arg
        node.annotation = ast.Name("Tensor", ast.Load())
        return node

    def visit_Name(self, node):
        node.id = "renamed_" + node.id if node.id in self.bound else node.id
        return node


def _edited(source: str, edit) -> str:
    tree = ast.parse(textwrap.dedent(source))
    edit(tree.body[0])
    return ast.unparse(ast.fix_missing_locations(tree))


def _drop_first_call(function):
    """Remove the first statement that calls something (or its call, if nested deeper)."""
    for parent in ast.walk(function):
        for field in ("body", "orelse"):
            statements = getattr(parent, field, None)
            if not isinstance(statements, list):
                continue
            for i, statement in enumerate(statements):
                if isinstance(statement, (ast.Expr, ast.Assign, ast.Return)) and any(
                        isinstance(n, ast.Call) for n in ast.walk(statement)):
                    del statements[i]
                    if not statements:
                        statements.append(ast.Pass())
                    return
    raise AssertionError("no statement with a call")


@pytest.mark.parametrize("key, method, function", _known_methods() or [pytest.param(None, None, None, marks=pytest.mark.skip(
    reason="neither timm nor transformers is installed"))])
def test_fingerprint_ignores_names_and_annotations_not_calls(key, method, function):
    """Each known upstream method: its fingerprint is an accepted one; a copy with every parameter
    and local renamed, annotations and a docstring added keeps it; a copy with one call added or
    one removed loses it."""
    accepted = dict([(k.key, k.fingerprints) for k in FUSE_MODULE._KNOWN_LIST] + list(FUSE_MODULE._NORMS.items()))
    source = inspect.getsource(function)
    fingerprint = FUSE_MODULE._fingerprint_source
    assert fingerprint(source) in accepted[key][method], f"{key}.{method}: the installed version is not a known one"
    bound = FUSE_MODULE._bound_names(ast.parse(textwrap.dedent(source)))
    renamed = _edited(source, lambda f: _Rename(bound).visit(f))
    assert "renamed_" in renamed and fingerprint(renamed) == fingerprint(source), renamed
    added = _edited(source, lambda f: f.body.insert(0, ast.Expr(ast.Call(ast.Name("print", ast.Load()), [], []))))
    assert fingerprint(added) != fingerprint(source)
    removed = _edited(source, _drop_first_call)
    assert fingerprint(removed) != fingerprint(source), removed


def test_fingerprint_equates_only_code_that_runs_the_same():
    """Straight-line code that reuses a name reads as code that does not; code with branches is
    compared by a consistent renaming only, so two functions that return different values do not
    collide."""
    fingerprint = FUSE_MODULE._fingerprint_source
    reuse = "def forward(self, input):\n    h = self.conv(input)\n    h = self.bn(h)\n    return h\n"
    fresh = "def forward(self, x: Tensor) -> Tensor:\n    y = self.conv(x)\n    z = self.bn(y)\n    return z\n"
    swapped = "def forward(self, x):\n    y = self.bn(x)\n    z = self.conv(y)\n    return z\n"
    assert fingerprint(reuse) == fingerprint(fresh) != fingerprint(swapped)
    branch_a = "def f(c):\n    a = g()\n    b = k()\n    if c:\n        a = h()\n    return a\n"
    branch_b = "def f(c):\n    a = g()\n    b = k()\n    if c:\n        b = h()\n    return b\n"
    assert fingerprint(branch_a) != fingerprint(branch_b)
    renamed_a = "def f(flag):\n    out = g()\n    tmp = k()\n    if flag:\n        out = h()\n    return out\n"
    assert fingerprint(branch_a) == fingerprint(renamed_a)
    with_global = "def forward(self, x):\n    y = self.conv(x)\n    z = torch.relu(y)\n    return z\n"
    other_global = "def forward(self, x):\n    y = self.conv(x)\n    z = torch.sigmoid(y)\n    return z\n"
    keyword = "def forward(self, x):\n    y = self.conv(x, inplace=True)\n    return y\n"
    no_keyword = "def forward(self, x):\n    y = self.conv(x, other=True)\n    return y\n"
    assert fingerprint(with_global) != fingerprint(other_global) and fingerprint(keyword) != fingerprint(no_keyword)
