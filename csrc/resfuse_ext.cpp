// resfuse._C — the torch-facing binding file of the CUDA extension.
//
// This is the one translation unit of the extension that knows torch. The CUDA kernels live in
// csrc/*.cu files; the ops of the CUDA backend are registered HERE later, with
//   TORCH_LIBRARY_FRAGMENT(resfuse, m) { ... }        // a fragment: resfuse/ops.py defines ops
//                                                     // in the same namespace from Python
//   TORCH_LIBRARY_IMPL(resfuse, CUDA, m) { ... }      // the CUDA kernels of those ops
// For now the module exposes only build_info(): what it was compiled against, which
// resfuse._extension compares with the running torch to explain a mismatch.
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

#include <string>

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resfuse CUDA extension (ops are registered with TORCH_LIBRARY_FRAGMENT(resfuse, ...))";
  m.def("build_info", &build_info,
        "What this extension was compiled against: torch version, CUDA runtime version, arch list");
}
