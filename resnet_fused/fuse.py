"""`fuse(model)`: the conv -> BatchNorm (-> ReLU) and conv -> BatchNorm -> add -> ReLU units of
a model run as fused ops, whichever library built it (torchvision, timm, transformers).

How: a table of module classes whose forward is known (_KNOWN). Each such module's class is
swapped for a subclass (same name, same submodules, parameters, buffers and state_dict keys)
whose forward runs the same computation with its units fused through nn.conv_bn_act, which
reads every BatchNorm hyperparameter and the train/eval mode at call time. Everything else
of the model (its class, methods, Python control flow, attributes such as timm's
pretrained_cfg or transformers' config) is untouched, so the model is what it was. There is
no graph rewrite: nothing is traced to run, so nothing that depends on `self.training` or on
in-place ops is frozen or dropped.

A table entry carries a fingerprint of the upstream methods it overrides (their source,
docstrings and formatting aside): a library version whose forward differs is left as it is,
and the summary says so, rather than run with a forward it no longer has.

`fuse_summary(model)` says what runs fused: units per kind, every conv/BatchNorm pair left
unfused with the reason, convs without a BatchNorm. Pairs inside containers the table does
not know are found by tracing that container's forward one level deep with torch.fx (for
the report only), or by the order of its children where it cannot be traced.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import copy
import dataclasses
import hashlib
import importlib
import inspect
import logging
import sys
import textwrap
import types
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from . import models as _models
from . import nn as _fnn
from ._batchnorm import fusable_norm

__all__ = ["fuse", "fuse_summary", "FuseSummary", "FusedUnit", "UnfusedPair"]

logger = logging.getLogger(__name__)

# Unit kinds, as fuse_summary counts them. "add+relu" is a residual add and ReLU fused into one
# op (ops.add_relu) where something sits between the BatchNorm and the add.
KINDS = ("conv+bn+relu", "conv+bn", "conv+bn+add+relu", "conv+bn+add", "add+relu")


# ---------------------------------------------------------------------------------------
# The summary.


@dataclasses.dataclass(frozen=True)
class FusedUnit:
    """One fused op of the forward: `kind` (KINDS), the conv and norm it covers (module paths;
    empty for add+relu, whose `where` is the block), and `note`: what runs after it unfused
    and why (empty when the unit is the whole chain)."""

    kind: str
    conv: str = ""
    norm: str = ""
    where: str = ""
    note: str = ""


@dataclasses.dataclass(frozen=True)
class UnfusedPair:
    """A conv feeding a BatchNorm that runs module by module, and why."""

    conv: str
    norm: str
    reason: str


@dataclasses.dataclass
class FuseSummary:
    """What runs fused in a model (fuse_summary). `print()` it."""

    model: str
    units: list[FusedUnit]
    unfused: list[UnfusedPair]
    convs_without_norm: list[str]  # nn.Conv2d modules no BatchNorm follows (SE convs, VGG): plain convolutions
    norms_without_conv: list[tuple[str, str]]  # (path, why) of BatchNorms no conv feeds

    @property
    def counts(self) -> dict[str, int]:
        """Fused units per kind (kinds with none left out), in KINDS order."""
        counter = collections.Counter(u.kind for u in self.units)
        return {k: counter[k] for k in KINDS if counter[k]}

    @property
    def fused_pairs(self) -> int:
        return sum(1 for u in self.units if u.conv)

    def __str__(self) -> str:
        pairs = self.fused_pairs + len(self.unfused)
        if not pairs and not self.units:
            lines = [f"fuse: {self.model}: nothing to fuse (no nn.Conv2d feeds a BatchNorm)"]
        else:
            lines = [f"fuse: {self.model}: {self.fused_pairs} of {pairs} conv+BatchNorm pairs fused"]
            lines.append("  fused units: " + (", ".join(f"{n} {k}" for k, n in self.counts.items()) or "none"))
        by_note: dict[str, list[FusedUnit]] = collections.defaultdict(list)
        for u in self.units:
            if u.note:
                by_note[u.note].append(u)
        for note, units in by_note.items():
            kinds = collections.Counter(u.kind for u in units)
            lines.append(f"  {', '.join(f'{n} {k}' for k, n in kinds.items())}: {note} "
                         f"({_abbreviate([u.conv or u.where for u in units])})")
        if self.unfused:
            lines.append(f"  left unfused ({len(self.unfused)}):")
            by_reason: dict[str, list[str]] = collections.defaultdict(list)
            for p in self.unfused:
                by_reason[p.reason].append(f"{p.conv} -> {p.norm}")
            for reason, where in by_reason.items():
                lines.append(f"    {reason}: {_abbreviate(where)}")
        elif pairs:
            lines.append("  left unfused: none")
        if self.convs_without_norm:
            lines.append(f"  convs without a BatchNorm (run as nn.Conv2d): {len(self.convs_without_norm)}")
        for path, why in self.norms_without_conv:
            lines.append(f"  BatchNorm {path} is not fused: {why}")
        return "\n".join(lines)


def _abbreviate(items: list[str], show: int = 4) -> str:
    return ", ".join(items[:show]) + (f", ... ({len(items) - show} more)" if len(items) > show else "")


# ---------------------------------------------------------------------------------------
# Units: what runs, and what the summary says runs. Every runtime decision below has its
# description beside it (the _describe_* functions take the same predicates).


def _fusing() -> bool:
    """Whether the fused forward runs. Scripted or recorded for another runtime (jit.trace, FX,
    ONNX: nn.records_graph) the upstream forward runs, as the fused torchvision blocks do."""
    return not torch.jit.is_scripting() and not _fnn.records_graph()


def _key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _name(module) -> str:
    return type(module).__name__


_BATCH_NORM_ACT = "timm.layers.norm_act.BatchNormAct2d"
_CONV_NORM_ACT = "timm.layers.conv_bn_act.ConvNormAct"
_HF = "transformers.models.resnet.modeling_resnet."


def _is_batch_norm(module: nn.Module) -> bool:
    """A module that normalizes like BatchNorm2d (fusable or not): what can pair with a conv."""
    return isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d))


def _split_norm(norm: nn.Module) -> tuple[type | None, list[nn.Module]]:
    """(the type whose forward is norm's normalization, None for type(norm); the modules norm's
    forward runs after it): timm's BatchNormAct2d (exact type, known forward) is BatchNorm2d's
    forward on its own state followed by its drop and act, which conv_bn_act and the BatchNorm
    rules take as such (norm_kind) where the module is built, with no object made per call
    (torch 2.11's compiler does not follow a BatchNorm2d view made in traced code); any other
    module is itself."""
    if _key(type(norm)) == _BATCH_NORM_ACT and _refusal(type(norm)) is None:
        return nn.BatchNorm2d, [m for m in (norm.drop, norm.act) if type(m) is not nn.Identity]
    return None, []


def _conv_reason(conv: nn.Module) -> str | None:
    """Why conv_bn_act runs this conv module by module (None: it fuses it). nn._fusable_conv decides."""
    if _fnn._fusable_conv(conv):
        return None
    if type(conv) is not nn.Conv2d:
        return f"the conv is {_key(type(conv))}, not nn.Conv2d (its forward may differ)"
    if conv.padding_mode != "zeros":
        return f"the conv pads with padding_mode={conv.padding_mode!r}"
    return f"the conv has padding={conv.padding!r}"


def _norm_reason(norm: nn.Module, kind: type | None = None) -> str | None:
    """Why conv_bn_act runs this norm module by module (None: it fuses it); kind: _split_norm's."""
    if fusable_norm(norm, kind):
        return None
    return (f"the norm is {_key(type(norm))}, not one the fused ops take (nn.BatchNorm2d, SyncBatchNorm, "
            "torchvision's FrozenBatchNorm2d; a subclass may override forward)")


def _unit(conv: nn.Module, norm: nn.Module, x: Tensor, residual: Tensor | None = None,
          act: nn.Module | None = None) -> Tensor:
    """act(norm(conv(x)) [+ residual]), where norm may run modules of its own after the
    BatchNorm (timm's BatchNormAct2d); fused as far as the modules allow (_describe_unit)."""
    kind, tail = _split_norm(norm)
    if not tail:
        return _fnn.conv_bn_act(conv, norm, x, residual, act, norm_kind=kind)
    if len(tail) == 1 and type(tail[0]) is nn.ReLU and residual is None and _no_act(act):
        return _fnn.conv_bn_act(conv, norm, x, act=tail[0], norm_kind=kind)
    y = _fnn.conv_bn_act(conv, norm, x, norm_kind=kind)
    for module in tail:
        y = module(y)
    return _fnn._add_act(y, residual, act)


def _no_act(act: nn.Module | None) -> bool:
    return act is None or type(act) is nn.Identity


class _Walk:
    """fuse_summary's state while it walks a model: module paths, the units and unfused pairs
    found, the modules they cover (claimed: a container's own description of them wins over
    its children's, since it is what runs them), and a reason when the module being described
    runs its upstream forward (then its pairs are unfused, for that reason)."""

    def __init__(self, model: nn.Module):
        self.paths = {id(m): name for name, m in model.named_modules()}
        self.claimed: set[int] = set()
        self.units: list[FusedUnit] = []
        self.unfused: list[UnfusedPair] = []
        self.unfused_because: str | None = None

    def path(self, module: nn.Module) -> str:
        return self.paths.get(id(module), f"<{_name(module)} outside the model>") or "<the model>"

    def claim(self, *modules: nn.Module) -> None:
        self.claimed.update(id(m) for m in modules)


def _describe_unit(walk: _Walk, conv: nn.Module, norm: nn.Module, *, residual: bool = False,
                   act: nn.Module | None = None, where: nn.Module | None = None, split_norm: bool = True,
                   note: str = "") -> None:
    """Records the op(s) _unit(conv, norm, x, residual, act) runs (conv_bn_act when not
    split_norm, as the torchvision blocks call it). `where`: the block, for an add+relu; `note`:
    why a residual add runs after this unit rather than in it. A conv a container above
    already runs in a unit of its own (claimed) is left to that description."""
    if id(conv) in walk.claimed:
        return
    walk.claim(conv, norm)
    cp, np_ = walk.path(conv), walk.path(norm)
    wp = walk.path(where) if where is not None else cp
    if walk.unfused_because is not None:
        walk.unfused.append(UnfusedPair(cp, np_, walk.unfused_because))
        return
    kind, tail = _split_norm(norm) if split_norm else (None, [])
    relu = type(act) is nn.ReLU
    reason = _conv_reason(conv) or _norm_reason(norm, kind)
    if reason is not None:
        walk.unfused.append(UnfusedPair(cp, np_, reason))
        if residual and relu:  # after the module-by-module pair, nn._add_act adds and applies ReLU in one op
            walk.units.append(FusedUnit("add+relu", where=wp, note="the residual add and ReLU after an unfused pair"))
        return
    if not tail:
        act_note = "" if _no_act(act) or relu else f"{_name(act)} runs after it (the fused ops apply ReLU only)"
        kind = "conv+bn" + ("+add" if residual else "") + ("+relu" if relu else "")
        walk.units.append(FusedUnit(kind, cp, np_, note="; ".join(n for n in (note, act_note) if n)))
    elif len(tail) == 1 and type(tail[0]) is nn.ReLU and not residual and _no_act(act):
        walk.units.append(FusedUnit("conv+bn+relu", cp, np_, note=note))
    else:
        tail_note = (f"{' and '.join(_name(m) for m in tail)} of {_name(norm)} run(s) after it "
                     "(the fused ops apply ReLU only)")
        walk.units.append(FusedUnit("conv+bn", cp, np_, note="; ".join(n for n in (note, tail_note) if n)))
        if residual and relu:
            walk.units.append(FusedUnit("add+relu", where=wp, note=tail_note))


# ---------------------------------------------------------------------------------------
# Sequences of modules (nn.Sequential, the stem of a timm ResNet): a conv followed by a
# BatchNorm (and nn.ReLU) among consecutive children is a unit, since each child's output
# feeds only the next child.


def _sequence_unit_at(modules: list[nn.Module], i: int) -> tuple[nn.Module, nn.Module, nn.Module | None] | None:
    if i + 1 < len(modules) and isinstance(modules[i], nn.Conv2d) and _is_batch_norm(modules[i + 1]):
        act = modules[i + 2] if i + 2 < len(modules) and type(modules[i + 2]) is nn.ReLU else None
        return modules[i], modules[i + 1], act
    return None


def _run_sequence(modules: list[nn.Module], x):
    i = 0
    while i < len(modules):
        unit = _sequence_unit_at(modules, i)
        if unit is None:
            x = modules[i](x)
            i += 1
        else:
            x = _unit(unit[0], unit[1], x, act=unit[2])
            i += 2 if unit[2] is None else 3
    return x


def _describe_sequence(walk: _Walk, modules: list[nn.Module]) -> None:
    i = 0
    while i < len(modules):
        unit = _sequence_unit_at(modules, i)
        if unit is None:
            i += 1
        else:
            _describe_unit(walk, unit[0], unit[1], act=unit[2])
            i += 2 if unit[2] is None else 3


def _has_unclaimed_unit(walk: _Walk, modules: list[nn.Module]) -> bool:
    return any(_sequence_unit_at(modules, i) is not None and id(modules[i]) not in walk.claimed
               for i in range(len(modules)))


def _sequential_forward(self, input):
    if not torch.jit.is_scripting():  # TorchScript compiles no statement of this branch
        if _fusing():
            return _run_sequence(list(self), input)
    return self._fuse_upstream_forward(input)


# ---------------------------------------------------------------------------------------
# timm.


def _timm_resnet_stem(self) -> tuple[list[nn.Module], nn.Module] | None:
    """(the modules before the stem's last conv, that conv) of a timm ResNet: conv1 is a conv,
    or a deep stem (nn.Sequential ending in a conv) whose last conv feeds bn1; None otherwise."""
    conv1 = self.conv1
    if isinstance(conv1, nn.Sequential) and len(conv1) and isinstance(conv1[-1], nn.Conv2d):
        return list(conv1)[:-1], conv1[-1]
    if isinstance(conv1, nn.Conv2d):
        return [], conv1
    return None


def _timm_resnet_run_stem(self, x):
    stem = _timm_resnet_stem(self)
    if stem is None or not _is_batch_norm(self.bn1):
        return self.act1(self.bn1(self.conv1(x)))
    head, conv = stem
    return _unit(conv, self.bn1, _run_sequence(head, x), act=self.act1)


def _full_recomputation():
    """Non-reentrant checkpointing recomputes a segment in backward only until its last saved
    tensor. A fused unit saves its tensors before ops.conv_bn_relu updates the running
    statistics, so a segment ending in one would skip that update where the model's own forward
    (whose last saved tensor comes after its BatchNorms) repeats it: recompute whole segments,
    as the model's own forward does, for the same running statistics."""
    early_stop = getattr(torch.utils.checkpoint, "set_checkpoint_early_stop", None)
    return early_stop(False) if early_stop is not None else contextlib.nullcontext()


def _timm_resnet_forward_features(self, x):
    if not torch.jit.is_scripting():  # TorchScript compiles no statement of this branch
        if _fusing():
            return _timm_resnet_fused_features(self, x)
    return self._fuse_upstream_forward_features(x)


def _timm_resnet_fused_features(self, x):
    # timm's forward_features with the stem (conv1, bn1, act1) as fused units.
    x = _timm_resnet_run_stem(self, x)
    x = self.maxpool(x)
    if self.grad_checkpointing and not torch.jit.is_scripting():
        checkpoint_seq = sys.modules[self._fuse_upstream.__module__].checkpoint_seq
        with _full_recomputation():
            x = checkpoint_seq([self.layer1, self.layer2, self.layer3, self.layer4], x, flatten=True)
    else:
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
    return x


def _timm_resnet_forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                                       intermediates_only=False):
    if not torch.jit.is_scripting():  # TorchScript compiles no statement of this branch
        if _fusing():
            return _timm_resnet_fused_intermediates(self, x, indices, norm, stop_early, output_fmt,
                                                    intermediates_only)
    return self._fuse_upstream_forward_intermediates(x, indices, norm, stop_early, output_fmt, intermediates_only)


def _timm_resnet_fused_intermediates(self, x, indices, norm, stop_early, output_fmt, intermediates_only):
    # timm's forward_intermediates with the stem as fused units.
    assert output_fmt in ("NCHW",), "Output shape must be NCHW."
    intermediates = []
    feature_take_indices = sys.modules[self._fuse_upstream.__module__].feature_take_indices
    take_indices, max_index = feature_take_indices(5, indices)
    feat_idx = 0
    x = _timm_resnet_run_stem(self, x)
    if feat_idx in take_indices:
        intermediates.append(x)
    x = self.maxpool(x)
    layer_names = ("layer1", "layer2", "layer3", "layer4")
    if stop_early:
        layer_names = layer_names[:max_index]
    for n in layer_names:
        feat_idx += 1
        x = getattr(self, n)(x)
        if feat_idx in take_indices:
            intermediates.append(x)
    if intermediates_only:
        return intermediates
    return x, intermediates


def _describe_timm_resnet(walk: _Walk, self) -> None:
    stem = _timm_resnet_stem(self)
    if stem is not None and _is_batch_norm(self.bn1):
        _describe_sequence(walk, stem[0])
        _describe_unit(walk, stem[1], self.bn1, act=self.act1)


def _between_norm_and_add(self, *names: str) -> list[str]:
    """The modules among `names` (attributes of a block) present between its last BatchNorm and
    its residual add: None or nn.Identity is absent."""
    return [_name(getattr(self, n)) for n in names
            if getattr(self, n, None) is not None and type(getattr(self, n)) is not nn.Identity]


def _timm_block_units(self) -> tuple[list[tuple], tuple]:
    """A timm ResNet BasicBlock's or Bottleneck's units: the inner ones as (conv, norm, act,
    fuse_act), fuse_act False where drop_block sits between the norm and the act; the last
    as (conv, norm, act after the residual add)."""
    fuse_act = type(self.drop_block) is nn.Identity
    if hasattr(self, "conv3"):  # Bottleneck: conv1 bn1 act1, conv2 bn2 [drop_block] act2 aa, conv3 bn3
        inner = [(self.conv1, self.bn1, self.act1, True), (self.conv2, self.bn2, self.act2, fuse_act)]
        return inner, (self.conv3, self.bn3, self.act3)
    # BasicBlock: conv1 bn1 [drop_block] act1 aa, conv2 bn2
    return [(self.conv1, self.bn1, self.act1, fuse_act)], (self.conv2, self.bn2, self.act2)


def _timm_block_forward(self, x):
    if not torch.jit.is_scripting():  # TorchScript compiles no statement of this branch
        if _fusing():
            return _timm_block_fused(self, x)
    return self._fuse_upstream_forward(x)


def _timm_block_fused(self, x):
    # timm's BasicBlock/Bottleneck forward, unit by unit.
    shortcut = x
    inner, (conv, norm, act) = _timm_block_units(self)
    for conv_i, norm_i, act_i, fuse_act in inner:
        x = _unit(conv_i, norm_i, x, act=act_i) if fuse_act else act_i(self.drop_block(_unit(conv_i, norm_i, x)))
    x = self.aa(x)
    if not _between_norm_and_add(self, "se", "drop_path"):
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return _unit(conv, norm, x, residual=shortcut, act=act)
    x = _unit(conv, norm, x)
    if self.se is not None:
        x = self.se(x)
    if self.drop_path is not None:
        x = self.drop_path(x)
    if self.downsample is not None:
        shortcut = self.downsample(shortcut)
    return _fnn._add_act(x, shortcut, act)


def _describe_timm_block(walk: _Walk, self) -> None:
    inner, (conv, norm, act) = _timm_block_units(self)
    for conv_i, norm_i, act_i, fuse_act in inner:
        _describe_unit(walk, conv_i, norm_i, act=act_i if fuse_act else None,
                       note="" if fuse_act else f"{_name(self.drop_block)} and {_name(act_i)} run after it")
    between = _between_norm_and_add(self, "se", "drop_path")
    _describe_residual_unit(walk, self, conv, norm, act, between, norm_name=walk.path(norm).rpartition(".")[2])


def _describe_residual_unit(walk: _Walk, block, conv, norm, act, between: list[str], norm_name: str) -> None:
    """The last unit of a residual block: conv+bn+add(+relu) when nothing sits between the
    norm and the add, else conv+bn with the add and act after `between` (add+relu for ReLU)."""
    if not between:
        _describe_unit(walk, conv, norm, residual=True, act=act, where=block)
        return
    note = f"{' and '.join(between)} between {norm_name} and the residual add"
    _describe_unit(walk, conv, norm, note=note)
    if type(act) is nn.ReLU and walk.unfused_because is None:
        walk.units.append(FusedUnit("add+relu", where=walk.path(block), note=note))


def _timm_conv_norm_act_forward(self, x):
    if not torch.jit.is_scripting():  # TorchScript compiles no statement of this branch
        if _fusing():
            return _timm_conv_norm_act_fused(self, x)
    return self._fuse_upstream_forward(x)


def _timm_conv_norm_act_fused(self, x):
    x = _unit(self.conv, self.bn, x) if _is_batch_norm(self.bn) else self.bn(self.conv(x))
    aa = getattr(self, "aa", None)
    if aa is not None:
        x = self.aa(x)
    return x


def _describe_timm_conv_norm_act(walk: _Walk, self) -> None:
    if _is_batch_norm(self.bn):
        _describe_unit(walk, self.conv, self.bn)


def _regnet_blockers(self) -> list[str]:
    """What sits between a timm RegNet Bottleneck's last BatchNorm (conv3's, a ConvNormAct
    without act) and its residual add: [] when conv3 runs with the add and act3."""
    blockers = [] if type(self.drop_path) is nn.Identity else [_name(self.drop_path)]
    conv3 = self.conv3
    if _key(_upstream_class(type(conv3))) != _CONV_NORM_ACT or not _is_batch_norm(conv3.bn):
        return blockers + [f"conv3 ({_name(conv3)})"]
    if getattr(conv3, "aa", None) is not None:
        blockers.append(_name(conv3.aa))
    return blockers + [_name(m) for m in _split_norm(conv3.bn)[1]]


def _regnet_bottleneck_forward(self, x):
    if not torch.jit.is_scripting():  # TorchScript compiles no statement of this branch
        if _fusing():
            return _regnet_bottleneck_fused(self, x)
    return self._fuse_upstream_forward(x)


def _regnet_bottleneck_fused(self, x):
    # timm's RegNet Bottleneck forward, conv1/conv2 as their (fused) ConvNormAct modules.
    shortcut = x
    x = self.conv1(x)
    x = self.conv2(x)
    x = self.se(x)
    if self.downsample is None:
        return self.act3(self.conv3(x))
    if not _regnet_blockers(self):
        return _unit(self.conv3.conv, self.conv3.bn, x, residual=self.downsample(shortcut), act=self.act3)
    x = self.conv3(x)
    return _fnn._add_act(self.drop_path(x), self.downsample(shortcut), self.act3)


def _describe_regnet_bottleneck(walk: _Walk, self) -> None:
    if self.downsample is None:
        return
    blockers = _regnet_blockers(self)
    if not blockers:
        _describe_unit(walk, self.conv3.conv, self.conv3.bn, residual=True, act=self.act3, where=self)
    elif type(self.act3) is nn.ReLU and walk.unfused_because is None:
        walk.units.append(FusedUnit("add+relu", where=walk.path(self),
                                    note=f"{' and '.join(blockers)} between conv3's norm and the residual add"))


# ---------------------------------------------------------------------------------------
# transformers.


def _hf_conv_layer_forward(self, input):
    if not torch.jit.is_scripting():  # TorchScript compiles no statement of this branch
        if _fusing():
            return _hf_conv_layer_fused(self, input)
    return self._fuse_upstream_forward(input)


def _hf_conv_layer_fused(self, input):
    return _unit(self.convolution, self.normalization, input, act=self.activation)


def _describe_hf_conv_layer(walk: _Walk, self) -> None:
    _describe_unit(walk, self.convolution, self.normalization, act=self.activation)


def _hf_shortcut_forward(self, input):
    if not torch.jit.is_scripting():  # TorchScript compiles no statement of this branch
        if _fusing():
            return _hf_shortcut_fused(self, input)
    return self._fuse_upstream_forward(input)


def _hf_shortcut_fused(self, input):
    return _unit(self.convolution, self.normalization, input)


def _describe_hf_shortcut(walk: _Walk, self) -> None:
    _describe_unit(walk, self.convolution, self.normalization)


def _hf_last_conv_layer(self) -> nn.Module | None:
    """The last ResNetConvLayer of a transformers residual layer when it runs with the residual
    add and activation (self.layer an nn.Sequential, that layer without an activation), else None."""
    if type(self.layer) is not nn.Sequential or not len(self.layer):
        return None
    last = self.layer[-1]
    if _key(_upstream_class(type(last))) != _HF + "ResNetConvLayer" or type(last.activation) is not nn.Identity:
        return None
    return last


def _hf_residual_layer_forward(self, hidden_state):
    if not torch.jit.is_scripting():  # TorchScript compiles no statement of this branch
        if _fusing():
            return _hf_residual_layer_fused(self, hidden_state)
    return self._fuse_upstream_forward(hidden_state)


def _hf_residual_layer_fused(self, hidden_state):
    last = _hf_last_conv_layer(self)
    if last is None:
        out = self.layer(hidden_state)
        return _fnn._add_act(out, self.shortcut(hidden_state), self.activation)
    out = hidden_state
    for layer in list(self.layer)[:-1]:
        out = layer(out)
    return _unit(last.convolution, last.normalization, out, residual=self.shortcut(hidden_state), act=self.activation)


def _describe_hf_residual_layer(walk: _Walk, self) -> None:
    last = _hf_last_conv_layer(self)
    if last is not None:
        _describe_unit(walk, last.convolution, last.normalization, residual=True, act=self.activation, where=self)
    elif type(self.activation) is nn.ReLU and walk.unfused_because is None:
        walk.units.append(FusedUnit("add+relu", where=walk.path(self),
                                    note="the last layer's activation between its norm and the residual add"))


# ---------------------------------------------------------------------------------------
# torchvision: from_torchvision's classes (models._TO_FUSED), described as they run.


def _describe_tv_stem(walk: _Walk, self) -> None:
    _describe_unit(walk, self.conv1, self.bn1, act=self.relu, split_norm=False)


def _describe_tv_downsample(walk: _Walk, downsample) -> None:
    if (type(downsample) is nn.Sequential and len(downsample) == 2 and isinstance(downsample[0], nn.Conv2d)
            and _is_batch_norm(downsample[1])):  # nn._identity runs it as conv_bn_act
        _describe_unit(walk, downsample[0], downsample[1], split_norm=False)


def _describe_tv_block(walk: _Walk, self) -> None:
    units = [(self.conv1, self.bn1), (self.conv2, self.bn2)]
    if hasattr(self, "conv3"):  # Bottleneck
        units.append((self.conv3, self.bn3))
    for conv, norm in units[:-1]:
        _describe_unit(walk, conv, norm, act=self.relu, split_norm=False)
    _describe_unit(walk, *units[-1], residual=True, act=self.relu, where=self, split_norm=False)
    _describe_tv_downsample(walk, self.downsample)


def _describe_tv_layer_getter(walk: _Walk, self) -> None:
    modules = list(self.items())
    i = 0
    while i < len(modules):
        unit = _models._fused_unit_at(modules, i, self.return_layers)
        if unit is None:
            i += 1
        else:
            _describe_unit(walk, unit[0], unit[1], act=unit[2], split_norm=False)
            i += 2 if unit[2] is None else 3


# ---------------------------------------------------------------------------------------
# The table.


@dataclasses.dataclass(frozen=True)
class _Known:
    """A module class fuse() converts: `key` its module.qualname, `methods` the fused overrides
    (None: an existing fused class, `fused`), `fingerprints` the accepted fingerprints of the
    upstream methods overridden (_fingerprint), `describe` its units."""

    key: str
    describe: Callable
    methods: dict[str, Callable] | None = None
    fingerprints: dict[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    fused: type | None = None

    @property
    def fused_name(self) -> str:
        """The fused class's attribute name in this module (how pickle finds it)."""
        return "Fused_" + self.key.replace(".", "_")


def _fp(*values: str) -> frozenset[str]:
    return frozenset(values)


# Fingerprints (_fingerprint_source) of the upstream methods each entry overrides, as measured
# on timm 1.0.29 and transformers 4.57.6 (the test extras' pins); another version's whose method
# does the same has the same fingerprint, whatever its parameter and local names, annotations,
# docstrings and formatting. transformers 5.18.0's four methods (parameters renamed to
# hidden_states, annotated) have these fingerprints (read from its source). A new version whose
# method differs: read it, adapt the override if needed, and add its fingerprint.
_KNOWN_LIST = [
    _Known("torch.nn.modules.container.Sequential", lambda w, m: _describe_sequence(w, list(m)),
           {"forward": _sequential_forward}),
    _Known("timm.models.resnet.ResNet", _describe_timm_resnet,
           {"forward_features": _timm_resnet_forward_features,
            "forward_intermediates": _timm_resnet_forward_intermediates},
           {"forward_features": _fp("81f38e45cb02736a"), "forward_intermediates": _fp("5252b7d0c85a0541")}),
    _Known("timm.models.resnet.BasicBlock", _describe_timm_block, {"forward": _timm_block_forward},
           {"forward": _fp("dc76cf4f5889775f")}),
    _Known("timm.models.resnet.Bottleneck", _describe_timm_block, {"forward": _timm_block_forward},
           {"forward": _fp("552e7d80654dd9e3")}),
    _Known("timm.models.regnet.Bottleneck", _describe_regnet_bottleneck, {"forward": _regnet_bottleneck_forward},
           {"forward": _fp("fb46ff89ef990321")}),
    _Known(_CONV_NORM_ACT, _describe_timm_conv_norm_act, {"forward": _timm_conv_norm_act_forward},
           {"forward": _fp("9313a0fd74150910")}),
    _Known(_HF + "ResNetConvLayer", _describe_hf_conv_layer, {"forward": _hf_conv_layer_forward},
           {"forward": _fp("b178884b29ee8714")}),
    _Known(_HF + "ResNetShortCut", _describe_hf_shortcut, {"forward": _hf_shortcut_forward},
           {"forward": _fp("31b07553861841ee")}),
    _Known(_HF + "ResNetBasicLayer", _describe_hf_residual_layer, {"forward": _hf_residual_layer_forward},
           {"forward": _fp("dee7763e6533b07c")}),
    _Known(_HF + "ResNetBottleNeckLayer", _describe_hf_residual_layer, {"forward": _hf_residual_layer_forward},
           {"forward": _fp("dee7763e6533b07c")}),
]
_KNOWN = {k.key: k for k in _KNOWN_LIST}
# Not converted, but fused inside a unit when its forward is the known one (_split_norm).
_NORMS = {_BATCH_NORM_ACT: {"forward": _fp("0c7da5392d749611")}}

# torchvision's classes convert to from_torchvision's (models._TO_FUSED), which describe as:
_TV_DESCRIBE = {
    _models.ResNet: _describe_tv_stem, _fnn.BasicBlock: _describe_tv_block, _fnn.Bottleneck: _describe_tv_block,
    _models.FusedIntermediateLayerGetter: _describe_tv_layer_getter,
}
for _tv, _fused in _models._TO_FUSED.items():
    if _fused in _TV_DESCRIBE:  # (a class from_torchvision gains later needs its description here first)
        _KNOWN[_key(_tv)] = _Known(_key(_tv), _TV_DESCRIBE[_fused], fused=_fused)

# fused class -> its _Known (filled as the classes are made).
_FUSED_CLASSES: dict[type, _Known] = {k.fused: k for k in _KNOWN.values() if k.fused is not None}


def _upstream_class(cls: type) -> type:
    """The class a fused class was converted from (`cls` itself if it is not a fused class)."""
    if cls not in _FUSED_CLASSES:
        return cls
    return cls.__dict__.get("_fuse_upstream") or _models._TO_TORCHVISION[cls]


def _fingerprint(function: Callable) -> str:
    """A digest of what a function does (_fingerprint_source of its source)."""
    return _fingerprint_source(inspect.getsource(function))


class _Canonical(ast.NodeTransformer):
    """A function's AST without what cannot change its behaviour: annotations and the names of
    its parameters and locals (docstrings and other no-ops: _drop_no_ops). Globals, attributes and keyword arguments keep
    their names: calling another function, reading another attribute or passing another
    keyword is a change.

    Locals are numbered in order of first appearance (a consistent renaming). In a function
    without control flow (straight_line) every binding is numbered instead, and each read
    names the binding it reads (the latest before it, in that code): then
    `h = conv(x); h = bn(h)` and `y = conv(x); z = bn(y)` read the same, as they run the same."""

    def __init__(self, bound: set[str], straight_line: bool):
        self.bound, self.ssa = bound, straight_line
        self.names: dict[str, str] = {}
        self.count = 0

    def _bind(self, name: str) -> str:
        if name not in self.bound:
            return name
        if self.ssa or name not in self.names:
            self.names[name] = f"_v{self.count}"
            self.count += 1
        return self.names[name]

    def _read(self, name: str) -> str:
        if name not in self.bound:
            return name
        return self.names[name] if name in self.names else self._bind(name)

    def visit_FunctionDef(self, node):
        node.returns = None
        node.name = "_f"
        node.decorator_list = [self.visit(d) for d in node.decorator_list]
        node.args = self.visit(node.args)
        node.body = [self.visit(statement) for statement in node.body]
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_arguments(self, node):  # a function's or a lambda's parameters
        # defaults are evaluated where the function is defined, before its parameters exist
        node.defaults = [self.visit(d) for d in node.defaults]
        node.kw_defaults = [self.visit(d) if d is not None else None for d in node.kw_defaults]
        for arg in [*node.posonlyargs, *node.args, node.vararg, *node.kwonlyargs, node.kwarg]:
            if arg is not None:
                arg.annotation = None
                arg.arg = self._bind(arg.arg)
        return node

    def visit_Assign(self, node):
        node.value = self.visit(node.value)  # read before the targets are bound
        node.targets = [self.visit(t) for t in node.targets]
        return node

    def visit_Name(self, node):
        node.id = self._bind(node.id) if isinstance(node.ctx, (ast.Store, ast.Del)) else self._read(node.id)
        return node

    def visit_ExceptHandler(self, node):
        if node.name:
            node.name = self._bind(node.name)
        return self.generic_visit(node)

    def visit_AnnAssign(self, node):
        if node.value is None:  # a bare annotation: nothing runs
            return ast.Pass()
        return self.visit(ast.copy_location(ast.Assign(targets=[node.target], value=node.value), node))


# What makes a function's code not straight-line for _Canonical: branches, loops, handlers,
# nested scopes, and bindings that read first (augmented assignment) or may not happen.
_NOT_STRAIGHT = (ast.If, ast.IfExp, ast.For, ast.AsyncFor, ast.While, ast.Try, ast.With, ast.AsyncWith, ast.Match,
                 ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.NamedExpr, ast.AugAssign,
                 ast.Delete, ast.Global, ast.Nonlocal, ast.BoolOp, ast.Assert, ast.Await, ast.Yield, ast.YieldFrom)
if hasattr(ast, "TryStar"):
    _NOT_STRAIGHT += (ast.TryStar,)


def _drop_no_ops(tree: ast.AST) -> None:
    """Statements that do nothing out of every block: `pass`, and constant expressions
    (docstrings, stray strings); an emptied block gets one `pass`."""
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            statements = getattr(node, field, None)
            if isinstance(statements, list) and statements and isinstance(statements[0], ast.stmt):
                kept = [st for st in statements if not (isinstance(st, ast.Pass) or (
                    isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant)))]
                setattr(node, field, kept or [ast.Pass()])


def _straight_line(function: ast.FunctionDef) -> bool:
    return not any(isinstance(node, (*_NOT_STRAIGHT, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                   for statement in function.body for node in ast.walk(statement))


def _bound_names(tree: ast.AST) -> set[str]:
    """Names a function binds: its (and nested functions' and lambdas') parameters and every
    name it assigns, deletes or catches."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return bound


def _fingerprint_source(source: str) -> str:
    """A digest of a function's source as Python runs it: the AST in _Canonical form, unparsed
    (comments, formatting, docstrings, annotations and local names do not count)."""
    tree = ast.parse(textwrap.dedent(source))
    function = tree.body[0]
    if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise SyntaxError("not a function's source")
    _drop_no_ops(tree)
    tree = ast.fix_missing_locations(_Canonical(_bound_names(tree), _straight_line(function)).visit(tree))
    return hashlib.sha256(ast.unparse(tree).encode()).hexdigest()[:16]


_REFUSALS: dict[type, str | None] = {}


def _refusal(cls: type) -> str | None:
    """Why fuse() leaves instances of upstream class `cls` as they are (None: it converts
    them): a method it overrides differs from the version it knows. Cached per class."""
    if cls not in _REFUSALS:
        key = _key(cls)
        fingerprints = _KNOWN[key].fingerprints if key in _KNOWN else _NORMS.get(key, {})
        reason = None
        for method, accepted in fingerprints.items():
            try:
                found = _fingerprint(getattr(cls, method))
            except (OSError, TypeError, SyntaxError) as exc:  # no source (a frozen or compiled install)
                reason = f"{key}.{method} has no readable source ({type(exc).__name__}), so fuse() cannot check it"
                break
            if found not in accepted:
                module = sys.modules.get(cls.__module__.split(".")[0])
                version = getattr(module, "__version__", "?")
                reason = (f"{key}.{method} (installed {cls.__module__.split('.')[0]} {version}) differs from the "
                          f"versions fuse() knows (fingerprint {found})")
                break
        _REFUSALS[cls] = reason
    return _REFUSALS[cls]


def _renamed(function: Callable, name: str) -> Callable:
    """`function` under another name (TorchScript names a method it compiles after its function)."""
    copy_ = types.FunctionType(function.__code__, function.__globals__, name, function.__defaults__,
                               function.__closure__)
    copy_.__kwdefaults__, copy_.__annotations__ = function.__kwdefaults__, dict(function.__annotations__)
    copy_.__qualname__, copy_.__module__, copy_.__doc__ = name, function.__module__, function.__doc__
    return copy_


def _fused_class(known: _Known, upstream: type) -> type:
    if known.fused is not None:
        return known.fused
    cls = globals().get(known.fused_name)
    if cls is None:
        # The upstream methods stay reachable as _fuse_upstream_<name>: the fused methods call
        # them when not fusing, and TorchScript compiles them from there (torch.jit.script of
        # a fused model is the upstream model scripted).
        originals = {f"_fuse_upstream_{name}": _renamed(getattr(upstream, name), f"_fuse_upstream_{name}")
                     for name in known.methods}
        methods = {name: _renamed(function, name) for name, function in known.methods.items()}
        namespace = dict(methods, **originals, __module__=__name__, __qualname__=known.fused_name,
                         _fuse_upstream=upstream,
                         __doc__=f"{known.key} with its conv/BatchNorm units fused (resnet_fused.fuse).")
        cls = type(upstream.__name__, (upstream,), namespace)  # upstream's name: repr and save_pretrained read it
        globals()[known.fused_name] = cls
        _FUSED_CLASSES[cls] = known
    return cls


def __getattr__(name: str):
    """The fused classes, made on first use (unpickling a fused model in a fresh process)."""
    for known in _KNOWN_LIST:
        if known.fused_name == name:
            module, _, qualname = known.key.rpartition(".")
            return _fused_class(known, getattr(importlib.import_module(module), qualname))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------
# Pairs in containers fuse() does not know, for the report: a one-level torch.fx trace.


class _OneLevelTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True  # the root's own forward only: every module it calls is a node


def _conv_output_of(module: nn.Module) -> nn.Module | None:
    """The nn.Conv2d whose output `module` returns: itself, or an nn.Sequential's last child."""
    if isinstance(module, nn.Sequential) and len(module):
        module = module[-1]
    return module if isinstance(module, nn.Conv2d) else None


def _traced_pairs(container: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(conv, norm) pairs where the container's forward feeds a conv's output to a BatchNorm,
    traced in training and in eval mode (the modes restored after)."""
    modes = {m: m.training for m in container.modules()}
    pairs = []
    try:
        for training in (True, False):
            container.train(training)
            graph = _OneLevelTracer().trace(container)
            for node in graph.nodes:
                if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
                    continue
                source = node.args[0]
                if source.op != "call_module":
                    continue
                conv = _conv_output_of(container.get_submodule(source.target))
                norm = container.get_submodule(node.target)
                if conv is not None and _is_batch_norm(norm) and (conv, norm) not in pairs:
                    pairs.append((conv, norm))
    finally:
        for m, training in modes.items():
            m.training = training
    return pairs


def _describe_unknown(walk: _Walk, path: str, container: nn.Module) -> None:
    children = list(container.children())
    if not any(_is_batch_norm(c) and id(c) not in walk.claimed for c in children):
        return
    where = f"{path or 'the model'} ({_key(type(container))})"
    reason = f"inside {where}, whose forward fuse() does not know"
    try:
        pairs = _traced_pairs(container)
    except Exception as exc:  # FX cannot trace every forward (data-dependent control flow, ...)
        reason += (f"; paired by the order of its children ({_name(container)} could not be traced: "
                   f"{type(exc).__name__})")
        pairs = [(_conv_output_of(a), b) for a, b in zip(children, children[1:])
                 if _conv_output_of(a) is not None and _is_batch_norm(b)]
    for conv, norm in pairs:
        if id(conv) not in walk.claimed and id(norm) not in walk.claimed:
            walk.claim(conv, norm)
            walk.unfused.append(UnfusedPair(walk.path(conv), walk.path(norm), reason))


# ---------------------------------------------------------------------------------------
# fuse, fuse_summary.


def _walk(model: nn.Module, convert: bool) -> FuseSummary:
    """Describes `model` module by module, parents first (a parent's description claims the
    units it runs itself); with `convert`, first swaps each known module's class for its fused
    one (fuse). Returns the summary."""
    walk = _Walk(model)
    for path, module in model.named_modules():
        cls = type(module)
        known = _FUSED_CLASSES.get(cls)
        fused = known is not None
        if known is None:
            known = _KNOWN.get(_key(cls))
        if known is not None and known.key == "torch.nn.modules.container.Sequential" and not fused:
            # A Sequential converts when it runs a unit no container above it runs.
            if not _has_unclaimed_unit(walk, list(module)):
                continue
        if known is None:
            _describe_unknown(walk, path, module)
            continue
        if not fused:
            refusal = _refusal(cls) if known.fused is None else None
            if convert and refusal is None:
                module.__class__ = _fused_class(known, cls)
                fused = True
            else:
                walk.unfused_because = refusal or f"{_key(cls)} runs its own forward (fuse() not applied)"
        known.describe(walk, module)
        walk.unfused_because = None
    convs, norms = [], []
    for path, module in model.named_modules():
        if id(module) in walk.claimed:
            continue
        if isinstance(module, nn.Conv2d):
            convs.append(path)
        elif _is_batch_norm(module):
            norms.append((path, "no nn.Conv2d feeds it directly in a module fuse() reads"))
    name = f"{type(model).__name__} ({_key(_upstream_class(type(model)))})"
    return FuseSummary(name, walk.units, walk.unfused, convs, norms)


def fuse(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """`model` with its conv -> BatchNorm (-> ReLU) and conv -> BatchNorm -> residual add (->
    ReLU) units running as fused ops, in training and eval, with the same results (the same
    outputs, gradients and running statistics as the model's own forward). A copy unless
    `inplace`.

    Converts the modules of a known class (timm's ResNet, BasicBlock, Bottleneck, ConvNormAct
    and RegNet Bottleneck, with BatchNormAct2d; transformers' ResNetConvLayer, ResNetShortCut,
    ResNetBasicLayer, ResNetBottleNeckLayer; torchvision's ResNet classes, as from_torchvision
    does; nn.Sequential) to a subclass of it whose forward runs fused units: parameters,
    buffers, state_dict keys, the model's class and every other method stay as they were.
    Activations other than ReLU run after their fused conv + BatchNorm; modules between a
    BatchNorm and a residual add (SE, drop_path) leave the add and ReLU as one add+relu op.

    `fuse_summary(model)` says what runs fused and why any pair does not; the same summary is
    logged at INFO level on the `resnet_fused.fuse` logger."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("model is a TorchScript module; fuse() converts nn.Modules: call it before torch.jit.script")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    if not inplace:
        model = copy.deepcopy(model)
    summary = _walk(model, convert=True)
    logger.info("%s", summary)
    return model


def fuse_summary(model: nn.Module) -> FuseSummary:
    """What runs fused in `model` now: units per kind (FuseSummary.counts), units followed by
    unfused modules (notes), every conv/BatchNorm pair left unfused with the reason, the
    convs without a BatchNorm. On a model fuse() has not converted, its pairs show as unfused."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return _walk(model, convert=False)
