// One kernel per translation unit (see conv_sm90.cuh): training (z + tile moments), bf16, 128x64 tiles.
#include "conv_sm90.cuh"

namespace resnet_fused::sm90 {
template Sm90Result conv_train<DType::BFloat16, 64>(const ConvShape&, const void*, const void*, const float*, void*,
                                                  float*, float*, int, cudaStream_t);
template KernelInfo conv_train_info<DType::BFloat16, 64>();
}
