"""CUDA streams of routed attention: the high-priority side stream the global heads run on, and
whether a stream is capturing a CUDA graph (:meth:`oasis_kernels.call.RoutedCall.forks`)."""

from __future__ import annotations

import threading

import torch

__all__ = ["side_stream", "capturing"]

#: one side stream per thread and device: a thread capturing a CUDA graph must not share its
#: side stream with another thread's eager work (that work would join the capture or break it)
_SIDE_STREAMS = threading.local()


def side_stream(device) -> "torch.cuda.Stream":
    streams = _SIDE_STREAMS.__dict__.setdefault("by_device", {})
    stream = streams.get(device)
    if stream is None:
        # the highest priority the device has (PyTorch maps a large negative number to it): the
        # block scheduler then issues the global heads' blocks before the local heads' whenever
        # both wait, so the local kernels take only the SMs the global kernels leave idle.
        # CUDA graphs keep the priority (PyTorch instantiates them with per-node priorities)
        stream = streams[device] = torch.cuda.Stream(device, priority=-1000)
    return stream


def capturing(device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph (PyTorch's check reads
    the current device's)."""
    if device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            return torch.cuda.is_current_stream_capturing()
    return torch.cuda.is_current_stream_capturing()
