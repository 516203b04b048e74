// CUTLASS feasibility / build-time probe for resnet_fused (the README's CUTLASS evaluation).
//
// NOT part of the extension: nothing here is built by setup.py or called from Python. It is compiled
// (never run) by scripts/cutlass_probe/build_probe.sh against the headers of the PyPI wheel
// nvidia-cutlass==4.2.0.0 (cutlass_library/source/include), to measure build time and to check which
// of our fused epilogues the CUTLASS 2.x implicit-GEMM convolution can express.
//
// All kernels: Conv2d fprop, NHWC activations, KRSC (= our OHWI) filters, cross-correlation (PyTorch
// semantics), Sm80 tensor cores (OpClassTensorOp, mma.sync 16x8x16), multistage cp.async mainloop,
// kOptimized iterators (so C_in and C_out must be multiples of 8 = one 16-byte vector: the 3-channel
// stem needs kFixedChannels/kFewChannels or channel padding, not instantiated here), float32 accumulate.
// The same sm_80 code path is what runs on sm_90 (no TMA / wgmma: that is the separate CUTLASS 3.x
// sm90 collective API).
//
// Instantiations (each behind a plain C launcher; compile-only, every one returns a cutlass::Status):
//   PROBE_EVAL_FOLDED : stock parts only. DefaultConv2dFpropWithBroadcast + LinearCombinationBiasElementwise
//                       y = relu(acc + 1*residual + shift[c]); the BN scale must be folded into the
//                       bf16 weights beforehand (w'[k] = w[k] * scale[k]) because the 2.x broadcast
//                       epilogue carries ONE per-channel vector.
//   PROBE_EVAL_EXACT  : same kernel/epilogue, plus a ~70-line custom thread functor (ScaleShiftResidualRelu)
//                       whose broadcast vector is interleaved {scale, shift} pairs, so that
//                       y = relu(acc * scale[c] + shift[c] [+ residual]) in fp32 exactly like our epilogue.
//   PROBE_TRAIN_SUM   : DefaultConv2dFpropWithReduction + LinearCombinationWithElementwise + plus<float>:
//                       stores z (bf16) and, deterministically (no atomics), per-(M tile, channel) partial
//                       sums of the fp32 z into sums[m_tile * ldr + c]. ONE reduction per launch: no sum of
//                       squares / M2 next to it (see README).
//   PROBE_FUSION_FP16 : DefaultConv2dFpropFusion (mainloop fusion): conv(relu(x * scale[c] + bias[c]))
//                       with the previous layer's BN applied while loading A. float16 ONLY: the transform
//                       is hard-coded PTX fma.rn.f16x2.relu (cutlass/conv/warp/scale_bias_relu_transform.h),
//                       so it is instantiated with half_t; a bf16 instantiation would reinterpret bf16 bits
//                       as fp16 (there is no static_assert), so none is offered.
// Define PROBE_ONLY_<NAME> to compile one instantiation alone (build_probe.sh times each), or
// PROBE_ONLY_NONE for the headers alone (no kernel instantiated: the front-end cost).

#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cutlass/numeric_types.h"
#include "cutlass/array.h"
#include "cutlass/functional.h"
#include "cutlass/numeric_conversion.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/conv/device/implicit_gemm_convolution_fusion.h"
#include "cutlass/conv/kernel/default_conv2d_fprop.h"
#include "cutlass/conv/kernel/default_conv2d_fprop_with_broadcast.h"
#include "cutlass/conv/kernel/default_conv2d_fprop_with_reduction.h"
#include "cutlass/conv/kernel/default_conv2d_fprop_fusion.h"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/epilogue/thread/linear_combination_bias_elementwise.h"
#include "cutlass/epilogue/thread/linear_combination_with_elementwise.h"

#if defined(PROBE_ONLY_EVAL_FOLDED) || defined(PROBE_ONLY_EVAL_EXACT) || defined(PROBE_ONLY_TRAIN_SUM) || \
    defined(PROBE_ONLY_FUSION_FP16) || defined(PROBE_ONLY_NONE)
#ifdef PROBE_ONLY_EVAL_FOLDED
#define PROBE_EVAL_FOLDED 1
#endif
#ifdef PROBE_ONLY_EVAL_EXACT
#define PROBE_EVAL_EXACT 1
#endif
#ifdef PROBE_ONLY_TRAIN_SUM
#define PROBE_TRAIN_SUM 1
#endif
#ifdef PROBE_ONLY_FUSION_FP16
#define PROBE_FUSION_FP16 1
#endif
#else
#define PROBE_EVAL_FOLDED 1
#define PROBE_EVAL_EXACT 1
#define PROBE_TRAIN_SUM 1
#define PROBE_FUSION_FP16 1
#endif

namespace probe {

// ---------------------------------------------------------------------------------------------
// Shared tile configuration (a common CUTLASS Sm80 choice for 16-bit conv; not tuned).
// ---------------------------------------------------------------------------------------------
using ElementAct = cutlass::bfloat16_t;
using ElementAcc = float;
using Layout = cutlass::layout::TensorNHWC;
using ThreadblockShape = cutlass::gemm::GemmShape<128, 128, 64>;
using WarpShape = cutlass::gemm::GemmShape<64, 64, 64>;
using InstructionShape = cutlass::gemm::GemmShape<16, 8, 16>;
using Swizzle = cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>;
constexpr int kStages = 3;
constexpr int kVec = 128 / cutlass::sizeof_bits<ElementAct>::value;  // 8 elements per 16-byte access

inline cutlass::conv::Conv2dProblemSize make_problem(int n, int h, int w, int c, int k, int r, int s, int pad_h,
                                                     int pad_w, int stride_h, int stride_w, int dil_h, int dil_w) {
  int p = (h + 2 * pad_h - dil_h * (r - 1) - 1) / stride_h + 1;
  int q = (w + 2 * pad_w - dil_w * (s - 1) - 1) / stride_w + 1;
  return cutlass::conv::Conv2dProblemSize(n, h, w, c, k, r, s, p, q, pad_h, pad_w, stride_h, stride_w, dil_h, dil_w,
                                          cutlass::conv::Mode::kCrossCorrelation, /*split_k_slices=*/1);
}

// Runs a device-level ImplicitGemmConvolution without a workspace (split_k_slices == 1 needs none).
template <typename Conv>
int run_conv(typename Conv::Arguments const& args, cudaStream_t stream) {
  Conv op;
  cutlass::Status status = op.can_implement(args);
  if (status != cutlass::Status::kSuccess) return static_cast<int>(status);
  if (Conv::get_workspace_size(args) != 0) return static_cast<int>(cutlass::Status::kErrorWorkspaceNull);
  status = op.initialize(args, nullptr, stream);
  if (status != cutlass::Status::kSuccess) return static_cast<int>(status);
  return static_cast<int>(op.run(stream));
}

// ---------------------------------------------------------------------------------------------
// Custom EpilogueWithBroadcast output functor: y = relu?(acc * scale[c] + shift[c] + beta * residual).
// The epilogue loads the per-column broadcast vector as Array<ElementVector> and converts it to
// Array<ElementCompute>; with ElementVector == ElementCompute == ScaleShift that conversion is the
// identity specialization of NumericArrayConverter, so one 8-byte {scale, shift} pair per channel
// reaches the functor. Arithmetic is float.
// ---------------------------------------------------------------------------------------------
struct alignas(8) ScaleShift {
  float scale;
  float shift;
  ScaleShift() = default;
  CUTLASS_HOST_DEVICE explicit ScaleShift(int v) : scale(float(v)), shift(float(v)) {}  // Array::clear()
};

template <typename ElementOut_, int Count>
class ScaleShiftResidualRelu {
 public:
  using ElementOutput = ElementOut_;
  using ElementC = ElementOut_;
  using ElementAccumulator = float;
  using ElementCompute = ScaleShift;  // what the epilogue's broadcast fragment is made of
  using ElementZ = ElementOut_;
  using ElementT = ElementOut_;
  using ElementVector = ScaleShift;
  static int const kElementsPerAccess = Count;
  static int const kCount = Count;
  static bool const kIsSingleSource = true;
  static bool const kIsHeavy = false;
  static bool const kStoreZ = true;
  static bool const kStoreT = false;

  using FragmentAccumulator = cutlass::Array<float, kCount>;
  using FragmentCompute = cutlass::Array<ScaleShift, kCount>;
  using FragmentC = cutlass::Array<ElementC, kCount>;
  using FragmentZ = cutlass::Array<ElementZ, kCount>;
  using FragmentT = cutlass::Array<ElementT, kCount>;

  struct Params {
    float beta = 0.f;  // 1: add the residual (ref_C); 0: no residual (ref_C is not read)
    int relu = 1;
    CUTLASS_HOST_DEVICE Params() {}
    CUTLASS_HOST_DEVICE Params(float beta_, int relu_) : beta(beta_), relu(relu_) {}
  };

  CUTLASS_HOST_DEVICE explicit ScaleShiftResidualRelu(Params const& p) : beta_(p.beta), relu_(p.relu != 0) {}
  CUTLASS_HOST_DEVICE bool is_source_needed() const { return beta_ != 0.f; }
  // Serial split-K would apply scale/shift once per slice: unsupported (the launcher uses 1 slice).
  CUTLASS_HOST_DEVICE void set_k_partition(int, int) {}

  CUTLASS_HOST_DEVICE void operator()(FragmentZ& frag_Z, FragmentT&, FragmentAccumulator const& AB,
                                      FragmentC const& frag_C, FragmentCompute const& V) const {
    cutlass::NumericArrayConverter<float, ElementC, kCount> to_float;
    cutlass::Array<float, kCount> c = to_float(frag_C);
    cutlass::Array<float, kCount> y;
    cutlass::maximum<float, /*PropagateNaN=*/true> relu_nan;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kCount; ++i) {
      float v = AB[i] * V[i].scale + V[i].shift + beta_ * c[i];
      y[i] = relu_ ? relu_nan(v, 0.f) : v;  // keeps NaN, as torch.relu does (fmaxf would not)
    }
    frag_Z = cutlass::NumericArrayConverter<ElementZ, float, kCount>()(y);
  }

  CUTLASS_HOST_DEVICE void operator()(FragmentZ& frag_Z, FragmentT&, FragmentAccumulator const& AB,
                                      FragmentCompute const& V) const {
    cutlass::Array<float, kCount> y;
    cutlass::maximum<float, /*PropagateNaN=*/true> relu_nan;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kCount; ++i) {
      float v = AB[i] * V[i].scale + V[i].shift;
      y[i] = relu_ ? relu_nan(v, 0.f) : v;  // keeps NaN, as torch.relu does (fmaxf would not)
    }
    frag_Z = cutlass::NumericArrayConverter<ElementZ, float, kCount>()(y);
  }

 private:
  float beta_;
  bool relu_;
};

// ---------------------------------------------------------------------------------------------
// 1. Eval, stock CUTLASS: scale folded into the weights, shift as the broadcast bias.
// ---------------------------------------------------------------------------------------------
#if PROBE_EVAL_FOLDED
using EpilogueEvalFolded = cutlass::epilogue::thread::LinearCombinationBiasElementwise<
    ElementAct,                           // ElementC (residual, read through ref_C)
    ElementAcc,                           // accumulator
    float,                                // compute
    ElementAct,                           // ElementZ (the stored y)
    ElementAct,                           // ElementT (not stored)
    kVec,                                 // elements per access
    cutlass::epilogue::thread::ReLu<float>,
    cutlass::plus<float>,
    /*StoreT=*/false,
    /*ElementVector=*/float>;             // shift[c] in fp32

using KernelEvalFolded = typename cutlass::conv::kernel::DefaultConv2dFpropWithBroadcast<
    ElementAct, Layout, ElementAct, Layout, ElementAct, Layout, ElementAcc, cutlass::arch::OpClassTensorOp,
    cutlass::arch::Sm80, ThreadblockShape, WarpShape, InstructionShape, EpilogueEvalFolded, Swizzle, kStages,
    cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized,
    cutlass::conv::StrideSupport::kStrided>::Kernel;
using ConvEvalFolded = cutlass::conv::device::ImplicitGemmConvolution<KernelEvalFolded>;
#endif

// ---------------------------------------------------------------------------------------------
// 2. Eval, exact: same kernel, custom functor with interleaved {scale, shift} per channel.
// ---------------------------------------------------------------------------------------------
#if PROBE_EVAL_EXACT
using EpilogueEvalExact = ScaleShiftResidualRelu<ElementAct, kVec>;
using KernelEvalExact = typename cutlass::conv::kernel::DefaultConv2dFpropWithBroadcast<
    ElementAct, Layout, ElementAct, Layout, ElementAct, Layout, ElementAcc, cutlass::arch::OpClassTensorOp,
    cutlass::arch::Sm80, ThreadblockShape, WarpShape, InstructionShape, EpilogueEvalExact, Swizzle, kStages,
    cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized,
    cutlass::conv::StrideSupport::kStrided>::Kernel;
using ConvEvalExact = cutlass::conv::device::ImplicitGemmConvolution<KernelEvalExact>;
#endif

// ---------------------------------------------------------------------------------------------
// 3. Training forward: store z, per-(M tile, channel) partial sums of z (deterministic, no atomics).
// ---------------------------------------------------------------------------------------------
#if PROBE_TRAIN_SUM
using EpilogueTrainSum = cutlass::epilogue::thread::LinearCombinationWithElementwise<
    float,        // ElementCompute (what is reduced; z before rounding to bf16)
    ElementAcc,   // accumulator
    ElementAct,   // ElementSource / ElementOutput (z)
    ElementAct,   // ElementTensor (extra input tensor, unused: ptr_Tensor = nullptr)
    kVec>;
using KernelTrainSum = typename cutlass::conv::kernel::DefaultConv2dFpropWithReduction<
    ElementAct, Layout, ElementAct, Layout, ElementAct, Layout, ElementAcc, cutlass::arch::OpClassTensorOp,
    cutlass::arch::Sm80, ThreadblockShape, WarpShape, InstructionShape, EpilogueTrainSum, cutlass::plus<float>,
    Swizzle, kStages, cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized,
    cutlass::conv::StrideSupport::kStrided>::Kernel;
using ConvTrainSum = cutlass::conv::device::ImplicitGemmConvolution<KernelTrainSum>;
#endif

// ---------------------------------------------------------------------------------------------
// 4. Mainloop fusion of the previous BN + ReLU on the input (float16 only, see header comment).
// ---------------------------------------------------------------------------------------------
#if PROBE_FUSION_FP16
using ElementHalf = cutlass::half_t;
using EpilogueFusion = cutlass::epilogue::thread::LinearCombination<ElementHalf, kVec, ElementAcc, float>;
using KernelFusion = typename cutlass::conv::kernel::DefaultConv2dFpropFusion<
    ElementHalf, Layout, ElementHalf, Layout, ElementHalf, cutlass::layout::RowMajor, ElementHalf, Layout,
    ElementAcc, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, ThreadblockShape, WarpShape,
    InstructionShape, EpilogueFusion, Swizzle, kStages, cutlass::arch::OpMultiplyAdd,
    cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel;
// (the fusion kernel has its own device wrapper; device::ImplicitGemmConvolution rejects it: no kStrideSupport)
using ConvFusion = cutlass::conv::device::ImplicitGemmConvolutionFusion<KernelFusion>;
#endif

}  // namespace probe

// ---------------------------------------------------------------------------------------------
// Plain C launchers (device pointers; x NHWC [n,h,w,c], w KRSC [k,r,s,c], y/residual NHWC [n,p,q,k]).
// Return value: static_cast<int>(cutlass::Status) (0 == kSuccess).
// ---------------------------------------------------------------------------------------------
extern "C" {

#if PROBE_EVAL_FOLDED
// y = relu(conv(x, w_folded) + shift[k] (+ residual)); w_folded[k] = w[k] * bn_scale[k] (bf16).
int probe_conv_bn_eval_folded_bf16(const void* x, const void* w_folded, const float* shift, const void* residual,
                                   void* y, int n, int h, int w, int c, int k, int r, int s, int pad_h, int pad_w,
                                   int stride_h, int stride_w, int dil_h, int dil_w, cudaStream_t stream) {
  using namespace probe;
  auto problem = make_problem(n, h, w, c, k, r, s, pad_h, pad_w, stride_h, stride_w, dil_h, dil_w);
  using T = ElementAct;
  auto ext_x = cutlass::conv::implicit_gemm_tensor_a_extent(cutlass::conv::Operator::kFprop, problem);
  auto ext_w = cutlass::conv::implicit_gemm_tensor_b_extent(cutlass::conv::Operator::kFprop, problem);
  auto ext_y = cutlass::conv::implicit_gemm_tensor_c_extent(cutlass::conv::Operator::kFprop, problem);
  typename ConvEvalFolded::Arguments args(
      problem,
      {static_cast<T*>(const_cast<void*>(x)), Layout::packed(ext_x)},
      {static_cast<T*>(const_cast<void*>(w_folded)), Layout::packed(ext_w)},
      {static_cast<T*>(const_cast<void*>(residual)), Layout::packed(ext_y)},  // source C = residual
      {static_cast<T*>(y), Layout::packed(ext_y)},                           // Z
      typename EpilogueEvalFolded::Params(/*alpha=*/1.f, /*beta=*/residual ? 1.f : 0.f),
      cutlass::conv::SplitKMode::kSerial,
      const_cast<float*>(shift),  // ptr_Vector: per-output-channel broadcast
      nullptr,                    // ptr_Tensor: T not stored
      0, 0);
  return run_conv<ConvEvalFolded>(args, stream);
}
#endif

#if PROBE_EVAL_EXACT
// y = relu?(conv(x, w) * scale[k] + shift[k] (+ residual)); scale_shift = interleaved float pairs [k][2].
int probe_conv_bn_eval_exact_bf16(const void* x, const void* wt, const float* scale_shift, const void* residual,
                                  void* y, int relu, int n, int h, int w, int c, int k, int r, int s, int pad_h,
                                  int pad_w, int stride_h, int stride_w, int dil_h, int dil_w, cudaStream_t stream) {
  using namespace probe;
  auto problem = make_problem(n, h, w, c, k, r, s, pad_h, pad_w, stride_h, stride_w, dil_h, dil_w);
  using T = ElementAct;
  auto ext_x = cutlass::conv::implicit_gemm_tensor_a_extent(cutlass::conv::Operator::kFprop, problem);
  auto ext_w = cutlass::conv::implicit_gemm_tensor_b_extent(cutlass::conv::Operator::kFprop, problem);
  auto ext_y = cutlass::conv::implicit_gemm_tensor_c_extent(cutlass::conv::Operator::kFprop, problem);
  typename ConvEvalExact::Arguments args(
      problem,
      {static_cast<T*>(const_cast<void*>(x)), Layout::packed(ext_x)},
      {static_cast<T*>(const_cast<void*>(wt)), Layout::packed(ext_w)},
      {static_cast<T*>(const_cast<void*>(residual)), Layout::packed(ext_y)},
      {static_cast<T*>(y), Layout::packed(ext_y)},
      typename EpilogueEvalExact::Params(residual ? 1.f : 0.f, relu),
      cutlass::conv::SplitKMode::kSerial,
      const_cast<float*>(scale_shift),
      nullptr, 0, 0);
  return run_conv<ConvEvalExact>(args, stream);
}
#endif

#if PROBE_TRAIN_SUM
// z = conv(x, w) stored as bf16; partial_sums[m_tile * k + c] = sum over the tile's rows of fp32 z
// (m_tiles = ceil(n*p*q / 128)); a second reduction (over m_tiles) is still needed, and so is the
// sum of squares (a separate pass: this epilogue has one reduction).
int probe_conv_train_sum_bf16(const void* x, const void* wt, void* z, float* partial_sums, int n, int h, int w, int c,
                              int k, int r, int s, int pad_h, int pad_w, int stride_h, int stride_w, int dil_h,
                              int dil_w, cudaStream_t stream) {
  using namespace probe;
  auto problem = make_problem(n, h, w, c, k, r, s, pad_h, pad_w, stride_h, stride_w, dil_h, dil_w);
  using T = ElementAct;
  auto ext_x = cutlass::conv::implicit_gemm_tensor_a_extent(cutlass::conv::Operator::kFprop, problem);
  auto ext_w = cutlass::conv::implicit_gemm_tensor_b_extent(cutlass::conv::Operator::kFprop, problem);
  auto ext_y = cutlass::conv::implicit_gemm_tensor_c_extent(cutlass::conv::Operator::kFprop, problem);
  typename ConvTrainSum::Arguments args(
      problem,
      {static_cast<T*>(const_cast<void*>(x)), Layout::packed(ext_x)},
      {static_cast<T*>(const_cast<void*>(wt)), Layout::packed(ext_w)},
      {static_cast<T*>(z), Layout::packed(ext_y)},  // C (beta = 0: not read)
      {static_cast<T*>(z), Layout::packed(ext_y)},  // D = z
      typename EpilogueTrainSum::Params(/*alpha=*/1.f, /*beta=*/0.f),
      cutlass::conv::SplitKMode::kSerial,
      partial_sums,  // ptr_Vector: reduction output, row stride ldr
      nullptr,       // ptr_Tensor: no extra input
      /*ldr=*/k, /*ldt=*/0);
  return run_conv<ConvTrainSum>(args, stream);
}
#endif

#if PROBE_FUSION_FP16
// y = conv(relu(x * scale[c] + bias[c]), w), float16 only; out-of-bounds (padding) stays 0.
int probe_conv_prev_bn_relu_fp16(const void* x, const void* wt, const void* scale, const void* bias, void* y, int n,
                                 int h, int w, int c, int k, int r, int s, int pad_h, int pad_w, int stride_h,
                                 int stride_w, int dil_h, int dil_w, cudaStream_t stream) {
  using namespace probe;
  auto problem = make_problem(n, h, w, c, k, r, s, pad_h, pad_w, stride_h, stride_w, dil_h, dil_w);
  using T = ElementHalf;
  auto ext_x = cutlass::conv::implicit_gemm_tensor_a_extent(cutlass::conv::Operator::kFprop, problem);
  auto ext_w = cutlass::conv::implicit_gemm_tensor_b_extent(cutlass::conv::Operator::kFprop, problem);
  auto ext_y = cutlass::conv::implicit_gemm_tensor_c_extent(cutlass::conv::Operator::kFprop, problem);
  cutlass::layout::RowMajor vec_layout(c);
  typename ConvFusion::Arguments args(
      problem,
      {static_cast<T*>(const_cast<void*>(x)), Layout::packed(ext_x)},
      {static_cast<T*>(const_cast<void*>(wt)), Layout::packed(ext_w)},
      {static_cast<T*>(const_cast<void*>(scale)), vec_layout},
      {static_cast<T*>(const_cast<void*>(bias)), vec_layout},
      {static_cast<T*>(y), Layout::packed(ext_y)},
      {static_cast<T*>(y), Layout::packed(ext_y)},
      typename EpilogueFusion::Params(1.f, 0.f));
  return run_conv<ConvFusion>(args, stream);
}
#endif

}  // extern "C"
