// One kernel per translation unit (see conv_sm90.cuh): eval + residual, tf32, 128x64 tiles.
#include "conv_sm90.cuh"

namespace resnet_fused::sm90 {
template Sm90Result conv_eval<DType::Float, true, 64>(const ConvShape&, const void*, const void*, const float*,
                                                         const float*, const void*, void*, bool, cudaStream_t);
template KernelInfo conv_eval_info<DType::Float, true, 64>();
}
