"""The on-device verifier: `python -m resnet_fused.verify` (or `resnet-fused-verify`).

It checks each fused backend's ops on the device against float64 under the package's rule
(resnet_fused.tolerances), compares a whole model with torchvision's, times every passed
backend against PyTorch's own kernels per layer shape, and writes the verdict `auto` reads
(cache.py). Without a passing verdict for a GPU, `auto` runs PyTorch's kernels there.
"""

from .cache import CACHE_DIR_ENV_VAR, VERIFY_COMMAND, cache_dir, device_key

__all__ = ["CACHE_DIR_ENV_VAR", "VERIFY_COMMAND", "cache_dir", "device_key", "main"]


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    return cli_main(argv)
