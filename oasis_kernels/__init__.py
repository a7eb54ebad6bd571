"""oasis-kernels: attention whose heads are routed to global, intra-frame or 3D-window patterns.

>>> import oasis_kernels as ok
>>> plan = ok.RoutingPlan(grid=(T, H, W), modes=["global", "intra", "window", ...], window=(3, 5, 5))
>>> out = ok.routed_attention(q, k, v, plan)   # q, k, v, out: [B, N, heads, D], N = T*H*W
>>> call = ok.prepare(q, plan, k, v); out = call(q, k, v)   # or prepared once, run many times
"""

from .api import attention_lse, global_attention, intra_frame_attention, routed_attention, window_attention
from .call import RoutedCall, prepare
from .config import Settings, configure, settings, use_settings
from .dispatch import BackendError, Dispatch, GroupDecision, decide, explain, single_stream
from .masks import BoxMask, GlobalMask, IntraFrameMask, WindowMask, mask_for
from .plan import Mode, RoutingPlan, head_runs, normalize_grid, normalize_window
from .reference import dense_reference

__version__ = "0.1.0"

__all__ = [
    "routed_attention",
    "prepare",
    "RoutedCall",
    "Settings",
    "settings",
    "configure",
    "use_settings",
    "global_attention",
    "intra_frame_attention",
    "window_attention",
    "attention_lse",
    "RoutingPlan",
    "Mode",
    "decide",
    "explain",
    "single_stream",
    "Dispatch",
    "GroupDecision",
    "BackendError",
    "BoxMask",
    "GlobalMask",
    "IntraFrameMask",
    "WindowMask",
    "mask_for",
    "dense_reference",
    "head_runs",
    "normalize_grid",
    "normalize_window",
]
