"""Build and install resfuse.

    pip install --no-build-isolation -e .      (or: ./run.sh setup)

`--no-build-isolation` is required: the CUDA extension `resfuse._C` must be compiled against
the torch that is installed. pip's isolated build environment would build with another torch
(the newest one, a multi-GB CUDA build) and the extension would not load with the installed one.

The extension is built when all of these hold, and skipped otherwise with one line saying why
(resfuse then runs on its Python backends):
  - RESFUSE_SKIP_CUDA_BUILD is not "1",
  - torch imports here,
  - torch is a CUDA build (`torch.version.cuda` is not None),
  - a CUDA toolkit is found (`torch.utils.cpp_extension.CUDA_HOME`).
TORCH_CUDA_ARCH_LIST (default "8.0;9.0") and MAX_JOBS (ninja's parallel jobs) are honoured.

Every build (editable or not, built or skipped) writes resfuse/_build_info.py (generated,
git-ignored): what the extension was built against, or why it was not built.
`resfuse._extension.load_extension()` reads it to explain a missing or mismatched extension.
"""
import datetime
import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext
from setuptools.command.build_py import build_py as _build_py
from setuptools.command.develop import develop as _develop

try:  # setuptools >= 64 (PEP 660 editable installs)
    from setuptools.command.editable_wheel import editable_wheel as _editable_wheel
except ImportError:  # pragma: no cover - older setuptools
    _editable_wheel = None

ROOT = os.path.dirname(os.path.abspath(__file__))
os.chdir(ROOT)  # package_dir and the csrc glob are relative to the checkout
BUILD_INFO_REL = os.path.join("resfuse", "_build_info.py")
DEFAULT_ARCH_LIST = "8.0;9.0"


def read_version() -> str:
    scope = {}
    with open(os.path.join(ROOT, "resfuse", "version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def nvcc_version(cuda_home):
    """'13.0.88' (or nvcc's last line of --version), None when no nvcc runs."""
    candidates = [os.path.join(cuda_home, "bin", "nvcc")] if cuda_home else []
    candidates.append(shutil.which("nvcc"))
    for nvcc in filter(None, candidates):
        try:
            out = subprocess.run([nvcc, "--version"], text=True, capture_output=True,
                                 check=True, timeout=60).stdout
        except Exception:  # noqa: BLE001 - not this one
            continue
        m = re.search(r"release [\d.]+, V([\d.]+)", out)
        return m.group(1) if m else (out.strip().splitlines() or ["unknown"])[-1]
    return None


def plan_cuda_extension() -> dict:
    """Decide whether resfuse._C is built. Returns the build record: `build` says which; when
    False, `why` says why not (plain words, no prefix)."""
    plan = dict(build=False, why=None, torch=None, torch_cuda=None, cuda_home=None,
                arch_list=None, nvcc=None, max_jobs=os.environ.get("MAX_JOBS") or None)
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any failure to import means: no extension
        plan["why"] = f"torch did not import at build time ({type(e).__name__}: {e})"
        return plan
    plan.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    if os.environ.get("RESFUSE_SKIP_CUDA_BUILD", "").strip() == "1":
        plan["why"] = "RESFUSE_SKIP_CUDA_BUILD=1"
        return plan
    if torch.version.cuda is None:
        plan["why"] = f"torch {torch.__version__} is a CPU-only build"
        return plan
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as e:  # noqa: BLE001
        plan["why"] = f"torch.utils.cpp_extension did not import ({type(e).__name__}: {e})"
        return plan
    if not CUDA_HOME:
        plan["why"] = (f"no CUDA toolkit found for torch {torch.__version__} (CUDA "
                       f"{torch.version.cuda}): set CUDA_HOME or put nvcc on PATH")
        return plan
    arch = (os.environ.get("TORCH_CUDA_ARCH_LIST") or "").strip() or DEFAULT_ARCH_LIST
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch  # read by torch's BuildExtension
    plan.update(build=True, cuda_home=CUDA_HOME, arch_list=arch, nvcc=nvcc_version(CUDA_HOME))
    return plan


def arch_list_define(arch: str):
    """The arch list as a -D flag the C++ side stringifies ("8.0;9.0" -> 8.0,9.0). Only
    [A-Za-z0-9.+] entries joined by commas: nothing a shell or ninja would split or eat."""
    entries = [a for a in re.split(r"[;,\s]+", arch) if a]
    if not entries or not all(re.fullmatch(r"[A-Za-z0-9.+]+", a) for a in entries):
        return []
    return [f"-DRESFUSE_CUDA_ARCH_LIST={','.join(entries)}"]


PLAN = plan_cuda_extension()


def cuda_extension():
    from torch.utils.cpp_extension import CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp"))) + \
        sorted(glob.glob(os.path.join("csrc", "*.cu")))
    defines = arch_list_define(PLAN["arch_list"])
    # The libstdc++ ABI torch was built with, said explicitly: some torch versions no longer
    # pass it, and a compiler whose default differs builds an extension that crashes the first
    # time an error message (a std::string) crosses into libc10.
    import torch
    defines = defines + [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    return CUDAExtension(
        name="resfuse._C",
        sources=sources,
        # No -std flag: torch's BuildExtension sets the standard its headers need (C++20 now).
        extra_compile_args={"cxx": ["-O3"] + defines,
                            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + defines},
    )


# ---- the build record, resfuse/_build_info.py --------------------------------------------------

_announced = False


def build_record(built: bool, reason=None) -> dict:
    return {
        "cuda_extension": built,
        "reason": reason,  # None when built, else "not built: <why>"
        "torch": PLAN["torch"],
        "torch_cuda": PLAN["torch_cuda"],
        "nvcc": PLAN["nvcc"] if PLAN["build"] else nvcc_version(PLAN["cuda_home"]),
        "cuda_home": PLAN["cuda_home"],
        "arch_list": PLAN["arch_list"],
        "max_jobs": PLAN["max_jobs"],
        "python": platform.python_version(),
        "resfuse": read_version(),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_build_record(record: dict, *also_under) -> None:
    """Write the record into the checkout, and into each build folder given (a wheel's)."""
    text = ("# Generated by setup.py (git-ignored): what resfuse._C was built against, or why it\n"
            "# was not built. Read by resfuse._extension.load_extension().\n"
            "BUILD_INFO = {\n"
            + "".join(f"    {k!r}: {v!r},\n" for k, v in record.items())
            + "}\n")
    for base in (ROOT,) + tuple(also_under):
        path = os.path.join(base, BUILD_INFO_REL)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def announce_and_record_plan() -> None:
    """Once per setup.py process, before anything is built: say what happens to resfuse._C and
    write the record. When the extension is to be built, the record says "not built" until
    build_ext finishes and rewrites it (so a failed build never leaves a record claiming one)."""
    global _announced
    if _announced:
        return
    _announced = True
    if PLAN["build"]:
        print(f"resfuse: building CUDA extension resfuse._C against torch {PLAN['torch']} "
              f"(CUDA {PLAN['torch_cuda']}, nvcc {PLAN['nvcc']}) for arch "
              f"{PLAN['arch_list']!r}, MAX_JOBS={PLAN['max_jobs'] or 'default'}",
              file=sys.stderr, flush=True)
        write_build_record(build_record(False, "not built: the build of resfuse._C did not finish"))
    else:
        print(f"resfuse: skipping CUDA extension resfuse._C: {PLAN['why']}", file=sys.stderr, flush=True)
        write_build_record(build_record(False, f"not built: {PLAN['why']}"))


# ---- commands ------------------------------------------------------------------------------------

if PLAN["build"]:
    from torch.utils.cpp_extension import BuildExtension

    _build_ext_base = BuildExtension.with_options(use_ninja=True)
else:
    _build_ext_base = _setuptools_build_ext


class build_py(_build_py):
    def run(self):
        announce_and_record_plan()  # first, so a wheel's build_py copies the record
        super().run()


class build_ext(_build_ext_base):
    def build_extensions(self):
        # Python's LDSHARED on Debian/Ubuntu links with -Bsymbolic-functions, which binds the
        # extension to its own copies of libstdc++ template code instead of the libstdc++ torch
        # loaded; with a newer compiler than torch's those copies crash (ostream << long in an
        # error message, seen on the lent H100 machine). Link without it.
        linker = getattr(self.compiler, "linker_so", None)
        if linker:
            self.compiler.linker_so = [a for a in linker if a != "-Wl,-Bsymbolic-functions"]
        super().build_extensions()

    def run(self):
        announce_and_record_plan()
        super().run()
        if PLAN["build"] and self.extensions:
            in_place = getattr(self, "inplace", False) or getattr(self, "editable_mode", False)
            write_build_record(build_record(True), *(() if in_place else (self.build_lib,)))
            print("resfuse: built resfuse._C", file=sys.stderr, flush=True)


cmdclass = {"build_py": build_py, "build_ext": build_ext}

if _editable_wheel is not None:
    class editable_wheel(_editable_wheel):
        def run(self):
            announce_and_record_plan()
            super().run()

    cmdclass["editable_wheel"] = editable_wheel


class develop(_develop):
    """`python setup.py develop`: setuptools >= 80 runs `pip install -e .` with build isolation
    here, which would build against a freshly downloaded torch. Run it without."""

    def run(self):
        # A pip that falls back to the legacy `setup.py develop` for `pip install -e` would
        # call back in here: then do setuptools' own develop instead of recursing.
        if os.environ.get("RESFUSE_DEVELOP_VIA_PIP"):
            return super().run()
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "-e", ROOT]
        if getattr(self, "no_deps", False):
            cmd.append("--no-deps")
        subprocess.check_call(cmd, env=dict(os.environ, RESFUSE_DEVELOP_VIA_PIP="1"))


cmdclass["develop"] = develop


def packages():
    # resfuse.triton_kernels (and any subpackage) comes from the top-level triton_kernels/
    # folder; a top-level `triton_kernels` package belongs to other projects and is never
    # installed.
    found = find_packages(include=["resfuse", "resfuse.*"])
    found += ["resfuse.triton_kernels"]
    found += ["resfuse.triton_kernels." + p for p in find_packages(where="triton_kernels")]
    return found


def long_description() -> str:
    path = os.path.join(ROOT, "README.md")
    return open(path).read() if os.path.exists(path) else ""


setup(
    name="resfuse",
    version=read_version(),
    description="Fused conv-BN-activation-residual blocks for PyTorch ResNets (Triton, CUDA, eager)",
    long_description=long_description(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=packages(),
    package_dir={"resfuse.triton_kernels": "triton_kernels"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest"],
        "plots": ["matplotlib"],  # bench/ plots
        "plot": ["matplotlib"],  # (the earlier name)
        "dev": ["pytest", "matplotlib", "ninja", "pybind11"],
    },
    ext_modules=[cuda_extension()] if PLAN["build"] else [],
    cmdclass=cmdclass,
    zip_safe=False,
)
