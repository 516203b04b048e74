"""The verdict cache: what `python -m resnet_fused.verify` found on a device, read by `auto`.

One JSON file per device key in $RESNET_FUSED_CACHE_DIR (default ~/.cache/resnet_fused). The
key names everything a verdict depends on: the device (name, compute capability, UUID), the
driver and CUDA versions, torch, triton, resnet_fused and a hash of the kernels installed (the
Triton kernel sources, the built CUDA extension). A file whose key differs in anything is
another machine's or another install's: ignored. Files are written to a temporary name and
renamed (atomic on POSIX), so concurrent writers leave one whole file and readers never see
half of one; a corrupt, truncated or foreign file is ignored with one warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

CACHE_DIR_ENV_VAR = "RESNET_FUSED_CACHE_DIR"
FORMAT = 1  # the file's layout; another is ignored
VERIFY_COMMAND = "python -m resnet_fused.verify"
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV_VAR) or Path.home() / ".cache" / "resnet_fused")


@functools.cache
def kernels_hash() -> str:
    """sha256 over the kernels this install runs: the Triton backend's sources and the built CUDA
    extension (its file's bytes), so an edited kernel or a rebuilt extension needs a new verdict."""
    digest = hashlib.sha256()
    files = sorted((_PACKAGE_DIR / "backends" / "triton").rglob("*.py"))
    files += sorted(_PACKAGE_DIR.glob("_C*.so")) + sorted(_PACKAGE_DIR.glob("_C*.pyd"))
    for path in files:
        digest.update(str(path.relative_to(_PACKAGE_DIR)).encode())
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest() if hasattr(hashlib, "file_digest")
                          else hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def _driver_version() -> int | None:
    """cuDriverGetVersion from the loaded driver library (torch has loaded it), or None."""
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return version.value
    except (OSError, AttributeError):
        pass
    return None


def _software() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # no (working) triton: the key says so
        triton_version = None
    from .. import __version__

    return dict(torch=torch.__version__, cuda=torch.version.cuda, triton=triton_version, resnet_fused=__version__,
                kernels=kernels_hash())


def device_key(device: torch.device | str) -> dict:
    """What a verdict on `device` depends on. A CPU device is the Triton interpreter's
    (TRITON_INTERPRET=1): its verdicts say the kernels' arithmetic is right, nothing about a GPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return dict(device="cpu (Triton interpreter)", **_software())
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    return dict(device=props.name, capability=f"{props.major}.{props.minor}", uuid=str(uuid) if uuid else None,
                driver=_driver_version(), **_software())


def key_id(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def verdict_path(key: dict) -> Path:
    safe = "".join(c if c.isalnum() else "-" for c in key["device"]).strip("-").lower()
    return cache_dir() / f"verdict-{safe}-{key_id(key)}.json"


def write(key: dict, record: dict) -> Path:
    """Store `record` (the verifier's result: "backends", "timings") under `key`, atomically."""
    path = verdict_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(format=FORMAT, key=key, **record)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


_warned: set[str] = set()


def _warn_once(path: Path, why: str) -> None:
    if str(path) not in _warned:
        _warned.add(str(path))
        warnings.warn(f"resnet_fused: ignoring the verdict file {path}: {why}; run {VERIFY_COMMAND} to write "
                      "a new one", RuntimeWarning, stacklevel=3)


def read(key: dict) -> dict | None:
    """The record stored under `key`, or None (none stored; or unreadable, corrupt, truncated or
    another key's: then with one warning per file)."""
    path = verdict_path(key)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        _warn_once(path, f"unreadable ({exc.strerror or exc})")
        return None
    try:
        data = json.loads(text)
    except ValueError:
        _warn_once(path, "not valid JSON (corrupt or truncated)")
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("backends"), dict):
        _warn_once(path, "not a resnet_fused verdict of this version")
        return None
    if data.get("key") != key:
        _warn_once(path, "written for another device, driver or install")
        return None
    return data


def passed_backends(record: dict | None) -> frozenset[str]:
    """The backends whose verdict in `record` is "passed"."""
    if not record:
        return frozenset()
    return frozenset(name for name, verdict in record["backends"].items()
                     if isinstance(verdict, dict) and verdict.get("verdict") == "passed")
