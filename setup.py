"""Build and install resfuse.

    pip install --no-build-isolation -e .

`--no-build-isolation`: the CUDA extension `resfuse._C` must be compiled against the torch that
is installed; pip's isolated build environment would install another torch to build with (the
newest, multi-GB CUDA build) and the result would not load.

The extension is built when torch imports, is a CUDA build, and a CUDA toolkit is found;
otherwise it is skipped with one line saying why, and resfuse runs on its Python backends.
Environment: RESFUSE_SKIP_CUDA_BUILD=1 forces the skip; TORCH_CUDA_ARCH_LIST (default
"8.0;9.0") and MAX_JOBS are honoured. What the build was made against is written to
resfuse/_build_info.py, which `resfuse.backends()` reads to explain a missing or
mismatched extension.
"""
import datetime
import glob
import os
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "resfuse", "_build_info.py")


def version() -> str:
    scope = {}
    with open(os.path.join(ROOT, "resfuse", "version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def nvcc_version(cuda_home):
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True,
                             capture_output=True, check=True).stdout
        return out.strip().splitlines()[-1]
    except Exception:
        return None


def cuda_extension_plan():
    """(ext_modules, cmdclass, info): the extension to build, or why not."""
    info = dict(cuda_extension=False, built_at=datetime.datetime.now(datetime.timezone.utc)
                .isoformat(timespec="seconds"))
    if os.environ.get("RESFUSE_SKIP_CUDA_BUILD", "0") == "1":
        return [], {}, dict(info, reason="skipped: RESFUSE_SKIP_CUDA_BUILD=1")
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # noqa: BLE001 - any import failure means: no extension
        return [], {}, dict(info, reason=f"not built: torch did not import at build time ({e})")
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    if torch.version.cuda is None:
        return [], {}, dict(info, reason=f"not built: torch {torch.__version__} is a CPU-only build")
    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None:
        return [], {}, dict(info, reason="not built: no CUDA toolkit found (set CUDA_HOME)")
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    ext = cpp_extension.CUDAExtension(
        name="resfuse._C", sources=sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]})
    info.update(cuda_extension=True, arch_list=arch, nvcc=nvcc_version(cuda_home),
                cuda_home=cuda_home, reason=None)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}, info


def write_build_info(info: dict):
    with open(BUILD_INFO, "w") as f:
        f.write("# Written by setup.py: what resfuse._C was (or was not) built against.\n")
        f.write(f"BUILD_INFO = {info!r}\n")


ext_modules, cmdclass, info = cuda_extension_plan()
write_build_info(info)
if info["reason"]:
    print(f"resfuse: skipping the CUDA extension resfuse._C: {info['reason']}", file=sys.stderr)
else:
    print(f"resfuse: building resfuse._C for {info['arch_list']} with {info['nvcc']}", file=sys.stderr)

setup(
    name="resfuse",
    version=version(),
    description="Fused conv-BN-activation-residual blocks for PyTorch ResNets (Triton, CUDA, eager)",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # resfuse.triton_kernels comes from the top-level triton_kernels/ folder; a top-level
    # `triton_kernels` package belongs to other projects and is never installed.
    packages=find_packages(include=["resfuse", "resfuse.*"]) + ["resfuse.triton_kernels"],
    package_dir={"resfuse.triton_kernels": "triton_kernels"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton"], "test": ["pytest"], "plot": ["matplotlib"],
                    "dev": ["pytest", "ninja", "pybind11"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
