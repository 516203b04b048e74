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
// Defined in conv_sm90.cuh, instantiated once each in conv_sm90_<kind>_<dtype>_n<TileN>.cu.
template <DType D, bool Residual, int TileN>
Sm90Result conv_eval(const ConvShape& s, const void* x, const void* w, const float* scale, const float* shift,
                     const void* r, void* y, bool relu, cudaStream_t stream);
template <DType D, int TileN>
Sm90Result conv_train(const ConvShape& s, const void* x, const void* w, const float* bias, void* z,
                      float* tile_mean, float* tile_m2, int num_m_tiles, cudaStream_t stream);
template <DType D, bool Residual, int TileN>
KernelInfo conv_eval_info();
template <DType D, int TileN>
KernelInfo conv_train_info();
}  // namespace sm90

namespace {

// Launches of the sm90 kernels, so tests can tell that a call ran on them rather than on the
// sm80 kernel (resnet_fused_sm90_launches below), and shapes CUTLASS refused after our checks
// accepted them (resnet_fused_sm90_rejected; ops.cpp also warns).
std::atomic<int64_t> sm90_launches{0};
std::atomic<int64_t> sm90_rejected{0};

// Whether the current device is an sm_90 (H100/H200): sm_90a machine code runs there and
// nowhere else. Asked once per device (cached: 0 not asked, 1 yes, 2 no).
bool device_is_sm90() {
  static std::atomic<int8_t> known[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  std::atomic<int8_t>* slot = device < 64 ? &known[device] : nullptr;
  if (slot != nullptr) {
    const int8_t v = slot->load(std::memory_order_relaxed);
    if (v != 0) return v == 1;
  }
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
    return false;
  const bool sm90 = major == 9 && minor == 0;
  if (slot != nullptr) slot->store(sm90 ? 1 : 2, std::memory_order_relaxed);
  return sm90;
}

// Whether calls may take the sm90 kernels at all (off: the sm80 kernel everywhere, for
// comparisons). Read from RESNET_FUSED_CUDA_SM90 at the first call (0 switches off), not per
// call: getenv walks the environment; switched at run time through
// resnet_fused_set_sm90_enabled (backends.cuda.use_sm90). -1: not read yet.
std::atomic<int> sm90_switch{-1};

bool sm90_switched_on() {
  int v = sm90_switch.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* env = std::getenv("RESNET_FUSED_CUDA_SM90");
    int unread = -1;
    sm90_switch.compare_exchange_strong(unread, env != nullptr && env[0] == '0' ? 0 : 1);
    v = sm90_switch.load(std::memory_order_relaxed);
  }
  return v != 0;
}

Sm90Result not_eligible(const char* reason) { return {Sm90Result::kNotEligible, reason}; }

// Whether this call is for the sm90 kernels at all: built, on an sm_90 device, not switched
// off, and a shape they take (sm90_shape_reason).
const char* call_reason(DType dtype, const ConvShape& s, bool allow_tf32) {
  if (!conv_sm90_built()) return "the extension was built without sm_90a";
  if (!device_is_sm90()) return "the device is not an sm_90";
  if (!sm90_switched_on()) return "switched off (RESNET_FUSED_CUDA_SM90=0 or backends.cuda.use_sm90(False))";
  return sm90_shape_reason(dtype, s, allow_tf32);
}

Sm90Result counted(Sm90Result result) {
  if (result.outcome == Sm90Result::kLaunched) ++sm90_launches;
  if (result.outcome == Sm90Result::kRejected) ++sm90_rejected;
  return result;
}

}  // namespace

bool conv_sm90_built() {
#if defined(RESNET_FUSED_SM90A)
  return true;
#else
  return false;
#endif
}

const char* sm90_shape_reason(DType dtype, const ConvShape& s, bool allow_tf32) {
  if (dtype == DType::Float && !allow_tf32) return "exact float32 (TF32 not allowed) stays on the FFMA path";
  // TMA moves 16-byte rows: channel counts in whole 16-byte vectors.
  const int64_t align = dtype == DType::Float ? 4 : 8;
  if (s.c_in % align != 0 || s.c_out % align != 0) return "channels are not whole 16-byte vectors";
  // Each filter tap's channels must fill whole K tiles (64 elements, 32 for TF32): fewer (the
  // stem: 3 channels, padded to 8) would leave most of every wgmma multiplying zeros, so those
  // convolutions take the sm80 kernel, whose K runs over (tap, channel) without per-tap padding.
  const int64_t tile_k = dtype == DType::Float ? 32 : 64;
  if (s.c_in % tile_k != 0) return "input channels are not whole K tiles (64, or 32 for TF32)";
  if (s.k != s.k_pad) return "the weight's rows are padded";
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  const int64_t extents[] = {s.n, s.h, s.w, s.c_in, s.c_out, s.kh, s.kw, s.h_out, s.w_out, s.n * s.h_out * s.w_out};
  for (int64_t e : extents)
    if (e <= 0 || e > kMax) return "an extent is empty or does not fit int32";
  // cuTensorMapEncodeIm2col's limits for a 4-D (NHWC) tensor. CUTLASS's can_implement checks the
  // corners and filter offsets but not the traversal stride, and with NDEBUG nothing asserts
  // the encode's result: an out-of-range value would launch with a broken descriptor.
  if (s.stride_h > 8 || s.stride_w > 8) return "a stride above 8 (TMA im2col's elementStrides are 1-8)";
  // Box corners, in [-128, 127] for 2 spatial dimensions: the lower corner is -padding, the
  // upper padding - (kernel - 1) * dilation.
  const int64_t corners[] = {-s.pad_h, -s.pad_w, s.pad_h - (s.kh - 1) * s.dil_h, s.pad_w - (s.kw - 1) * s.dil_w};
  for (int64_t c : corners)
    if (c < -128 || c > 127) return "padding or the dilated kernel extent puts a TMA im2col box corner outside [-128, 127]";
  // Filter tap offsets ((kernel - 1) * dilation) in [0, 255).
  if ((s.kh - 1) * s.dil_h >= 255 || (s.kw - 1) * s.dil_w >= 255)
    return "the dilated kernel extent exceeds TMA im2col's filter offsets (255)";
  // Global strides (bytes) below 2**40 and dimensions at most 2**32: every stride of a dense
  // NHWC tensor whose extents fit int32 is at most its size in bytes.
  const int64_t bytes = dtype == DType::Float ? 4 : 2;
  if (s.h * s.w * s.c_in * bytes >= (int64_t{1} << 40)) return "an image spans 2**40 bytes (TMA stride limit)";
  return nullptr;
}

Sm90Result launch_conv_eval_sm90(DType dtype, const ConvShape& s, const void* x, const void* w, const float* scale,
                                 const float* shift, const void* r, void* y, bool relu, bool allow_tf32,
                                 cudaStream_t stream) {
  if (const char* reason = call_reason(dtype, s, allow_tf32)) return not_eligible(reason);
  if (!aligned16(x) || !aligned16(w) || !aligned16(y) || !aligned16(r) || !aligned16(scale) || !aligned16(shift))
    return not_eligible("an operand is not 16-byte aligned");
#if defined(RESNET_FUSED_SM90A)
  const bool residual = r != nullptr;
  const bool narrow = sm90_tile_n(s.c_out) == 64;
  auto run = [&](auto d) -> Sm90Result {
    constexpr DType D = decltype(d)::value;
    if (narrow)
      return residual ? sm90::conv_eval<D, true, 64>(s, x, w, scale, shift, r, y, relu, stream)
                      : sm90::conv_eval<D, false, 64>(s, x, w, scale, shift, r, y, relu, stream);
    return residual ? sm90::conv_eval<D, true, 128>(s, x, w, scale, shift, r, y, relu, stream)
                    : sm90::conv_eval<D, false, 128>(s, x, w, scale, shift, r, y, relu, stream);
  };
  switch (dtype) {
    case DType::BFloat16: return counted(run(std::integral_constant<DType, DType::BFloat16>{}));
    case DType::Half: return counted(run(std::integral_constant<DType, DType::Half>{}));
    case DType::Float: return counted(run(std::integral_constant<DType, DType::Float>{}));
  }
#else
  (void)relu;
  (void)stream;
#endif
  return not_eligible("the extension was built without sm_90a");
}

Sm90Result launch_conv_train_sm90(DType dtype, const ConvShape& s, const void* x, const void* w, const float* bias,
                                  void* z, float* partial_mean, float* partial_m2, bool allow_tf32,
                                  cudaStream_t stream) {
  if (const char* reason = call_reason(dtype, s, allow_tf32)) return not_eligible(reason);
  if (!aligned16(x) || !aligned16(w) || !aligned16(z) || !aligned16(bias))
    return not_eligible("an operand is not 16-byte aligned");
  const int64_t tiles = (s.n * s.h_out * s.w_out + kSm90TileM - 1) / kSm90TileM;
  const int num_m_tiles = static_cast<int>(tiles);
#if defined(RESNET_FUSED_SM90A)
  const bool narrow = sm90_tile_n(s.c_out) == 64;
  auto run = [&](auto d) -> Sm90Result {
    constexpr DType D = decltype(d)::value;
    return narrow ? sm90::conv_train<D, 64>(s, x, w, bias, z, partial_mean, partial_m2, num_m_tiles, stream)
                  : sm90::conv_train<D, 128>(s, x, w, bias, z, partial_mean, partial_m2, num_m_tiles, stream);
  };
  switch (dtype) {
    case DType::BFloat16: return counted(run(std::integral_constant<DType, DType::BFloat16>{}));
    case DType::Half: return counted(run(std::integral_constant<DType, DType::Half>{}));
    case DType::Float: return counted(run(std::integral_constant<DType, DType::Float>{}));
  }
#else
  (void)partial_mean;
  (void)partial_m2;
  (void)num_m_tiles;
  (void)stream;
#endif
  return not_eligible("the extension was built without sm_90a");
}

}  // namespace resnet_fused

// For the SASS gate (resnet_fused/backends/cuda_sass.py, through ctypes; no GPU needed): the
// launch resources of the sm90 kernel for dtype (0 fp16, 1 bf16, 2 tf32, as DType), kind
// (0 eval, 1 eval + residual, 2 train) and tile width (64 or 128 channels). Returns 0, or -1
// when the kernels are not built or the arguments name no kernel.
extern "C" int resnet_fused_sm90_kernel_info(int dtype, int kind, int tile_n, int* shared_bytes, int* stages,
                                             int* threads) {
#if defined(RESNET_FUSED_SM90A)
  using resnet_fused::DType;
  using resnet_fused::KernelInfo;
  namespace k = resnet_fused::sm90;
  auto pick = [&](auto d, auto n) -> KernelInfo {
    constexpr DType D = decltype(d)::value;
    constexpr int N = decltype(n)::value;
    return kind == 0 ? k::conv_eval_info<D, false, N>() : kind == 1 ? k::conv_eval_info<D, true, N>()
                                                                    : k::conv_train_info<D, N>();
  };
  auto pick_n = [&](auto d) -> KernelInfo {
    return tile_n == 64 ? pick(d, std::integral_constant<int, 64>{}) : pick(d, std::integral_constant<int, 128>{});
  };
  if (dtype < 0 || dtype > 2 || kind < 0 || kind > 2 || (tile_n != 64 && tile_n != 128)) return -1;
  const KernelInfo info = dtype == 0   ? pick_n(std::integral_constant<DType, DType::Half>{})
                          : dtype == 1 ? pick_n(std::integral_constant<DType, DType::BFloat16>{})
                                       : pick_n(std::integral_constant<DType, DType::Float>{});
  *shared_bytes = info.shared_bytes;
  *stages = info.stages;
  *threads = info.threads;
  return 0;
#else
  (void)dtype, (void)kind, (void)tile_n, (void)shared_bytes, (void)stages, (void)threads;
  return -1;
#endif
}

// The sm90 dispatch's shape rule (resnet_fused::sm90_shape_reason) for tests, on any machine:
// dims = {n, h, w, c_in, c_out, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w}, dtype as
// above. Returns why the sm90 kernels do not take the shape, or null when they do.
extern "C" const char* resnet_fused_sm90_shape_reason(int dtype, const int64_t* dims, int allow_tf32) {
  resnet_fused::ConvShape s{};
  s.n = dims[0], s.h = dims[1], s.w = dims[2], s.c_in = dims[3], s.c_out = dims[4], s.kh = dims[5], s.kw = dims[6];
  s.stride_h = dims[7], s.stride_w = dims[8], s.pad_h = dims[9], s.pad_w = dims[10], s.dil_h = dims[11],
  s.dil_w = dims[12];
  s.h_out = (s.h + 2 * s.pad_h - s.dil_h * (s.kh - 1) - 1) / s.stride_h + 1;
  s.w_out = (s.w + 2 * s.pad_w - s.dil_w * (s.kw - 1) - 1) / s.stride_w + 1;
  s.k = s.kh * s.kw * s.c_in;
  s.k_pad = (s.k + 7) / 8 * 8;
  return resnet_fused::sm90_shape_reason(static_cast<resnet_fused::DType>(dtype), s, allow_tf32 != 0);
}

// How many sm90 kernels this process launched, and how many calls CUTLASS refused after our
// checks accepted them (tests/test_backend_cuda.py reads both through ctypes).
// The switch above: read (reading the environment once if nothing set it) and set.
extern "C" int resnet_fused_sm90_enabled() { return resnet_fused::sm90_switched_on() ? 1 : 0; }
extern "C" void resnet_fused_set_sm90_enabled(int enabled) { resnet_fused::sm90_switch.store(enabled ? 1 : 0); }

extern "C" int64_t resnet_fused_sm90_launches() { return resnet_fused::sm90_launches.load(); }
extern "C" int64_t resnet_fused_sm90_rejected() { return resnet_fused::sm90_rejected.load(); }
