// One kernel per translation unit (see conv_sm90.cuh): training forward (z and per-tile moments), fp16.
#include "conv_sm90.cuh"

namespace resnet_fused::sm90 {
template int conv_train<DType::Half>(const ConvShape&, const void*, const void*, const float*, void*, float*,
                                   float*, int, cudaStream_t);
template KernelInfo conv_train_info<DType::Half>();
}
