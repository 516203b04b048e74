// Memory-bound kernels: add+ReLU, BatchNorm apply, BatchNorm backward reductions and dz.
//
// All of them make one pass over memory with 16-byte vector loads/stores when the
// pointers are 16-byte aligned and (for per-channel kernels) channels % VEC == 0, and fall
// back to one element per thread otherwise. Indices are int64_t throughout.
// Reductions are deterministic: per-(row chunk, channel) partials, chunk count fixed by the
// shape, summed in a fixed order.

#include <algorithm>
#include <initializer_list>
#include <type_traits>

#include "common.cuh"

namespace resnet_fused {
namespace {

constexpr int kThreads = 256;

// ---------------------------------------------------------------------------------------
// add_relu: y = relu(x + r). Layout-agnostic (x, r, y share one dense layout).

// Not fmaxf(v, 0): NaN must stay NaN, as torch.relu leaves it.
__device__ __forceinline__ float relu_f(float v) { return v <= 0.f ? 0.f : v; }

template <typename T, int VEC>
__global__ void add_relu_kernel(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ y,
                                int64_t numel) {
  const int64_t n_vec = numel / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = tid; i < n_vec; i += stride) {
    const Vec<T, VEC> a = load_vec<T, VEC>(x + i * VEC);
    const Vec<T, VEC> b = load_vec<T, VEC>(r + i * VEC);
    Vec<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = from_float<T>(relu_f(to_float(a.v[j]) + to_float(b.v[j])));
    store_vec<T, VEC>(y + i * VEC, out);
  }
  // Tail (numel % VEC elements), one per thread.
  const int64_t tail = n_vec * VEC + tid;
  if (tail < numel) y[tail] = from_float<T>(relu_f(to_float(x[tail]) + to_float(r[tail])));
}

// ---------------------------------------------------------------------------------------
// bn_apply: y = act(z * scale[c] + shift[c] [+ r]), NHWC (channel = index % channels).
// VEC > 1 requires channels % VEC == 0, so one vector never straddles two rows.

template <typename T, int VEC>
__global__ void bn_apply_kernel(const T* __restrict__ z, const float* __restrict__ scale,
                                const float* __restrict__ shift, const T* __restrict__ r, T* __restrict__ y,
                                int64_t numel, int64_t channels, bool relu) {
  const int64_t n_vec = numel / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vec; i += stride) {
    const int64_t c0 = (i * VEC) % channels;
    const Vec<T, VEC> a = load_vec<T, VEC>(z + i * VEC);
    Vec<T, VEC> res;
    if (r != nullptr) res = load_vec<T, VEC>(r + i * VEC);
    Vec<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float v = fmaf(to_float(a.v[j]), __ldg(scale + c0 + j), __ldg(shift + c0 + j));
      if (r != nullptr) v += to_float(res.v[j]);
      if (relu) v = relu_f(v);
      out.v[j] = from_float<T>(v);
    }
    store_vec<T, VEC>(y + i * VEC, out);
  }
}

// ---------------------------------------------------------------------------------------
// Row-chunk reductions over NHWC [rows][channels]. Block = (bx, by) threads, bx * by = 256:
// thread (tx, ty) owns channel vector blockIdx.x * bx + tx and rows ty, ty + by, ... of
// chunk blockIdx.y. The by per-thread sums are then added in ty order (deterministic).

__device__ __forceinline__ float relu_mask(float g, float y_val, bool relu) {
  return (relu && y_val <= 0.f) ? 0.f : g;  // threshold_backward: a NaN output passes g
}

template <int VEC, int NQ>
__device__ __forceinline__ void block_reduce_rows_and_store(float (&acc)[NQ][VEC], float* smem, float* const* partials,
                                                            int64_t chunk, int64_t channels, int64_t c0,
                                                            bool active) {
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  // smem layout: [NQ][by][bx][VEC]
#pragma unroll
  for (int q = 0; q < NQ; ++q)
#pragma unroll
    for (int j = 0; j < VEC; ++j) smem[((q * by + ty) * bx + tx) * VEC + j] = acc[q][j];
  __syncthreads();
  if (ty == 0 && active) {
#pragma unroll
    for (int q = 0; q < NQ; ++q) {
      if (partials[q] == nullptr) continue;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float s = 0.f;
        for (int t = 0; t < by; ++t) s += smem[((q * by + t) * bx + tx) * VEC + j];
        partials[q][chunk * channels + c0 + j] = s;
      }
    }
  }
}

template <typename T, int VEC>
__global__ void bn_train_backward_reduce_kernel(const T* __restrict__ grad_y, const T* __restrict__ y,
                                                const T* __restrict__ z, const float* __restrict__ mean,
                                                const float* __restrict__ invstd, float* partial_g,
                                                float* partial_gx, int64_t rows, int64_t channels,
                                                int64_t rows_per_chunk, bool relu) {
  extern __shared__ float smem[];
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t c0 = cv * VEC;
  const bool active = c0 < channels;
  const int64_t chunk = blockIdx.y;
  const int64_t row_begin = chunk * rows_per_chunk;
  const int64_t row_end = min(rows, row_begin + rows_per_chunk);
  float acc[2][VEC];
  float m[VEC], is[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    acc[0][j] = acc[1][j] = 0.f;
    m[j] = active ? mean[c0 + j] : 0.f;
    is[j] = active ? invstd[c0 + j] : 0.f;
  }
  if (active) {
    for (int64_t row = row_begin + threadIdx.y; row < row_end; row += blockDim.y) {
      const int64_t off = row * channels + c0;
      const Vec<T, VEC> gv = load_vec<T, VEC>(grad_y + off);
      const Vec<T, VEC> zv = load_vec<T, VEC>(z + off);
      Vec<T, VEC> yv;
      if (relu) yv = load_vec<T, VEC>(y + off);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float g = relu_mask(to_float(gv.v[j]), relu ? to_float(yv.v[j]) : 1.f, relu);
        acc[0][j] += g;
        acc[1][j] += g * ((to_float(zv.v[j]) - m[j]) * is[j]);
      }
    }
  }
  float* partials[2] = {partial_g, partial_gx};
  block_reduce_rows_and_store<VEC, 2>(acc, smem, partials, chunk, channels, c0, active);
}

template <typename T, int VEC>
__global__ void bn_eval_backward_fused_kernel(const T* __restrict__ grad_y, const T* __restrict__ y,
                                              const float* __restrict__ scale, T* __restrict__ g_out,
                                              T* __restrict__ gs_out, float* partial_g, int64_t rows,
                                              int64_t channels, int64_t rows_per_chunk, bool relu) {
  extern __shared__ float smem[];
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t c0 = cv * VEC;
  const bool active = c0 < channels;
  const int64_t chunk = blockIdx.y;
  const int64_t row_begin = chunk * rows_per_chunk;
  const int64_t row_end = min(rows, row_begin + rows_per_chunk);
  float acc[1][VEC];
  float sc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    acc[0][j] = 0.f;
    sc[j] = active ? scale[c0 + j] : 0.f;
  }
  if (active) {
    for (int64_t row = row_begin + threadIdx.y; row < row_end; row += blockDim.y) {
      const int64_t off = row * channels + c0;
      const Vec<T, VEC> gv = load_vec<T, VEC>(grad_y + off);
      Vec<T, VEC> yv;
      if (relu) yv = load_vec<T, VEC>(y + off);
      Vec<T, VEC> g_vec, gs_vec;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float g = relu_mask(to_float(gv.v[j]), relu ? to_float(yv.v[j]) : 1.f, relu);
        acc[0][j] += g;
        g_vec.v[j] = from_float<T>(g);
        gs_vec.v[j] = from_float<T>(g * sc[j]);
      }
      if (g_out != nullptr) store_vec<T, VEC>(g_out + off, g_vec);
      if (gs_out != nullptr) store_vec<T, VEC>(gs_out + off, gs_vec);
    }
  }
  float* partials[1] = {partial_g};
  block_reduce_rows_and_store<VEC, 1>(acc, smem, partials, chunk, channels, c0, active);
}

__global__ void sum_partials_kernel(const float* __restrict__ partial, float* __restrict__ out, int64_t num_chunks,
                                    int64_t channels) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  float s = 0.f;
  for (int64_t i = 0; i < num_chunks; ++i) s += partial[i * channels + c];
  out[c] = s;
}

// grad_z = k[c] * (g - sum_g[c]/count - xhat * sum_gx[c]/count), elementwise over NHWC.
template <typename T, int VEC>
__global__ void bn_train_backward_dz_kernel(const T* __restrict__ grad_y, const T* __restrict__ y,
                                            const T* __restrict__ z, const float* __restrict__ mean,
                                            const float* __restrict__ invstd, const float* __restrict__ bn_weight,
                                            const float* __restrict__ sum_g, const float* __restrict__ sum_gx,
                                            T* __restrict__ grad_z, T* __restrict__ g_out, int64_t numel,
                                            int64_t channels, float inv_count, bool relu) {
  const int64_t n_vec = numel / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vec; i += stride) {
    const int64_t c0 = (i * VEC) % channels;
    const Vec<T, VEC> gv = load_vec<T, VEC>(grad_y + i * VEC);
    const Vec<T, VEC> zv = load_vec<T, VEC>(z + i * VEC);
    Vec<T, VEC> yv;
    if (relu) yv = load_vec<T, VEC>(y + i * VEC);
    Vec<T, VEC> dz, gvec;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t c = c0 + j;
      const float g = relu_mask(to_float(gv.v[j]), relu ? to_float(yv.v[j]) : 1.f, relu);
      const float is = __ldg(invstd + c);
      const float xhat = (to_float(zv.v[j]) - __ldg(mean + c)) * is;
      const float k = __ldg(bn_weight + c) * is;
      dz.v[j] = from_float<T>(k * (g - __ldg(sum_g + c) * inv_count - xhat * (__ldg(sum_gx + c) * inv_count)));
      gvec.v[j] = from_float<T>(g);
    }
    store_vec<T, VEC>(grad_z + i * VEC, dz);
    if (g_out != nullptr) store_vec<T, VEC>(g_out + i * VEC, gvec);
  }
}

// Vector width for per-channel kernels: 16 bytes when every pointer is aligned and a
// vector stays inside one row, else 1.
template <typename T>
int channel_vec(int64_t channels, std::initializer_list<const void*> ptrs) {
  constexpr int V = vec16<T>();
  if (channels % V != 0) return 1;
  for (const void* p : ptrs)
    if (!aligned16(p)) return 1;
  return V;
}

dim3 chunk_block(int64_t channel_vectors) {
  int bx = 1;
  while (bx < 32 && bx < channel_vectors) bx *= 2;
  return dim3(bx, kThreads / bx);
}

}  // namespace

int64_t bn_backward_num_chunks(int64_t rows) {
  // About 64+ rows per chunk, at most 512 chunks: enough blocks to fill an H100, few
  // enough partials that summing them is cheap.
  int64_t chunks = ceil_div(rows, 64);
  if (chunks > 512) chunks = 512;
  return chunks < 1 ? 1 : chunks;
}

void launch_add_relu(DType dtype, const void* x, const void* r, void* y, int64_t numel, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = vec16<T>();
    const bool vec = aligned16(x) && aligned16(r) && aligned16(y);
    if (vec) {
      const unsigned int blocks = elementwise_blocks(std::max<int64_t>(numel / V, numel % V), kThreads);
      add_relu_kernel<T, V><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(r),
                                                             static_cast<T*>(y), numel);
    } else {
      add_relu_kernel<T, 1><<<elementwise_blocks(numel, kThreads), kThreads, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const T*>(r), static_cast<T*>(y), numel);
    }
  });
}

void launch_bn_apply(DType dtype, const void* z, const float* scale, const float* shift, const void* r, void* y,
                     int64_t numel, int64_t channels, bool relu, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int v = channel_vec<T>(channels, {z, r, y});
    const T* rr = static_cast<const T*>(r);
    if (v > 1) {
      constexpr int V = vec16<T>();
      bn_apply_kernel<T, V><<<elementwise_blocks(numel / V, kThreads), kThreads, 0, stream>>>(
          static_cast<const T*>(z), scale, shift, rr, static_cast<T*>(y), numel, channels, relu);
    } else {
      bn_apply_kernel<T, 1><<<elementwise_blocks(numel, kThreads), kThreads, 0, stream>>>(
          static_cast<const T*>(z), scale, shift, rr, static_cast<T*>(y), numel, channels, relu);
    }
  });
}

void launch_bn_train_backward_reduce(DType dtype, const void* grad_y, const void* y, const void* z,
                                     const float* mean, const float* invstd, float* partial_g, float* partial_gx,
                                     int64_t rows, int64_t channels, bool relu, cudaStream_t stream) {
  const int64_t chunks = bn_backward_num_chunks(rows);
  const int64_t rows_per_chunk = ceil_div(rows, chunks);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const dim3 block = chunk_block(channels / V);
      const dim3 grid(static_cast<unsigned int>(ceil_div(channels / V, block.x)), static_cast<unsigned int>(chunks));
      const size_t smem = 2 * kThreads * V * sizeof(float);
      bn_train_backward_reduce_kernel<T, V><<<grid, block, smem, stream>>>(
          static_cast<const T*>(grad_y), static_cast<const T*>(y), static_cast<const T*>(z), mean, invstd,
          partial_g, partial_gx, rows, channels, rows_per_chunk, relu);
    };
    if (channel_vec<T>(channels, {grad_y, y, z}) > 1)
      run(std::integral_constant<int, vec16<T>()>{});
    else
      run(std::integral_constant<int, 1>{});
  });
}

void launch_bn_eval_backward_fused(DType dtype, const void* grad_y, const void* y, const float* scale, void* g_out,
                                   void* gs_out, float* partial_g, int64_t rows, int64_t channels, bool relu,
                                   cudaStream_t stream) {
  const int64_t chunks = bn_backward_num_chunks(rows);
  const int64_t rows_per_chunk = ceil_div(rows, chunks);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const dim3 block = chunk_block(channels / V);
      const dim3 grid(static_cast<unsigned int>(ceil_div(channels / V, block.x)), static_cast<unsigned int>(chunks));
      const size_t smem = kThreads * V * sizeof(float);
      bn_eval_backward_fused_kernel<T, V><<<grid, block, smem, stream>>>(
          static_cast<const T*>(grad_y), static_cast<const T*>(y), scale, static_cast<T*>(g_out),
          static_cast<T*>(gs_out), partial_g, rows, channels, rows_per_chunk, relu);
    };
    if (channel_vec<T>(channels, {grad_y, y, g_out, gs_out}) > 1)
      run(std::integral_constant<int, vec16<T>()>{});
    else
      run(std::integral_constant<int, 1>{});
  });
}

void launch_sum_partials(const float* partial, float* out, int64_t num_chunks, int64_t channels,
                         cudaStream_t stream) {
  sum_partials_kernel<<<static_cast<unsigned int>(ceil_div(channels, kThreads)), kThreads, 0, stream>>>(
      partial, out, num_chunks, channels);
}

void launch_bn_train_backward_dz(DType dtype, const void* grad_y, const void* y, const void* z, const float* mean,
                                 const float* invstd, const float* bn_weight, const float* sum_g,
                                 const float* sum_gx, void* grad_z, void* g_out, int64_t rows, int64_t count,
                                 int64_t channels, bool relu, cudaStream_t stream) {
  const int64_t numel = rows * channels;
  const float inv_count = 1.f / static_cast<float>(count);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      bn_train_backward_dz_kernel<T, V><<<elementwise_blocks(numel / V, kThreads), kThreads, 0, stream>>>(
          static_cast<const T*>(grad_y), static_cast<const T*>(y), static_cast<const T*>(z), mean, invstd,
          bn_weight, sum_g, sum_gx, static_cast<T*>(grad_z), static_cast<T*>(g_out), numel, channels, inv_count,
          relu);
    };
    if (channel_vec<T>(channels, {grad_y, y, z, grad_z, g_out}) > 1)
      run(std::integral_constant<int, vec16<T>()>{});
    else
      run(std::integral_constant<int, 1>{});
  });
}

}  // namespace resnet_fused
