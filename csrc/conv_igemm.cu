// Implicit-GEMM convolution, NHWC, on tensor cores (WMMA), with fused BatchNorm epilogues.
//
// GEMM view:  M = n * h_out * w_out (output pixels, NHWC rows), N = c_out, K = kh * kw * c_in
//   A[m][k] = x[n][ho*sh - ph + r*dh][wo*sw - pw + s*dw][ci]   with k = (r * kw + s) * c_in + ci
//   B[k][co] = w[co][r][s][ci]                                 (OHWI weight, rows zero-padded to k_pad)
// Tiles: 64 (M) x 64 (N) x 32 (K) per block of 4 warps (2 x 2, 32 x 32 each = 2 x 2 WMMA tiles).
// Operands: float16 / bfloat16 (m16n16k16) or float32 as TF32 (m16n16k8), float32 accumulate;
// float32 with TF32 disallowed runs an exact FFMA path over the same shared-memory tiles
// (each thread an 8 x 4 block of the 64 x 64 tile).
// Pipeline: cp.async (16-byte, zero-filling out-of-bounds/padding) into a 3-stage (16-bit types)
// or 2-stage (float32) shared-memory ring. x must be 16-byte aligned with c_in a multiple of the
// 16-byte vector: the launcher pads the 3-channel stem with zero channels (the element-wise
// gather with scalar loads it replaced was the only kernel variant with a stack frame).
// Epilogues (fp32 accumulators staged through shared memory):
//   eval : y = act(acc * scale[c] + shift[c] [+ residual])
//   train: z = acc [+ bias[c]] rounded to the activation dtype; per-(M tile, channel) mean and M2
//          of the rounded z (two passes over the tile in shared memory), merged later by
//          launch_bn_finalize in tile order with Chan's formula (deterministic).

#include <mma.h>

#include "common.cuh"

namespace resnet_fused {
namespace {

using namespace nvcuda;

constexpr int BM = kConvTileM;
constexpr int BN = kConvTileN;
constexpr int BK = 32;
constexpr int kWarpsM = 2, kWarpsN = 2;
constexpr int kThreads = 32 * kWarpsM * kWarpsN;
constexpr int kWarpTileM = BM / kWarpsM, kWarpTileN = BN / kWarpsN;
constexpr int kFragsM = kWarpTileM / 16, kFragsN = kWarpTileN / 16;
constexpr int LDC = BN + 4;  // epilogue staging row stride (floats)

template <typename T>
struct MmaTraits;
template <>
struct MmaTraits<__half> {
  using Frag = __half;
  static constexpr int kK = 16;
};
template <>
struct MmaTraits<__nv_bfloat16> {
  using Frag = __nv_bfloat16;
  static constexpr int kK = 16;
};
template <>
struct MmaTraits<float> {
  using Frag = wmma::precision::tf32;
  static constexpr int kK = 8;
};

template <typename T>
struct TileConfig {
  static constexpr int kVec = 16 / sizeof(T);        // elements per 16-byte chunk
  static constexpr int kStages = sizeof(T) == 2 ? 3 : 2;
  static constexpr int kLds = BK + kVec;              // smem row stride (elements), padded vs bank conflicts
  static constexpr int kStageA = BM * kLds;           // elements
  static constexpr int kStageB = BN * kLds;
  static constexpr int kPipeBytes = kStages * (kStageA + kStageB) * sizeof(T);
  static constexpr int kEpiBytes = BM * LDC * sizeof(float);
  static constexpr int kSmemBytes = kPipeBytes > kEpiBytes ? kPipeBytes : kEpiBytes;
  static constexpr int kChunksPerRow = BK / kVec;
  static constexpr int kChunksPerThread = BM * kChunksPerRow / kThreads;  // same for A and B (BM == BN)
  static constexpr int kRowStep = kThreads / kChunksPerRow;
};
static_assert(BM == BN, "loaders assume square tiles");

__device__ __forceinline__ void cp_async16(void* smem_ptr, const void* gmem_ptr, bool pred) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned int s = static_cast<unsigned int>(__cvta_generic_to_shared(smem_ptr));
  const int src_size = pred ? 16 : 0;  // 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem_ptr), "r"(src_size));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

enum class Epilogue { Eval, Train };

struct EpilogueArgs {
  const float* scale;     // eval
  const float* shift;     // eval
  const void* residual;   // eval, may be null
  bool relu;              // eval
  const float* bias;      // train, may be null
  float* partial_mean;    // train [c_out][num_m_tiles]
  float* partial_m2;      // train
  int64_t num_m_tiles;    // train
};

// c_in % kVec == 0 and x 16-byte aligned (conv_igemm_supported), so every 16-byte chunk of an
// A row lies in one (r, s) filter tap and can be copied with cp.async.
// EXACT (float32 only): FFMA instead of TF32 tensor cores.
template <typename T, Epilogue EPI, bool EXACT>
__global__ void __launch_bounds__(kThreads)
    conv_igemm_kernel(const ConvShape s, const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ out,
                      const EpilogueArgs ep) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Cfg = TileConfig<T>;
  using Frag = typename MmaTraits<T>::Frag;
  constexpr int MK = MmaTraits<T>::kK;
  constexpr int VA = Cfg::kVec;

  __shared__ __align__(128) unsigned char smem_raw[Cfg::kSmemBytes];
  T* smem_a = reinterpret_cast<T*>(smem_raw);
  T* smem_b = smem_a + Cfg::kStages * Cfg::kStageA;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
  const int64_t M = s.n * s.h_out * s.w_out;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t hw_out = s.h_out * s.w_out;
  const int num_k_tiles = static_cast<int>((s.k_pad + BK - 1) / BK);

  // Per-thread chunk assignment: chunk id = tid + i * kThreads -> row id / kChunksPerRow,
  // column (tid % kChunksPerRow) * kVec, the same column for all i.
  const int chunk_col = (tid % Cfg::kChunksPerRow) * VA;
  const int chunk_row0 = tid / Cfg::kChunksPerRow;

  // A rows owned by this thread: image base offset and top-left input pixel.
  int64_t a_base[Cfg::kChunksPerThread];
  int a_h[Cfg::kChunksPerThread], a_w[Cfg::kChunksPerThread];
  bool a_valid[Cfg::kChunksPerThread];
#pragma unroll
  for (int i = 0; i < Cfg::kChunksPerThread; ++i) {
    const int64_t m = m0 + chunk_row0 + i * Cfg::kRowStep;
    a_valid[i] = m < M;
    const int64_t mm = a_valid[i] ? m : 0;
    const int64_t img = mm / hw_out;
    const int64_t rem = mm - img * hw_out;
    const int64_t ho = rem / s.w_out, wo = rem - (rem / s.w_out) * s.w_out;
    a_base[i] = img * s.h * s.w * s.c_in;
    a_h[i] = static_cast<int>(ho * s.stride_h - s.pad_h);
    a_w[i] = static_cast<int>(wo * s.stride_w - s.pad_w);
  }

  auto load_tile = [&](int stage, int kt) {
    T* sa = smem_a + stage * Cfg::kStageA;
    T* sb = smem_b + stage * Cfg::kStageB;
    const int64_t k0 = static_cast<int64_t>(kt) * BK;
    // B: weight rows n0.., columns k0.. (rows padded with zeros up to k_pad).
    {
      const int64_t k = k0 + chunk_col;
#pragma unroll
      for (int i = 0; i < Cfg::kChunksPerThread; ++i) {
        const int row = chunk_row0 + i * Cfg::kRowStep;
        const int64_t co = n0 + row;
        const bool pred = co < s.c_out && k < s.k_pad;
        const T* src = pred ? w + co * s.k_pad + k : w;
        cp_async16(sb + row * Cfg::kLds + chunk_col, src, pred);
      }
    }
    const int64_t k = k0 + chunk_col;
    const bool k_ok = k < s.k;
    const int64_t kk = k_ok ? k : 0;
    const int64_t tap = kk / s.c_in;
    const int64_t ci = kk - tap * s.c_in;
    const int r = static_cast<int>(tap / s.kw), q = static_cast<int>(tap - (tap / s.kw) * s.kw);
    const int dh = r * static_cast<int>(s.dil_h), dw = q * static_cast<int>(s.dil_w);
#pragma unroll
    for (int i = 0; i < Cfg::kChunksPerThread; ++i) {
      const int row = chunk_row0 + i * Cfg::kRowStep;
      const int hi = a_h[i] + dh, wi = a_w[i] + dw;
      const bool pred = k_ok && a_valid[i] && hi >= 0 && hi < s.h && wi >= 0 && wi < s.w;
      const T* src = pred ? x + a_base[i] + (static_cast<int64_t>(hi) * s.w + wi) * s.c_in + ci : x;
      cp_async16(sa + row * Cfg::kLds + chunk_col, src, pred);
    }
  };

  static_assert(!EXACT || sizeof(T) == 4, "the exact path is for float32");
  wmma::fragment<wmma::accumulator, 16, 16, MK, float> acc[kFragsM][kFragsN];
  // Exact path: thread (ty, tx) = (tid / 16, tid % 16) owns rows ty + 8 i, columns tx + 16 j.
  constexpr int kExactRows = EXACT ? BM / 8 : 1, kExactCols = EXACT ? BN / 16 : 1;
  float acc_exact[kExactRows][kExactCols];
  if constexpr (EXACT) {
#pragma unroll
    for (int i = 0; i < kExactRows; ++i)
#pragma unroll
      for (int j = 0; j < kExactCols; ++j) acc_exact[i][j] = 0.f;
  } else {
#pragma unroll
    for (int i = 0; i < kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }

  // Prologue: stages 0 .. kStages-2 in flight.
#pragma unroll
  for (int st = 0; st < Cfg::kStages - 1; ++st) {
    if (st < num_k_tiles) load_tile(st, st);
    cp_async_commit();
  }

  for (int kt = 0; kt < num_k_tiles; ++kt) {
    cp_async_wait<Cfg::kStages - 2>();
    __syncthreads();  // tile kt is in shared memory; every warp is done with tile kt-1's stage
    const int next = kt + Cfg::kStages - 1;
    if (next < num_k_tiles) load_tile(next % Cfg::kStages, next);
    cp_async_commit();  // possibly empty group: keeps the wait_group count uniform

    const T* sa = smem_a + (kt % Cfg::kStages) * Cfg::kStageA;
    const T* sb = smem_b + (kt % Cfg::kStages) * Cfg::kStageB;
    if constexpr (EXACT) {
      const int ty = tid / 16, tx = tid % 16;
#pragma unroll 4
      for (int kk = 0; kk < BK; ++kk) {
        float a[kExactRows], b[kExactCols];
#pragma unroll
        for (int i = 0; i < kExactRows; ++i) a[i] = to_float(sa[(ty + 8 * i) * Cfg::kLds + kk]);
#pragma unroll
        for (int j = 0; j < kExactCols; ++j) b[j] = to_float(sb[(tx + 16 * j) * Cfg::kLds + kk]);
#pragma unroll
        for (int i = 0; i < kExactRows; ++i)
#pragma unroll
          for (int j = 0; j < kExactCols; ++j) acc_exact[i][j] = fmaf(a[i], b[j], acc_exact[i][j]);
      }
    } else {
#pragma unroll
      for (int kk = 0; kk < BK; kk += MK) {
        wmma::fragment<wmma::matrix_a, 16, 16, MK, Frag, wmma::row_major> fa[kFragsM];
        wmma::fragment<wmma::matrix_b, 16, 16, MK, Frag, wmma::col_major> fb[kFragsN];
#pragma unroll
        for (int i = 0; i < kFragsM; ++i) {
          wmma::load_matrix_sync(fa[i], sa + (warp_m * kWarpTileM + i * 16) * Cfg::kLds + kk, Cfg::kLds);
          if constexpr (sizeof(T) == 4)
#pragma unroll
            for (int t = 0; t < fa[i].num_elements; ++t) fa[i].x[t] = wmma::__float_to_tf32(fa[i].x[t]);
        }
#pragma unroll
        for (int j = 0; j < kFragsN; ++j) {
          wmma::load_matrix_sync(fb[j], sb + (warp_n * kWarpTileN + j * 16) * Cfg::kLds + kk, Cfg::kLds);
          if constexpr (sizeof(T) == 4)
#pragma unroll
            for (int t = 0; t < fb[j].num_elements; ++t) fb[j].x[t] = wmma::__float_to_tf32(fb[j].x[t]);
        }
#pragma unroll
        for (int i = 0; i < kFragsM; ++i)
#pragma unroll
          for (int j = 0; j < kFragsN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers are reused for the epilogue staging below

  float* smem_c = reinterpret_cast<float*>(smem_raw);
  if constexpr (EXACT) {
    const int ty = tid / 16, tx = tid % 16;
#pragma unroll
    for (int i = 0; i < kExactRows; ++i)
#pragma unroll
      for (int j = 0; j < kExactCols; ++j) smem_c[(ty + 8 * i) * LDC + tx + 16 * j] = acc_exact[i][j];
  } else {
#pragma unroll
    for (int i = 0; i < kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < kFragsN; ++j)
        wmma::store_matrix_sync(smem_c + (warp_m * kWarpTileM + i * 16) * LDC + warp_n * kWarpTileN + j * 16,
                                acc[i][j], LDC, wmma::mem_row_major);
  }
  __syncthreads();

  const int64_t rows_valid = (M - m0) < BM ? (M - m0) : BM;
  // Consecutive threads take consecutive channels of one row: coalesced NHWC stores.
  for (int e = tid; e < BM * BN; e += kThreads) {
    const int row = e / BN, col = e % BN;
    const int64_t co = n0 + col;
    if (row >= rows_valid || co >= s.c_out) continue;
    const int64_t off = (m0 + row) * s.c_out + co;
    float v = smem_c[row * LDC + col];
    if constexpr (EPI == Epilogue::Eval) {
      v = fmaf(v, __ldg(ep.scale + co), __ldg(ep.shift + co));
      if (ep.residual != nullptr) v += to_float(static_cast<const T*>(ep.residual)[off]);
      if (ep.relu) v = v <= 0.f ? 0.f : v;  // NaN stays NaN, as torch.relu
      out[off] = from_float<T>(v);
    } else {
      if (ep.bias != nullptr) v += __ldg(ep.bias + co);
      const T zt = from_float<T>(v);
      out[off] = zt;
      smem_c[row * LDC + col] = to_float(zt);  // statistics of the stored (rounded) z
    }
  }
  if constexpr (EPI == Epilogue::Train) {
    __syncthreads();
    if (tid < BN && n0 + tid < s.c_out) {
      const int col = tid;
      float sum = 0.f;
      for (int row = 0; row < rows_valid; ++row) sum += smem_c[row * LDC + col];
      const float mean = sum / static_cast<float>(rows_valid);
      float m2 = 0.f;
      for (int row = 0; row < rows_valid; ++row) {
        const float d = smem_c[row * LDC + col] - mean;
        m2 = fmaf(d, d, m2);
      }
      const int64_t idx = (n0 + col) * ep.num_m_tiles + blockIdx.x;
      ep.partial_mean[idx] = mean;
      ep.partial_m2[idx] = m2;
    }
  }
#else
  __trap();  // built for an architecture below sm80: the launcher never selects this path
#endif
}

template <typename T, Epilogue EPI, bool EXACT>
void launch_conv_t(const ConvShape& s, const void* x, const void* w, void* out, const EpilogueArgs& ep,
                   cudaStream_t stream) {
  const int64_t M = s.n * s.h_out * s.w_out;
  const dim3 grid(static_cast<unsigned int>(ceil_div(M, BM)), static_cast<unsigned int>(ceil_div(s.c_out, BN)));
  conv_igemm_kernel<T, EPI, EXACT><<<grid, kThreads, 0, stream>>>(s, static_cast<const T*>(x), static_cast<const T*>(w),
                                                                   static_cast<T*>(out), ep);
}

template <typename T, Epilogue EPI>
void launch_conv(const ConvShape& s, const void* x, const void* w, void* out, const EpilogueArgs& ep,
                 bool allow_tf32, cudaStream_t stream) {
  if constexpr (sizeof(T) == 4) {
    if (!allow_tf32) return launch_conv_t<T, EPI, true>(s, x, w, out, ep, stream);
  }
  launch_conv_t<T, EPI, false>(s, x, w, out, ep, stream);
}

struct Stats {
  float n, mean, m2;
};

__device__ __forceinline__ Stats chan_merge(Stats a, Stats b) {
  const float n = a.n + b.n;
  if (b.n == 0.f) return a;
  if (a.n == 0.f) return b;
  const float delta = b.mean - a.mean;
  const float fb = b.n / n;
  return {n, fmaf(delta, fb, a.mean), a.m2 + b.m2 + delta * delta * a.n * fb};
}

constexpr int kFinalizeThreads = 256;

__global__ void bn_finalize_kernel(const float* __restrict__ partial_mean, const float* __restrict__ partial_m2,
                                   int64_t num_m_tiles, int64_t tile_rows, int64_t rows, const float* __restrict__ bn_weight,
                                   const float* __restrict__ bn_bias, float eps, float* __restrict__ mean_out,
                                   float* __restrict__ var_out, float* __restrict__ scale_out,
                                   float* __restrict__ shift_out) {
  __shared__ Stats sh[kFinalizeThreads];
  const int64_t c = blockIdx.x;
  const int t = threadIdx.x;
  Stats acc{0.f, 0.f, 0.f};
  for (int64_t tile = t; tile < num_m_tiles; tile += kFinalizeThreads) {
    const int64_t left = rows - tile * tile_rows;
    const Stats p{static_cast<float>(left < tile_rows ? left : tile_rows), partial_mean[c * num_m_tiles + tile],
                  partial_m2[c * num_m_tiles + tile]};
    acc = chan_merge(acc, p);
  }
  sh[t] = acc;
  __syncthreads();
  for (int stride = kFinalizeThreads / 2; stride > 0; stride /= 2) {
    if (t < stride) sh[t] = chan_merge(sh[t], sh[t + stride]);
    __syncthreads();
  }
  if (t == 0) {
    const Stats tot = sh[0];
    const float mean = tot.n > 0.f ? tot.mean : __int_as_float(0x7fc00000);  // NaN for an empty batch, as torch
    const float var = tot.n > 0.f ? tot.m2 / tot.n : __int_as_float(0x7fc00000);
    mean_out[c] = mean;
    var_out[c] = var;
    const float scale = bn_weight[c] * rsqrtf(var + eps);
    scale_out[c] = scale;
    shift_out[c] = bn_bias[c] - mean * scale;
  }
}

}  // namespace

bool conv_igemm_supported(DType dtype, const ConvShape& s) {
  const int64_t vec = dtype == DType::Float ? 4 : 8;  // elements per 16-byte cp.async chunk
  return s.c_in % vec == 0 && s.k_pad % 8 == 0 && s.k_pad >= s.k && s.n > 0 && s.c_out > 0 && s.h_out > 0 && s.w_out > 0 &&
         ceil_div(s.c_out, BN) <= 65535 && ceil_div(s.n * s.h_out * s.w_out, BM) <= 2147483647LL &&
         s.h <= 2147483647LL / 2 && s.w <= 2147483647LL / 2;
}

void launch_conv_eval(DType dtype, const ConvShape& s, const void* x, const void* w, const float* scale,
                      const float* shift, const void* r, void* y, bool relu, bool allow_tf32, cudaStream_t stream) {
  EpilogueArgs ep{};
  ep.scale = scale;
  ep.shift = shift;
  ep.residual = r;
  ep.relu = relu;
  dispatch_dtype(dtype, [&](auto tag) { launch_conv<decltype(tag), Epilogue::Eval>(s, x, w, y, ep, allow_tf32, stream); });
}

void launch_conv_train(DType dtype, const ConvShape& s, const void* x, const void* w, const float* bias, void* z,
                       float* partial_mean, float* partial_m2, bool allow_tf32, cudaStream_t stream) {
  EpilogueArgs ep{};
  ep.bias = bias;
  ep.partial_mean = partial_mean;
  ep.partial_m2 = partial_m2;
  ep.num_m_tiles = ceil_div(s.n * s.h_out * s.w_out, BM);
  dispatch_dtype(dtype, [&](auto tag) { launch_conv<decltype(tag), Epilogue::Train>(s, x, w, z, ep, allow_tf32, stream); });
}

void launch_bn_finalize(const float* partial_mean, const float* partial_m2, int64_t num_m_tiles, int64_t tile_rows,
                        int64_t rows, int64_t channels, const float* bn_weight, const float* bn_bias, double eps,
                        float* mean, float* var, float* scale, float* shift, cudaStream_t stream) {
  bn_finalize_kernel<<<static_cast<unsigned int>(channels), kFinalizeThreads, 0, stream>>>(
      partial_mean, partial_m2, num_m_tiles, tile_rows, rows, bn_weight, bn_bias, static_cast<float>(eps), mean, var, scale,
      shift);
}

}  // namespace resnet_fused
