"""The CUDA extension's machine-code gate (resnet_fused/backends/cuda_sass.py), read from the
built library without a GPU: the sm_90a convolutions are CUTLASS kernels with wgmma and TMA
im2col loads, no convolution kernel touches local memory or global atomics, and every kernel's
shared memory fits an H100's 227 KB.

Skipped, with the reason, when the extension is not built, or built without 9.0a in
TORCH_CUDA_ARCH_LIST. Built with 9.0a but without the CUTLASS kernels (headers missing) fails.
"""

from __future__ import annotations

import pytest

from resnet_fused.backends import cuda_sass

pytestmark = pytest.mark.slow

H100_SHARED_BYTES = 227 * 1024  # opt-in dynamic shared memory per block on sm_90
VARIANTS = {f"{dtype} {kind}, 128x{tile_n}" for dtype in ("fp16", "bf16", "tf32")
            for kind in ("eval", "eval + residual", "train (z + tile moments)") for tile_n in (128, 64)}


@pytest.fixture(scope="module")
def report():
    if cuda_sass.extension_path() is None:
        pytest.skip("the CUDA extension resnet_fused._C is not built")
    rep = cuda_sass.inspect()
    if not any(k["arch"] == "sm_90a" for k in rep["kernels"]):
        pytest.skip("the extension was built without sm_90a (TORCH_CUDA_ARCH_LIST had no 9.0a)")
    return rep


def test_sm90a_convolutions_are_the_cutlass_kernels(report):
    got = {k["variant"] for k in report["kernels"] if k["arch"] == "sm_90a" and k["family"] == cuda_sass.CUTLASS_CONV}
    assert got == VARIANTS, "sm_90a CUTLASS kernels missing (were the CUTLASS headers found at build time?)"


def test_gate_rules_hold(report):
    """wgmma + TMA im2col in every CUTLASS kernel, not serialized (one wait per wgmma), no CALL;
    HMMA on sm_90a only in the sm80 fallback; no LDL/STL, stack or global atomics in any
    convolution kernel."""
    assert cuda_sass.check(report) == []


def test_shared_memory_fits(report):
    for k in report["kernels"]:
        if k["arch"] != "sm_90a":
            continue
        total = k.get("static_shared_bytes", 0) + k.get("dynamic_shared_bytes", 0)
        assert total <= H100_SHARED_BYTES, f"{k.get('variant', k['name'][:80])}: {total} bytes of shared memory"
        if k["family"] == cuda_sass.CUTLASS_CONV:
            assert k.get("stages", 0) >= 3, f"{k['variant']}: {k.get('stages')} pipeline stages"


def test_narrow_tiles_issue_narrow_wgmma(report):
    """The 128x64 kernels (layers with c_out <= 64, e.g. ResNet-50's layer1) issue 64x64 wgmma,
    so no half of any wgmma multiplies padding, and their smaller B tile buys pipeline stages."""
    cutlass = {k["variant"]: k for k in report["kernels"] if k["arch"] == "sm_90a"
               and k["family"] == cuda_sass.CUTLASS_CONV}
    for label, k in cutlass.items():
        shapes = set(k["HGMMA_SHAPES"])
        want = "64x64" if label.endswith("128x64") else "64x128"
        assert shapes and all(shape.startswith(want) for shape in shapes), f"{label}: HGMMA {sorted(shapes)}"
        if label.endswith("128x64"):
            wide = cutlass[label.replace("128x64", "128x128")]
            assert k["stages"] > wide["stages"], f"{label}: {k['stages']} stages, {wide['stages']} at 128x128"


def test_instruction_counting():
    """What counts as an atomic or local-memory access: mbarrier arrives (SYNCS...RED) and shared
    atomics are not global atomics; predicated instructions count."""
    sass = "\n".join([
        "        /*0100*/                   HGMMA.64x128x16.F32.BF16 gdesc[UR4], RZ, !UPT ;",
        "        /*0110*/                   UTMALDG.4D.IM2COL [UR8], [UR6], UR10 ;",
        "        /*0120*/                   UTMALDG.4D [UR8], [UR6] ;",
        "        /*0130*/                   SYNCS.ARRIVE.TRANS64.RED.A1T0 RZ, [UR7], RZ ;",
        "        /*0140*/               @P0 RED.E.ADD.F32.FTZ.RN.STRONG.GPU [R2.64], R5 ;",
        "        /*0150*/                   ATOMS.ADD RZ, [R3], R4 ;",
        "        /*0160*/              @!P1 LDL R0, [R1] ;",
        "        /*0170*/                   STL.64 [R1], R4 ;",
        "        /*0180*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;",
        "        /*0190*/                   CALL.REL.NOINC 0x9eb0 ;",
        "        /*01a0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;",
        "        /*01b0*/                   WARPGROUP.ARRIVE ;",
    ])
    assert cuda_sass.hgmma_shapes(sass) == ["64x128x16"]
    counts = cuda_sass.count_instructions(sass)
    assert counts == {"HGMMA": 1, "HGMMA_WAIT": 1, "HMMA": 1, "UTMALDG": 2, "UTMALDG_IM2COL": 1, "LDL": 1, "STL": 1,
                      "ATOMIC": 1, "CALL": 1}
