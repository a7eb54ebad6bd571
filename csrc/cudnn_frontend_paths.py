"""Where the optional direct cuDNN path (csrc/cudnn_sdpa.cpp) finds its headers: the cuDNN
frontend's (the ``nvidia-cudnn-frontend`` wheel, or ``CUDNN_FRONTEND_INCLUDE``), cuDNN's
(``nvidia-cudnn``, which CUDA builds of torch pull in, or /usr/include) and NVRTC's (the
toolkit's or ``nvidia-cuda-nvrtc``). Used by setup.py and by the CPU test that compiles that path;
plain Python with no imports beyond the standard library, since it runs before anything is built.
"""

import os
import sys
import sysconfig


def include_dirs() -> tuple[list[str], str]:
    """``(dirs, "")`` with one include dir per header, or ``([], why)`` where one is missing or
    ``OASIS_CUDNN_FRONTEND=0`` turns the path off."""
    if os.environ.get("OASIS_CUDNN_FRONTEND") == "0":
        return [], "OASIS_CUDNN_FRONTEND=0"
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
            return [], f"{header} not found"
        found.append(hit)
    return found, ""


# the defines the extension is built with where the headers are found (setup.py, the CPU test).
# The frontend loads cuDNN and NVRTC at run time (those torch loaded already), so no link flags.
# Its logging is off: it first segfaulted on the device (the libstdc++ mix that setup.py's
# --exclude-libs now prevents), and cudnn_sdpa_last_decline() carries cuDNN's messages instead.
DEFINES = ["-DOASIS_WITH_CUDNN_FRONTEND", "-DNV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING", "-DNV_CUDNN_FRONTEND_DISABLE_LOGGING"]
