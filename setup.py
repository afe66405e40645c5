"""Build prefix_grouper; compile csrc/ into prefix_grouper._C where CUDA can be built.

Environment switches:
  PREFIX_GROUPER_SKIP_CUDA_BUILD=1   never build the CUDA extension
  PREFIX_GROUPER_FORCE_CUDA_BUILD=1  fail instead of skipping when it cannot be built
  PREFIX_GROUPER_CUDA_ARCHS="80;90a" SM architectures to compile for (default 80 and 90a)
  MAX_JOBS=N                         parallel compile jobs (ninja)
  CUDA_HOME=/path                    CUDA toolkit (default: /usr/local/cuda, then nvcc on PATH)
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    # /usr/local/bin/nvcc may be a wrapper script, so prefer the toolkit directory itself.
    def version(path):
        digits = path.rsplit("-", 1)[-1].split(".")
        return tuple(int(d) for d in digits if d.isdigit())

    for candidate in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), key=version, reverse=True):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def _gencode_flags(archs):
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip().replace("sm_", "").replace(".", "")
        if arch:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _cuda_extensions():
    """The CUDA extension and build command, or ([], {}) with a one-line reason printed."""

    def skip(reason):
        if _truthy("PREFIX_GROUPER_FORCE_CUDA_BUILD"):
            sys.exit(f"prefix_grouper: CUDA build forced but impossible: {reason}")
        print(f"prefix_grouper: skipping the CUDA extension ({reason}); Triton and PyTorch backends only")
        return [], {}

    if _truthy("PREFIX_GROUPER_SKIP_CUDA_BUILD"):
        return skip("PREFIX_GROUPER_SKIP_CUDA_BUILD is set")
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        return skip("no nvcc found; set CUDA_HOME")
    os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        return skip(f"torch is not importable in the build environment ({exc}); "
                    "install torch first and use --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU build")

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        return skip("csrc/ holds no sources")
    archs = os.environ.get("PREFIX_GROUPER_CUDA_ARCHS", "80;90a")
    nvcc_flags = ["-O3", "-lineinfo"] + _gencode_flags(archs)
    print(f"prefix_grouper: building the CUDA extension with {cuda_home} for sm {archs}")
    ext = CUDAExtension(
        name="prefix_grouper._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
