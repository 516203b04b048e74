// One kernel per translation unit (see conv_sm90.cuh): eval with a residual, tf32.
#include "conv_sm90.cuh"

namespace resnet_fused::sm90 {
template int conv_eval<DType::Float, true>(const ConvShape&, const void*, const void*, const float*, const float*,
                                       const void*, void*, bool, cudaStream_t);
template KernelInfo conv_eval_info<DType::Float, true>();
}
