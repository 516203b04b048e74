"""resnet_fused: ResNets with convolution, BatchNorm, residual add and ReLU fused.

Swap `torchvision.models.resnet50` for `resnet_fused.resnet50`; state_dicts load both ways.
"""

from . import nn, ops
from .backends import available_backends, decompositions, get_backend, set_backend, use_backend, verified_backends
from ._freeze import freeze
from .distributed import SyncBatchNorm, convert_sync_batchnorm
from .fuse import fuse, fuse_summary  # resnet_fused.fuse is the function (the module: `from resnet_fused.fuse import`)
from .models import (
    ResNet,
    from_torchvision,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    to_torchvision,
    wide_resnet50_2,
    wide_resnet101_2,
)

__version__ = "0.1.0"

__all__ = [
    "nn", "ops", "available_backends", "decompositions", "get_backend", "set_backend", "use_backend", "ResNet", "SyncBatchNorm",
    "convert_sync_batchnorm", "from_torchvision", "to_torchvision", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
    "fuse", "fuse_summary", "freeze", "verified_backends", "__version__",
]
