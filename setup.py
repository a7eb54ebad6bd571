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


def _cudnn_frontend_includes():
    """Include dirs for the optional direct cuDNN path (csrc/cudnn_sdpa.cpp), or [] where a header
    is missing: the cuDNN frontend's (the ``nvidia-cudnn-frontend`` wheel, or
    ``CUDNN_FRONTEND_INCLUDE``), cuDNN's (``nvidia-cudnn``, which CUDA builds of torch pull in)
    and NVRTC's (the toolkit's or ``nvidia-cuda-nvrtc``). ``OASIS_CUDNN_FRONTEND=0`` skips it."""
    if os.environ.get("OASIS_CUDNN_FRONTEND") == "0":
        return []
    import sys
    import sysconfig

    roots = [p for p in [*sys.path, sysconfig.get_paths()["purelib"]] if p and os.path.isdir(p)]
    candidates = {
        "cudnn_frontend.h": [os.environ.get("CUDNN_FRONTEND_INCLUDE", "")] + [os.path.join(r, "include") for r in roots],
        "cudnn.h": [os.path.join(r, "nvidia", "cudnn", "include") for r in roots] + ["/usr/include"],
        "nvrtc.h": [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")]
        + [os.path.join(r, "nvidia", sub, "include") for r in roots for sub in ("cu13", "cuda_nvrtc")],
    }
    found = []
    for header, dirs in candidates.items():
        hit = next((d for d in dirs if d and os.path.isfile(os.path.join(d, header))), None)
        if hit is None:
            print(f"oasis-kernels: building without the direct cuDNN path ({header} not found)")
            return []
        found.append(hit)
    return found


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
    frontend = _cudnn_frontend_includes()
    # the frontend loads cuDNN and NVRTC at run time (those torch loaded already): no link flags.
    # Its logging writes to std::cout/cerr, which crashed on the device's toolchain (a g++ that
    # links libstdc++ into the extension, where those streams were never initialised): off.
    defines = ["-DOASIS_WITH_CUDNN_FRONTEND", "-DNV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING",
               "-DNV_CUDNN_FRONTEND_DISABLE_LOGGING"] if frontend else []
    ext = CUDAExtension(
        "oasis_kernels._C",
        sources,
        include_dirs=frontend,
        # keep the symbols of any static library linked in (a toolchain that links libstdc++
        # statically, as on our GPU machines) private to the extension: exported, they mixed with
        # the process's shared libstdc++ and number formatting in the cuDNN frontend segfaulted
        extra_link_args=["-Wl,--exclude-libs,ALL"],
        # the Triton kernels run on sm80+; the copy kernel (csrc/copy_rows.cu) is built for
        # Ampere and Hopper, with PTX for newer cards
        # hidden visibility: PyTorch's libtorch_cuda exports its own (older) cuDNN frontend's
        # inline functions and classes; ours must bind to our copies, not be interposed by those
        extra_compile_args={"cxx": ["-O3", "-std=c++20", "-fvisibility=hidden", "-fvisibility-inlines-hidden",
                                    *defines],
                            "nvcc": ["-O3", "-gencode=arch=compute_80,code=sm_80",
                                     "-gencode=arch=compute_90,code=sm_90",
                                     "-gencode=arch=compute_90,code=compute_90"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
