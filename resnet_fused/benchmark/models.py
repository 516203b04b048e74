"""The models and the input every provider starts from: torchvision's ResNet (or timm's or
transformers'), with non-trivial BatchNorm, and its fused copy."""

from __future__ import annotations

import torch
import torchvision

import resnet_fused

# --model timm:NAME and hf:NAME: ResNets of other libraries, fused with resnet_fused.fuse.
# hf: models are built from a transformers ResNetConfig (no download): these names.
HF_RESNETS = {
    "resnet-50": dict(),  # ResNetConfig's defaults are ResNet-50's
    "resnet-18": dict(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]),
}


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Freshly initialized BatchNorm (mean 0, var 1, gamma 1, beta 0) would make the logit
    check trivially exact; give every BN the non-trivial statistics a trained model has."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t, (lo, hi) in ((m.running_mean, (-0.5, 0.5)), (m.running_var, (0.5, 1.5)),
                                    (m.weight, (0.5, 1.5)), (m.bias, (-0.5, 0.5))):
                    t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)
    return model


class LogitsOf(torch.nn.Module):
    """A transformers image classifier returning its logits tensor (its own ModelOutput otherwise)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def library_of(name: str) -> str:
    """"timm", "hf" or "torchvision": which library builds --model `name`."""
    prefix, _, rest = name.partition(":")
    return prefix if rest and prefix in ("timm", "hf") else "torchvision"


def _build_base(name: str) -> torch.nn.Module:
    library, model_name = library_of(name), name.partition(":")[2]
    if library == "timm":
        import timm

        return timm.create_model(model_name, pretrained=False)
    if library == "hf":
        from transformers import ResNetConfig, ResNetForImageClassification

        return LogitsOf(ResNetForImageClassification(ResNetConfig(num_labels=1000, **HF_RESNETS[model_name])))
    return getattr(torchvision.models, name)()


def torchvision_model(name: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The unfused model `name` (torchvision's, or timm:/hf: another library's; random weights,
    non-trivial BatchNorm), channels_last on `device`: what every provider starts from."""
    torch.manual_seed(seed)
    model = randomize_batchnorm(_build_base(name), seed)
    return model.to(device, memory_format=torch.channels_last)


def fused_copy(model: torch.nn.Module) -> torch.nn.Module:
    """resnet_fused's version of the unfused `model`: from_torchvision for torchvision's ResNets,
    fuse for the other libraries' (both copy)."""
    if isinstance(model, torchvision.models.ResNet):
        return resnet_fused.from_torchvision(model)
    return resnet_fused.fuse(model)


def fused_model_names() -> list[str]:
    """The --model names: resnet_fused's builders (each the name of the torchvision ResNet it
    fuses whole, so every one of them runs its convolutions, BatchNorms and ReLUs fused)."""
    registered = set(torchvision.models.list_models(module=resnet_fused))
    return [name for name in resnet_fused.models.__all__ if resnet_fused.models.REGISTRY_PREFIX + name in registered]


def model_input(batch: int, image_size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """A fixed random image batch, channels_last."""
    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    return x.to(device).contiguous(memory_format=torch.channels_last)

