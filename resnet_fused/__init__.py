"""resnet_fused: ResNets with convolution, BatchNorm, residual add and ReLU fused.

Swap `torchvision.models.resnet50` for `resnet_fused.resnet50`; state_dicts load both ways.
"""

from . import ops
from .backends import available_backends, get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = ["ops", "available_backends", "get_backend", "set_backend", "use_backend", "__version__"]
