"""The ResNet bodies inside torchvision's detection and segmentation models, converted by
from_torchvision: which modules become fused (the 16 Bottlenecks, the getter's stem as one
fused unit), what a getter returning stem intermediates fuses, FrozenBatchNorm2d backbones,
and the way back with to_torchvision. float64.

(The whole detection and segmentation models on the fused backbone, eval and training,
against the stock models: test_detection.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from random_bn import randomize_frozen_bn, randomize_model_bn
from resnet_fused.tolerances import rel_err
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fused

F64 = torch.float64


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
    getter) runs fused; the backbone's feature maps stay the same, and with FrozenBatchNorm2d
    (what the builder makes for pretrained weights) the detections (boxes, scores, labels) in
    eval too (with nn.BatchNorm2d: test_detection.test_eval_outputs_match_stock)."""
    torch.manual_seed(0)
    tv = _fasterrcnn(frozen).eval()
    randomize_model_bn(tv), randomize_frozen_bn(tv)
    tv.double()
    fused = resnet_fused.from_torchvision(copy.deepcopy(tv), inplace=True)
    assert _converted_blocks(fused) == 16
    images = [torch.rand(3, 80, 96, dtype=F64), torch.rand(3, 96, 72, dtype=F64)]
    x = torch.rand(1, 3, 64, 64, dtype=F64)
    _assert_stem_fused(tv.backbone.body, fused.backbone.body, x)
    with torch.no_grad():
        feats_tv, feats_f = tv.backbone(x), fused.backbone(x)
    assert list(feats_f) == list(feats_tv)
    for key in feats_tv:
        assert rel_err(feats_f[key], feats_tv[key]) <= 1e-12, key
    if not frozen:
        return
    with torch.no_grad():
        out_tv, out_f = tv(images), fused(images)
    assert sum(len(o["boxes"]) for o in out_tv) > 0
    for a, b in zip(out_tv, out_f):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(b["scores"], a["scores"], rtol=1e-9, atol=1e-9)


def test_deeplabv3_resnet50_backbone():
    """deeplabv3_resnet50 (dilated layer3/4 inside an IntermediateLayerGetter): the 16
    Bottlenecks and the stem convert; to_torchvision gives torchvision's classes back. (Its
    eval outputs and a training step against the stock model: test_detection.py.)"""
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
            assert rel_err(out_f[key], out_tv[key]) <= 1e-12, (training, key)
