// Dispatch to the sm90 CUTLASS kernels (one per translation unit beside this file). This file
// includes no CUTLASS header, so it compiles in seconds.
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>

#include <cuda_runtime_api.h>

#include "kernels.h"

namespace resnet_fused {
namespace sm90 {
// Defined in conv_sm90.cuh, instantiated once each in conv_sm90_{eval,eval_residual,train}_<dtype>.cu.
// Return a cutlass::Status as int: 0 when the kernel was launched.
template <DType D, bool Residual>
int conv_eval(const ConvShape& s, const void* x, const void* w, const float* scale, const float* shift, const void* r,
              void* y, bool relu, cudaStream_t stream);
template <DType D>
int conv_train(const ConvShape& s, const void* x, const void* w, const float* bias, void* z, float* tile_mean,
               float* tile_m2, int num_m_tiles, cudaStream_t stream);
template <DType D, bool Residual>
KernelInfo conv_eval_info();
template <DType D>
KernelInfo conv_train_info();
}  // namespace sm90

namespace {

// Launches of the sm90 kernels, so tests can tell that a call ran on them rather than on the
// sm80 kernel (resnet_fused_sm90_launches below).
std::atomic<int64_t> sm90_launches{0};

// The current device is an sm_90 (H100/H200): sm_90a machine code runs there and nowhere else.
bool device_is_sm90() {
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) return false;
  return major == 9 && minor == 0;
}

// What the kernels need before CUTLASS's own can_implement: 16-byte aligned channel rows for
// TMA, whole K tiles per filter tap, extents that fit int32.
bool eligible(DType dtype, const ConvShape& s, bool allow_tf32) {
  if (!conv_sm90_built() || !device_is_sm90()) return false;
  // RESNET_FUSED_CUDA_SM90=0: the sm80 kernel everywhere (for comparisons; read per call so
  // that tests and benchmarks can switch it).
  const char* env = std::getenv("RESNET_FUSED_CUDA_SM90");
  if (env != nullptr && env[0] == '0') return false;
  if (dtype == DType::Float && !allow_tf32) return false;  // exact float32 stays on the FFMA path
  const int64_t align = dtype == DType::Float ? 4 : 8;
  if (s.c_in % align != 0 || s.c_out % align != 0) return false;
  // Each filter tap's channels must fill whole K tiles (64 elements, 32 for TF32): fewer (the
  // stem: 3 channels, padded to 8) would leave most of every wgmma multiplying zeros, so those
  // convolutions take the sm80 kernel, whose K runs over (tap, channel) without per-tap padding.
  const int64_t tile_k = dtype == DType::Float ? 32 : 64;
  if (s.c_in % tile_k != 0) return false;
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  const int64_t extents[] = {s.n, s.h, s.w, s.c_in, s.c_out, s.kh, s.kw, s.h_out, s.w_out, s.n * s.h_out * s.w_out};
  for (int64_t e : extents)
    if (e <= 0 || e > kMax) return false;
  return s.k == s.k_pad;
}

}  // namespace

bool conv_sm90_built() {
#if defined(RESNET_FUSED_SM90A)
  return true;
#else
  return false;
#endif
}

bool launch_conv_eval_sm90(DType dtype, const ConvShape& s, const void* x, const void* w, const float* scale,
                           const float* shift, const void* r, void* y, bool relu, bool allow_tf32,
                           cudaStream_t stream) {
  if (!eligible(dtype, s, allow_tf32)) return false;
  if (!aligned16(x) || !aligned16(w) || !aligned16(y) || !aligned16(r) || !aligned16(scale) || !aligned16(shift))
    return false;
  int status = -1;
#if defined(RESNET_FUSED_SM90A)
  const bool residual = r != nullptr;
  switch (dtype) {
    case DType::BFloat16:
      status = residual ? sm90::conv_eval<DType::BFloat16, true>(s, x, w, scale, shift, r, y, relu, stream)
                        : sm90::conv_eval<DType::BFloat16, false>(s, x, w, scale, shift, r, y, relu, stream);
      break;
    case DType::Half:
      status = residual ? sm90::conv_eval<DType::Half, true>(s, x, w, scale, shift, r, y, relu, stream)
                        : sm90::conv_eval<DType::Half, false>(s, x, w, scale, shift, r, y, relu, stream);
      break;
    case DType::Float:
      status = residual ? sm90::conv_eval<DType::Float, true>(s, x, w, scale, shift, r, y, relu, stream)
                        : sm90::conv_eval<DType::Float, false>(s, x, w, scale, shift, r, y, relu, stream);
      break;
  }
#else
  (void)relu;
  (void)stream;
#endif
  if (status == 0) ++sm90_launches;
  return status == 0;
}

bool launch_conv_train_sm90(DType dtype, const ConvShape& s, const void* x, const void* w, const float* bias, void* z,
                            float* partial_mean, float* partial_m2, bool allow_tf32, cudaStream_t stream) {
  if (!eligible(dtype, s, allow_tf32)) return false;
  if (!aligned16(x) || !aligned16(w) || !aligned16(z) || !aligned16(bias)) return false;
  const int64_t tiles = (s.n * s.h_out * s.w_out + kSm90TileM - 1) / kSm90TileM;
  const int num_m_tiles = static_cast<int>(tiles);
  int status = -1;
#if defined(RESNET_FUSED_SM90A)
  switch (dtype) {
    case DType::BFloat16:
      status = sm90::conv_train<DType::BFloat16>(s, x, w, bias, z, partial_mean, partial_m2, num_m_tiles, stream);
      break;
    case DType::Half:
      status = sm90::conv_train<DType::Half>(s, x, w, bias, z, partial_mean, partial_m2, num_m_tiles, stream);
      break;
    case DType::Float:
      status = sm90::conv_train<DType::Float>(s, x, w, bias, z, partial_mean, partial_m2, num_m_tiles, stream);
      break;
  }
#else
  (void)partial_mean;
  (void)partial_m2;
  (void)num_m_tiles;
  (void)stream;
#endif
  if (status == 0) ++sm90_launches;
  return status == 0;
}

}  // namespace resnet_fused

// For the SASS gate (resnet_fused/backends/cuda_sass.py, through ctypes; no GPU needed): the
// launch resources of the sm90 kernel for dtype (0 fp16, 1 bf16, 2 tf32, as DType) and kind
// (0 eval, 1 eval + residual, 2 train). Returns 0, or -1 when the kernels are not built.
extern "C" int resnet_fused_sm90_kernel_info(int dtype, int kind, int* shared_bytes, int* stages, int* threads) {
#if defined(RESNET_FUSED_SM90A)
  using resnet_fused::DType;
  using resnet_fused::KernelInfo;
  namespace k = resnet_fused::sm90;
  auto pick = [&](auto d) -> KernelInfo {
    constexpr DType D = decltype(d)::value;
    return kind == 0 ? k::conv_eval_info<D, false>() : kind == 1 ? k::conv_eval_info<D, true>() : k::conv_train_info<D>();
  };
  if (dtype < 0 || dtype > 2 || kind < 0 || kind > 2) return -1;
  const KernelInfo info = dtype == 0   ? pick(std::integral_constant<DType, DType::Half>{})
                          : dtype == 1 ? pick(std::integral_constant<DType, DType::BFloat16>{})
                                       : pick(std::integral_constant<DType, DType::Float>{});
  *shared_bytes = info.shared_bytes;
  *stages = info.stages;
  *threads = info.threads;
  return 0;
#else
  (void)dtype, (void)kind, (void)shared_bytes, (void)stages, (void)threads;
  return -1;
#endif
}

// How many sm90 kernels this process launched (tests/test_backend_cuda.py reads it through ctypes).
extern "C" int64_t resnet_fused_sm90_launches() { return resnet_fused::sm90_launches.load(); }
