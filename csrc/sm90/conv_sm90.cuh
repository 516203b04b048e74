// CUTLASS 3 convolution for Hopper (sm_90a): TMA im2col loads, warp-specialized wgmma mainloop,
// and the BatchNorm epilogues as Epilogue Visitor Trees. Included only by the one-kernel
// translation units beside it (conv_sm90_<op>_<dtype>.cu), each instantiating one kernel, so
// the build parallelizes per kernel (about 30 s and 3.6 GB of nvcc each, sm_80 + sm_90a,
// on 2 cores). Built with NDEBUG: CUTLASS's device asserts are function calls, and
// a call inside the kernel makes ptxas serialize every wgmma (its warning C7510).
//
// GEMM view of an NHWC forward convolution: M = N*P*Q output pixels, N = output channels,
// K = R*S*C (tap, input channel). Per-channel vectors are therefore row broadcasts (one value
// per GEMM column) and per-channel reductions are row reductions.
#pragma once

#include <atomic>
#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/kernel_hardware_info.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/dispatch_policy.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/numeric_types.h"

#include "kernels.h"

namespace resnet_fused::sm90 {

using namespace cute;

template <DType D> struct ElementOf;
template <> struct ElementOf<DType::BFloat16> { using type = cutlass::bfloat16_t; };
template <> struct ElementOf<DType::Half> { using type = cutlass::half_t; };
template <> struct ElementOf<DType::Float> { using type = float; };  // TF32 wgmma (the builder picks tfloat32_t)

// 128-row output tiles, TileN (128, or 64 for c_out <= 64: sm90_tile_n) channels wide; K step 64
// for 16-bit operands, 32 for TF32 (the same 128 bytes of each row per stage).
template <class Element, int TileN>
using TileShape = Shape<_128, Int<TileN>, Shape<Int<128 / sizeof(Element)>>>;
using ClusterShape = Shape<_1, _1, _1>;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

// The eval epilogue's compute node: y = act(acc * scale[c] + shift[c] [+ r]) in float, rounded
// once to the activation dtype. ReLU keeps NaN (x < 0 is false for NaN), as torch.relu does.
// (CUTLASS's stock per-column-bias trees apply the activation before the residual add, the
// wrong order for a ResNet block, and take one vector only.)
struct BnActArguments {
  int relu = 1;
};

template <class T>
struct BnApplyAct {
  using Arguments = BnActArguments;
};

template <int N>
struct BnApplyAct<cutlass::Array<float, N>> {
  using Arguments = BnActArguments;
  using Frag = cutlass::Array<float, N>;

  CUTLASS_DEVICE static float act(float v, Arguments const& args) { return (args.relu && v < 0.f) ? 0.f : v; }

  CUTLASS_DEVICE Frag operator()(Frag const& acc, Frag const& scale, Frag const& shift, Arguments const& args) const {
    Frag out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = act(fmaf(acc[i], scale[i], shift[i]), args);
    return out;
  }

  CUTLASS_DEVICE Frag operator()(Frag const& acc, Frag const& scale, Frag const& shift, Frag const& residual,
                                 Arguments const& args) const {
    Frag out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = act(fmaf(acc[i], scale[i], shift[i]) + residual[i], args);
    return out;
  }
};

namespace fusion = cutlass::epilogue::fusion;

template <class Element, int TileN>
using ChannelVector = fusion::Sm90RowBroadcast<0, TileShape<Element, TileN>, float, float>;

// Eval tree: act(acc * scale + shift [+ C]), C = the residual.
template <class Element, bool Residual, int TileN>
using EvalTree = cute::conditional_t<
    Residual,
    fusion::Sm90EVT<fusion::Sm90Compute<BnApplyAct, Element, float, kRound>, fusion::Sm90AccFetch,
                    ChannelVector<Element, TileN>, ChannelVector<Element, TileN>, fusion::Sm90SrcFetch<Element>>,
    fusion::Sm90EVT<fusion::Sm90Compute<BnApplyAct, Element, float, kRound>, fusion::Sm90AccFetch,
                    ChannelVector<Element, TileN>, ChannelVector<Element, TileN>>>;

// Training tree: z = acc [+ bias] rounded to the activation dtype and stored, and per-(M tile,
// channel) moments of the stored z, merged over tiles afterwards (launch_bn_finalize).
//
// TileChannelMoments is our own visitor. CUTLASS's Sm90RowReduction (two of them, for the sum
// and the sum of squares) built with a 768-byte stack frame (480 bytes for one), i.e. local
// memory in every epilogue; this one keeps nothing per thread across subtiles and uses no
// local memory (the SASS gate checks LDL/STL). Per epilogue subtile the consumer threads stage
// the rounded z in shared memory by coordinate (layout-agnostic), then reduce each column in a
// fixed order: deterministic, no atomics. Sums are taken around a shift, the tile's first row
// (a data value of the same channel), so the tile's M2 = S2 - S1^2/n loses no precision to a
// large mean; the tile writes (mean, M2) and the finalize kernel merges tiles by Chan's formula.
template <int kCtaM, int kCtaN, int kEpiM, int kEpiN, int kThreads>
struct TileChannelMoments {
  static constexpr int kGroups = kThreads / kEpiN;  // row groups of the per-subtile column sums
  static constexpr int kRowsPerGroup = kEpiM / kGroups;
  static constexpr int kStagePitch = kEpiN + 8;     // row stride = 8 banks: the MMA fragment's 8x8 stores are 2-way
  static_assert(kThreads % kEpiN == 0 && kEpiM % kGroups == 0, "subtile and thread count do not divide");

  struct SharedStorage {
    float stage[kEpiM][kStagePitch];
    float part[2][kGroups][kEpiN];
    float shift[kCtaN];
    float sum[kCtaN];
    float sumsq[kCtaN];
  };

  struct Arguments {
    float* ptr_mean = nullptr;  // [channels][num_m_tiles]: the tile's mean, per channel
    float* ptr_m2 = nullptr;    // [channels][num_m_tiles]: the tile's sum of squared deviations
    int num_m_tiles = 0;
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.ptr_mean != nullptr && args.ptr_m2 != nullptr && args.num_m_tiles > 0;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }

  CUTLASS_HOST_DEVICE TileChannelMoments() {}
  CUTLASS_HOST_DEVICE TileChannelMoments(Params const& params, SharedStorage const& shared_storage)
      : params(params), smem(const_cast<SharedStorage*>(&shared_storage)) {}

  Params params;
  SharedStorage* smem = nullptr;

  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(fusion::ProducerLoadArgs<Args...> const&) {
    return fusion::EmptyProducerLoadCallbacks{};
  }

  template <class ThrCoord, class ThrResidue>
  struct ConsumerStoreCallbacks : fusion::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(ThrCoord tCcD, ThrResidue residue_tCcD, int first_m, int first_n,
                                          int rows_valid, int cols_valid, int m_tile, int n_tile, int thread_idx,
                                          Params const& params, SharedStorage* smem)
        : tCcD(tCcD), residue_tCcD(residue_tCcD), first_m(first_m), first_n(first_n), rows_valid(rows_valid),
          cols_valid(cols_valid), m_tile(m_tile), n_tile(n_tile), thread_idx(thread_idx), params(params),
          smem(smem) {}

    ThrCoord tCcD;            // (CPY,CPY_M,CPY_N,EPI_M,EPI_N) coordinates relative to this thread's first element
    ThrResidue residue_tCcD;  // in-bounds extent from this thread's first element
    int first_m, first_n;     // this thread's first element, in tile coordinates
    int rows_valid, cols_valid;
    int m_tile, n_tile, thread_idx;
    Params const& params;
    SharedStorage* smem;

    template <class ElementAccumulator, class ElementInput, int FragmentSize>
    CUTLASS_DEVICE auto visit(cutlass::Array<ElementAccumulator, FragmentSize> const&, int epi_v, int epi_m,
                              int epi_n, cutlass::Array<ElementInput, FragmentSize> const& frg_input) {
      Tensor tCcD_mn = tCcD(_, _, _, epi_m, epi_n);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) {
        auto coord = tCcD_mn(epi_v * FragmentSize + i);
        const int row = first_m + static_cast<int>(get<0>(coord)) - epi_m * kEpiM;
        const int col = first_n + static_cast<int>(get<1>(coord)) - epi_n * kEpiN;
        smem->stage[row][col] = static_cast<float>(frg_input[i]);
      }
      return frg_input;
    }

    template <class STensor, class SyncFn, class VTensor>
    CUTLASS_DEVICE void reduce(STensor&&, SyncFn const& sync_fn, int epi_m, int epi_n, bool is_last_iteration,
                               VTensor) {
      sync_fn();  // the subtile is staged
      const int col = thread_idx % kEpiN;
      const int group = thread_idx / kEpiN;
      const int n_local = epi_n * kEpiN + col;
      // The shift: the tile's first row (always in bounds), set when a column block starts (epi_m == 0).
      const float shift = epi_m == 0 ? smem->stage[0][col] : smem->shift[n_local];
      float s1 = 0.f, s2 = 0.f;
      CUTLASS_PRAGMA_UNROLL
      for (int r = group * kRowsPerGroup; r < (group + 1) * kRowsPerGroup; ++r) {
        if (epi_m * kEpiM + r < rows_valid) {
          const float d = smem->stage[r][col] - shift;
          s1 += d;
          s2 = fmaf(d, d, s2);
        }
      }
      smem->part[0][group][col] = s1;
      smem->part[1][group][col] = s2;
      sync_fn();
      if (group == 0) {  // one thread per column adds the groups in order
        float t1 = 0.f, t2 = 0.f;
        CUTLASS_PRAGMA_UNROLL
        for (int g = 0; g < kGroups; ++g) {
          t1 += smem->part[0][g][col];
          t2 += smem->part[1][g][col];
        }
        if (epi_m == 0) {
          smem->shift[n_local] = shift;
          smem->sum[n_local] = t1;
          smem->sumsq[n_local] = t2;
        } else {
          smem->sum[n_local] += t1;
          smem->sumsq[n_local] += t2;
        }
      }
      if (is_last_iteration) {
        sync_fn();
        const float rows = static_cast<float>(rows_valid < kCtaM ? rows_valid : kCtaM);
        for (int c = thread_idx; c < kCtaN && c < cols_valid; c += kThreads) {
          const float s1_t = smem->sum[c], s2_t = smem->sumsq[c];
          const int64_t at = static_cast<int64_t>(n_tile * kCtaN + c) * params.num_m_tiles + m_tile;
          // __fdividef: IEEE division calls a slow-path subroutine; a call in a wgmma kernel is
          // what makes ptxas serialize wgmma (the SASS gate rejects CALL).
          const float d1 = __fdividef(s1_t, rows);
          params.ptr_mean[at] = smem->shift[c] + d1;
          // Cancellation can leave M2 a little below 0: clamp it, but keep a NaN (an Inf or NaN
          // in the tile) as eager's variance keeps it, which fmaxf would turn into 0.
          const float m2 = s2_t - s1_t * d1;
          params.ptr_m2[at] = m2 < 0.f ? 0.f : m2;
        }
      }
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(fusion::ConsumerStoreArgs<Args...> const& args) {
    static_assert(decltype(size<0>(args.epi_tile))::value == kEpiM && decltype(size<1>(args.epi_tile))::value == kEpiN,
                  "TileChannelMoments: epilogue tile mismatch");
    static_assert(decltype(size(args.tiled_mma))::value == kThreads, "TileChannelMoments: consumer thread count");
    // Tile coordinates of this thread's first element: residue_cD - residue_tCcD (both are (M, N) minus a corner).
    const int first_m = static_cast<int>(get<0>(args.residue_cD)) - static_cast<int>(get<0>(args.residue_tCcD));
    const int first_n = static_cast<int>(get<1>(args.residue_cD)) - static_cast<int>(get<1>(args.residue_tCcD));
    return ConsumerStoreCallbacks<decltype(args.tCcD), decltype(args.residue_tCcD)>(
        args.tCcD, args.residue_tCcD, first_m, first_n, static_cast<int>(get<0>(args.residue_cD)),
        static_cast<int>(get<1>(args.residue_cD)), static_cast<int>(get<0>(args.tile_coord_mnkl)),
        static_cast<int>(get<1>(args.tile_coord_mnkl)), args.thread_idx, params, smem);
  }
};

// The epilogue subtile of every tree: 64 rows x 32 channels (what EpilogueTileAuto picks here;
// fixed so TileChannelMoments can size its staging buffer).
using EpilogueTile = Shape<_64, _32>;
constexpr int kConsumerThreads = 128;  // KernelImplicitTmaWarpSpecializedSm90: one consumer warpgroup

template <class Element, int TileN>
using TrainTree = fusion::Sm90EVT<
    TileChannelMoments<128, TileN, 64, 32, kConsumerThreads>,
    fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, Element, float, kRound>, fusion::Sm90AccFetch,
                    ChannelVector<Element, TileN>>>;

// The mainloop's stage count: what shared memory holds after the epilogue's pipeline barriers
// only. This kernel (KernelImplicitTmaWarpSpecializedSm90, non-persistent) overlays the
// epilogue's tensor storage on the mainloop's (a union in its SharedStorage: the two never run
// at once), so carving out all of sizeof(Epilogue::SharedStorage), as CUTLASS's examples do for
// every schedule, costs a stage: 6 instead of 7 for the 128x128 tiles. The SASS gate reads the
// stages and the total shared memory (at most 227 KB).
template <class Epilogue>
constexpr int kEpilogueCarveout = static_cast<int>((sizeof(typename Epilogue::PipelineStorage) + 127) / 128 * 128);

template <class Element, class Tree, bool HasSource, int TileN>
struct ConvKernelFor {
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;
  using ElementC = cute::conditional_t<HasSource, Element, void>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape<Element, TileN>, ClusterShape,
      EpilogueTile, float, float, ElementC, cutlass::layout::TensorNHWC, kAlign,
      Element, cutlass::layout::TensorNHWC, kAlign, cutlass::epilogue::TmaWarpSpecialized,
      Tree>::CollectiveOp;
  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop, Element,
      cutlass::layout::TensorNHWC, kAlign, Element, cutlass::layout::TensorNHWC, kAlign, float,
      TileShape<Element, TileN>, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<kEpilogueCarveout<Epilogue>>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;
  using ProblemShape =
      cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop, Mainloop::DispatchPolicy::NumSpatialDimensions>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, Mainloop, Epilogue>;
  using Conv = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
  static_assert(Kernel::SharedStorageSize <= cutlass::gemm::collective::detail::sm90_smem_capacity_bytes,
                "the stages do not fit in shared memory");
};

template <class Problem>
Problem problem_of(const ConvShape& s) {
  return Problem(cutlass::conv::Mode::kCrossCorrelation,
                 {static_cast<int>(s.n), static_cast<int>(s.h), static_cast<int>(s.w), static_cast<int>(s.c_in)},
                 {static_cast<int>(s.c_out), static_cast<int>(s.kh), static_cast<int>(s.kw), static_cast<int>(s.c_in)},
                 {static_cast<int>(s.pad_h), static_cast<int>(s.pad_w)},
                 {static_cast<int>(s.pad_h), static_cast<int>(s.pad_w)},
                 {static_cast<int>(s.stride_h), static_cast<int>(s.stride_w)},
                 {static_cast<int>(s.dil_h), static_cast<int>(s.dil_w)}, 1);
}

// The packed NHWC stride of the output (C and D), in the hierarchical form the epilogue takes.
template <class Stride, class Problem>
Stride output_stride(const Problem& problem) {
  Stride stride{};
  cute::for_each(cute::make_seq<cute::rank<0>(Stride{})>{},
                 [&](auto i) { cute::get<0, i>(stride) = problem.stride_C[Problem::RankT - 2 - i]; });
  return stride;
}

// The kernel may use more than 48 KB of dynamic shared memory: a function attribute, set once
// per device (it holds for the device's context), not on every call.
template <class Kernel>
cudaError_t allow_dynamic_shared_memory() {
  static std::atomic<uint64_t> devices_set{0};  // bit d: set on device d (< 64)
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (devices_set.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  error = cudaFuncSetAttribute(cutlass::device_kernel<Kernel>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               Kernel::SharedStorageSize);
  if (error == cudaSuccess) devices_set.fetch_or(bit, std::memory_order_release);
  return error;
}

inline Sm90Result failed(const char* step, cudaError_t error) {
  return {Sm90Result::kFailed, step, error};
}

// Runs the CUTLASS kernel. What ConvUniversalAdapter::run would do, but it returns the CUDA
// error of a failed step (the adapter clears it and returns kErrorInternal, and would report an
// earlier pending error as its own). Nothing here allocates: no tree needs a workspace.
template <class Op>
Sm90Result run(typename Op::Conv::Arguments const& args, cudaStream_t stream) {
  using Kernel = typename Op::Kernel;
  if (!Kernel::can_implement(args)) return {Sm90Result::kRejected, "CUTLASS's can_implement refused the problem"};
  if (Kernel::get_workspace_size(args) != 0) return {Sm90Result::kRejected, "the epilogue asks for a workspace"};
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return failed("an earlier CUDA call (its error was still pending)", error);
  error = allow_dynamic_shared_memory<Kernel>();
  if (error != cudaSuccess) return failed("cudaFuncSetAttribute (dynamic shared memory)", error);
  // Params hold the TMA descriptors, encoded for this call's pointers and shape.
  typename Kernel::Params params = Kernel::to_underlying_arguments(args, nullptr);
  static_assert(cute::size(ClusterShape{}) == 1, "a cluster launch would need cudaLaunchKernelEx");
  cutlass::device_kernel<Kernel>
      <<<Kernel::get_grid_shape(params), Kernel::get_block_shape(), Kernel::SharedStorageSize, stream>>>(params);
  error = cudaGetLastError();
  if (error != cudaSuccess) return failed("the kernel launch", error);
  return {Sm90Result::kLaunched};
}

// Launch resources of a kernel, for the SASS gate's report (the binary holds only the
// static shared memory; CUTLASS's is dynamic): shared bytes, mainloop stages, threads.
template <class Op>
KernelInfo info_of() {
  return {static_cast<int>(Op::Kernel::SharedStorageSize), static_cast<int>(Op::Mainloop::DispatchPolicy::Stages),
          static_cast<int>(Op::Kernel::MaxThreadsPerBlock)};
}

template <DType D, bool Residual, int TileN>
KernelInfo conv_eval_info() {
  using Element = typename ElementOf<D>::type;
  return info_of<ConvKernelFor<Element, EvalTree<Element, Residual, TileN>, Residual, TileN>>();
}

template <DType D, int TileN>
KernelInfo conv_train_info() {
  using Element = typename ElementOf<D>::type;
  return info_of<ConvKernelFor<Element, TrainTree<Element, TileN>, false, TileN>>();
}

template <DType D, bool Residual, int TileN>
Sm90Result conv_eval(const ConvShape& s, const void* x, const void* w, const float* scale, const float* shift,
                     const void* r, void* y, bool relu, cudaStream_t stream) {
  using Element = typename ElementOf<D>::type;
  using Op = ConvKernelFor<Element, EvalTree<Element, Residual, TileN>, Residual, TileN>;
  using Problem = typename Op::ProblemShape;
  const Problem problem = problem_of<Problem>(s);
  using StrideC = typename Op::Kernel::StrideC;
  using StrideD = typename Op::Kernel::StrideD;
  // Tree arguments, children first and the node's last: acc, scale, shift [, residual], act.
  using TreeArgs = typename EvalTree<Element, Residual, TileN>::Arguments;
  const BnActArguments act{relu ? 1 : 0};
  TreeArgs tree;
  if constexpr (Residual) {
    tree = TreeArgs{{}, {scale}, {shift}, {}, act};
  } else {
    tree = TreeArgs{{}, {scale}, {shift}, act};
  }
  typename Op::Conv::Arguments args{
      problem,
      {static_cast<Element const*>(x), static_cast<Element const*>(w)},
      {tree, static_cast<Element const*>(r), output_stride<StrideC>(problem), static_cast<Element*>(y),
       output_stride<StrideD>(problem)}};
  return run<Op>(args, stream);
}

template <DType D, int TileN>
Sm90Result conv_train(const ConvShape& s, const void* x, const void* w, const float* bias, void* z, float* tile_mean,
                      float* tile_m2, int num_m_tiles, cudaStream_t stream) {
  using Element = typename ElementOf<D>::type;
  using Op = ConvKernelFor<Element, TrainTree<Element, TileN>, false, TileN>;
  using Problem = typename Op::ProblemShape;
  const Problem problem = problem_of<Problem>(s);
  using StrideC = typename Op::Kernel::StrideC;
  using StrideD = typename Op::Kernel::StrideD;
  // Tree arguments, children first: (acc, bias [null: zeros], plus), then the moments.
  using TreeArgs = typename TrainTree<Element, TileN>::Arguments;
  const TreeArgs tree{{{}, {bias}, {}}, {tile_mean, tile_m2, num_m_tiles}};
  typename Op::Conv::Arguments args{
      problem,
      {static_cast<Element const*>(x), static_cast<Element const*>(w)},
      {tree, nullptr, output_stride<StrideC>(problem), static_cast<Element*>(z), output_stride<StrideD>(problem)}};
  return run<Op>(args, stream);
}

}  // namespace resnet_fused::sm90
