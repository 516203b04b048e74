// Op launchers and their registration: CUDA kernels for the resnet_fused_cuda ops.
//
// The schemas are defined once, in Python (resnet_fused/_library.py, SCHEMAS), by
// resnet_fused/backends/cuda.py after it imports this extension; here we only register
// kernels for the CUDA dispatch key (the dispatcher accepts an impl before its def and
// checks the C++ signature against the schema when the def arrives).
//
// Every launcher: argument checks with messages, device guard, current stream, early
// return on empty tensors, dtype dispatch (float16, bfloat16, float32), launch check.
// Activations are made NHWC-contiguous for the kernels (a copy for NCHW inputs); outputs
// take x's layout (channels_last iff x is channels_last), exactly as the reference.

#include <Python.h>

#include <array>
#include <atomic>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels.h"

extern "C" {
// `import resnet_fused._C` loads this library, which runs the TORCH_LIBRARY_IMPL below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "CUDA kernels of resnet_fused (ops under torch.ops.resnet_fused_cuda)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}

namespace resnet_fused {
namespace {

using at::Tensor;

constexpr const char* kPrefix = "resnet_fused_cuda: ";

DType dtype_of(const Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return DType::Half;
    case at::kBFloat16:
      return DType::BFloat16;
    case at::kFloat:
      return DType::Float;
    default:
      TORCH_CHECK(false, kPrefix, op, ": dtype ", t.scalar_type(),
                  " is not supported (float16, bfloat16 and float32 are; the reference backend handles the rest)");
  }
  return DType::Float;  // unreachable
}

void check_cuda(const Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.defined(), kPrefix, op, ": ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), kPrefix, op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

void check_like(const Tensor& t, const char* name, const Tensor& x, const char* op, bool same_dtype = true) {
  check_cuda(t, name, op);
  TORCH_CHECK(t.device() == x.device(), kPrefix, op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  if (same_dtype)
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), kPrefix, op, ": ", name, " has dtype ", t.scalar_type(),
                " but x has dtype ", x.scalar_type());
}

void check_channel_vector(const Tensor& t, const char* name, int64_t channels, const Tensor& x, const char* op) {
  check_like(t, name, x, op, /*same_dtype=*/false);
  TORCH_CHECK(t.dim() == 1 && t.numel() == channels, kPrefix, op, ": ", name, " must be 1-D with ", channels,
              " elements, got shape ", t.sizes());
  TORCH_CHECK(t.is_floating_point(), kPrefix, op, ": ", name, " must be floating point, got ", t.scalar_type());
}

void check_residual(const Tensor& residual, const std::vector<int64_t>& out_size, const Tensor& x, const char* op) {
  check_like(residual, "residual", x, op);
  TORCH_CHECK(residual.sizes() == at::IntArrayRef(out_size), kPrefix, op, ": residual must have the conv output's shape ",
              at::IntArrayRef(out_size), ", got ", residual.sizes());
}

// The layout the reference gives an op's activation outputs: channels_last iff x is.
at::MemoryFormat layout_of(const Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

Tensor nhwc(const Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

// An output in `format` plus the NHWC-dense buffer the kernels write (the same tensor when
// the output already is NHWC-dense; then finish() copies nothing).
struct Output {
  Tensor out, buf;
  Output(at::IntArrayRef sizes, const at::TensorOptions& opts, at::MemoryFormat format) {
    out = at::empty(sizes, opts.memory_format(format));
    buf = out.is_contiguous(at::MemoryFormat::ChannelsLast)
              ? out
              : at::empty(sizes, opts.memory_format(at::MemoryFormat::ChannelsLast));
  }
  Tensor finish() {
    if (!buf.is_same(out)) out.copy_(buf);
    return out;
  }
};

Tensor to_float_vec(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

cudaStream_t current_stream(const Tensor& x) { return c10::cuda::getCurrentCUDAStream(x.device().index()).stream(); }

// The device's compute capability major, asked once per device (not on every call).
int capability_major(c10::DeviceIndex device) {
  static std::atomic<int> known[64] = {};  // 0: not asked yet
  std::atomic<int>* slot = device >= 0 && device < 64 ? &known[device] : nullptr;
  if (slot != nullptr) {
    const int major = slot->load(std::memory_order_relaxed);
    if (major != 0) return major;
  }
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (slot != nullptr) slot->store(major, std::memory_order_relaxed);
  return major;
}

void check_sm80(const Tensor& x, const char* op) {
  const int major = capability_major(x.device().index());
  TORCH_CHECK(major >= 8, kPrefix, op, ": the convolution kernels need compute capability 8.0 or newer (sm80+), ",
              "device ", x.device(), " has ", major, ".x");
}

// Checks conv arguments and returns the implicit-GEMM shape (weight row length padded to 8).
ConvShape conv_shape(const Tensor& x, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, int64_t groups, const char* op) {
  TORCH_CHECK(x.dim() == 4, kPrefix, op, ": x must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, kPrefix, op, ": weight must be 4-D, got shape ", weight.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, kPrefix, op,
              ": stride, padding and dilation must have 2 elements each");
  TORCH_CHECK(groups == 1, kPrefix, op, ": groups=", groups,
              " is not supported by the implicit-GEMM kernels (grouped convolutions take the reference path)");
  TORCH_CHECK(x.size(1) == weight.size(1), kPrefix, op, ": x has ", x.size(1), " channels but weight ",
              weight.sizes(), " expects ", weight.size(1));
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 &&
                  padding[1] >= 0,
              kPrefix, op, ": invalid stride ", stride, ", padding ", padding, " or dilation ", dilation);
  ConvShape s{};
  s.n = x.size(0);
  s.c_in = x.size(1);
  s.h = x.size(2);
  s.w = x.size(3);
  s.c_out = weight.size(0);
  s.kh = weight.size(2);
  s.kw = weight.size(3);
  s.stride_h = stride[0];
  s.stride_w = stride[1];
  s.pad_h = padding[0];
  s.pad_w = padding[1];
  s.dil_h = dilation[0];
  s.dil_w = dilation[1];
  s.h_out = (s.h + 2 * s.pad_h - s.dil_h * (s.kh - 1) - 1) / s.stride_h + 1;
  s.w_out = (s.w + 2 * s.pad_w - s.dil_w * (s.kw - 1) - 1) / s.stride_w + 1;
  TORCH_CHECK(s.h_out > 0 && s.w_out > 0, kPrefix, op, ": input of spatial size ", x.sizes().slice(2),
              " is too small for kernel ", weight.sizes().slice(2), ": output size would be (", s.h_out, ", ",
              s.w_out, ")");
  s.k = s.kh * s.kw * s.c_in;
  s.k_pad = (s.k + 7) / 8 * 8;
  return s;
}

// float32 convolutions use TF32 tensor cores when PyTorch allows TF32 for cuDNN convolutions
// (torch.backends.cudnn.allow_tf32, default True), as nn.Conv2d does; else the exact path.
bool allow_tf32() { return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV); }

// The implicit GEMMs read x as NHWC rows of whole 16-byte vectors from a 16-byte aligned base
// (cp.async on sm80; TMA im2col on sm90). Returns x in that form, padding channels with zeros
// to a multiple of the vector (the 3-channel stem: 8 for 16-bit types, 4 for float32) and
// updating s (c_in, k, k_pad) to the padded shape; gemm_weight then pads the weight to match.
Tensor gemm_input(const Tensor& x, ConvShape& s, DType dtype) {
  const int64_t vec = dtype == DType::Float ? 4 : 8;
  const int64_t c_pad = (s.c_in + vec - 1) / vec * vec;
  Tensor xc = nhwc(x);
  if (c_pad != s.c_in) {
    Tensor padded = at::zeros({s.n, c_pad, s.h, s.w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    padded.narrow(1, 0, s.c_in).copy_(xc);
    s.c_in = c_pad;
    s.k = s.kh * s.kw * s.c_in;
    s.k_pad = (s.k + 7) / 8 * 8;
    return padded;
  }
  if (!aligned16(xc.data_ptr())) return xc.clone(at::MemoryFormat::ChannelsLast);  // a view at an odd offset
  return xc;
}

// Weight as [c_out][k_pad] OHWI rows, input channels zero-padded to s.c_in (see gemm_input)
// and rows to k_pad, 16-byte aligned: a view when it already is (aligned channels_last weights
// with k % 8 == 0), else one small copy.
Tensor gemm_weight(const Tensor& weight, const ConvShape& s) {
  Tensor ohwi = weight.permute({0, 2, 3, 1});
  const int64_t c = weight.size(1);
  if (c == s.c_in && s.k == s.k_pad && ohwi.is_contiguous() && aligned16(ohwi.data_ptr()))
    return ohwi.reshape({s.c_out, s.k});
  Tensor taps = at::zeros({s.c_out, s.kh, s.kw, s.c_in}, weight.options());
  taps.narrow(3, 0, c).copy_(ohwi);
  if (s.k == s.k_pad) return taps.view({s.c_out, s.k});
  Tensor padded = at::zeros({s.c_out, s.k_pad}, weight.options());
  padded.narrow(1, 0, s.k).copy_(taps.view({s.c_out, s.k}));
  return padded;
}

// The sm90 launcher's outcome: true when the CUTLASS kernel ran; false when the call is for the
// sm80 kernel (a shape, device or build the sm90 kernels do not take, by design; or a shape
// CUTLASS refused though our checks took it: warned once, counted); raises when a CUDA call of
// the launch failed, with its error (never a silent fallback that could hide it).
bool ran_sm90(const Sm90Result& result, const ConvShape& s, const char* op) {
  switch (result.outcome) {
    case Sm90Result::kLaunched:
      return true;
    case Sm90Result::kNotEligible:
      return false;
    case Sm90Result::kRejected:
      TORCH_WARN_ONCE(kPrefix, op, ": the Hopper (sm90) CUTLASS convolution refused a shape resnet_fused's checks ",
                      "accepted (", result.reason, "; x ", s.n, "x", s.c_in, "x", s.h, "x", s.w, ", weight ", s.c_out,
                      "x", s.c_in, "x", s.kh, "x", s.kw, ", stride ", s.stride_h, "x", s.stride_w, ", padding ",
                      s.pad_h, "x", s.pad_w, ", dilation ", s.dil_h, "x", s.dil_w,
                      "). Such calls run on the sm80 kernel; please report the shape.");
      return false;
    case Sm90Result::kFailed:
      break;
  }
  TORCH_CHECK(false, kPrefix, op, ": the Hopper (sm90) CUTLASS convolution failed at ", result.reason, ": ",
              cudaGetErrorString(result.error), ". RESNET_FUSED_CUDA_SM90=0 runs the sm80 kernel instead.");
  return false;
}

void check_conv_supported(const ConvShape& s, DType dtype, const char* op) {
  TORCH_CHECK(conv_igemm_supported(dtype, s), kPrefix, op, ": shape not supported by the implicit-GEMM kernel");
}

// An op output the caller did not ask for (output_mask false): an empty tensor, because a
// custom-op schema returns Tensor, not Tensor?. The one place for that rule in C++ (the
// Python backends' is _utils.unasked / or_unasked).
Tensor unasked(const Tensor& like) { return at::empty({0}, like.options()); }
Tensor or_unasked(const Tensor& t, const Tensor& like) { return t.defined() ? t : unasked(like); }

// --------------------------------------------------------------------------------------

Tensor add_relu(const Tensor& x, const Tensor& residual) {
  constexpr const char* op = "add_relu";
  check_cuda(x, "x", op);
  check_like(residual, "residual", x, op);
  TORCH_CHECK(residual.sizes() == x.sizes(), kPrefix, op, ": residual must have x's shape ", x.sizes(), ", got ",
              residual.sizes());
  const DType dtype = dtype_of(x, op);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::MemoryFormat format = layout_of(x);
  Tensor out = at::empty(x.sizes(), x.options().memory_format(format));
  if (out.numel() == 0) return out;
  // Elementwise: any layout works as long as x, residual and out share it.
  const Tensor xc = x.contiguous(format);
  const Tensor rc = residual.contiguous(format);
  launch_add_relu(dtype, xc.data_ptr(), rc.data_ptr(), out.data_ptr(), out.numel(), current_stream(x));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

Tensor conv_bn_eval(const Tensor& x, const Tensor& weight, const Tensor& scale, const Tensor& shift,
                    const std::optional<Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, int64_t groups, bool relu) {
  constexpr const char* op = "conv_bn_eval";
  check_cuda(x, "x", op);
  check_like(weight, "weight", x, op);
  const DType dtype = dtype_of(x, op);
  const ConvShape s = conv_shape(x, weight, stride, padding, dilation, groups, op);
  check_channel_vector(scale, "scale", s.c_out, x, op);
  check_channel_vector(shift, "shift", s.c_out, x, op);
  const std::vector<int64_t> out_size{s.n, s.c_out, s.h_out, s.w_out};
  if (residual.has_value()) check_residual(*residual, out_size, x, op);
  const c10::cuda::CUDAGuard device_guard(x.device());
  Output y(out_size, x.options(), layout_of(x));
  if (y.out.numel() == 0) return y.out;
  check_sm80(x, op);
  ConvShape g = s;  // the GEMM's shape: channels padded to whole 16-byte vectors
  const Tensor xc = gemm_input(x, g, dtype);
  const Tensor wc = gemm_weight(weight, g);
  check_conv_supported(g, dtype, op);
  const Tensor scale_f = to_float_vec(scale), shift_f = to_float_vec(shift);
  const Tensor rc = residual.has_value() ? nhwc(*residual) : Tensor();
  const void* r = rc.defined() ? rc.data_ptr() : nullptr;
  const cudaStream_t stream = current_stream(x);
  // Hopper: the CUTLASS TMA + wgmma kernel where it applies; else (other GPUs, the 3-channel
  // stem, exact float32, unaligned views) the sm80 implicit GEMM.
  if (!ran_sm90(launch_conv_eval_sm90(dtype, g, xc.data_ptr(), wc.data_ptr(), scale_f.data_ptr<float>(),
                                      shift_f.data_ptr<float>(), r, y.buf.data_ptr(), relu, allow_tf32(), stream),
                g, op))
    launch_conv_eval(dtype, g, xc.data_ptr(), wc.data_ptr(), scale_f.data_ptr<float>(), shift_f.data_ptr<float>(), r,
                     y.buf.data_ptr(), relu, allow_tf32(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y.finish();
}

// The training conv pass and its statistics: z_buf (NHWC) = conv(x, weight) [+ bias] with
// per-(M tile, channel) partials in the GEMM epilogue, merged in tile order into the batch
// mean and biased variance of the stored z, and the folded scale/shift of bn_weight/bn_bias.
void conv_and_stats(const char* op, DType dtype, const ConvShape& s, const Tensor& x, const Tensor& weight,
                    const std::optional<Tensor>& bias, const Tensor& bn_weight_f, const Tensor& bn_bias_f, double eps,
                    const Tensor& z_buf, const Tensor& mean, const Tensor& var, const Tensor& scale,
                    const Tensor& shift, cudaStream_t stream) {
  const at::TensorOptions stat_opts = x.options().dtype(at::kFloat);
  ConvShape g = s;  // the GEMM's shape: channels padded to whole 16-byte vectors
  const Tensor xc = gemm_input(x, g, dtype);
  const Tensor wc = gemm_weight(weight, g);
  check_conv_supported(g, dtype, op);
  const Tensor bias_f = bias.has_value() ? to_float_vec(*bias) : Tensor();
  const int64_t rows = s.n * s.h_out * s.w_out;
  const float* bias_p = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  // Hopper: the CUTLASS kernel with its 128-row tiles where it applies (as in conv_bn_eval); else
  // the sm80 implicit GEMM with 64-row tiles. Both write per-(channel, tile) (mean, M2), [c_out]
  // rows of `tiles` each; one allocation sized for the smaller tiles serves either.
  static_assert(kConvTileM <= kSm90TileM, "the partials are sized by the sm80 tiles");
  int64_t tile_rows = kSm90TileM;
  int64_t tiles = (rows + tile_rows - 1) / tile_rows;
  const Tensor partials = at::empty({2, s.c_out * ((rows + kConvTileM - 1) / kConvTileM)}, stat_opts);
  float* partial_mean = partials[0].data_ptr<float>();
  float* partial_m2 = partials[1].data_ptr<float>();
  if (!ran_sm90(launch_conv_train_sm90(dtype, g, xc.data_ptr(), wc.data_ptr(), bias_p, z_buf.data_ptr(), partial_mean,
                                       partial_m2, allow_tf32(), stream),
                g, op)) {
    tile_rows = kConvTileM;
    tiles = (rows + tile_rows - 1) / tile_rows;
    launch_conv_train(dtype, g, xc.data_ptr(), wc.data_ptr(), bias_p, z_buf.data_ptr(), partial_mean, partial_m2,
                      allow_tf32(), stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_bn_finalize(partial_mean, partial_m2, tiles, tile_rows, rows, s.c_out,
                     bn_weight_f.data_ptr<float>(), bn_bias_f.data_ptr<float>(), eps, mean.data_ptr<float>(),
                     var.data_ptr<float>(), scale.data_ptr<float>(), shift.data_ptr<float>(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> conv_bn_train(const Tensor& x, const Tensor& weight,
                                                         const std::optional<Tensor>& bias, const Tensor& bn_weight,
                                                         const Tensor& bn_bias, const std::optional<Tensor>& residual,
                                                         at::IntArrayRef stride, at::IntArrayRef padding,
                                                         at::IntArrayRef dilation, int64_t groups, double eps,
                                                         bool relu) {
  constexpr const char* op = "conv_bn_train";
  check_cuda(x, "x", op);
  check_like(weight, "weight", x, op);
  const DType dtype = dtype_of(x, op);
  const ConvShape s = conv_shape(x, weight, stride, padding, dilation, groups, op);
  if (bias.has_value()) check_channel_vector(*bias, "bias", s.c_out, x, op);
  check_channel_vector(bn_weight, "bn_weight", s.c_out, x, op);
  check_channel_vector(bn_bias, "bn_bias", s.c_out, x, op);
  const std::vector<int64_t> out_size{s.n, s.c_out, s.h_out, s.w_out};
  if (residual.has_value()) check_residual(*residual, out_size, x, op);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = current_stream(x);
  const at::MemoryFormat format = layout_of(x);
  Output y(out_size, x.options(), format);
  Output z(out_size, x.options(), format);
  const at::TensorOptions stat_opts = x.options().dtype(at::kFloat);
  Tensor mean = at::empty({s.c_out}, stat_opts), var = at::empty({s.c_out}, stat_opts);
  const int64_t rows = s.n * s.h_out * s.w_out;
  if (rows == 0 || s.c_out == 0) {
    // Statistics of an empty batch are NaN, as in the reference (mean over no elements).
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    var.fill_(std::numeric_limits<float>::quiet_NaN());
    return {y.out, z.out, mean, var};
  }
  check_sm80(x, op);
  const Tensor bn_weight_f = to_float_vec(bn_weight), bn_bias_f = to_float_vec(bn_bias);
  const Tensor rc = residual.has_value() ? nhwc(*residual) : Tensor();
  Tensor scale = at::empty({s.c_out}, stat_opts), shift = at::empty({s.c_out}, stat_opts);
  conv_and_stats(op, dtype, s, x, weight, bias, bn_weight_f, bn_bias_f, eps, z.buf, mean, var, scale, shift, stream);
  launch_bn_apply(dtype, z.buf.data_ptr(), scale.data_ptr<float>(), shift.data_ptr<float>(),
                  rc.defined() ? rc.data_ptr() : nullptr, y.buf.data_ptr(), rows * s.c_out, s.c_out, relu, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y.finish(), z.finish(), mean, var};
}

// Conv data/weight gradients: at::convolution_backward (cuDNN) as a documented first step;
// an implicit-GEMM dgrad/wgrad is future work. grad_out must be in x's layout.
std::tuple<Tensor, Tensor> conv_grads(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups, bool need_x, bool need_w) {
  if (!need_x && !need_w) return {Tensor(), Tensor()};
  auto grads = at::convolution_backward(grad_out, x, weight, std::nullopt, stride, padding, dilation, false, {0, 0},
                                        groups, {need_x, need_w, false});
  Tensor gx = std::get<0>(grads), gw = std::get<1>(grads);
  if (gx.defined()) gx = gx.contiguous(layout_of(x));
  if (gw.defined()) gw = gw.contiguous(layout_of(weight));
  return {gx, gw};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn_eval_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& scale, const std::optional<Tensor>& y,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
    std::array<bool, 5> output_mask) {
  constexpr const char* op = "conv_bn_eval_backward";
  check_cuda(x, "x", op);
  check_like(grad_y, "grad_y", x, op);
  check_like(weight, "weight", x, op);
  const DType dtype = dtype_of(x, op);
  TORCH_CHECK(grad_y.dim() == 4, kPrefix, op, ": grad_y must be 4-D, got shape ", grad_y.sizes());
  const int64_t channels = grad_y.size(1);
  check_channel_vector(scale, "scale", channels, x, op);
  TORCH_CHECK(!relu || y.has_value(), kPrefix, op, ": relu=True needs the forward output y");
  if (relu) {
    check_like(*y, "y", x, op);
    TORCH_CHECK(y->sizes() == grad_y.sizes(), kPrefix, op, ": y must have grad_y's shape ", grad_y.sizes());
  }
  const auto [need_x, need_w, need_scale, need_shift, need_residual] = output_mask;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::MemoryFormat format = layout_of(x);
  const int64_t rows = channels == 0 ? 0 : grad_y.numel() / channels;
  const bool need_g = need_w || need_scale || need_residual;
  const at::TensorOptions stat_opts = x.options().dtype(at::kFloat);

  Output g(grad_y.sizes(), x.options(), format), gs(grad_y.sizes(), x.options(), format);
  Tensor sum_g = at::zeros({channels}, stat_opts);
  if (rows > 0 && channels > 0 && (need_g || need_x || need_shift)) {
    const Tensor gy = nhwc(grad_y);
    const Tensor yc = relu ? nhwc(*y) : Tensor();
    const Tensor scale_f = to_float_vec(scale);
    const int64_t chunks = bn_backward_num_chunks(rows);
    Tensor partial = need_shift ? at::empty({chunks, channels}, stat_opts) : Tensor();
    const cudaStream_t stream = current_stream(x);
    launch_bn_eval_backward_fused(dtype, gy.data_ptr(), relu ? yc.data_ptr() : nullptr, scale_f.data_ptr<float>(),
                                  need_g ? g.buf.data_ptr() : nullptr, need_x ? gs.buf.data_ptr() : nullptr,
                                  need_shift ? partial.data_ptr<float>() : nullptr, rows, channels, relu, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_shift) {
      launch_sum_partials(partial.data_ptr<float>(), sum_g.data_ptr<float>(), chunks, channels, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  } else {
    g.out.zero_();
    g.buf.zero_();
    gs.out.zero_();
    gs.buf.zero_();
  }
  Tensor g_t = need_g ? g.finish() : Tensor();
  Tensor gs_t = need_x ? gs.finish() : Tensor();
  Tensor grad_x, wgrad_unscaled;
  std::tie(grad_x, std::ignore) = conv_grads(gs_t, x, weight, stride, padding, dilation, groups, need_x, false);
  std::tie(std::ignore, wgrad_unscaled) =
      conv_grads(g_t, x, weight, stride, padding, dilation, groups, false, need_w || need_scale);
  Tensor grad_w, grad_scale;
  if (wgrad_unscaled.defined()) {
    const Tensor wgrad_f = wgrad_unscaled.to(at::kFloat);
    if (need_w)
      grad_w = (wgrad_f * scale.to(at::kFloat).view({-1, 1, 1, 1})).to(weight.scalar_type()).contiguous(
          layout_of(weight));
    if (need_scale) grad_scale = (wgrad_f * weight.to(at::kFloat)).sum({1, 2, 3}).to(scale.scalar_type());
  }
  const Tensor grad_shift = need_shift ? sum_g.to(scale.scalar_type()) : Tensor();
  const Tensor grad_residual = need_residual ? g_t : Tensor();
  return {or_unasked(grad_x, x), or_unasked(grad_w, x), or_unasked(grad_scale, x), or_unasked(grad_shift, x),
          or_unasked(grad_residual, x)};
}

// Training backward, pass 1 (NHWC-dense activations, float32 vectors; yc undefined when !relu):
// sum_g[c] = sum of g and sum_gx[c] = sum of g * (z - mean) * invstd, g = ReLU-masked grad_y,
// through per-chunk partials summed in chunk order (deterministic).
void bn_backward_sums(DType dtype, const Tensor& gy, const Tensor& yc, const Tensor& zc, const Tensor& mean_f,
                      const Tensor& invstd, const Tensor& sum_g, const Tensor& sum_gx, bool relu,
                      cudaStream_t stream) {
  const int64_t channels = zc.size(1), rows = zc.numel() / channels;
  const at::TensorOptions stat_opts = zc.options().dtype(at::kFloat);
  const int64_t chunks = bn_backward_num_chunks(rows);
  Tensor partial_g = at::empty({chunks, channels}, stat_opts), partial_gx = at::empty({chunks, channels}, stat_opts);
  launch_bn_train_backward_reduce(dtype, gy.data_ptr(), relu ? yc.data_ptr() : nullptr, zc.data_ptr(),
                                  mean_f.data_ptr<float>(), invstd.data_ptr<float>(), partial_g.data_ptr<float>(),
                                  partial_gx.data_ptr<float>(), rows, channels, relu, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_sum_partials(partial_g.data_ptr<float>(), sum_g.data_ptr<float>(), chunks, channels, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_sum_partials(partial_gx.data_ptr<float>(), sum_gx.data_ptr<float>(), chunks, channels, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn_train_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& z, const std::optional<Tensor>& y,
    const Tensor& mean, const Tensor& var, const Tensor& bn_weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, double eps, bool relu, std::array<bool, 6> output_mask) {
  constexpr const char* op = "conv_bn_train_backward";
  check_cuda(x, "x", op);
  check_like(grad_y, "grad_y", x, op);
  check_like(weight, "weight", x, op);
  check_like(z, "z", x, op);
  const DType dtype = dtype_of(x, op);
  TORCH_CHECK(z.dim() == 4 && grad_y.sizes() == z.sizes(), kPrefix, op, ": grad_y ", grad_y.sizes(),
              " and z ", z.sizes(), " must be 4-D with the same shape");
  const int64_t channels = z.size(1);
  check_channel_vector(mean, "mean", channels, x, op);
  check_channel_vector(var, "var", channels, x, op);
  check_channel_vector(bn_weight, "bn_weight", channels, x, op);
  TORCH_CHECK(!relu || y.has_value(), kPrefix, op, ": relu=True needs the forward output y");
  if (relu) {
    check_like(*y, "y", x, op);
    TORCH_CHECK(y->sizes() == z.sizes(), kPrefix, op, ": y must have z's shape ", z.sizes());
  }
  const auto [need_x, need_w, need_bias, need_bn_weight, need_bn_bias, need_residual] = output_mask;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::MemoryFormat format = layout_of(x);
  const int64_t rows = channels == 0 ? 0 : z.numel() / channels;
  const at::TensorOptions stat_opts = x.options().dtype(at::kFloat);

  Output grad_z(z.sizes(), x.options(), format), g(z.sizes(), x.options(), format);
  Tensor sum_g = at::zeros({channels}, stat_opts), sum_gx = at::zeros({channels}, stat_opts);
  if (rows > 0 && channels > 0) {
    const cudaStream_t stream = current_stream(x);
    const Tensor gy = nhwc(grad_y), zc = nhwc(z);
    const Tensor yc = relu ? nhwc(*y) : Tensor();
    const Tensor mean_f = to_float_vec(mean);
    const Tensor invstd = at::rsqrt(var.to(at::kFloat) + eps).contiguous();
    const Tensor bn_weight_f = to_float_vec(bn_weight);
    // Pass 1: ReLU mask + the two BatchNorm reductions (sum g, sum g * x_hat).
    bn_backward_sums(dtype, gy, yc, zc, mean_f, invstd, sum_g, sum_gx, relu, stream);
    // Pass 2: dz (and the residual gradient g) in one elementwise pass.
    launch_bn_train_backward_dz(dtype, gy.data_ptr(), relu ? yc.data_ptr() : nullptr, zc.data_ptr(),
                                mean_f.data_ptr<float>(), invstd.data_ptr<float>(), bn_weight_f.data_ptr<float>(),
                                sum_g.data_ptr<float>(), sum_gx.data_ptr<float>(), grad_z.buf.data_ptr(),
                                need_residual ? g.buf.data_ptr() : nullptr, rows, rows, channels, relu, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    grad_z.buf.zero_();
    g.buf.zero_();
  }
  const Tensor grad_z_t = grad_z.finish();
  auto [grad_x, grad_w] = conv_grads(grad_z_t, x, weight, stride, padding, dilation, groups, need_x, need_w);
  const Tensor grad_bias = need_bias ? grad_z_t.sum({0, 2, 3}, false, at::kFloat).to(weight.scalar_type()) : Tensor();
  const Tensor grad_bn_weight = need_bn_weight ? sum_gx.to(bn_weight.scalar_type()) : Tensor();
  const Tensor grad_bn_bias = need_bn_bias ? sum_g.to(bn_weight.scalar_type()) : Tensor();
  const Tensor grad_residual = need_residual ? g.finish() : Tensor();
  return {or_unasked(grad_x, x),         or_unasked(grad_w, x),       or_unasked(grad_bias, x),
          or_unasked(grad_bn_weight, x), or_unasked(grad_bn_bias, x), or_unasked(grad_residual, x)};
}


// --------------------------------------------------------------------------------------
// Building blocks of the synchronized BatchNorm path (resnet_fused/distributed.py): the
// kernels above, split where the statistics and the gradient sums are all-reduced.

// Checks the (grad_y, z, y?) activations of the BatchNorm backward building blocks.
void check_bn_activations(const Tensor& grad_y, const Tensor& z, const std::optional<Tensor>& y, bool relu,
                          const char* op) {
  check_cuda(z, "z", op);
  TORCH_CHECK(z.dim() == 4, kPrefix, op, ": z must be 4-D (N, C, H, W), got shape ", z.sizes());
  check_like(grad_y, "grad_y", z, op);
  TORCH_CHECK(grad_y.sizes() == z.sizes(), kPrefix, op, ": grad_y must have z's shape ", z.sizes(), ", got ",
              grad_y.sizes());
  TORCH_CHECK(!relu || y.has_value(), kPrefix, op, ": relu=True needs the forward output y");
  if (relu) {
    check_like(*y, "y", z, op);
    TORCH_CHECK(y->sizes() == z.sizes(), kPrefix, op, ": y must have z's shape ", z.sizes(), ", got ", y->sizes());
  }
}

std::tuple<Tensor, Tensor, Tensor> conv_bn_stats(const Tensor& x, const Tensor& weight,
                                                 const std::optional<Tensor>& bias, at::IntArrayRef stride,
                                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "conv_bn_stats";
  check_cuda(x, "x", op);
  check_like(weight, "weight", x, op);
  const DType dtype = dtype_of(x, op);
  const ConvShape s = conv_shape(x, weight, stride, padding, dilation, groups, op);
  if (bias.has_value()) check_channel_vector(*bias, "bias", s.c_out, x, op);
  const c10::cuda::CUDAGuard device_guard(x.device());
  Output z({s.n, s.c_out, s.h_out, s.w_out}, x.options(), layout_of(x));
  const at::TensorOptions stat_opts = x.options().dtype(at::kFloat);
  Tensor mean = at::empty({s.c_out}, stat_opts), var = at::empty({s.c_out}, stat_opts);
  if (s.n * s.h_out * s.w_out == 0 || s.c_out == 0) {
    mean.fill_(std::numeric_limits<float>::quiet_NaN());  // as the reference: a mean over no elements
    var.fill_(std::numeric_limits<float>::quiet_NaN());
    return {z.out, mean, var};
  }
  check_sm80(x, op);
  // The folded scale/shift are not needed here: identity BatchNorm parameters, scratch outputs.
  const Tensor ones = at::ones({s.c_out}, stat_opts), zeros = at::zeros({s.c_out}, stat_opts);
  Tensor scale = at::empty({s.c_out}, stat_opts), shift = at::empty({s.c_out}, stat_opts);
  conv_and_stats(op, dtype, s, x, weight, bias, ones, zeros, 0.0, z.buf, mean, var, scale, shift, current_stream(x));
  return {z.finish(), mean, var};
}

Tensor bn_apply(const Tensor& z, const Tensor& mean, const Tensor& var, const Tensor& bn_weight,
                const Tensor& bn_bias, const std::optional<Tensor>& residual, double eps, bool relu) {
  constexpr const char* op = "bn_apply";
  check_cuda(z, "z", op);
  TORCH_CHECK(z.dim() == 4, kPrefix, op, ": z must be 4-D (N, C, H, W), got shape ", z.sizes());
  const DType dtype = dtype_of(z, op);
  const int64_t channels = z.size(1);
  check_channel_vector(mean, "mean", channels, z, op);
  check_channel_vector(var, "var", channels, z, op);
  check_channel_vector(bn_weight, "bn_weight", channels, z, op);
  check_channel_vector(bn_bias, "bn_bias", channels, z, op);
  if (residual.has_value()) check_residual(*residual, z.sizes().vec(), z, op);
  const c10::cuda::CUDAGuard device_guard(z.device());
  Output y(z.sizes(), z.options(), layout_of(z));
  if (y.out.numel() == 0) return y.out;
  // Fold as launch_bn_finalize does: scale = bn_weight * rsqrt(var + eps), shift = bn_bias - mean * scale.
  const Tensor scale = (bn_weight.to(at::kFloat) * at::rsqrt(var.to(at::kFloat) + eps)).contiguous();
  const Tensor shift = (bn_bias.to(at::kFloat) - mean.to(at::kFloat) * scale).contiguous();
  const Tensor zc = nhwc(z);
  const Tensor rc = residual.has_value() ? nhwc(*residual) : Tensor();
  launch_bn_apply(dtype, zc.data_ptr(), scale.data_ptr<float>(), shift.data_ptr<float>(),
                  rc.defined() ? rc.data_ptr() : nullptr, y.buf.data_ptr(), y.out.numel(), channels, relu,
                  current_stream(z));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y.finish();
}

// The recompute chain's forward (resnet_fused/recompute.py): conv_bn_stats of bn_apply(z_in).
// The activation goes through a temporary here; the Triton backend applies the BatchNorm + ReLU
// in its conv kernel's operand load instead (a CUTLASS prologue is future work).
std::tuple<Tensor, Tensor, Tensor> bn_act_conv_bn_stats(const Tensor& z_in, const Tensor& mean, const Tensor& var,
                                                        const Tensor& bn_weight, const Tensor& bn_bias, double eps,
                                                        bool relu, const Tensor& weight,
                                                        const std::optional<Tensor>& bias, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                                        int64_t groups) {
  const Tensor y_in = bn_apply(z_in, mean, var, bn_weight, bn_bias, std::nullopt, eps, relu);
  return conv_bn_stats(y_in, weight, bias, stride, padding, dilation, groups);
}

std::tuple<Tensor, Tensor> bn_apply_backward_reduce(const Tensor& grad_y, const Tensor& z,
                                                    const std::optional<Tensor>& y, const Tensor& mean, bool relu);

// Its backward's conv part: dgrad masked by the ReLU of relu(bn(z_in)) (as threshold_backward:
// zero where the activation is <= 0), wgrad against that activation, through a temporary, and
// BatchNorm backward's two sums of the masked gradient.
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_conv_backward(
    const Tensor& grad_z, const Tensor& z_in, const Tensor& mean, const Tensor& var, const Tensor& bn_weight,
    const Tensor& bn_bias, double eps, bool relu, const Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 2> output_mask) {
  const Tensor y_in = bn_apply(z_in, mean, var, bn_weight, bn_bias, std::nullopt, eps, relu);
  auto [g, grad_w] = conv_grads(grad_z.contiguous(layout_of(y_in)), y_in, weight, stride, padding, dilation, groups,
                                output_mask[0], output_mask[1]);
  if (!output_mask[0])
    return {unasked(z_in), output_mask[1] ? grad_w : unasked(weight), unasked(mean), unasked(mean)};
  if (relu) g = at::where(y_in <= 0, at::zeros_like(g), g);
  auto [sum_g, sum_g_zc] = bn_apply_backward_reduce(g, z_in, std::nullopt, mean, false);
  return {g, output_mask[1] ? grad_w : unasked(weight), sum_g, sum_g_zc};
}

std::tuple<Tensor, Tensor> bn_apply_backward_reduce(const Tensor& grad_y, const Tensor& z,
                                                    const std::optional<Tensor>& y, const Tensor& mean, bool relu) {
  constexpr const char* op = "bn_apply_backward_reduce";
  check_bn_activations(grad_y, z, y, relu, op);
  const DType dtype = dtype_of(z, op);
  const int64_t channels = z.size(1);
  check_channel_vector(mean, "mean", channels, z, op);
  const c10::cuda::CUDAGuard device_guard(z.device());
  const at::TensorOptions stat_opts = z.options().dtype(at::kFloat);
  Tensor sum_g = at::zeros({channels}, stat_opts), sum_g_zc = at::zeros({channels}, stat_opts);
  const int64_t rows = channels == 0 ? 0 : z.numel() / channels;
  if (rows == 0 || channels == 0) return {sum_g, sum_g_zc};
  const cudaStream_t stream = current_stream(z);
  const Tensor gy = nhwc(grad_y), zc = nhwc(z);
  const Tensor yc = relu ? nhwc(*y) : Tensor();
  // invstd = 1 turns the kernel's sum(g * (z - mean) * invstd) into sum(g * (z - mean)).
  bn_backward_sums(dtype, gy, yc, zc, to_float_vec(mean), at::ones({channels}, stat_opts), sum_g, sum_g_zc, relu,
                   stream);
  return {sum_g, sum_g_zc};
}

std::tuple<Tensor, Tensor> bn_apply_backward(const Tensor& grad_y, const Tensor& z, const std::optional<Tensor>& y,
                                             const Tensor& mean, const Tensor& var, const Tensor& bn_weight,
                                             const Tensor& sum_g, const Tensor& sum_g_zc, int64_t count, double eps,
                                             bool relu, std::array<bool, 2> output_mask) {
  constexpr const char* op = "bn_apply_backward";
  check_bn_activations(grad_y, z, y, relu, op);
  const DType dtype = dtype_of(z, op);
  const int64_t channels = z.size(1);
  check_channel_vector(mean, "mean", channels, z, op);
  check_channel_vector(var, "var", channels, z, op);
  check_channel_vector(bn_weight, "bn_weight", channels, z, op);
  check_channel_vector(sum_g, "sum_g", channels, z, op);
  check_channel_vector(sum_g_zc, "sum_g_zc", channels, z, op);
  TORCH_CHECK(count > 0, kPrefix, op, ": count must be positive, got ", count);
  const auto [need_dz, need_residual] = output_mask;
  const c10::cuda::CUDAGuard device_guard(z.device());
  const at::MemoryFormat format = layout_of(z);
  Output dz(z.sizes(), z.options(), format), g(z.sizes(), z.options(), format);
  const int64_t rows = channels == 0 ? 0 : z.numel() / channels;
  if (rows > 0 && channels > 0 && (need_dz || need_residual)) {
    const Tensor gy = nhwc(grad_y), zc = nhwc(z);
    const Tensor yc = relu ? nhwc(*y) : Tensor();
    const Tensor mean_f = to_float_vec(mean);
    const Tensor invstd = at::rsqrt(var.to(at::kFloat) + eps).contiguous();
    const Tensor bn_weight_f = to_float_vec(bn_weight);
    const Tensor sum_g_f = to_float_vec(sum_g);
    const Tensor sum_gx = (sum_g_zc.to(at::kFloat) * invstd).contiguous();  // the kernel's sum(g * xhat)
    launch_bn_train_backward_dz(dtype, gy.data_ptr(), relu ? yc.data_ptr() : nullptr, zc.data_ptr(),
                                mean_f.data_ptr<float>(), invstd.data_ptr<float>(), bn_weight_f.data_ptr<float>(),
                                sum_g_f.data_ptr<float>(), sum_gx.data_ptr<float>(), dz.buf.data_ptr(),
                                need_residual ? g.buf.data_ptr() : nullptr, rows, count, channels, relu,
                                current_stream(z));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const Tensor dz_t = need_dz ? dz.finish() : unasked(z);
  const Tensor g_t = need_residual ? g.finish() : unasked(z);
  return {dz_t, g_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused_cuda, CUDA, m) {
  m.impl("conv_bn_eval", &conv_bn_eval);
  m.impl("conv_bn_eval_backward", &conv_bn_eval_backward);
  m.impl("conv_bn_train", &conv_bn_train);
  m.impl("conv_bn_train_backward", &conv_bn_train_backward);
  m.impl("add_relu", &add_relu);
  m.impl("conv_bn_stats", &conv_bn_stats);
  m.impl("bn_apply", &bn_apply);
  m.impl("bn_apply_backward_reduce", &bn_apply_backward_reduce);
  m.impl("bn_apply_backward", &bn_apply_backward);
  m.impl("bn_act_conv_bn_stats", &bn_act_conv_bn_stats);
  m.impl("bn_act_conv_backward", &bn_act_conv_backward);
}

}  // namespace resnet_fused
