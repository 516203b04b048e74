"""The fused models in the PyTorch ecosystem's tools, as they come from the builders, against
torchvision's models with the same weights: TorchScript (script and trace), FX and feature
extraction, ONNX (both exporters, run by onnxruntime), torch.export with and without the
decompositions, torchvision's model registry, and FLOP counting.

Artifacts that must run without resnet_fused are loaded in a fresh process where importing
resnet_fused fails.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import resnet_fused
from resnet_fused import models as fused_models

BUILDERS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
            "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")

# A small net with every kind of unit: Bottleneck blocks with groups (ResNeXt's 3x3) and downsampling.
SMALL = dict(block="Bottleneck", layers=[1, 1, 1, 1], groups=2, width_per_group=16, num_classes=10)


def twins(name: str | None = None, train: bool = False):
    """(fused model, torchvision model with the same weights); name: a builder, else SMALL."""
    if name is None:
        kwargs = dict(SMALL, block=torchvision.models.resnet.Bottleneck)
        tv = torchvision.models.ResNet(**kwargs)
        fused = resnet_fused.from_torchvision(tv)
    else:
        fused = getattr(resnet_fused, name)()
        tv = getattr(torchvision.models, name)()
        tv.load_state_dict(fused.state_dict())
    with torch.no_grad():  # non-trivial running statistics
        for a, b in zip(fused.modules(), tv.modules()):
            if isinstance(a, torch.nn.BatchNorm2d):
                a.running_mean.uniform_(-0.5, 0.5)
                a.running_var.uniform_(0.5, 1.5)
                b.load_state_dict(a.state_dict())
    return fused.train(train), tv.train(train)


def run_without_resnet_fused(code: str) -> str:
    """Runs code in a fresh Python where `import resnet_fused` fails; returns its stdout."""
    prelude = "import sys\nsys.modules['resnet_fused'] = None  # importing it now raises ImportError\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def assert_same_logits(actual, expected):
    actual = torch.as_tensor(actual)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def _fused_ops_in(graph) -> set[str]:
    return {str(n.target) for n in graph.nodes if n.op == "call_function" and "resnet_fused" in str(n.target)}


# ---------------------------------------------------------------------------------------
# TorchScript


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_torch_jit_script_matches_torchvision(train, tmp_path):
    fused, tv = twins(train=train)
    scripted = torch.jit.script(fused)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(scripted(x), tv(x), rtol=0, atol=0)  # the same ops: torchvision's forward
    if train:
        for a, b in zip(fused.buffers(), tv.buffers()):  # the running statistics moved alike
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    path = tmp_path / "scripted.pt"
    scripted.eval().save(str(path))
    out = run_without_resnet_fused(f"""
        import torch
        m = torch.jit.load({str(path)!r})
        torch.manual_seed(1)
        print(m(torch.randn(2, 3, 32, 32)).abs().sum().item())
    """)
    torch.manual_seed(1)
    assert float(out) == pytest.approx(tv.eval()(torch.randn(2, 3, 32, 32)).abs().sum().item(), rel=1e-5)


@pytest.mark.slow
def test_torch_jit_script_of_every_builder():
    """As torchvision's model tests do: each builder scripts (compile only here; the unit
    above checks a scripted model's outputs)."""
    for name in BUILDERS:
        torch.jit.script(getattr(resnet_fused, name)())


def test_torch_jit_trace_gives_a_portable_graph_without_warnings(tmp_path):
    fused, tv = twins()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(fused, (x,))
    ours = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning) or "resnet_fused" in w.filename]
    assert not ours, [str(w.message) for w in ours]
    assert not [n for n in traced.inlined_graph.nodes() if "resnet_fused" in n.kind()]
    torch.testing.assert_close(traced(x), tv(x), rtol=0, atol=0)
    path = tmp_path / "traced.pt"
    traced.save(str(path))
    out = run_without_resnet_fused(f"""
        import torch
        torch.manual_seed(2)
        print(torch.jit.load({str(path)!r})(torch.randn(2, 3, 32, 32)).abs().sum().item())
    """)
    torch.manual_seed(2)
    assert float(out) == pytest.approx(tv(torch.randn(2, 3, 32, 32)).abs().sum().item(), rel=1e-5)


def test_feature_extraction_routes_give_equal_tensors():
    """torchvision's feature-extraction test asks that IntermediateLayerGetter and
    create_feature_extractor give equal tensors. On the fused model they do, and equal a direct
    call's (read with a forward hook) and torchvision's, in float32 eval."""
    from torchvision.models._utils import IntermediateLayerGetter

    fused, tv = twins()
    fused.eval(), tv.eval()
    x = torch.randn(2, 3, 32, 32)
    layers = {"layer2": "c3", "layer4": "c5"}
    seen = {}
    hooks = [getattr(fused, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
             for name in layers]
    with torch.no_grad():
        fused(x)
        for h in hooks:
            h.remove()
        routes = {"IntermediateLayerGetter": IntermediateLayerGetter(fused, layers)(x),
                  "create_feature_extractor": create_feature_extractor(fused, layers)(x),
                  "direct call": {out: seen[name] for name, out in layers.items()},
                  "torchvision": create_feature_extractor(tv, layers)(x)}
    for route, got in routes.items():
        for key, want in routes["IntermediateLayerGetter"].items():
            assert torch.equal(got[key], want), f"{route} {key}"


# ---------------------------------------------------------------------------------------
# FX


@pytest.mark.parametrize("name", BUILDERS)
def test_fx_graph_node_names_are_torchvisions(name):
    fused = getattr(resnet_fused, name)()
    tv = getattr(torchvision.models, name)()
    assert get_graph_node_names(fused) == get_graph_node_names(tv)


def test_fx_symbolic_trace_and_feature_extraction_match_torchvision():
    fused, tv = twins()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(torch.fx.symbolic_trace(fused)(x), tv(x), rtol=0, atol=0)
    nodes = {"layer1.0.relu_2": "block1", "layer3": "c4", "layer4": "c5", "avgpool": "pool"}
    got = create_feature_extractor(fused, nodes)(x)
    want = create_feature_extractor(tv, nodes)(x)
    assert list(got) == list(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    # Training mode too (the extractor keeps both graphs): running statistics move alike.
    fused.train(), tv.train()
    create_feature_extractor(fused, {"layer4": "c5"})(x)["c5"].sum().backward()
    create_feature_extractor(tv, {"layer4": "c5"})(x)["c5"].sum().backward()
    for (n, a), b in zip(fused.named_parameters(), tv.parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=n)


def test_fused_model_still_runs_fused_outside_tracers():
    fused, _ = twins()
    with resnet_fused.backends.record_selections() as used:
        fused(torch.randn(2, 3, 32, 32))
    assert sum(used.values()) > 0


# ---------------------------------------------------------------------------------------
# ONNX


def _dynamo_exporter_flags_itself() -> bool:
    """Whether this torch's dynamo ONNX exporter sets torch.onnx.is_in_onnx_export() (2.11 and
    2.14 do; 2.6's does not, so the fused ops reach it and it has no ONNX function for them)."""
    try:
        from torch.onnx._internal.exporter import _flags
    except ImportError:
        return False
    return hasattr(_flags, "_is_onnx_exporting")


@pytest.mark.parametrize("dynamo", [
    pytest.param(True, marks=pytest.mark.xfail(
        not _dynamo_exporter_flags_itself(), strict=True, raises=Exception,
        reason="this torch's dynamo ONNX exporter does not flag itself: export with dynamo=False or "
               "resnet_fused.to_torchvision(model) (docs/ecosystem.md)")),
    False], ids=["dynamo", "torchscript"])
def test_onnx_export_gives_standard_ops_that_onnxruntime_runs(dynamo, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    fused, tv = twins()
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' own deprecation notes
        torch.onnx.export(fused, (x,), str(path), dynamo=dynamo)
    model = onnx.load(str(path))
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}, "a custom-domain op was exported"
    assert "Conv" in {node.op_type for node in model.graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert_same_logits(out, tv(x).detach())


# ---------------------------------------------------------------------------------------
# torch.export


@pytest.mark.slow
def test_torch_export_keeps_the_fused_ops_and_decomposes_to_core_aten(tmp_path):
    fused, tv = twins()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(fused, (x,))
    assert _fused_ops_in(program.graph) == {"resnet_fused.conv_bn_eval.default"}
    assert_same_logits(program.module()(x), tv(x))
    portable = program.run_decompositions(resnet_fused.decompositions())
    assert not _fused_ops_in(portable.graph)
    assert_same_logits(portable.module()(x), tv(x))
    path = tmp_path / "model.pt2"
    torch.export.save(portable, str(path))
    out = run_without_resnet_fused(f"""
        import torch
        program = torch.export.load({str(path)!r})
        torch.manual_seed(3)
        print(program.module()(torch.randn(2, 3, 32, 32)).abs().sum().item())
    """)
    torch.manual_seed(3)
    assert float(out) == pytest.approx(tv(torch.randn(2, 3, 32, 32)).abs().sum().item(), rel=1e-4)


def test_torch_export_of_a_training_step_decomposes():
    fused, _ = twins(train=True)
    program = torch.export.export(fused, (torch.randn(4, 3, 32, 32),))
    assert _fused_ops_in(program.graph) == {"resnet_fused.conv_bn_train.default"}
    assert not _fused_ops_in(program.run_decompositions(resnet_fused.decompositions()).graph)


# ---------------------------------------------------------------------------------------
# torchvision's model registry


@pytest.mark.parametrize("name", BUILDERS)
def test_registry_knows_the_builders(name):
    builder = getattr(resnet_fused, name)
    weights = torchvision.models.get_model_weights(getattr(torchvision.models, name))
    assert torchvision.models.get_model_weights(builder) is weights
    assert torchvision.models.get_model_weights(f"resnet_fused.{name}") is weights
    assert torchvision.models.get_model_builder(f"resnet_fused.{name}") is builder
    assert f"resnet_fused.{name}" in torchvision.models.list_models(module=resnet_fused)


def test_registry_builds_through_get_model():
    model = torchvision.models.get_model("resnet_fused.resnet18", num_classes=7)
    assert type(model) is resnet_fused.ResNet and model.fc.out_features == 7


@pytest.mark.parametrize("pretrained", [False, True])
def test_legacy_pretrained_argument_behaves_as_torchvisions(pretrained, monkeypatch):
    loaded = []
    monkeypatch.setattr(fused_models, "_load_weights", lambda model, weights, progress: loaded.append(weights))
    # torchvision's builder, stopped before any download, for its warnings.
    monkeypatch.setattr(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.__class__, "get_state_dict",
                        lambda self, *a, **k: torchvision.models.resnet50().state_dict())
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        resnet_fused.resnet50(pretrained=pretrained)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        torchvision.models.resnet50(pretrained=pretrained)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs] and ours
    assert loaded == ([torchvision.models.ResNet50_Weights.IMAGENET1K_V1] if pretrained else [])


# ---------------------------------------------------------------------------------------
# FLOP counting


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d"])
def test_flop_counter_sees_the_fused_convolutions(name):
    fused, tv = twins(name)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        forward = _flops(lambda: fused(x))
        assert forward == _flops(lambda: tv(x)) and forward > 8e9  # resnet50: 8.18 GFLOP, as torchvision's


def test_flop_counter_counts_the_backward():
    """A training step: the data and the weight gradient each count the forward's FLOPs (as
    torch's formula does for an ungrouped convolution)."""
    fused, tv = twins("resnet18", train=True)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    ours = _flops(lambda: fused(x).sum().backward())
    assert ours == _flops(lambda: tv(x).sum().backward())
    with torch.no_grad():
        assert ours == 3 * _flops(lambda: fused(x))
