"""Build hook for the optional CUDA extensions in ``csrc/``: ``oasis_kernels._C`` (the eager
replay and the cuDNN glue, ``csrc/*``), ``oasis_kernels._cuda_local`` (the local-attention
kernels, ``csrc/local_attention/``) and ``oasis._vae_conv`` (the VAE's convolutions, ``csrc/vae_conv/``).

They are built only when ``csrc/`` holds CUDA sources, torch is importable with a CUDA build
and a CUDA toolkit (nvcc) is found; ``MAX_JOBS`` limits the parallel compiles.
``OASIS_BUILD_CUDA=1`` forces the build (and fails loudly if it cannot), ``OASIS_BUILD_CUDA=0``
skips it. A CPU-only install never fails
because of it. Build with ``pip install --no-build-isolation -e .`` so the build sees the
torch you run with.
"""

import glob
import os
import shutil

from setuptools import setup


def _cudnn_frontend_flags():
    """Include dirs and defines for the optional direct cuDNN path, or ([], []) where its headers
    are missing (csrc/cudnn_frontend_paths.py says where it looks)."""
    import importlib.util

    path = os.path.join("csrc", "cudnn_frontend_paths.py")
    spec = importlib.util.spec_from_file_location("cudnn_frontend_paths", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    found, missing = module.include_dirs()
    if missing:
        print(f"oasis-kernels: building without the direct cuDNN path ({missing})")
        return [], []
    return found, module.DEFINES


#: the local-attention kernels (csrc/local_attention/, their own extension, loaded with
#: torch.ops.load_library): wgmma/cp.async code compiled for Hopper only (sm_90a),
#: the one card they are measured on; oasis_kernels.kernels.cuda_local JIT-builds the same sources
#: where this build did not run, with the same flags (oasis_kernels/kernels/cuda_local.py)
LOCAL_ATTENTION_SOURCES = sorted(glob.glob("csrc/local_attention/*.cu") + glob.glob("csrc/local_attention/*.cpp"))
LOCAL_ATTENTION_NVCC = ["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a"]


#: the Wan VAE's CUDA convolutions (csrc/vae_conv/, oasis._vae_conv, loaded with torch.ops.load_library): the
#: decoder's output convolution takes them by default on Hopper (docs/PERF.md entry 18p), so an install builds
#: them rather than the first decode; oasis/vae_cuda.py JIT-builds the same sources with the same flags where
#: this build did not run
VAE_CONV_SOURCES = sorted(glob.glob("csrc/vae_conv/*.cu") + glob.glob("csrc/vae_conv/*.cpp"))


def _cuda_extension():
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
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
    frontend, defines = _cudnn_frontend_flags()
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
    vae_conv = CUDAExtension(
        "oasis._vae_conv",
        VAE_CONV_SOURCES,
        depends=sorted(glob.glob("csrc/vae_conv/*.cuh") + glob.glob("csrc/vae_conv/*.h")
                       + glob.glob("csrc/hopper/*.cuh")),
        extra_link_args=["-Wl,--exclude-libs,ALL"],
        extra_compile_args={"cxx": ["-O3", "-std=c++17", "-fvisibility=hidden"], "nvcc": LOCAL_ATTENTION_NVCC},
    )
    local = CUDAExtension(
        "oasis_kernels._cuda_local",
        LOCAL_ATTENTION_SOURCES,
        # the kernels live in headers: setuptools rebuilds only when a listed file is newer
        depends=sorted(glob.glob("csrc/local_attention/*.cuh") + glob.glob("csrc/local_attention/*.h")),
        extra_link_args=["-Wl,--exclude-libs,ALL"],
        extra_compile_args={"cxx": ["-O3", "-std=c++17", "-fvisibility=hidden"], "nvcc": LOCAL_ATTENTION_NVCC},
    )
    return [ext, local, vae_conv], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
