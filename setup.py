"""Build hook for the optional CUDA extension in ``csrc/``.

The extension is built only when ``csrc/`` holds CUDA sources, torch is importable with a
CUDA build and a CUDA toolkit (nvcc) is found. ``OASIS_BUILD_CUDA=1`` forces the build (and
fails loudly if it cannot), ``OASIS_BUILD_CUDA=0`` skips it. A CPU-only install never fails
because of it. Build with ``pip install --no-build-isolation -e .`` so the build sees the
torch you run with.
"""

import glob
import os
import shutil

from setuptools import setup


def _cuda_extension():
    sources = sorted(glob.glob("csrc/**/*.cu", recursive=True) + glob.glob("csrc/**/*.cpp", recursive=True))
    force = os.environ.get("OASIS_BUILD_CUDA")
    if force == "0" or not sources:
        if force == "1":
            raise RuntimeError("OASIS_BUILD_CUDA=1 but csrc/ holds no CUDA sources")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        if force == "1":
            raise
        print(f"oasis-kernels: skipping csrc/ ({exc})")
        return [], {}
    have_nvcc = shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME")
    if force != "1" and (torch.version.cuda is None or not have_nvcc):
        print("oasis-kernels: skipping csrc/ (needs a CUDA build of torch and nvcc; OASIS_BUILD_CUDA=1 forces)")
        return [], {}
    ext = CUDAExtension(
        "oasis_kernels._C",
        sources,
        # the Triton kernels run on sm80+; the copy kernel (csrc/copy_rows.cu) is built for
        # Ampere and Hopper, with PTX for newer cards
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-gencode=arch=compute_80,code=sm_80",
                                                     "-gencode=arch=compute_90,code=sm_90",
                                                     "-gencode=arch=compute_90,code=compute_90"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
