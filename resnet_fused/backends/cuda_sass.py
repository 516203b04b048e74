"""The CUDA extension's machine-code gate: what `resnet_fused._C` will run on each GPU
architecture, read from its SASS on a machine without a GPU.

    python -m resnet_fused.backends.cuda_sass [--json report.json]

For every kernel of every cubin in the built extension it reports registers, stack, static
shared memory and local memory (`cuobjdump --dump-resource-usage`), and counts the SASS
instructions that decide its speed (`cuobjdump --dump-sass`): wgmma (HGMMA), mma.sync
(HMMA), TMA loads (UTMALDG, im2col or tiled), local-memory traffic (LDL/STL) and global
atomics (RED/ATOM/ATOMG; mbarrier arrives such as SYNCS.ARRIVE...RED are not atomics).
`check()` states the rules tests/test_cuda_sass_gate.py asserts.

cuobjdump ships with Triton (triton/backends/nvidia/bin); a CUDA toolkit's works too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

# Kernel families, by (demangled) name.
CUTLASS_CONV = "cutlass_conv"  # csrc/sm90/: CUTLASS 3 ConvUniversal, sm_90a
WMMA_CONV = "wmma_conv"  # csrc/conv_igemm.cu: the sm80 implicit GEMM (and its exact float32 path)
ELEMENTWISE = "elementwise"  # csrc/elementwise.cu and the BatchNorm finalize

_OPCODE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_x]+)*)")


def extension_path() -> str | None:
    """The built extension's shared library, located without importing it (no CUDA needed)."""
    spec = importlib.util.find_spec("resnet_fused._C")
    return spec.origin if spec is not None and spec.origin else None


def cuobjdump() -> str:
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    path = shutil.which("cuobjdump")
    if path is None:
        raise FileNotFoundError("no cuobjdump: install triton (it ships one) or a CUDA toolkit")
    return path


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if filt is None or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def family(name: str) -> str:
    if "cutlass" in name and "ConvUniversal" in name:
        return CUTLASS_CONV
    if "conv_igemm_kernel" in name:
        return WMMA_CONV
    return ELEMENTWISE


def variant(name: str) -> str:
    """A CUTLASS conv kernel's role, from its (demangled) name: dtype, epilogue tree and tile
    (128 rows by the wgmma's N: one consumer warpgroup issues 64xN wgmma)."""
    mma = re.search(r"MMA_64x(\d+)x\d+_F32(BF16|F16|TF32)", name)
    dtype = {"BF16": "bf16", "F16": "fp16", "TF32": "tf32"}[mma.group(2)] if mma else "?"
    tile = f", 128x{mma.group(1)}" if mma else ""
    if "TileChannelMoments" in name:
        return f"{dtype} train (z + tile moments){tile}"
    if "BnApplyAct" in name:
        return f"{dtype} eval" + (" + residual" if "Sm90SrcFetch" in name else "") + tile
    return dtype + tile


def _split_by_arch(text: str, marker: str) -> list[tuple[str, str, str]]:
    """(arch, source file, section text) per cubin of a cuobjdump listing."""
    sections = []
    for block in text.split(marker)[1:]:
        arch = re.search(r"arch = (sm_\w+)", block)
        ident = re.search(r"identifier = (\S+)", block)
        sections.append((arch.group(1) if arch else "?", os.path.basename(ident.group(1)) if ident else "?", block))
    return sections


def _resource_usage(tool: str, lib: str) -> dict[tuple[str, str], dict]:
    text = subprocess.run([tool, "--dump-resource-usage", lib], capture_output=True, text=True, check=True).stdout
    usage = {}
    for arch, _source, block in _split_by_arch(text, "Fatbin elf code:"):
        for name, fields in re.findall(r"Function (\S+):\n\s+(REG:.*)", block):
            values = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", fields))
            usage[(arch, name)] = {"registers": int(values.get("REG", 0)), "stack_bytes": int(values.get("STACK", 0)),
                                   "static_shared_bytes": int(values.get("SHARED", 0)),
                                   "local_bytes": int(values.get("LOCAL", 0))}
    return usage


def count_instructions(sass: str) -> dict[str, int]:
    """Counts per kernel SASS text: tensor-core, TMA, local-memory and global-atomic instructions."""
    counts = {"HGMMA": 0, "HGMMA_WAIT": 0, "HMMA": 0, "UTMALDG": 0, "UTMALDG_IM2COL": 0, "LDL": 0, "STL": 0,
              "ATOMIC": 0, "CALL": 0}
    for line in sass.splitlines():
        m = _OPCODE.match(line)
        if m is None:
            continue
        op, mods = m.group(1), m.group(2)
        if op in ("HGMMA", "HMMA", "LDL", "STL", "CALL"):
            counts[op] += 1
        elif op == "WARPGROUP" and mods.startswith(".DEPBAR"):  # waits for issued wgmma to finish
            counts["HGMMA_WAIT"] += 1
        elif op == "UTMALDG":
            counts["UTMALDG"] += 1
            counts["UTMALDG_IM2COL"] += ".IM2COL" in mods
        elif op in ("RED", "REDG", "ATOM", "ATOMG"):  # global/generic atomics; SYNCS.* and ATOMS (shared) are not
            counts["ATOMIC"] += 1
    return counts


def hgmma_shapes(sass: str) -> list[str]:
    """The distinct wgmma shapes (MxNxK) in a kernel's SASS, e.g. ["64x128x16"]."""
    return sorted(set(re.findall(r"\bHGMMA\.(\d+x\d+x\d+)", sass)))


_KINDS = ("eval", "eval + residual", "train (z + tile moments)")
_DTYPES = ("fp16", "bf16", "tf32")  # DType's order in csrc/kernels.h
TILE_WIDTHS = (128, 64)  # output channels per tile (csrc/kernels.h sm90_tile_n: 64 where c_out <= 64)


def launch_resources(lib: str) -> tuple[dict[str, dict], str | None]:
    """Dynamic shared memory, stages and threads of each sm90 kernel, asked from the library
    (resnet_fused_sm90_kernel_info; loading it needs torch, not a GPU). The SASS holds only
    static shared memory. Returns ({variant: info}, None) or ({}, why not)."""
    import ctypes

    import torch  # noqa: F401  (the extension links against torch's libraries)

    try:
        fn = ctypes.CDLL(lib).resnet_fused_sm90_kernel_info
    except (OSError, AttributeError) as exc:
        return {}, f"cannot ask the library ({exc})"
    out = {}
    for d, dtype in enumerate(_DTYPES):
        for kind, label in enumerate(_KINDS):
            for tile_n in TILE_WIDTHS:
                smem, stages, threads = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
                if fn(d, kind, tile_n, ctypes.byref(smem), ctypes.byref(stages), ctypes.byref(threads)) != 0:
                    return {}, "the extension was built without the sm90 kernels"
                out[f"{dtype} {label}, 128x{tile_n}"] = {"dynamic_shared_bytes": smem.value, "stages": stages.value,
                                                         "threads": threads.value}
    return out, None


def inspect(lib: str | None = None) -> dict:
    """Every kernel of the extension: arch, source, family, resources and instruction counts."""
    lib = lib or extension_path()
    if lib is None:
        raise FileNotFoundError("resnet_fused._C is not built")
    tool = cuobjdump()
    usage = _resource_usage(tool, lib)
    text = subprocess.run([tool, "--dump-sass", lib], capture_output=True, text=True, check=True).stdout
    kernels = []
    for arch, source, block in _split_by_arch(text, "Fatbin elf code:"):
        for chunk in re.split(r"\n\s*Function : ", block)[1:]:
            name = chunk.split("\n", 1)[0].strip()
            kernels.append({"arch": arch, "source": source, "mangled": name, **usage.get((arch, name), {}),
                            **count_instructions(chunk), "HGMMA_SHAPES": hgmma_shapes(chunk)})
    names = _demangle([k["mangled"] for k in kernels])
    for k in kernels:
        k["name"] = names[k["mangled"]]
        k["family"] = family(k["name"])
        if k["family"] == CUTLASS_CONV:
            k["variant"] = variant(k["name"])
    resources, why_not = launch_resources(lib)
    for k in kernels:
        if k["family"] == CUTLASS_CONV and k["arch"] == "sm_90a":
            k.update(resources.get(k["variant"], {}))
    ptx = subprocess.run([tool, "--list-ptx", lib], capture_output=True, text=True).stdout
    return {"library": lib, "cuobjdump": tool, "kernels": kernels, "launch_resources_note": why_not,
            "ptx": sorted(set(re.findall(r"\.(sm_\w+)\.ptx", ptx)))}


def check(report: dict) -> list[str]:
    """The gate's rules; returns the violations (empty: the gate passes).

    - every sm_90a CUTLASS conv kernel uses wgmma (HGMMA) and TMA im2col loads (UTMALDG.IM2COL);
    - its wgmma are not serialized: fewer waits (WARPGROUP.DEPBAR) than wgmma. ptxas serializes
      them, one wait each, when a function call is in the kernel (its warning C7510; CUTLASS's
      device asserts and IEEE division are calls, hence NDEBUG and __fdividef), so the kernel
      also has no CALL;
    - on sm_90a, mma.sync (HMMA) appears only in the sm80 implicit GEMM, the fallback for
      shapes the CUTLASS kernels do not take (the 3-channel stem, unaligned channel counts);
    - no conv kernel uses local memory (LDL/STL, a nonzero stack) or global atomics.
    """
    problems = []
    for k in report["kernels"]:
        where = f"{k['arch']} {k['source']}: {k['name'][:160]}"
        if k["family"] == CUTLASS_CONV and k["arch"] == "sm_90a":
            if k["HGMMA"] == 0 or k["UTMALDG_IM2COL"] == 0:
                problems.append(f"{where}: HGMMA={k['HGMMA']} UTMALDG.IM2COL={k['UTMALDG_IM2COL']}")
            if k["HGMMA"] and k["HGMMA_WAIT"] >= k["HGMMA"]:
                problems.append(f"{where}: wgmma serialized ({k['HGMMA_WAIT']} waits for {k['HGMMA']} HGMMA)")
            if k["CALL"]:
                problems.append(f"{where}: {k['CALL']} CALL instructions (ptxas serializes wgmma around calls)")
        if k["arch"].startswith("sm_90") and k["HMMA"] and not k["HGMMA"] and k["family"] != WMMA_CONV:
            problems.append(f"{where}: mma.sync (HMMA) without wgmma outside the sm80 fallback")
        if k["family"] in (CUTLASS_CONV, WMMA_CONV):
            if k["LDL"] or k["STL"] or k.get("stack_bytes", 0):
                problems.append(f"{where}: local memory (LDL={k['LDL']} STL={k['STL']} stack={k.get('stack_bytes')})")
            if k["ATOMIC"]:
                problems.append(f"{where}: {k['ATOMIC']} global atomics")
    return problems


def summary(report: dict) -> str:
    rows = ["arch     family        regs  stack  smem(static/dynamic) stages  HGMMA(waits)  HMMA  UTMALDG(im2col)  "
            "LDL/STL  atomics  kernel"]
    for k in sorted(report["kernels"], key=lambda k: (k["arch"], k["family"], k["name"])):
        if k["family"] == ELEMENTWISE:
            continue
        short = k.get("variant") or re.sub(r"\s+", " ", k["name"])
        short = short if len(short) < 90 else short[:87] + "..."
        smem = f"{k.get('static_shared_bytes', '?')}/{k.get('dynamic_shared_bytes', '-')}"
        rows.append(f"{k['arch']:<8} {k['family']:<12} {k.get('registers', '?'):>5} {k.get('stack_bytes', '?'):>6} "
                     f"{smem:>20} {k.get('stages', '-'):>6} {k['HGMMA']:>6}({k['HGMMA_WAIT']:>3}) {k['HMMA']:>5} "
                     f"{k['UTMALDG']:>7}({k['UTMALDG_IM2COL']}) {k['LDL'] + k['STL']:>10} {k['ATOMIC']:>8}  {short}")
    counts = {}
    for k in report["kernels"]:
        counts[(k["arch"], k["family"])] = counts.get((k["arch"], k["family"]), 0) + 1
    rows.append("kernels: " + ", ".join(f"{a}/{f}: {n}" for (a, f), n in sorted(counts.items())))
    rows.append(f"PTX embedded for: {', '.join(report['ptx']) or 'none'}")
    if report.get("launch_resources_note"):
        rows.append(f"dynamic shared memory not read: {report['launch_resources_note']}")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--library", help="the extension's .so (default: the installed resnet_fused._C)")
    parser.add_argument("--json", help="write the full report here")
    args = parser.parse_args(argv)
    report = inspect(args.library)
    report["violations"] = check(report)
    print(summary(report))
    for problem in report["violations"]:
        print("VIOLATION:", problem)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if report["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
