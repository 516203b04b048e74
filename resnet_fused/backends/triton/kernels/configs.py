"""Launch configuration shared by the Triton kernels.

Config lists are built at import from the environment alone (TRITON_INTERPRET), never from
the device, so importing the package initializes no CUDA. Which configs a launch may use is
decided when it launches (`prune_configs_by`): by the target architecture's shared memory
(read from the device then, or set by `target()` for the compile gate) and by the layer's
shape, with at most MAX_CONFIGS per kernel and layer (each one is a compile on the first
step, and a benchmark).

Under the interpreter (TRITON_INTERPRET=1) `triton.autotune` cannot benchmark more than one
config (it times through a GPU driver), so every autotuned kernel gets exactly one there.

Why each config and bound is here is said beside it; the compile gate
(python -m resnet_fused.backends.triton.aot; tests/test_triton_compile_gate.py) enforces the
rules (no spill-free config missing, shared memory within the limit, at most MAX_CONFIGS per
launch), and docs/kernels.md keeps its per-config readings (registers, spills, shared memory).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton

from ...._utils import interpret
from .launch import next_power_of_2

# Whether the kernels run in Triton's CPU interpreter: read once, at import, as triton.jit
# decides it for each kernel when the kernel modules are imported; the launchers' block sizes
# and configs follow the kernels they launch.
INTERPRETED = interpret()

# Shared memory a block may use (the opt-in maximum), by compute capability.
SMEM_BYTES = {90: 232448, 100: 232448, 80: 166912, 87: 166912, 86: 101376, 89: 101376, 120: 101376}
SMEM_BYTES_DEFAULT = 101376
# Compiles (and benchmarks) per conv kernel and layer shape on the first step.
MAX_CONFIGS = 3

# SMs of the GPU a target architecture stands for in the compile gate (H100/H200 SXM for sm_90).
TARGET_SMS = {90: 132, 100: 148, 80: 108}

_TARGET: tuple[int, int] | None = None


@contextlib.contextmanager
def target(arch: int, sms: int | None = None):
    """Choose configs and grids for this architecture (sm_XY as XY) and SM count instead of the
    current device's: the compile gate (aot.py) enumerates a GPU's launches on a machine
    without one."""
    global _TARGET
    previous, _TARGET = _TARGET, (arch, sms or TARGET_SMS.get(arch, 132))
    try:
        yield
    finally:
        _TARGET = previous


def current_target() -> tuple[int, int] | None:
    """(arch, SMs) set by target(), or None: the current device's."""
    return _TARGET


@functools.cache
def _device_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


@functools.cache
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count() -> int:
    """SMs of the GPU launches run on (asked at launch time)."""
    if _TARGET is not None:
        return _TARGET[1]
    return _device_sms(torch.cuda.current_device())


def target_arch() -> int:
    """The architecture launches compile for (0 in the interpreter). Asked at launch time only:
    CUDA is in use by then."""
    if _TARGET is not None:
        return _TARGET[0]
    if INTERPRETED:
        return 0
    return _device_arch(torch.cuda.current_device())


def smem_bytes(arch: int) -> int:
    return SMEM_BYTES.get(arch, SMEM_BYTES_DEFAULT)


def _cfg(block_n, block_k, warps, stages):
    return triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)


def conv_configs() -> list[triton.Config]:
    """Configs of the implicit-GEMM forward and dgrad (BLOCK_N, BLOCK_K, warps, stages; BLOCK_M
    is fixed by the caller because the training statistics partials are per BLOCK_M tile), in
    order of preference: pruning keeps the first MAX_CONFIGS that fit."""
    if INTERPRETED:
        # The interpreter's cost is per program and per loop iteration, hardly per element.
        return [_cfg(64, 64, 4, 1)]
    # Each kept config compiles spill-free for the layers it is kept for (the gate's
    # test_each_kernel_and_layer_has_a_spill_free_config; readings per config in docs/kernels.md).
    return [
        _cfg(64, 64, 4, 4),
        _cfg(128, 64, 8, 4),  # C_out >= 128; fp32 needs more shared memory than sm_90 has (pruned)
        _cfg(128, 32, 8, 4),
        _cfg(64, 32, 4, 4),
        _cfg(64, 64, 4, 3),   # the 3-stage twin of the first, for 64-channel layers
        # Pre-Hopper TF32 only (see _register_operands): 8 warps hold half the accumulator each,
        # where 4 warps spilled (the stem, the 1x1 training forwards).
        _cfg(64, 32, 8, 4),
    ] + [_cfg(*c) for c in EXACT_FP32_CONFIGS]


# The shortest K block tl.dot compiles: Triton 3.6 rejects K = 8 (the FMA dots of exact float32
# take it from 3.8 on).
MIN_DOT_K = 8 if tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 8) else 16

# Exact float32 (TF32 off) only: the dots run on the CUDA cores as FMA, where each thread holds
# its rows of A and columns of B over the whole K block in registers, so K blocks are short and
# the accumulator is spread over 8 warps. The tensor-core configs spilled 12-16484 B there in the
# sm_90 gate (docs/kernels.md); these are the only configs exact float32 keeps: the first three
# candidates this Triton compiles. Where it rejects K = 8 (3.6), the 32-wide 8-warp tile takes that config's
# place (without it the recompute chain's 3x3 forward spilled 8 B in every config on sm_80).
EXACT_FP32_CONFIGS = tuple(c for c in ((64, 16, 8, 2), (32, 16, 4, 2), (64, 8, 8, 2), (32, 16, 8, 2))
                           if c[1] >= MIN_DOT_K)[:3]


def _exact_fp32(elem_bytes: int, args: dict) -> bool:
    """A float32 launch with TF32 off (exact float32: FMA dots)."""
    return elem_bytes == 4 and not args.get("ALLOW_TF32", True)


def wgrad_configs() -> list[triton.Config]:
    """Configs of wgrad (BLOCK_K, warps, stages); its BLOCK_M and BLOCK_N are the launcher's
    (conv.wgrad_tiles), because its split count depends on them."""
    def cfg(block_k, warps, stages):
        return triton.Config({"BLOCK_K": block_k}, num_warps=warps, num_stages=stages)

    if INTERPRETED:
        return [cfg(32, 4, 1)]
    # 8 warps for 128x128 tiles, 4 for 64-wide ones (prune_wgrad_configs); spill-free in the gate.
    return [cfg(64, 8, 3), cfg(32, 8, 4), cfg(64, 4, 3), cfg(32, 4, 4)] + [cfg(*c) for c in EXACT_FP32_WGRAD_CONFIGS]


# Exact float32 wgrad (see EXACT_FP32_CONFIGS): short K blocks, 8 warps (prune_wgrad_configs).
EXACT_FP32_WGRAD_CONFIGS = tuple(c for c in ((16, 8, 2), (8, 8, 2)) if c[0] >= MIN_DOT_K)


def prune_wgrad_configs(configs, named_args, **kwargs):
    """wgrad configs that fit shared memory, with 8 warps for 128x128 tiles and 4 below (a
    warp group per 64 rows of the accumulator; exact float32 and int64 indices before Hopper
    see below), 8-warp configs first; at most MAX_CONFIGS."""
    args = {**named_args, **kwargs}
    limit = smem_bytes(target_arch())
    elem = _itemsize(args["dz_ptr"].dtype)
    block_m, block_n = args["BLOCK_M"], args["BLOCK_N"]
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    # FLAT_N (the stem: columns are (ci, kh, kw), decoded per K element) keeps BLOCK_K 32: at
    # 64 it ran at the register limit and spilled with 64x128 tiles (the gate's spill test).
    max_k = 32 if args.get("FLAT_N") else 1 << 30
    if _register_operands(elem):
        max_k = min(max_k, 32)
    exact = _exact_fp32(elem, args)
    if exact and args.get("PROLOGUE"):
        # The BatchNorm + ReLU prologue's float32 registers on top of the FMA operands: BLOCK_K
        # 16 spilled 1968-10092 B in the sm_90 gate (the recompute chain's backward), 8 none
        # (Triton 3.8; 3.6 compiles no K block below 16).
        max_k = min(max_k, MIN_DOT_K)
    allowed = {warps}
    if exact:
        # FMA dots: each warp's share of the accumulator is the register budget, so 8 warps for
        # every tile (4 spilled 96 B on a 64-wide tile with int64 indices and the prologue, sm_90).
        allowed = {8}
    elif args.get("INDEX_64") and _register_operands(elem):
        # mma.sync's register operands with 64-bit index math: 8 warps too, tried first (the
        # stem's TF32 wgrad spilled 32 B with 4 on sm_80; a 1x1 chain wgrad 12 B with 8 only).
        allowed = {4, 8}
    kept = [c for c in configs if c.num_warps in allowed and c.kwargs["BLOCK_K"] <= max_k
            and ((c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in EXACT_FP32_WGRAD_CONFIGS) == exact
            and c.num_stages * (block_m + block_n) * c.kwargs["BLOCK_K"] * elem <= limit]
    if not kept:
        kept = [min(configs, key=lambda c: c.num_stages * c.kwargs["BLOCK_K"])]
    kept.sort(key=lambda c: c.num_warps != 8)  # stable: only reorders where both warp counts are kept
    return kept[:MAX_CONFIGS]


def _pipeline_smem(cfg: triton.Config, block_m: int, block_k: int, elem_bytes: int) -> int:
    """Shared memory of the software pipeline: num_stages (A, B) tile pairs. The epilogue's
    layout conversion reuses it (the gate's shared bytes equal this for every conv config)."""
    return cfg.num_stages * (block_m + cfg.kwargs["BLOCK_N"]) * block_k * elem_bytes


def _register_operands(elem_bytes: int) -> bool:
    """Before Hopper, mma.sync takes both operand tiles from registers: with 4-byte (TF32)
    operands, 4-warp configs with BLOCK_K 64 spilled in the sm_80 gate (dgrad, the recompute
    chain's wgrad); at BLOCK_K 32 they do not (figures in docs/kernels.md)."""
    return elem_bytes == 4 and 0 < target_arch() < 90


def _itemsize(dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def prune_gemm_configs(cols_arg: str, k_arg: str, a_ptr_arg: str):
    """An early_config_prune for an implicit-GEMM kernel whose columns come from the kernel
    argument `cols_arg`, whose per-tap K extent is `k_arg`, and whose A operand is `a_ptr_arg`.
    Keeps, in order, configs that fit shared memory, whose BLOCK_N is not wider than the
    layer's columns and BLOCK_K not longer than its K per tap (padding columns or K is pure
    waste); FLAT kernels ignore BLOCK_K (their K block is a filter row), so configs differing
    only in BLOCK_K count once. With a PROLOGUE (the recompute chain's BatchNorm + ReLU on the
    A tile, in float32 registers) 4-warp configs keep BLOCK_K <= 32: at 64 the 1x1 forwards
    spilled in the sm_90 gate (docs/kernels.md). Before Hopper with TF32 operands
    (_register_operands) the same BLOCK_K bound holds, and 8-warp 64-wide tiles are kept only
    there. At most MAX_CONFIGS."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        limit = smem_bytes(target_arch())
        elem = _itemsize(args[a_ptr_arg].dtype)
        block_m = args["BLOCK_M"]
        flat = bool(args.get("FLAT", False))
        prologue = bool(args.get("PROLOGUE", False))
        max_n = max(16, next_power_of_2(int(args[cols_arg])))
        max_k = max(16, next_power_of_2(int(args[k_arg])))
        exact = _exact_fp32(elem, args)
        index_64 = bool(args.get("INDEX_64", False))
        kept, seen = [], set()
        for cfg in configs:
            block_n, block_k = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
            if ((block_n, block_k, cfg.num_warps, cfg.num_stages) in EXACT_FP32_CONFIGS) != exact:
                continue  # exact float32 keeps its own configs, and only it keeps them
            if flat:
                block_k = args["KW_PAD"] * args["C_PAD"]
            if _pipeline_smem(cfg, block_m, block_k, elem) > limit:
                continue
            if block_n > max_n or (not flat and block_k > max_k):
                continue
            if (prologue or _register_operands(elem)) and cfg.num_warps == 4 and block_k > 32:
                continue
            if cfg.num_warps == 8 and block_n == 64 and not _register_operands(elem) and not exact and not index_64:
                continue
            key = (block_n, block_k, cfg.num_warps, cfg.num_stages)
            if key in seen:
                continue
            seen.add(key)
            kept.append(cfg)
        if not kept:  # a shape no preferred config suits: the smallest tiles
            kept = [min(configs, key=lambda c: _pipeline_smem(c, block_m, c.kwargs["BLOCK_K"], elem))]
        if index_64:
            # 64-bit index math holds twice the address registers: 8-warp tiles first, 64 wide
            # too. In the sm_90 gate the stem's forward and the 3x3/2 fp32 dgrad spilled 48-1200 B
            # in every 4-warp and 128-wide config with int64 indices, the 8-warp 64-wide one none.
            kept.sort(key=lambda c: c.num_warps != 8)
        return kept[:MAX_CONFIGS]

    return prune


def m_bucket(m: int) -> int:
    """The GEMM row count as the autotuner sees it: rounded up to a power of two, so a new
    batch size or resolution reuses the config tuned for its bucket instead of benchmarking
    again and growing the cache by one entry per distinct M (bounded: ~log2(M_max) entries
    per layer shape). Configs depend on M only through the tile-count regime."""
    return next_power_of_2(max(int(m), 1))


def conv_block_m() -> int:
    return 64 if INTERPRETED else 128


def elementwise_block() -> tuple[int, int]:
    """(rows, channels) tile of the per-channel elementwise/reduction kernels."""
    return (64, 32) if INTERPRETED else (64, 64)
