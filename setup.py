"""Build script: the Python package, plus the CUDA extension `resnet_fused._C` from csrc/.

Switches (environment variables), printed at start:
  RESNET_FUSED_SKIP_CUDA_BUILD=1   never build the extension (the Triton/reference backends still work)
  RESNET_FUSED_FORCE_CUDA=1        build it or fail loudly (no silent skip when nvcc or CUDA torch is missing)
  TORCH_CUDA_ARCH_LIST             GPU architectures, default "8.0+PTX;9.0a": A100 machine code, PTX that later
                                   GPUs (Blackwell) compile at load time, and H100/H200 code with wgmma/TMA; the
                                   CUTLASS Hopper kernels (csrc/sm90/) are built only when the list has 9.0a
  CUTLASS_DIR                      a CUTLASS source tree (include/, tools/util/include/); default: the headers of
                                   the nvidia-cutlass package (`pip install --no-deps nvidia-cutlass==4.2.0.0`)
  MAX_JOBS                         parallel compile jobs, default from cores and memory (3.5 GB per nvcc: a CUTLASS
                                   kernel's peak)
  NVCC_THREADS                     nvcc --threads (architectures compiled in parallel per file)
  RESNET_FUSED_PY_LIMITED_API=0    build for this Python only instead of the stable ABI (abi3, Python >= 3.10)

Install with `pip install --no-build-isolation -e .` so the extension builds against the torch you run.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
SKIP = os.environ.get("RESNET_FUSED_SKIP_CUDA_BUILD", "0") == "1"
FORCE = os.environ.get("RESNET_FUSED_FORCE_CUDA", "0") == "1"
PY_LIMITED_API = os.environ.get("RESNET_FUSED_PY_LIMITED_API", "1") == "1"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX;9.0a")


def _default_max_jobs() -> int:
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8.0
    return max(1, min(cores, int(mem_gib * 2**30 / 1e9 // 3.5)))


os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
NVCC_THREADS = os.environ.get("NVCC_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["MAX_JOBS"]))))


def _log(msg: str) -> None:
    print(f"[resnet_fused setup] {msg}", file=sys.stderr, flush=True)


def _nvidia_pip_include_dirs() -> list[str]:
    """Headers torch includes that a bare CUDA toolkit may lack (cusparse.h, cublas) come
    from pip's nvidia-* wheels (site-packages/nvidia/cu13/include, or nvidia/*/include)."""
    dirs = []
    for entry in sys.path:
        nvidia = os.path.join(entry, "nvidia")
        if os.path.isdir(nvidia):
            dirs += sorted(glob.glob(os.path.join(nvidia, "cu*", "include")))
            dirs += sorted(glob.glob(os.path.join(nvidia, "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _cutlass_dir() -> tuple[str | None, str]:
    """The CUTLASS tree to build the Hopper kernels against, and where it came from."""
    if os.environ.get("CUTLASS_DIR"):
        return os.environ["CUTLASS_DIR"], "CUTLASS_DIR"
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        source = os.path.join(list(spec.submodule_search_locations)[0], "source")
        if os.path.isfile(os.path.join(source, "include", "cutlass", "cutlass.h")):
            return source, "the nvidia-cutlass package"
    return None, "no CUTLASS headers (pip install --no-deps nvidia-cutlass==4.2.0.0, or set CUTLASS_DIR)"


def _sm90_kernels() -> tuple[list[str], list[str], str]:
    """The CUTLASS sm_90a kernel sources and their include dirs, or none and the reason."""
    arches = [a.strip().lower() for a in os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";") if a.strip()]
    if not any(a.startswith("9.0a") for a in arches):
        return [], [], f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} has no 9.0a"
    root, origin = _cutlass_dir()
    if root is None:
        return [], [], origin
    includes = [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
    return sorted(glob.glob("csrc/sm90/conv_sm90_*.cu")), includes, f"CUTLASS from {origin} ({root})"


def _cuda_extension():
    """The extension, or None (with the reason printed) when it cannot or should not be built."""
    # csrc/sm90/conv_sm90_*.cu are the CUTLASS kernels (one per file), added by _sm90_kernels().
    sources = sorted(set(glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True))
                     - set(glob.glob("csrc/sm90/conv_sm90_*.cu")))
    if SKIP:
        _log("RESNET_FUSED_SKIP_CUDA_BUILD=1: not building the CUDA extension")
        return None, {}
    reason = None
    if not sources:
        reason = "no sources in csrc/"
    else:
        try:
            import torch
            from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
        except ImportError as exc:
            reason = f"torch is not importable at build time ({exc}); install torch first and use --no-build-isolation"
        else:
            if torch.version.cuda is None:
                reason = f"torch {torch.__version__} is a CPU-only build"
            elif CUDA_HOME is None:
                reason = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    if reason is not None:
        if FORCE:
            raise RuntimeError(f"RESNET_FUSED_FORCE_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _log(f"not building the CUDA extension: {reason}")
        return None, {}

    # pip's nvidia headers (cusparse.h, cublas) fill gaps in a bare toolkit only: they are searched
    # after the toolkit's (-idirafter), since their cuda_runtime.h would shadow the toolkit's and
    # miss crt/. Only ops.cpp (host compiler) includes torch; the .cu files stay torch-free.
    pip_dirs = _nvidia_pip_include_dirs()
    # torch derives CUDA_HOME from `which nvcc`; with a wrapper script (/usr/local/bin/nvcc ->
    # /usr/local/cuda-13.0/bin/nvcc) that is /usr/local, which has no CUDA headers or libraries.
    # Ask nvcc where its toolkit is (the TOP it reports) and use that toolkit's include/lib64.
    toolkit_include, toolkit_lib = [], []
    if not os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        import subprocess

        dryrun = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--dryrun", "-c", "-x", "cu", os.devnull,
                                 "-o", os.devnull], capture_output=True, text=True)
        for line in (dryrun.stdout + dryrun.stderr).splitlines():
            if line.startswith("#$ TOP="):
                top = os.path.realpath(line.split("=", 1)[1].strip())
                toolkit_include = [d for d in (os.path.join(top, "include"),) if os.path.isdir(d)]
                toolkit_lib = [d for d in (os.path.join(top, "lib64"), os.path.join(top, "lib")) if os.path.isdir(d)]
                break
        _log(f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime.h; nvcc's toolkit: {toolkit_include} {toolkit_lib}")
    after_flags = [flag for d in pip_dirs for flag in ("-idirafter", d)]
    _log(f"building resnet_fused._C from {len(sources)} sources with torch {torch.__version__} "
         f"(CUDA {torch.version.cuda}), nvcc at {CUDA_HOME}")
    _log(f"include dirs searched after the toolkit's: {pip_dirs}")
    # torch >= 2.10 headers require C++20.
    cxx_std = "-std=c++20" if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 10) else "-std=c++17"
    sm90_sources, cutlass_includes, sm90_note = _sm90_kernels()
    sm90_flags = ["-DRESNET_FUSED_SM90A"] if sm90_sources else []
    _log(f"CUTLASS Hopper kernels: {len(sm90_sources)} ({sm90_note})")
    # The stable Python ABI (as pytorch/extension-cpp): one build loads on every Python >= 3.10
    # with the same torch. The extension uses torch's C++ ABI, so the torch version must match.
    limited_api = ["-DPy_LIMITED_API=0x030A0000"] if PY_LIMITED_API else []
    extension = CUDAExtension(
        name="resnet_fused._C",
        sources=sources + sm90_sources,
        include_dirs=[os.path.join(ROOT, "csrc"), *toolkit_include, *cutlass_includes],
        library_dirs=toolkit_lib,
        py_limited_api=PY_LIMITED_API,
        extra_compile_args={
            "cxx": ["-O3", cxx_std, *limited_api, *sm90_flags, *after_flags],
            "nvcc": [
                # NDEBUG: CUTLASS's device asserts are calls, which make ptxas serialize wgmma.
                "-O3", cxx_std, "-DNDEBUG", "-lineinfo", f"--threads={NVCC_THREADS}", *sm90_flags,
                "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
                *(f"-Xcompiler=-idirafter,{d}" for d in pip_dirs),
            ],
        },
    )
    return extension, {"build_ext": BuildExtension}


_log(
    f"switches: SKIP_CUDA_BUILD={int(SKIP)} FORCE_CUDA={int(FORCE)} PY_LIMITED_API={int(PY_LIMITED_API)} "
    f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} MAX_JOBS={os.environ['MAX_JOBS']} "
    f"NVCC_THREADS={NVCC_THREADS}"
)
ext, cmdclass = _cuda_extension()
setup(
    ext_modules=[ext] if ext is not None else [],
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if PY_LIMITED_API and ext is not None else {},
)
