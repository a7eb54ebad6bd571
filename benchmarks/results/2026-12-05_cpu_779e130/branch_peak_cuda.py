"""vae_peak.py's live-bytes count with the CUDA convolution's path stood in for on the CPU (ad hoc)."""
import sys
from pathlib import Path
ROOT = Path(sys.argv[1]).resolve()
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
import torch
import torch.nn.functional as F
from oasis import vae_conv, vae_cuda
from oasis.vae_kernels import norm_silu_reference
import vae_peak

RULE = sys.argv[2]  # "64": Cin a multiple of 64 (main); "96": also 96-channel stages
TR = {}


class T(vae_peak.Tracker):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        TR["t"] = self


vae_peak.Tracker = T


def takes(x, weight, time_pad, *, prev=None, residual=None, norm=False):
    cin, cout = weight.shape[1], weight.shape[0]
    ok_cin = cin % 64 == 0 or (RULE == "96" and cin % 96 == 0)
    return (time_pad == 2 and tuple(weight.shape[2:]) == (3, 3, 3) and ok_cin and cout % 96 == 0
            and (not norm or cout in (96, 192)))


def conv3d_k3(x, weight, bias=None, *, prev=None, residual=None, norm=None, tail=None, out=None):
    tr = TR["t"]
    tr.paused += 1
    try:
        front = prev if prev is not None else x.new_zeros((*x.shape[:2], 2, *x.shape[3:]))
        y = F.conv3d(torch.cat([front, x], 2), weight, None if bias is None else bias.to(x.dtype), padding=(0, 1, 1))
        if residual is not None:
            y = y + residual
        if norm is not None:
            y = norm_silu_reference(y, norm[0], norm[1])
    finally:
        tr.paused -= 1
    if out is None:
        out = torch.empty(y.shape, dtype=x.dtype, memory_format=torch.channels_last_3d)
    out.copy_(y)
    del y
    if tail is not None:
        tail.copy_(out[:, :, out.shape[2] - tail.shape[2]:])
    return out


vae_conv.cuda_kernel_takes = takes
vae_cuda.conv3d_k3 = conv3d_k3
vae_peak.main(sys.argv[3:])
