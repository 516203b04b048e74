// Launch functions for the kernels in csrc/*.cu.
//
// This header is the boundary between the kernels and the op launchers in ops.cpp:
// it carries plain pointers, sizes and a dtype tag only, so the .cu files compile
// without ATen/torch headers (keeps the nvcc build fast).
// Argument checking, device guards, stream selection, allocation, empty-tensor
// early returns and the launch check (C10_CUDA_KERNEL_LAUNCH_CHECK) live in ops.cpp.
//
// Layout conventions: activations are NHWC-contiguous ("rows" = N*H*W, "channels" = C
// innermost); per-channel vectors (scale, shift, statistics) are float32; all element
// counts and offsets are int64_t.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace resnet_fused {

enum class DType : int { Half = 0, BFloat16 = 1, Float = 2 };

// A 16-byte aligned address (vector loads, cp.async, TMA); a null (absent) operand counts as aligned.
inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---- elementwise.cu -------------------------------------------------------------------

// y = relu(x + r), any layout (x, r, y share one dense layout), 16-byte vectors when aligned.
void launch_add_relu(DType dtype, const void* x, const void* r, void* y, int64_t numel, cudaStream_t stream);

// y = act(z * scale[c] + shift[c] [+ r]), NHWC with `channels` innermost; r may be null.
void launch_bn_apply(DType dtype, const void* z, const float* scale, const float* shift, const void* r, void* y,
                     int64_t numel, int64_t channels, bool relu, cudaStream_t stream);

// Number of row chunks the backward reductions use for `rows` rows. Depends on the shape
// only (never on the device), so the reduction order, and the result, is deterministic.
int64_t bn_backward_num_chunks(int64_t rows);

// Training backward, pass 1: g = relu ? (y > 0 ? grad_y : 0) : grad_y;
//   partial_g[chunk][c]  = sum over the chunk's rows of g
//   partial_gx[chunk][c] = sum of g * (z - mean[c]) * invstd[c]
// y may be null when !relu. Partials are float32, [num_chunks][channels].
void launch_bn_train_backward_reduce(DType dtype, const void* grad_y, const void* y, const void* z,
                                     const float* mean, const float* invstd, float* partial_g, float* partial_gx,
                                     int64_t rows, int64_t channels, bool relu, cudaStream_t stream);

// Eval backward, one pass: g as above; writes g (if g_out) and g * scale[c] (if gs_out) in
// the activation dtype, and partial_g[chunk][c] = sum of g (if partial_g).
void launch_bn_eval_backward_fused(DType dtype, const void* grad_y, const void* y, const float* scale, void* g_out,
                                   void* gs_out, float* partial_g, int64_t rows, int64_t channels, bool relu,
                                   cudaStream_t stream);

// Sums partials [num_chunks][channels] over chunks in chunk order (deterministic) into out[c].
void launch_sum_partials(const float* partial, float* out, int64_t num_chunks, int64_t channels, cudaStream_t stream);

// Training backward, pass 2: grad_z = k[c] * (g - sum_g[c]/count - xhat * sum_gx[c]/count),
// k = bn_weight * invstd, xhat = (z - mean) * invstd; also writes g to g_out when given.
// `count` is the number of rows the sums cover: `rows`, or every process's for SyncBatchNorm.
void launch_bn_train_backward_dz(DType dtype, const void* grad_y, const void* y, const void* z, const float* mean,
                                 const float* invstd, const float* bn_weight, const float* sum_g,
                                 const float* sum_gx, void* grad_z, void* g_out, int64_t rows, int64_t count,
                                 int64_t channels, bool relu, cudaStream_t stream);

// ---- conv_igemm.cu --------------------------------------------------------------------

struct ConvShape {
  int64_t n, h, w, c_in;       // x: NHWC
  int64_t c_out, kh, kw;       // weight: [c_out][kh][kw][c_in] (OHWI), row length k_pad
  int64_t h_out, w_out;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t k;                   // kh * kw * c_in
  int64_t k_pad;               // k rounded up to a multiple of 8 (weight rows are zero-padded)
};

// Tile sizes of the implicit GEMM (M = n*h_out*w_out output pixels, N = c_out, K = k).
constexpr int kConvTileM = 64;
constexpr int kConvTileN = 64;

// Whether conv_igemm can run this shape/dtype at all (it needs sm80+ at run time): c_in a
// multiple of the 16-byte vector (8 elements, 4 for float32). x and the weight rows must be
// 16-byte aligned; ops.cpp pads channels (the stem) and realigns before launching.
bool conv_igemm_supported(DType dtype, const ConvShape& s);

// Eval: y = act(conv(x, w) * scale[c] + shift[c] [+ r]), NHWC in and out; r may be null.
// allow_tf32 (float32 only): TF32 tensor cores; otherwise float32 runs an exact FFMA path.
void launch_conv_eval(DType dtype, const ConvShape& s, const void* x, const void* w, const float* scale,
                      const float* shift, const void* r, void* y, bool relu, bool allow_tf32, cudaStream_t stream);

// Train, conv pass: z = conv(x, w) [+ bias[c]] (stored rounded to the activation dtype) and
// per-(M tile, channel) partial statistics of the stored z: partial_mean / partial_m2 are
// [c_out][num_m_tiles] float32; tile t holds min(kConvTileM, M - t*kConvTileM) rows.
void launch_conv_train(DType dtype, const ConvShape& s, const void* x, const void* w, const float* bias, void* z,
                       float* partial_mean, float* partial_m2, bool allow_tf32, cudaStream_t stream);

// Train, finalize: merges the partials of each channel in tile order with Chan's formula
// (deterministic), writes the biased batch mean/var and the folded scale/shift:
//   scale = bn_weight * rsqrt(var + eps), shift = bn_bias - mean * scale.
// Tile t of the partials holds min(tile_rows, rows - t*tile_rows) rows.
void launch_bn_finalize(const float* partial_mean, const float* partial_m2, int64_t num_m_tiles, int64_t tile_rows,
                        int64_t rows, int64_t channels, const float* bn_weight, const float* bn_bias, double eps,
                        float* mean, float* var, float* scale, float* shift, cudaStream_t stream);

// ---- sm90/ -----------------------------------------------------------------------------
// CUTLASS 3 implicit GEMM for Hopper: TMA im2col loads, warp-specialized wgmma, the BatchNorm
// epilogues as visitor trees; 128-row tiles, 128 channels wide, or 64 where c_out <= 64 (a
// 128-wide tile would leave half of every wgmma on padding). Built for sm_90a only (setup.py).
// The launchers say what they did (Sm90Result): ran the kernel; declined the call (built
// without sm_90a, another device, a shape or alignment the kernel does not take), so the caller
// runs the launchers above; or failed to launch, which the caller raises.

constexpr int kSm90TileM = 128;

// The output-channel width of the sm90 tile for c_out output channels.
constexpr int sm90_tile_n(int64_t c_out) { return c_out <= 64 ? 64 : 128; }

struct KernelInfo {
  int shared_bytes;  // dynamic shared memory per block
  int stages;        // mainloop pipeline stages
  int threads;       // per block
};

struct Sm90Result {
  enum Outcome : int {
    kLaunched = 0,
    kNotEligible = 1,  // by design: the sm80 kernel takes the call (reason says why)
    kRejected = 2,     // CUTLASS's can_implement refused a shape our checks accepted: the sm80 kernel
                       // takes it, and the caller warns (a check missing from sm90_shape_reason)
    kFailed = 3,       // a CUDA call failed (reason: which; error: its code): the caller raises
  };
  Outcome outcome = kNotEligible;
  const char* reason = nullptr;
  cudaError_t error = cudaSuccess;
};

// Whether the sm90 kernels were compiled into this build (TORCH_CUDA_ARCH_LIST had 9.0a).
bool conv_sm90_built();

// Why the sm90 kernels do not take this shape (nullptr: they do), on any machine: channel
// alignment, whole K tiles per tap, int32 extents, and the TMA im2col descriptor's limits
// (traversal stride, box corners, filter offsets) that CUTLASS's can_implement does not all
// check and NDEBUG builds do not assert.
const char* sm90_shape_reason(DType dtype, const ConvShape& s, bool allow_tf32);

// Eval, as launch_conv_eval. float32 runs only with allow_tf32 (TF32 wgmma).
Sm90Result launch_conv_eval_sm90(DType dtype, const ConvShape& s, const void* x, const void* w, const float* scale,
                                 const float* shift, const void* r, void* y, bool relu, bool allow_tf32,
                                 cudaStream_t stream);

// Train conv pass, as launch_conv_train, with kSm90TileM-row tiles: partial_mean / partial_m2
// are [c_out][ceil(M / kSm90TileM)].
Sm90Result launch_conv_train_sm90(DType dtype, const ConvShape& s, const void* x, const void* w, const float* bias,
                                  void* z, float* partial_mean, float* partial_m2, bool allow_tf32,
                                  cudaStream_t stream);

}  // namespace resnet_fused
