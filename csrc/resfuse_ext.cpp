// resfuse._C — the torch-facing binding file of the CUDA extension.
//
// The CUDA kernels live in csrc/*.cu files that include only CUDA headers (their launchers take
// raw pointers, sizes and a cudaStream_t) and are compile-checked on CPU machines with nvcc.
// This file is the one place that knows torch: it validates arguments with CHECK_* macros and
// registers the ops with TORCH_LIBRARY_FRAGMENT(resfuse, ...) / TORCH_LIBRARY_IMPL(resfuse,
// CUDA, ...) — a fragment, because resfuse/ops.py defines ops in the same namespace from Python.
// No kernels are registered yet (the CUDA backend is a later milestone); what exists is the
// build information that resfuse.backends() compares with the running torch.
#include <torch/extension.h>
#include <torch/version.h>
#include <cuda_runtime_api.h>

#include <string>

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch"] = std::string(TORCH_VERSION);
  info["cuda_runtime"] = CUDART_VERSION;  // e.g. 13000 for CUDA 13.0
#ifdef TORCH_CUDA_ARCH_LIST_STR
  info["arch_list"] = std::string(TORCH_CUDA_ARCH_LIST_STR);
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resfuse CUDA extension";
  m.def("build_info", &build_info, "What this extension was compiled against");
}
