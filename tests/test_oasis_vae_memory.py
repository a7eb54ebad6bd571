"""oasis.wan_vae: what the decoder keeps alive while it decodes (its peak memory at 720p is these
tensors: docs/PERF.md entry 18e). Each test watches tensor objects through weak references on a tiny
config on the CPU; the arithmetic is unchanged by any of this (test_oasis_vae.py compares it with
diffusers)."""

import weakref

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from oasis import wan_vae
from oasis.wan_vae import CausalConv3d, PendingSum, ResidualBlock, UpBlock, WanVAE, WanVAEConfig


def tiny():
    torch.manual_seed(0)
    return WanVAE(WanVAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1), encoder=False).eval()


@pytest.mark.parametrize("piece", [None, 2, 1])
def test_each_stage_input_is_freed_before_the_next_stage(monkeypatch, piece):
    """When a stage starts (its residual blocks, or up_blocks.0's upsampler on the head's output for one chunk),
    every earlier stage's input is gone, storage and all: none is held by the stages' caller until the chunk ends
    (a recursion did that, ~0.33 GB a stage at 720p), nor a chunk's head output through its own stages, nor a group's
    head output by views of it once its chunks are decoded."""
    vae = tiny()
    seen, starts = [], []
    real_blocks, real_upsample = UpBlock.blocks, UpBlock.upsample

    def watch(handed):
        alive = [i for i, r in enumerate(seen) if not r.expired()]
        assert not alive, f"stage inputs {alive} of {len(seen)} still alive"
        x = handed[0]
        # the tensors a pending sum holds, not only the wrapper
        for t in (x.conv, x.residual) if isinstance(x, PendingSum) else (x,):
            if t is not None:
                seen.append(StorageWeakRef(t.untyped_storage()))
        del x
        starts.append(1)

    def blocks(self, handed, cache, *args, **kwargs):
        watch(handed)
        return real_blocks(self, handed, cache, *args, **kwargs)

    def upsample(self, handed, cache, *args, **kwargs):
        if self is vae.decoder.up_blocks[0]:  # the head's output for this chunk
            watch(handed)
        return real_upsample(self, handed, cache, *args, **kwargs)

    monkeypatch.setattr(UpBlock, "blocks", blocks)
    monkeypatch.setattr(UpBlock, "upsample", upsample)
    with torch.no_grad():
        vae.decode(torch.randn(1, 16, 5, 3, 4), chunk=1, piece_frames=piece)
    # every chunk through up_blocks.0's upsampler and the three later stages (pieces: more calls), up_blocks.0's
    # blocks once a group of LATENT_STAGE_FRAMES latent frames
    assert len(starts) >= 5 * 4 + -(-5 // wan_vae.LATENT_STAGE_FRAMES)


def test_conv1_output_is_freed_before_conv2_runs(monkeypatch):
    """Inside a residual block, conv1's output is read into conv2's buffer by the norm pass and then
    dropped, before conv2's output is allocated."""
    vae = tiny()
    conv2s = {m.conv2 for m in vae.modules() if isinstance(m, ResidualBlock)}
    pending, checked = {}, []
    real_input, real_conv = CausalConv3d.normed_input, CausalConv3d._conv

    def normed_input(self, x, *args, **kwargs):
        buf = real_input(self, x, *args, **kwargs)
        if self in conv2s:
            pending[self] = weakref.ref(x)
        return buf

    def conv(self, x, *args, **kwargs):
        ref = pending.pop(self, None)
        if ref is not None:
            assert ref() is None, "conv1's output is still alive when conv2 runs"
            checked.append(1)
        return real_conv(self, x, *args, **kwargs)

    monkeypatch.setattr(CausalConv3d, "normed_input", normed_input)
    monkeypatch.setattr(CausalConv3d, "_conv", conv)
    with torch.no_grad():
        vae.decode(torch.randn(1, 16, 2, 3, 4), chunk=1, piece_frames=2)
    assert len(checked) >= len(conv2s)


@pytest.mark.parametrize("channels_last", [False, True])
def test_cache_entries_are_overwritten_in_place(channels_last):
    """Each layer's cached frames go into the storage of the entry they replace (no moment with two
    entries of one layer): from the second chunk on, every entry; under autograd none, as the old
    entry is part of the graph."""
    vae = tiny().channels_last(channels_last)
    x = torch.randn(1, 16, 3, 3, 4).contiguous(memory_format=vae.memory_format)
    for grad in (False, True):
        cache: dict = {}
        with torch.set_grad_enabled(grad):
            z = vae.post_quant_conv(x.clone().requires_grad_(grad))
            vae.decoder(z[:, :, :1], cache, starts=True, piece_frames=2)
            vae.decoder(z[:, :, 1:2], cache, starts=False, piece_frames=2)
            # the entries themselves (an address could be reused by a new tensor once the old is freed)
            before = dict(cache)
            vae.decoder(z[:, :, 2:], cache, starts=False, piece_frames=2)
        same = sum(entry is before.get(layer) for layer, entry in cache.items())
        assert len(cache) > 10 and same == (0 if grad else len(cache)), (grad, same, len(cache))
