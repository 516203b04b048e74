#!/usr/bin/env bash
# Build-time probe: compile scripts/cutlass_probe/conv_fprop_bn_relu.cu (CUTLASS 2.x conv fprop with
# fused BN epilogues, headers from the PyPI wheel nvidia-cutlass==4.2.0.0) and, for comparison, our own
# csrc/conv_igemm.cu, with the nvcc command line that setup.py / torch's CUDAExtension produce.
# Compile only; no GPU needed. Prints everything to stdout:
#   bash scripts/cutlass_probe/build_probe.sh 2>&1 | tee scripts/cutlass_probe/build_times.log
#
# Environment:
#   PYTHON           python with torch (default /work/venv/bin/python, else python3)
#   CUTLASS_WHEEL    the wheel (default /tmp/cutlass/nvidia_cutlass-4.2.0.0-py3-none-any.whl;
#                    fetched with `pip download nvidia-cutlass==4.2.0.0 --no-deps` when missing)
#   CUTLASS_DIR      where it is unzipped (default /tmp/cutlass_pkg); headers: $CUTLASS_DIR/cutlass_library/source/include
#   OUT_DIR          objects (default /tmp/cutlass_probe_build)
#   REPEAT           repetitions of the main (sm_80 + sm_90) compiles (default 2)
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-/work/venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
CUTLASS_VERSION=4.2.0.0
CUTLASS_WHEEL="${CUTLASS_WHEEL:-/tmp/cutlass/nvidia_cutlass-${CUTLASS_VERSION}-py3-none-any.whl}"
CUTLASS_DIR="${CUTLASS_DIR:-/tmp/cutlass_pkg}"
CUTLASS_INC="$CUTLASS_DIR/cutlass_library/source/include"
OUT_DIR="${OUT_DIR:-/tmp/cutlass_probe_build}"
REPEAT="${REPEAT:-2}"
NVCC="${NVCC:-nvcc}"
mkdir -p "$OUT_DIR"

echo "=== environment ==="
date -u +"date: %Y-%m-%dT%H:%M:%SZ"
echo "host: $(uname -srm)"
echo "nproc: $(nproc)"
echo "uptime: $(uptime)"
grep -m1 "model name" /proc/cpuinfo
free -g | head -2
echo "nvcc: $(command -v "$NVCC")"
"$NVCC" --version | tail -2
g++ --version | head -1

if [ ! -f "$CUTLASS_INC/cutlass/cutlass.h" ]; then
  if [ ! -f "$CUTLASS_WHEEL" ]; then
    "$PYTHON" -m pip download "nvidia-cutlass==$CUTLASS_VERSION" --no-deps -d "$(dirname "$CUTLASS_WHEEL")"
  fi
  mkdir -p "$CUTLASS_DIR"
  (cd "$CUTLASS_DIR" && unzip -q -o "$CUTLASS_WHEEL")
fi
echo
echo "=== CUTLASS headers ==="
echo "wheel: $CUTLASS_WHEEL ($(stat -c %s "$CUTLASS_WHEEL") bytes, sha256 $(sha256sum "$CUTLASS_WHEEL" | cut -d' ' -f1))"
echo "include dir: $CUTLASS_INC"
grep -E "define CUTLASS_(MAJOR|MINOR|PATCH) " "$CUTLASS_INC/cutlass/version.h"
echo "include/ size: $(du -sh "$CUTLASS_INC" | cut -f1), files: $(find "$CUTLASS_INC" -type f | wc -l)" \
     "(cutlass/: $(du -sh "$CUTLASS_INC/cutlass" | cut -f1), cute/: $(du -sh "$CUTLASS_INC/cute" | cut -f1))"

# The nvcc flags of setup.py + torch.utils.cpp_extension.CUDAExtension/BuildExtension for a .cu file,
# minus the -gencode and --threads flags, which this script varies.
FLAGS_FILE="$OUT_DIR/flags.txt"
"$PYTHON" - "$ROOT" > "$FLAGS_FILE" <<'PY'
import glob, os, subprocess, sys
root = sys.argv[1]
import torch
from torch.utils import cpp_extension as ce
# setup.py: _nvidia_pip_include_dirs()
pip_dirs = []
for entry in sys.path:
    nvidia = os.path.join(entry, "nvidia")
    if os.path.isdir(nvidia):
        pip_dirs += sorted(glob.glob(os.path.join(nvidia, "cu*", "include")))
        pip_dirs += sorted(glob.glob(os.path.join(nvidia, "*", "include")))
pip_dirs = [d for d in dict.fromkeys(pip_dirs) if os.path.isdir(d)]
# setup.py: the toolkit's include dir when CUDA_HOME has no cuda_runtime.h
toolkit_include = []
if not os.path.isfile(os.path.join(ce.CUDA_HOME, "include", "cuda_runtime.h")):
    out = subprocess.run([os.path.join(ce.CUDA_HOME, "bin", "nvcc"), "--dryrun", "-c", "-x", "cu", os.devnull, "-o",
                          os.devnull], capture_output=True, text=True)
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            toolkit_include = [os.path.join(os.path.realpath(line.split("=", 1)[1].strip()), "include")]
            break
cxx_std = "-std=c++20" if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 10) else "-std=c++17"
includes = [os.path.join(root, "csrc"), *toolkit_include, *ce.include_paths("cuda")]
flags = [f"-I{d}" for d in includes]
flags += ce.COMMON_NVCC_FLAGS + ["--compiler-options", "-fPIC"]
flags += ["-O3", cxx_std, "-lineinfo", "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
          "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
flags += [f"-Xcompiler=-idirafter,{d}" for d in pip_dirs]
flags += ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
          f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
print(f"# torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={ce.CUDA_HOME}", file=sys.stderr)
print("\n".join(flags))
PY
mapfile -t BASE_FLAGS < "$FLAGS_FILE"
echo
echo "=== nvcc flags (setup.py + CUDAExtension; -gencode/--threads vary below) ==="
printf '  %s\n' "${BASE_FLAGS[@]}"
echo "setup.py on this machine would use: MAX_JOBS=$("$PYTHON" -c 'import os;c=os.cpu_count() or 1;m=os.sysconf("SC_PAGE_SIZE")*os.sysconf("SC_PHYS_PAGES")/2**30;print(max(1,min(c,int(m//3))))')" \
     "(NVCC_THREADS = cores // MAX_JOBS)"

GEN80=(-gencode arch=compute_80,code=sm_80)
GEN90=(-gencode arch=compute_90,code=sm_90)
PROBE="$HERE/conv_fprop_bn_relu.cu"
OURS="$ROOT/csrc/conv_igemm.cu"

# compile LABEL OUTPUT SOURCE [extra nvcc flags...]: timed with /usr/bin/time, one result line.
compile() {
  local label="$1" obj="$2" src="$3"; shift 3
  rm -f "$obj"
  echo
  echo "--- $label"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "+ $NVCC <flags above${STD_OVERRIDE:+, with $STD_OVERRIDE}> $* -c $src -o $obj"
  local t0 t1 rc
  t0=$(date +%s.%N)
  local flags=("${BASE_FLAGS[@]}")
  if [ -n "${STD_OVERRIDE:-}" ]; then flags=("${flags[@]/#-std=c++*/$STD_OVERRIDE}"); fi
  /usr/bin/time -f "time: %e s wall, %U s user, %S s sys, max RSS %M KiB" \
    "$NVCC" "${flags[@]}" "$@" -c "$src" -o "$obj" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  if [ $rc -eq 0 ]; then
    printf 'RESULT %-48s rc=0 wall=%6.1f s  object=%s bytes\n' "$label" "$(echo "$t1 - $t0" | bc)" "$(stat -c %s "$obj")"
  else
    printf 'RESULT %-48s rc=%d wall=%6.1f s  (FAILED)\n' "$label" "$rc" "$(echo "$t1 - $t0" | bc)"
  fi
}

echo
echo "=== per architecture (one -gencode each) ==="
compile "cutlass probe, sm_80" "$OUT_DIR/probe_sm80.o" "$PROBE" "-I$CUTLASS_INC" "${GEN80[@]}"
compile "cutlass probe, sm_90" "$OUT_DIR/probe_sm90.o" "$PROBE" "-I$CUTLASS_INC" "${GEN90[@]}"
compile "conv_igemm.cu, sm_80" "$OUT_DIR/ours_sm80.o" "$OURS" "${GEN80[@]}"
compile "conv_igemm.cu, sm_90" "$OUT_DIR/ours_sm90.o" "$OURS" "${GEN90[@]}"

echo
echo "=== both architectures, as setup.py builds them (TORCH_CUDA_ARCH_LIST=8.0;9.0) ==="
for i in $(seq 1 "$REPEAT"); do
  compile "cutlass probe, sm_80+sm_90, --threads=2 (#$i)" "$OUT_DIR/probe_both_t2.o" "$PROBE" "-I$CUTLASS_INC" "${GEN80[@]}" "${GEN90[@]}" --threads=2
  compile "conv_igemm.cu, sm_80+sm_90, --threads=2 (#$i)" "$OUT_DIR/ours_both_t2.o" "$OURS" "${GEN80[@]}" "${GEN90[@]}" --threads=2
done
compile "cutlass probe, sm_80+sm_90, --threads=1" "$OUT_DIR/probe_both_t1.o" "$PROBE" "-I$CUTLASS_INC" "${GEN80[@]}" "${GEN90[@]}" --threads=1
compile "conv_igemm.cu, sm_80+sm_90, --threads=1" "$OUT_DIR/ours_both_t1.o" "$OURS" "${GEN80[@]}" "${GEN90[@]}" --threads=1

echo
echo "=== cost of each CUTLASS instantiation alone (sm_80+sm_90, --threads=2; NONE = headers, no kernel) ==="
for v in NONE EVAL_FOLDED EVAL_EXACT TRAIN_SUM FUSION_FP16; do
  compile "cutlass probe, only $v" "$OUT_DIR/probe_$v.o" "$PROBE" "-I$CUTLASS_INC" "${GEN80[@]}" "${GEN90[@]}" --threads=2 "-DPROBE_ONLY_$v"
done

echo
echo "=== the probe with -std=c++17 instead of setup.py's standard (sm_80+sm_90, --threads=2) ==="
STD_OVERRIDE=-std=c++17 compile "cutlass probe, -std=c++17" "$OUT_DIR/probe_cxx17.o" "$PROBE" "-I$CUTLASS_INC" "${GEN80[@]}" "${GEN90[@]}" --threads=2

echo
echo "=== kernel resources (ptxas -v, sm_80; not timed against the above) ==="
for v in EVAL_FOLDED EVAL_EXACT TRAIN_SUM FUSION_FP16; do
  echo "--- $v"
  "$NVCC" "${BASE_FLAGS[@]}" "${GEN80[@]}" "-DPROBE_ONLY_$v" -I"$CUTLASS_INC" -Xptxas -v -c "$PROBE" -o "$OUT_DIR/ptxas_$v.o" 2>&1 \
    | grep -E "registers|spill" | grep -v "^ptxas info    : Function properties for _Z.*cudaAddressOf" | sed 's/^ptxas info    : //'
done
echo "--- conv_igemm.cu (all its kernels)"
"$NVCC" "${BASE_FLAGS[@]}" "${GEN80[@]}" -Xptxas -v -c "$OURS" -o "$OUT_DIR/ptxas_ours.o" > "$OUT_DIR/ptxas_ours.txt" 2>&1
echo "kernels in conv_igemm.cu (sm_80): $(grep -c "Compiling entry function" "$OUT_DIR/ptxas_ours.txt")"
grep -E "registers|spill" "$OUT_DIR/ptxas_ours.txt" | sed 's/^ptxas info    : //' | sort | uniq -c | sort -rn

echo
echo "=== end: $(date -u +%H:%M:%SZ), load $(cut -d' ' -f1-3 /proc/loadavg) ==="
