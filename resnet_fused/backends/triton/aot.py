"""The compile gate: every kernel and autotune config the Triton backend launches for
ResNet-50's convolutions, compiled ahead of time for a GPU target on this machine's CPU.

    python -m resnet_fused.backends.triton.aot --target sm_90 --json report.json
    python -m resnet_fused.backends.triton.aot --subset ci          # what tests/test_triton_compile_gate.py runs

How: the backend's op implementations (conv_bn_eval, conv_bn_train and both backwards) run
on meta tensors of each layer's real shape while kernels/launch.py records their launches
instead of running them. Each recorded launch is then specialized exactly as Triton's JIT
would specialize it on the GPU (the JIT's own binder: the same i32/i64 argument types,
divisibility-by-16 attributes and constexprs, pointers 16-byte aligned as the caching
allocator gives them), once per autotune config that survives the kernel's pruning, and
compiled with `triton.compile` for the target. Identical specializations compile once. The
Triton cache key is the JIT's (jit_hash checks it against JITFunction.warmup's), so pointing
--cache-dir at a GPU machine's Triton cache warms it, on that machine's CPU cores, with the
binaries the first step would otherwise compile; the report counts the compiles that were
already in the cache (cache_hits).

Per compile the report has: kernel, layer, op, dtype, layout, config, index width, the grid and
its program count, shared memory bytes, registers, spill bytes (ptxas -v), whether the PTX
uses wgmma / TMA (cp.async.bulk.tensor) / cp.async, and the number of scf.for loops in the
TTGIR (a conv kernel's K loops); with --sass, the counts of a few SASS instructions (SASS_OPS).

Needs a Triton with the NVIDIA backend (its ptxas and cuobjdump); no GPU, no CUDA init.
Refuses to run under TRITON_INTERPRET=1 (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import torch

# ---------------------------------------------------------------------------------------
# What is enumerated.


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str
    c_in: int
    c_out: int
    k: int
    stride: int
    hw: int                  # input height = width
    relu: bool = True
    residual: bool = False   # the block's last conv: + identity, then ReLU
    needs_grad_x: bool = True  # False for the stem: the image needs no gradient

    @property
    def padding(self) -> int:
        return self.k // 2


def _bottleneck_stage(c_mid: int, c_in: int, hw: int, stride: int) -> list[Layer]:
    c_out = 4 * c_mid
    hw_out = hw // stride
    s = f"/{stride}" if stride > 1 else ""
    return [
        Layer(f"1x1 {c_in}->{c_mid} @{hw}", c_in, c_mid, 1, 1, hw),
        Layer(f"3x3{s} {c_mid}->{c_mid} @{hw}", c_mid, c_mid, 3, stride, hw),
        Layer(f"1x1 {c_mid}->{c_out} @{hw_out} +res", c_mid, c_out, 1, 1, hw_out, residual=True),
        Layer(f"1x1{s} {c_in}->{c_out} @{hw} downsample", c_in, c_out, 1, stride, hw, relu=False),
        Layer(f"1x1 {c_out}->{c_mid} @{hw_out}", c_out, c_mid, 1, 1, hw_out),
        Layer(f"3x3 {c_mid}->{c_mid} @{hw_out}", c_mid, c_mid, 3, 1, hw_out),
    ]


STEM = Layer("stem 7x7/2 3->64 @224", 3, 64, 7, 2, 224, needs_grad_x=False)
# The 24 distinct convolutions of torchvision's ResNet-50 (stride on the 3x3, "v1.5").
RESNET50: dict[str, Layer] = {
    layer.name: layer
    for layer in [STEM] + _bottleneck_stage(64, 64, 56, 1) + _bottleneck_stage(128, 256, 56, 2)
    + _bottleneck_stage(256, 512, 28, 2)
    + _bottleneck_stage(512, 1024, 14, 2)
}
# Six layer types, one per kernel shape class: the ones every figure in docs/kernels.md refers to.
LAYER_TYPES = [
    "1x1 256->64 @56", "3x3 64->64 @56", "1x1 64->256 @56 +res", "3x3/2 128->128 @56", STEM.name,
    "1x1 2048->512 @7",
]
# The CI subset: one of each kernel shape class (3x3 stride 1, 3x3 stride 2, 1x1 with the
# residual epilogue, the flattened-K stem) in bf16 and TF32, fp16 on one layer, exact float32
# (fp32x) on a 3x3 and on the 1x1 (TMA), and the int64-index variant (what a batch past 2**31
# elements launches) of the 1x1 (TMA), the strided 3x3 (phased dgrad) and the stem. Extra cases
# are (layer, dtype, index width).
CI_SUBSET = {
    "layers": ["3x3 64->64 @56", "1x1 64->256 @56 +res", "3x3/2 128->128 @56", STEM.name],
    "dtypes": ["bf16", "fp32"],
    "extra": [("3x3 64->64 @56", "fp16", "int32"), ("1x1 64->256 @56 +res", "bf16", "int64"),
              ("3x3/2 128->128 @56", "bf16", "int64"), (STEM.name, "bf16", "int64"),
              ("3x3 64->64 @56", "fp32x", "int32"), ("1x1 64->256 @56 +res", "fp32x", "int32")],
}
INDEX_WIDTHS = ("int32", "int64")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp32x": torch.float32}
# fp32 launches with TF32 allowed (PyTorch's default for convolutions); fp32x with TF32 off,
# exact float32 on the CUDA cores (torch.backends.cudnn.allow_tf32 = False).
TF32_ALLOWED = {"fp32x": False}
# chain / chain_bwd: recompute_bn_relu's forward, the conv with the previous unit's BatchNorm +
# ReLU in its operand load (bn_act_conv_bn_stats), and its backward's conv part, dgrad with the
# ReLU mask in its epilogue and wgrad with the same prologue (bn_act_conv_backward); not for
# the stem, whose input is the image.
OPS = ("eval", "train", "train_bwd", "eval_bwd", "chain", "chain_bwd")


def _layer_list(spec: str) -> list[Layer]:
    if spec == "all":
        return list(RESNET50.values())
    if spec == "types":
        return [RESNET50[n] for n in LAYER_TYPES]
    return [RESNET50[n.strip()] for n in spec.split(";")]


# ---------------------------------------------------------------------------------------
# Recording the launches of one op call on meta tensors.


class PointerArg:
    """A tensor argument as the JIT's specialization sees it: dtype and a 16-byte-aligned
    address (the caching allocator's blocks are 512-byte aligned)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def data_ptr(self) -> int:
        return 1 << 20

    def __reduce__(self):
        return (PointerArg, (self.dtype,))


def _meta(shape, dtype, layout):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if layout == "nhwc" and len(shape) == 4 else t


def record_op(layer: Layer, op: str, dtype: torch.dtype, layout: str, batch: int):
    """The launches the backend makes for one op call of this layer."""
    from . import (bn_act_conv_backward, bn_act_conv_bn_stats, conv_bn_eval, conv_bn_eval_backward, conv_bn_train,
                   conv_bn_train_backward)
    from .kernels import launch as launch_mod

    n, s, p = batch, [layer.stride] * 2, [layer.padding] * 2
    d = [1, 1]
    x = _meta((n, layer.c_in, layer.hw, layer.hw), dtype, layout)
    w = _meta((layer.c_out, layer.c_in, layer.k, layer.k), dtype, layout)
    ho = (layer.hw + 2 * layer.padding - layer.k) // layer.stride + 1
    out_shape = (n, layer.c_out, ho, ho)
    vec = torch.empty(layer.c_out, dtype=torch.float32, device="meta")
    vec_in = torch.empty(layer.c_in, dtype=torch.float32, device="meta")  # the previous unit's (chain ops)
    res = _meta(out_shape, dtype, layout) if layer.residual else None
    with launch_mod.recording() as launches:
        if op == "eval":
            conv_bn_eval(x, w, vec, vec, res, s, p, d, 1, layer.relu)
        elif op == "train":
            conv_bn_train(x, w, None, vec, vec, res, s, p, d, 1, 1e-5, layer.relu)
        elif op == "train_bwd":
            gy, z = _meta(out_shape, dtype, layout), _meta(out_shape, dtype, layout)
            y = _meta(out_shape, dtype, layout) if layer.relu else None
            conv_bn_train_backward(gy, x, w, z, y, vec, vec, vec, s, p, d, 1, 1e-5, layer.relu,
                                   [layer.needs_grad_x, True, False, True, True, layer.residual])
        elif op == "chain":
            if layer.c_in >= 8:  # not the stem
                bn_act_conv_bn_stats(x, vec_in, vec_in, vec_in, vec_in, 1e-5, True, w, None, s, p, d, 1)
        elif op == "chain_bwd":
            if layer.c_in >= 8:
                bn_act_conv_backward(_meta(out_shape, dtype, layout), x, vec_in, vec_in, vec_in, vec_in, 1e-5, True,
                                     w, s, p, d, 1, [True, True])
        elif op == "eval_bwd":  # frozen BatchNorm (fine-tuning): grads of x and the weight only
            gy = _meta(out_shape, dtype, layout)
            y = _meta(out_shape, dtype, layout) if layer.relu else None
            conv_bn_eval_backward(gy, x, w, vec, y, s, p, d, 1, layer.relu,
                                  [layer.needs_grad_x, True, False, False, layer.residual])
        else:
            raise ValueError(op)
    return launches


# ---------------------------------------------------------------------------------------
# Specializing a launch the way the JIT does, and compiling it.


def _jit_function(kernel):
    """(JITFunction, Autotuner or None)."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    tuner = kernel if isinstance(kernel, Autotuner) else None
    fn = kernel
    while isinstance(fn, (Autotuner, Heuristics)):
        fn = fn.fn
    return fn, tuner


def launch_configs(kernel, args, kwargs, all_configs: bool = False):
    """[(config label dict, kwargs for the JIT)] for one recorded launch: one per autotune
    config that the kernel's pruning keeps (all of them with all_configs)."""
    fn, tuner = _jit_function(kernel)
    if tuner is None:
        return [({k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}, dict(kwargs))]
    configs = tuner.configs
    prune = getattr(tuner, "early_config_prune", None)
    if prune is not None and not all_configs:
        configs = prune(configs, dict(zip(tuner.arg_names, args)), **kwargs)
    out = []
    for cfg in configs:
        label = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        out.append((label, {**kwargs, **cfg.all_kwargs()}))
    return out


def _as_jit_arg(a):
    return PointerArg(a.dtype) if isinstance(a, torch.Tensor) else a


def _as_jit_kwargs(kwargs: dict) -> dict:
    """A launch's keyword arguments (the launchers pass every argument by keyword) with each
    tensor as the JIT's specialization sees it."""
    return {k: _as_jit_arg(v) for k, v in kwargs.items()}


_BINDERS: dict = {}


def specialize(fn, target, args, kwargs):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run computes them."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    key = (fn, target)
    if key not in _BINDERS:
        backend = make_backend(target)
        _BINDERS[key] = (backend, create_function_from_signature(fn.signature, fn.params, backend))
    backend, binder = _BINDERS[key]
    kwargs = _as_jit_kwargs(kwargs)  # a new dict
    # JITFunction.run adds these two before binding (they are part of the cache key).
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*[_as_jit_arg(a) for a in args], **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def _bin_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


# SASS instructions counted per kernel: wgmma (HGMMA) or mma.sync (HMMA) tensor-core ops, TMA
# loads (UTMALDG), cp.async (LDGSTS), local-memory loads and stores (LDL/STL: spills).
SASS_OPS = ("HGMMA", "HMMA", "UTMALDG", "LDGSTS", "LDL", "STL")


# Which jobs get their SASS disassembled (--sass): disassembly is about 40% of a compile's
# time, and the gate's tests read the counts only where the 1x1 forward's loads are checked.
SASS_CHOICES = ("all", "1x1-forward", "none")


def _wants_sass(policy: str, kernel_name: str, layer: Layer) -> bool:
    return policy == "all" or (policy == "1x1-forward" and kernel_name == "_conv_fwd_kernel" and layer.k == 1)


def _resources(cubin: bytes, sass: bool) -> dict:
    """Registers and stack from cuobjdump; with sass, SASS instruction counts that show what ran."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([os.path.join(_bin_dir(), "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True).stdout
        listing = subprocess.run([os.path.join(_bin_dir(), "cuobjdump"), "-sass", f.name],
                                 capture_output=True, text=True).stdout if sass else None
    out = {}
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if m:
        out.update(registers=int(m[1]), stack_bytes=int(m[2]), local_bytes=int(m[4]))
    if listing is not None:
        out["sass"] = {op: len(re.findall(rf"\b{op}\b", listing)) for op in SASS_OPS}
    return out


def compile_one(job: dict) -> dict:
    """Compile one specialization; returns its measurements (or the error)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = sys.modules.get(job["module"]) or __import__(job["module"], fromlist=["_"])
    fn, _ = _jit_function(getattr(module, job["kernel"]))
    target = GPUTarget("cuda", job["arch"], 32)
    signature, constexprs, attrs, options = specialize(fn, target, job["args"], job["kwargs"])
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as exc:  # reported, and the gate fails on it
        return {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
    seconds = time.perf_counter() - start
    ptx, ttgir, ttir = compiled.asm["ptx"], compiled.asm["ttgir"], compiled.asm["ttir"]
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    wgmma_lines = [ln for ln in ptx.splitlines() if "wgmma.mma_async" in ln]
    mma_lines = [ln for ln in ptx.splitlines() if "mma.sync" in ln]
    out = {
        "shared_bytes": compiled.metadata.shared,
        # Global scratch per program (device-side TMA descriptors); > 0 needs triton.set_allocator.
        "global_scratch_bytes": getattr(compiled.metadata, "global_scratch_size", 0),
        "spill_store_bytes": int(spills[1]) if spills else None,  # None: loaded from the cache, no ptxas run
        "spill_load_bytes": int(spills[2]) if spills else None,
        "cache_hit": not spills,
        "gemm": "tt.dot" in ttir,
        "wgmma": bool(wgmma_lines),
        "wgmma_tf32": any(".tf32" in ln for ln in wgmma_lines),
        "mma_sync": bool(mma_lines),
        "mma_sync_tf32": any(".tf32" in ln for ln in mma_lines),
        "tma": "cp.async.bulk.tensor" in ptx,
        "cp_async": bool(re.search(r"cp\.async\.c[ag]", ptx)),
        "k_loops": len(re.findall(r"\bscf\.for\b", ttgir)),
        "compile_s": round(seconds, 2),
        "hash": compiled.hash,  # the Triton cache key
    }
    out.update(_resources(compiled.asm["cubin"], job.get("sass", True)))
    return out


class _TargetOnlyDriver:
    """Stands in for the GPU driver while the JIT's own launch path runs with warmup=True
    (compile, no launch): the target is all it asks."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def jit_hash(job: dict) -> str:
    """The cache key Triton's JIT itself produces for this job's launch (JITFunction.warmup on a
    stand-in driver): what compile_one's hash must equal for a warmed cache to hit on the GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    module = sys.modules.get(job["module"]) or __import__(job["module"], fromlist=["_"])
    fn, _ = _jit_function(getattr(module, job["kernel"]))
    previous = driver._active
    driver.set_active(_TargetOnlyDriver(GPUTarget("cuda", job["arch"], 32)))
    try:
        fn.device_caches.clear()
        kernel = fn.warmup(*[_as_jit_arg(a) for a in job["args"]], grid=(1,), **job["kwargs"])
        return kernel.hash
    finally:
        fn.device_caches.clear()
        driver._active = previous


# ---------------------------------------------------------------------------------------
# The enumeration.


def enumerate_jobs(layers, dtypes, layouts, ops, batch, arch, all_configs=False, extra=(), indexes=("int32",),
                   sass="all"):
    """rows (one per kernel launch and config) and the unique compile jobs they need.
    indexes: the index widths every case is recorded with (int64: under launch.force_int64,
    the variant a tensor of 2**31 elements or more launches); extra: (layer name, dtype,
    index width) cases beside the full product; sass: which jobs' SASS is counted (SASS_CHOICES)."""
    from triton.backends.compiler import GPUTarget

    from .kernels import configs as cfg_mod
    from .kernels.launch import force_int64, grid_size

    target = GPUTarget("cuda", arch, 32)
    rows, jobs = [], {}
    cases = [(lyr, dt, lay, ix) for lyr in layers for dt in dtypes for lay in layouts for ix in indexes]
    cases += [(RESNET50[name], dt, lay, ix) for name, dt, ix in extra for lay in layouts
              if (RESNET50[name], dt, lay, ix) not in cases]
    prev_tf32 = torch.backends.cudnn.allow_tf32
    try:
        with cfg_mod.target(arch):
            for layer, dt, layout, index in cases:
                torch.backends.cudnn.allow_tf32 = TF32_ALLOWED.get(dt, True)
                for op in ops:
                    with force_int64() if index == "int64" else contextlib.nullcontext():
                        recorded = record_op(layer, op, DTYPES[dt], layout, batch)
                    for order, rec in enumerate(recorded):
                        fn, _ = _jit_function(rec.kernel)
                        for label, kwargs in launch_configs(rec.kernel, rec.args, rec.kwargs, all_configs):
                            sig, constexprs, attrs, options = specialize(fn, target, rec.args, kwargs)
                            key = repr((fn.__name__, sorted(sig.items()), sorted(constexprs.items()),
                                        sorted(attrs.items()), sorted(options.__dict__.items())))
                            if key not in jobs:
                                jobs[key] = {"module": fn.fn.__module__, "kernel": _attr_name(rec.kernel),
                                             "arch": arch, "args": [_as_jit_arg(a) for a in rec.args],
                                             "kwargs": _as_jit_kwargs(kwargs), "sass": False}
                            jobs[key]["sass"] |= _wants_sass(sass, fn.__name__, layer)
                            meta = {**rec.kwargs, **kwargs}
                            grid = grid_size(rec.grid, meta)
                            rows.append({
                                "kernel": fn.__name__, "layer": layer.name, "op": op, "launch": order,
                                "dtype": dt, "layout": layout, "config": label,
                                "index": "int64" if meta.get("INDEX_64") else "int32",
                                "grid": list(grid), "programs": _programs(grid),
                                "key": key,
                            })
    finally:
        torch.backends.cudnn.allow_tf32 = prev_tf32
    return rows, jobs


def _programs(grid) -> int:
    return grid[0] * grid[1] * grid[2]


def _attr_name(kernel) -> str:
    fn, _ = _jit_function(kernel)
    module = sys.modules[fn.fn.__module__]
    for name, obj in vars(module).items():
        if obj is kernel:
            return name
    raise LookupError(f"{fn.__name__} is not a module attribute")


def run(layers, dtypes, layouts, ops, batch=256, arch=90, jobs_n=None, cache_dir=None, all_configs=False,
        extra=(), progress=None, indexes=("int32",), sass="all"):
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("the compile gate needs compiled kernels: unset TRITON_INTERPRET")
    start = time.perf_counter()
    rows, jobs = enumerate_jobs(layers, dtypes, layouts, ops, batch, arch, all_configs, extra, indexes, sass)
    results = _compile_all(list(jobs.items()), jobs_n or os.cpu_count() or 1, cache_dir, progress)
    for row in rows:
        row.update(results[row["key"]])
    per_layer = defaultdict(set)
    for row in rows:
        per_layer[f"{row['layer']} | {row['dtype']} | {row['layout']}"].add(row["key"])
    for row in rows:
        row["key"] = _short(row["key"])
    import triton

    from .kernels import configs

    return {
        "target": f"sm_{arch}", "triton": triton.__version__, "torch": torch.__version__, "batch": batch,
        "smem_limit": configs.smem_bytes(arch), "unique_compiles": len(jobs),
        "cache_hits": sum(1 for r in results.values() if r.get("cache_hit")),
        "compiles_per_layer": {k: len(v) for k, v in sorted(per_layer.items())},
        "seconds": round(time.perf_counter() - start, 1), "rows": rows,
    }


def _short(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _compile_all(items, jobs_n, cache_dir, progress):
    """Compile in worker processes (fork: they inherit the imported kernels)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    own_cache = None
    if cache_dir is None:  # a fresh cache: every compile runs ptxas, whose log has the spills
        own_cache = tempfile.TemporaryDirectory(prefix="rf-aot-cache-")
        cache_dir = own_cache.name
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    results = {}
    try:
        if jobs_n <= 1:
            for i, (key, job) in enumerate(items):
                results[key] = compile_one(job)
                if progress:
                    progress(i + 1, len(items))
        else:
            ctx = mp.get_context("fork")
            with ProcessPoolExecutor(max_workers=jobs_n, mp_context=ctx) as pool:
                futures = {pool.submit(compile_one, job): key for key, job in items}
                from concurrent.futures import as_completed

                for i, fut in enumerate(as_completed(futures)):
                    results[futures[fut]] = fut.result()
                    if progress:
                        progress(i + 1, len(items))
    finally:
        if own_cache is not None:
            own_cache.cleanup()
    return results


# ---------------------------------------------------------------------------------------
# Summary and command line.


def summarize(report: dict) -> list[dict]:
    """One line per (kernel, layer, dtype, layout, index width): the spread over its configs."""
    groups = defaultdict(list)
    for row in report["rows"]:
        groups[(row["kernel"], row["layer"], row["dtype"], row["layout"], row["index"])].append(row)
    out = []
    for (kernel, layer, dt, layout, index), rows in groups.items():
        ok = [r for r in rows if "error" not in r]
        configs = {json.dumps(r["config"], sort_keys=True) for r in rows}
        out.append({
            "kernel": kernel, "layer": layer, "dtype": dt, "layout": layout, "index": index, "configs": len(configs),
            "errors": len(rows) - len(ok),
            "registers": sorted({r["registers"] for r in ok}),
            "spill_bytes": sorted({r["spill_store_bytes"] for r in ok if r["spill_store_bytes"] is not None}),
            "shared_kb": sorted({round(r["shared_bytes"] / 1024) for r in ok}),
            "wgmma": all(r["wgmma"] for r in ok) if ok and ok[0]["gemm"] else None,
            "tma": any(r["tma"] for r in ok),
            "k_loops": sorted({r["k_loops"] for r in ok}),
            "programs": sorted({r["programs"] for r in rows}),
        })
    return out


def format_summary(report: dict) -> str:
    lines = [f"{report['unique_compiles']} unique compiles for {report['target']} with triton {report['triton']} "
             f"in {report['seconds']} s ({report['cache_hits']} already in the Triton cache)"]
    head = f"{'kernel':24} {'layer':32} {'dtype':5} {'lay':4} {'idx':5} {'cfg':>3} {'regs':>11} {'spill B':>9} " \
           f"{'smem KB':>9} {'wgmma':5} {'tma':3} {'loops':5} programs"
    lines.append(head)
    for s in summarize(report):
        def span(v):
            return "-" if not v else (str(v[0]) if len(v) == 1 else f"{v[0]}-{v[-1]}")
        wg = "-" if s["wgmma"] is None else ("yes" if s["wgmma"] else "NO")
        lines.append(f"{s['kernel']:24} {s['layer']:32} {s['dtype']:5} {s['layout']:4} {s['index']:5} {s['configs']:>3} "
                     f"{span(s['registers']):>11} {span(s['spill_bytes']):>9} {span(s['shared_kb']):>9} {wg:5} "
                     f"{'yes' if s['tma'] else 'no':3} {span(s['k_loops']):5} {span(s['programs'])}"
                     + (f"  ERRORS {s['errors']}" if s["errors"] else ""))
    lines.append("compiles per layer (unique binaries for one layer, dtype and layout):")
    for k, v in report["compiles_per_layer"].items():
        lines.append(f"  {k}: {v}")
    return "\n".join(lines)


def _progress(done: int, total: int) -> None:
    if done % 25 == 0 or done == total:
        print(f"compiled {done}/{total}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m resnet_fused.backends.triton.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="sm_90", help="GPU architecture, sm_XY (default sm_90)")
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--subset", choices=["ci", "types", "all"], default="types",
                   help="ci: the CI test's representative subset; types: six layer types, one per kernel shape class (default); "
                        "all: ResNet-50's 24 convolutions")
    p.add_argument("--layers", help="';'-separated layer names (overrides --subset's layers)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated: bf16,fp16,fp32,fp32x (fp32 with TF32 allowed, fp32x exact float32)")
    p.add_argument("--layouts", default="nhwc", help="comma-separated: nhwc,nchw (default nhwc)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated: {','.join(OPS)}")
    p.add_argument("--index", default="int32",
                   help="comma-separated index widths: int32,int64 (int64: the variant launched for tensors "
                        "of 2**31 elements or more; default int32, the CI subset adds int64 cases)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: all cores)")
    p.add_argument("--cache-dir", help="Triton cache to compile into (default: a fresh temporary one, so that "
                                       "every compile runs ptxas and reports spills); a GPU machine's cache to warm it")
    p.add_argument("--all-configs", action="store_true",
                   help="every autotune config, not only those pruning keeps (the exact-float32 configs with "
                        "BLOCK_K 8 do not compile for 16-bit dtypes, which never keep them)")
    p.add_argument("--sass", choices=SASS_CHOICES, default="all",
                   help="which compiles get their SASS disassembled and counted (about 40%% of a compile's time): "
                        "all (default), 1x1-forward (what the CI test checks), none")
    p.add_argument("--count", action="store_true",
                   help="compile nothing: print the unique compiles the selection needs, per kernel, as JSON")
    a = p.parse_args(argv)
    arch = int(a.target.removeprefix("sm_").rstrip("a"))
    extra = ()
    if a.subset == "ci":
        layer_names, dtypes, extra = CI_SUBSET["layers"], CI_SUBSET["dtypes"], CI_SUBSET["extra"]
        layers = [RESNET50[n] for n in layer_names]
    else:
        layers, dtypes = _layer_list("all" if a.subset == "all" else "types"), list(DTYPES)
    if a.layers:
        layers = _layer_list(a.layers)
    if a.dtypes:
        dtypes = a.dtypes.split(",")
    unknown = sorted(set(dtypes) - set(DTYPES))
    if unknown:
        p.error(f"--dtypes: unknown dtype(s) {', '.join(unknown)}; expected a comma-separated subset of "
                f"{','.join(DTYPES)}")
    ops = a.ops.split(",")
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        p.error(f"--ops: unknown op(s) {', '.join(unknown)}; expected a comma-separated subset of {','.join(OPS)}")
    indexes = a.index.split(",")
    unknown = sorted(set(indexes) - set(INDEX_WIDTHS))
    if unknown:
        p.error(f"--index: unknown width(s) {', '.join(unknown)}; expected a comma-separated subset of "
                f"{','.join(INDEX_WIDTHS)}")
    if os.environ.get("TRITON_INTERPRET") == "1":  # the launchers would plan for the interpreter
        p.error("the compile gate plans compiled kernels: unset TRITON_INTERPRET")
    if a.count:
        _, jobs = enumerate_jobs(layers, dtypes, a.layouts.split(","), ops, a.batch, arch, a.all_configs, extra, indexes)
        per_kernel = defaultdict(int)
        for job in jobs.values():
            per_kernel[job["kernel"]] += 1
        print(json.dumps({"target": f"sm_{arch}", "unique_compiles": len(jobs), "per_kernel": dict(per_kernel)}))
        return 0
    report = run(layers, dtypes, a.layouts.split(","), ops, a.batch, arch, a.jobs, a.cache_dir,
                 a.all_configs, extra, progress=_progress, indexes=indexes, sass=a.sass)
    print(format_summary(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    failed = [r for r in report["rows"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
