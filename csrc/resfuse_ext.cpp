// resfuse._C — the torch-facing binding file of the CUDA extension.
//
// The one translation unit of the extension that knows torch. The CUDA kernels live in
// csrc/*.cu files (CUDA headers only; their launchers, declared in resfuse_kernels.h, take raw
// pointers, sizes and a cudaStream_t). This file checks every argument (CHECK_* below, clear
// messages naming the argument), puts the tensors of a call into one memory layout, allocates
// the outputs and workspaces, and registers the ops of the CUDA backend:
//   TORCH_LIBRARY_FRAGMENT(resfuse, m)   // schemas (resfuse/ops.py defines the composite ops
//                                        // of the same namespace from Python)
//   TORCH_LIBRARY_IMPL(resfuse, CUDA, m) // their CUDA kernels
// Fake (meta) implementations are registered from Python (resfuse/backend/cuda.py). The module
// also exposes build_info(): what it was compiled against, which resfuse._extension compares
// with the running torch to explain a mismatch.
//
// Built by setup.py (torch.utils.cpp_extension.CUDAExtension) only with a CUDA build of torch;
// it must compile against torch 2.11+ (C++20, as BuildExtension sets it).
#include <torch/extension.h>

#if defined(__has_include)
#if __has_include(<torch/version.h>)
#include <torch/version.h>
#endif
#if __has_include(<cuda_runtime_api.h>)
#include <cuda_runtime_api.h>  // CUDART_VERSION
#endif
#endif

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "resfuse_kernels.h"

// setup.py passes -DRESFUSE_CUDA_ARCH_LIST=8.0,9.0 (TORCH_CUDA_ARCH_LIST, comma-separated):
// stringified here. Variadic, so the commas stay part of the one argument.
#define RESFUSE_STRINGIFY_(...) #__VA_ARGS__
#define RESFUSE_STRINGIFY(...) RESFUSE_STRINGIFY_(__VA_ARGS__)

namespace {

pybind11::dict build_info() {
  pybind11::dict info;

#if defined(TORCH_VERSION)
  info["torch"] = std::string(TORCH_VERSION);  // e.g. "2.11.0" (no local "+cu130" suffix)
#elif defined(TORCH_VERSION_MAJOR) && defined(TORCH_VERSION_MINOR) && defined(TORCH_VERSION_PATCH)
  info["torch"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
                  "." + std::to_string(TORCH_VERSION_PATCH);
#else
  info["torch"] = pybind11::none();
#endif

#if defined(CUDART_VERSION)
  // CUDART_VERSION is 1000 * major + 10 * minor, e.g. 13000 for CUDA 13.0.
  info["cuda_runtime_version"] = static_cast<int>(CUDART_VERSION);
  info["cuda_runtime"] = std::to_string(CUDART_VERSION / 1000) + "." +
                         std::to_string((CUDART_VERSION % 1000) / 10);
#else
  info["cuda_runtime_version"] = pybind11::none();
  info["cuda_runtime"] = pybind11::none();
#endif

#if defined(RESFUSE_CUDA_ARCH_LIST)
  info["arch_list"] = std::string(RESFUSE_STRINGIFY(RESFUSE_CUDA_ARCH_LIST));
#else
  info["arch_list"] = pybind11::none();
#endif

#if defined(_GLIBCXX_USE_CXX11_ABI)
  info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
#endif
  return info;
}


// ---- argument checks ------------------------------------------------------------------------
// Numbers and shapes in messages are formatted with std::to_string, never with an ostream
// `<<` on an integer: a toolchain whose libstdc++ differs from torch's can instantiate that
// operator inside this library and crash on the error path (seen with torch 2.11 on the lent
// H100 machine). setup.py also links without -Bsymbolic-functions for the same reason.
std::string num(int64_t v) { return std::to_string(v); }

std::string shape(at::IntArrayRef s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + (s.size() == 1 ? ",)" : ")");
}

#define CHECK_CUDA(x, name) TORCH_CHECK((x).is_cuda(), "resfuse (cuda backend): ", name, " must be a CUDA tensor, got one on ", (x).device())
#define CHECK_SAME_DEVICE(x, ref, name) \
  TORCH_CHECK((x).device() == (ref).device(), "resfuse (cuda backend): ", name, " is on ", (x).device(), " but the input is on ", (ref).device())
#define CHECK_DTYPE(x, dt, name) \
  TORCH_CHECK((x).scalar_type() == (dt), "resfuse (cuda backend): ", name, " must have dtype ", (dt), ", got ", (x).scalar_type())
#define CHECK_PER_CHANNEL(x, C, name)                                                                  \
  TORCH_CHECK((x).dim() == 1 && (x).size(0) == (C), "resfuse (cuda backend): ", name, " must have shape (", num(C), \
              ",), got ", shape((x).sizes()))

resfuse::DType kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return resfuse::DType::kFloat32;
    case at::kDouble: return resfuse::DType::kFloat64;
    case at::kHalf: return resfuse::DType::kFloat16;
    case at::kBFloat16: return resfuse::DType::kBFloat16;
    default: TORCH_CHECK(false, "resfuse (cuda backend): ", name, " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  }
}

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The layout every tensor of a call will share: z's own when it is dense in NCHW or NHWC
// order, else (odd strides) the one it suggests, after a copy.
struct Layout {
  at::MemoryFormat format;
  resfuse::Geometry geo;
};

Layout layout_of(at::Tensor& z, const char* name) {
  TORCH_CHECK(z.dim() == 4, "resfuse (cuda backend): ", name, " must be 4-D (N, C, H, W), got shape ", shape(z.sizes()));
  at::MemoryFormat fmt;
  if (z.is_contiguous()) {
    fmt = at::MemoryFormat::Contiguous;
  } else if (z.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    fmt = at::MemoryFormat::ChannelsLast;
  } else {
    fmt = z.suggest_memory_format();
    z = z.contiguous(fmt);
  }
  resfuse::Geometry g;
  g.n = z.size(0);
  g.c = z.size(1);
  g.hw = z.size(2) * z.size(3);
  g.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  return {fmt, g};
}

// `t` (shaped like z) in z's layout, checked; copies only when its strides differ.
at::Tensor like_z(const at::Tensor& t, const at::Tensor& z, const Layout& L, const char* name) {
  CHECK_CUDA(t, name);
  CHECK_SAME_DEVICE(t, z, name);
  CHECK_DTYPE(t, z.scalar_type(), name);
  TORCH_CHECK(t.sizes() == z.sizes(), "resfuse (cuda backend): ", name, " must have shape ", shape(z.sizes()), ", got ", shape(t.sizes()));
  return t.contiguous(L.format);
}

// A per-channel vector in the accumulation dtype (a copy only when it is not one already).
at::Tensor per_channel(const at::Tensor& t, const at::Tensor& z, int64_t C, const char* name) {
  CHECK_CUDA(t, name);
  CHECK_SAME_DEVICE(t, z, name);
  CHECK_PER_CHANNEL(t, C, name);
  return t.to(acc_type(z)).contiguous();
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "resfuse (cuda backend): ", what, " failed: ", cudaGetErrorString(err));
}

// SMs of the current device (sizes the reduction grids; read once per device).
int num_sms() {
  static int cached[64] = {0};
  int dev = 0;
  check_launch(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 0 || dev >= 64) dev = 0;
  if (cached[dev] == 0) {
    int n = 0;
    check_launch(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    cached[dev] = n > 0 ? n : 1;
  }
  return cached[dev];
}

resfuse::Act act_of(int64_t a) {
  TORCH_CHECK(a >= 0 && a < resfuse::kNumActs, "resfuse (cuda backend): activation code must be 0..",
              num(resfuse::kNumActs - 1), ", got ", num(a));
  return static_cast<resfuse::Act>(a);
}

resfuse::Saved saved_of(int64_t k) {
  TORCH_CHECK(k >= 0 && k <= 3, "resfuse (cuda backend): saved_kind must be 0..3, got ", num(k));
  return static_cast<resfuse::Saved>(k);
}

// ---- ops --------------------------------------------------------------------------------------

// Batch statistics of z and what BN needs from them, with the running-stat update:
// returns (mean, invstd, scale, shift), per channel in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_stats_op(
    const at::Tensor& z_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum, double eps) {
  CHECK_CUDA(z_in, "z");
  const resfuse::DType dtype = kernel_dtype(z_in, "z");
  at::Tensor z = z_in;
  const Layout L = layout_of(z, "z");
  const int64_t C = L.geo.c;
  TORCH_CHECK(L.geo.per_channel() > 1, "resfuse (cuda backend): expected more than 1 value per channel for batch statistics, got input of shape ", shape(z.sizes()));
  const c10::cuda::CUDAGuard guard(z.device());
  const auto acc = acc_type(z);
  const auto opts = z.options().dtype(acc);
  at::Tensor w, b;
  if (weight.has_value()) w = per_channel(*weight, z, C, "bn_weight");
  if (bias.has_value()) b = per_channel(*bias, z, C, "bn_bias");
  const bool update = running_mean.has_value();
  TORCH_CHECK(update == running_var.has_value(), "resfuse (cuda backend): running_mean and running_var must be given together");
  at::Tensor rm, rv;
  if (update) {
    rm = per_channel(*running_mean, z, C, "running_mean");
    rv = per_channel(*running_var, z, C, "running_var");
  }
  const bool cumulative = !momentum.has_value();
  const bool have_nbt = num_batches_tracked.has_value();
  if (have_nbt) {
    CHECK_CUDA(*num_batches_tracked, "num_batches_tracked");
    CHECK_DTYPE(*num_batches_tracked, at::kLong, "num_batches_tracked");
    TORCH_CHECK(num_batches_tracked->numel() == 1, "resfuse (cuda backend): num_batches_tracked must hold one value");
  }
  auto mean = at::empty({C}, opts), invstd = at::empty({C}, opts);
  auto scale = at::empty({C}, opts), shift = at::empty({C}, opts);
  auto ws = at::empty({resfuse::reduce_workspace_elems(L.geo, num_sms())}, opts);
  at::Tensor nbt;
  if (update && have_nbt) {
    num_batches_tracked->add_(1);  // on the device, before the kernel reads it (momentum=None)
    nbt = num_batches_tracked->contiguous();
  }
  resfuse::BnStatsArgs a;
  a.z = z.const_data_ptr();
  a.dtype = dtype;
  a.geo = L.geo;
  a.weight = w.defined() ? w.const_data_ptr() : nullptr;
  a.bias = b.defined() ? b.const_data_ptr() : nullptr;
  a.running_mean = update ? rm.data_ptr() : nullptr;
  a.running_var = update ? rv.data_ptr() : nullptr;
  a.num_batches_tracked = nbt.defined() ? nbt.const_data_ptr<int64_t>() : nullptr;
  // momentum=None without a counter: nn.BatchNorm2d then uses factor 0 (stats unchanged).
  a.cumulative = cumulative && nbt.defined();
  a.momentum = cumulative ? 0.0 : *momentum;
  a.eps = eps;
  a.workspace = ws.data_ptr();
  a.num_sms = num_sms();
  a.mean = mean.data_ptr();
  a.invstd = invstd.data_ptr();
  a.scale = scale.data_ptr();
  a.shift = shift.data_ptr();
  check_launch(resfuse::bn_stats(a, c10::cuda::getCurrentCUDAStream().stream()), "bn_stats");
  if (update) {  // write back where the per-channel view was a converted copy
    if (!rm.is_same(*running_mean)) running_mean->copy_(rm);
    if (!rv.is_same(*running_var)) running_var->copy_(rv);
  }
  return {mean, invstd, scale, shift};
}

// y = act(z * scale + shift + residual); `save` 0: nothing, 1: the 1-bit mask (int32 words),
// 3: the pre-activation u. Returns (y, saved) with saved empty for 0.
std::tuple<at::Tensor, at::Tensor> bn_apply_op(const at::Tensor& z_in, const std::optional<at::Tensor>& scale,
                                               const std::optional<at::Tensor>& shift,
                                               const std::optional<at::Tensor>& residual, int64_t activation,
                                               double negative_slope, int64_t save) {
  CHECK_CUDA(z_in, "z");
  const resfuse::DType dtype = kernel_dtype(z_in, "z");
  at::Tensor z = z_in;
  const Layout L = layout_of(z, "z");
  const int64_t C = L.geo.c;
  const c10::cuda::CUDAGuard guard(z.device());
  TORCH_CHECK(scale.has_value() == shift.has_value(), "resfuse (cuda backend): scale and shift must be given together");
  TORCH_CHECK(save == 0 || save == 1 || save == 3, "resfuse (cuda backend): save must be 0 (nothing), 1 (mask) or 3 (input), got ", num(save));
  const resfuse::Act act = act_of(activation);
  TORCH_CHECK(save != 1 || act == resfuse::Act::kRelu || act == resfuse::Act::kLeakyRelu ||
                  act == resfuse::Act::kRelu6 || act == resfuse::Act::kHardsigmoid,
              "resfuse (cuda backend): a mask is saved for relu, leaky_relu, relu6 and hardsigmoid only");
  at::Tensor sc, sh, r;
  if (scale.has_value()) {
    sc = per_channel(*scale, z, C, "scale");
    sh = per_channel(*shift, z, C, "shift");
  }
  if (residual.has_value()) r = like_z(*residual, z, L, "residual");
  auto y = at::empty_like(z, L.format);
  at::Tensor saved;
  if (save == 1) saved = at::empty({resfuse::mask_words(z.numel())}, z.options().dtype(at::kInt));
  else if (save == 3) saved = at::empty_like(z, L.format);
  else saved = at::empty({0}, z.options());
  resfuse::ApplyForwardArgs a;
  a.z = z.const_data_ptr();
  a.residual = r.defined() ? r.const_data_ptr() : nullptr;
  a.dtype = dtype;
  a.geo = L.geo;
  a.scale = sc.defined() ? sc.const_data_ptr() : nullptr;
  a.shift = sh.defined() ? sh.const_data_ptr() : nullptr;
  a.act = act;
  a.slope = negative_slope;
  a.y = y.data_ptr();
  a.mask = save == 1 ? reinterpret_cast<uint32_t*>(saved.data_ptr<int32_t>()) : nullptr;
  a.u = save == 3 ? saved.data_ptr() : nullptr;
  a.num_sms = num_sms();
  check_launch(resfuse::bn_apply_forward(a, c10::cuda::getCurrentCUDAStream().stream()), "bn_apply");
  return {y, saved};
}

struct SavedArg {
  resfuse::Saved kind = resfuse::Saved::kNone;
  at::Tensor t;  // kept alive through the launch
};

SavedArg saved_arg(const std::optional<at::Tensor>& saved, int64_t saved_kind, const at::Tensor& z, const Layout& L) {
  SavedArg s;
  s.kind = saved_of(saved_kind);
  if (s.kind == resfuse::Saved::kNone) return s;
  TORCH_CHECK(saved.has_value(), "resfuse (cuda backend): saved is required for saved_kind ", num(saved_kind));
  if (s.kind == resfuse::Saved::kMask) {
    CHECK_CUDA(*saved, "saved mask");
    CHECK_SAME_DEVICE(*saved, z, "saved mask");
    CHECK_DTYPE(*saved, at::kInt, "saved mask");
    TORCH_CHECK(saved->dim() == 1 && saved->numel() == resfuse::mask_words(z.numel()),
                "resfuse (cuda backend): saved mask must hold ", num(resfuse::mask_words(z.numel())), " words, got ", shape(saved->sizes()));
    s.t = saved->contiguous();
  } else {
    s.t = like_z(*saved, z, L, "saved");
  }
  return s;
}

// One pass: g_u (written when write_grad_u), the two BN-backward sums and the apply pass's
// coefficients. Returns (g_u or empty, sum_g, sum_gz, coef [3, C]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_reduce_op(
    const at::Tensor& grad_y_in, const std::optional<at::Tensor>& saved, int64_t saved_kind, const at::Tensor& z_in,
    const at::Tensor& mean_in, const at::Tensor& invstd_in, const std::optional<at::Tensor>& weight,
    bool use_batch_stats, int64_t activation, double negative_slope, bool write_grad_u) {
  CHECK_CUDA(z_in, "z");
  const resfuse::DType dtype = kernel_dtype(z_in, "z");
  at::Tensor z = z_in;
  const Layout L = layout_of(z, "z");
  const int64_t C = L.geo.c;
  TORCH_CHECK(L.geo.numel() > 0, "resfuse (cuda backend): bn_backward_reduce needs a non-empty input");
  const c10::cuda::CUDAGuard guard(z.device());
  const auto gy = like_z(grad_y_in, z, L, "grad_y");
  const SavedArg s = saved_arg(saved, saved_kind, z, L);
  const auto mean = per_channel(mean_in, z, C, "mean");
  const auto invstd = per_channel(invstd_in, z, C, "invstd");
  at::Tensor w;
  if (weight.has_value()) w = per_channel(*weight, z, C, "bn_weight");
  const auto opts = z.options().dtype(acc_type(z));
  auto sum_g = at::empty({C}, opts), sum_gz = at::empty({C}, opts), coef = at::empty({3, C}, opts);
  auto ws = at::empty({resfuse::reduce_workspace_elems(L.geo, num_sms())}, opts);
  at::Tensor gu = write_grad_u ? at::empty_like(z, L.format) : at::empty({0}, z.options());
  resfuse::BnBackwardReduceArgs a;
  a.grad_y = gy.const_data_ptr();
  a.saved = s.t.defined() ? s.t.const_data_ptr() : nullptr;
  a.saved_kind = s.kind;
  a.z = z.const_data_ptr();
  a.dtype = dtype;
  a.geo = L.geo;
  a.act = act_of(activation);
  a.slope = negative_slope;
  a.mean = mean.const_data_ptr();
  a.invstd = invstd.const_data_ptr();
  a.weight = w.defined() ? w.const_data_ptr() : nullptr;
  a.use_batch_stats = use_batch_stats;
  a.grad_u = write_grad_u ? gu.data_ptr() : nullptr;
  a.workspace = ws.data_ptr();
  a.num_sms = num_sms();
  a.sum_g = sum_g.data_ptr();
  a.sum_gz = sum_gz.data_ptr();
  a.coef = coef.data_ptr();
  check_launch(resfuse::bn_backward_reduce(a, c10::cuda::getCurrentCUDAStream().stream()), "bn_backward_reduce");
  return {gu, sum_g, sum_gz, coef};
}

// g_z = alpha * g_u + gamma * (z - mean) + beta, g_u recomputed from grad_y and `saved`.
at::Tensor bn_backward_apply_op(const at::Tensor& grad_y_in, const std::optional<at::Tensor>& saved,
                                int64_t saved_kind, const at::Tensor& z_in, const at::Tensor& mean_in,
                                const at::Tensor& coef_in, int64_t activation, double negative_slope) {
  CHECK_CUDA(z_in, "z");
  const resfuse::DType dtype = kernel_dtype(z_in, "z");
  at::Tensor z = z_in;
  const Layout L = layout_of(z, "z");
  const int64_t C = L.geo.c;
  const c10::cuda::CUDAGuard guard(z.device());
  const auto gy = like_z(grad_y_in, z, L, "grad_y");
  const SavedArg s = saved_arg(saved, saved_kind, z, L);
  const auto mean = per_channel(mean_in, z, C, "mean");
  CHECK_CUDA(coef_in, "coef");
  CHECK_SAME_DEVICE(coef_in, z, "coef");
  TORCH_CHECK(coef_in.dim() == 2 && coef_in.size(0) == 3 && coef_in.size(1) == C,
              "resfuse (cuda backend): coef must have shape (3, ", num(C), "), got ", shape(coef_in.sizes()));
  const auto coef = coef_in.to(acc_type(z)).contiguous();
  auto gz = at::empty_like(z, L.format);
  resfuse::BnBackwardApplyArgs a;
  a.grad_y = gy.const_data_ptr();
  a.saved = s.t.defined() ? s.t.const_data_ptr() : nullptr;
  a.saved_kind = s.kind;
  a.z = z.const_data_ptr();
  a.dtype = dtype;
  a.geo = L.geo;
  a.act = act_of(activation);
  a.slope = negative_slope;
  a.mean = mean.const_data_ptr();
  a.coef = coef.const_data_ptr();
  a.grad_z = gz.data_ptr();
  a.num_sms = num_sms();
  check_launch(resfuse::bn_backward_apply(a, c10::cuda::getCurrentCUDAStream().stream()), "bn_backward_apply");
  return gz;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resfuse CUDA extension (ops are registered with TORCH_LIBRARY_FRAGMENT(resfuse, ...))";
  m.def("build_info", &build_info,
        "What this extension was compiled against: torch version, CUDA runtime version, arch list");
}

TORCH_LIBRARY_FRAGMENT(resfuse, m) {
  m.def("cuda_bn_stats(Tensor z, Tensor? bn_weight, Tensor? bn_bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float? momentum, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_bn_apply(Tensor z, Tensor? scale, Tensor? shift, Tensor? residual, int activation, "
        "float negative_slope, int save) -> (Tensor, Tensor)");
  m.def("cuda_bn_backward_reduce(Tensor grad_y, Tensor? saved, int saved_kind, Tensor z, Tensor mean, "
        "Tensor invstd, Tensor? bn_weight, bool use_batch_stats, int activation, float negative_slope, "
        "bool write_grad_u) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_bn_backward_apply(Tensor grad_y, Tensor? saved, int saved_kind, Tensor z, Tensor mean, "
        "Tensor coef, int activation, float negative_slope) -> Tensor");
}

TORCH_LIBRARY_IMPL(resfuse, CUDA, m) {
  m.impl("cuda_bn_stats", &bn_stats_op);
  m.impl("cuda_bn_apply", &bn_apply_op);
  m.impl("cuda_bn_backward_reduce", &bn_backward_reduce_op);
  m.impl("cuda_bn_backward_apply", &bn_backward_apply_op);
}
