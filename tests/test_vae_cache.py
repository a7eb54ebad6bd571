"""oasis.vae_cache: the causal cache entries of a stage's convolutions as slots of one tensor, against the
plain path (each entry a tensor of its own) on the CPU: the same bits, and the arenas really in use."""

import pytest
import torch

from oasis import vae_cache
from oasis.vae_cache import CacheArena, ConvGroup
from oasis.wan_vae import WanVAE, WanVAEConfig

TINY = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])


def _frames(value, t, c=3, h=2, w=3):
    return torch.full((1, c, t, h, w), float(value))


@pytest.mark.parametrize("m", [1, 2])
def test_windows_carry_each_layers_frames(m):
    """Three layers in turn, ``m`` slots of new frames a call: each window starts with the layer's own last
    frames (zeros at first), whatever moved meanwhile, and each compaction moves every entry once."""
    tp, layers, cache = 2, ["a", "b", "c"], {}
    group = ConvGroup(len(layers))
    group.plan(cache, m * tp)
    assert cache[group] == m
    last = {k: torch.zeros(1, 3, tp, 2, 3) for k in layers}
    for call in range(6):
        for i, k in enumerate(layers):
            new = torch.rand(1, 3, m * tp, 2, 3) + 10 * i + 100 * call
            arena = CacheArena.get(group, new, tp, cache)
            win = arena.window(k, new.shape[2], cache)
            assert win.shape == (1, 3, tp + m * tp, 2, 3)
            assert torch.equal(win[:, :, :tp], last[k]), (call, k)
            win[:, :, tp:] = new
            assert cache[k].data_ptr() == win[:, :, -tp:].data_ptr()  # the next entry: frames already there
            last[k] = new[:, :, -tp:].clone()
    assert arena.slots == len(layers) + m and arena.windows == 18
    assert arena.moves == 5 * len(layers)  # every call after the first: one compaction of the three entries


def test_entries_outside_the_arena_and_odd_calls():
    """A layer whose entry another path replaced gives its slot back; a call on frames filling no whole slot
    gets no window; ``entry`` hands out a slot for the plain path; no plan, a batch of two, gradients: no arena."""
    tp, cache = 2, {}
    group = ConvGroup(2)
    group.plan(cache, 2)
    x = torch.rand(1, 4, 2, 3, 3)
    arena = CacheArena.get(group, x, tp, cache)
    assert arena is CacheArena.get(group, x, tp, cache)
    assert arena.window("a", 3, cache) is None and arena.window("a", 1, cache) is None
    slot = arena.entry("a", cache)
    assert cache["a"] is slot and arena.pos["a"] == arena.slots - 1
    slot.fill_(7.0)
    win = arena.window("a", 2, cache)
    assert torch.equal(win[:, :, :tp], torch.full_like(win[:, :, :tp], 7.0))
    cache["a"] = torch.full((1, 4, tp, 3, 3), 5.0)  # replaced elsewhere (a CUDA kernel's entry)
    win = arena.window("a", 2, cache)
    assert torch.equal(win[:, :, :tp], torch.full_like(win[:, :, :tp], 5.0))
    assert list(arena.pos) == ["a"]
    arena.release("a")
    assert not arena.pos and all(o is None for o in arena.owner)
    assert CacheArena.get(group, torch.rand(1, 5, 2, 3, 3), tp, cache) is None  # another geometry
    assert CacheArena.get(group, torch.rand(2, 4, 2, 3, 3), tp, cache) is None  # a batch of two
    w = torch.rand(4, 4, 3, 3, 3, requires_grad=True)
    assert CacheArena.get(group, x, tp, cache, w) is None  # gradients wanted
    assert CacheArena.get(ConvGroup(2), x, tp, cache) is None  # no plan
    fresh = {}
    group.plan(fresh, 3)  # frames filling no whole slot: no plan
    assert group not in fresh


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    v = WanVAE(WanVAEConfig.from_dict(TINY)).eval()
    with torch.no_grad():
        for p in v.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return v


@pytest.mark.parametrize("chunk,piece", [(1, 2), (1, 4), (2, 3), (2, None), (1, 1)])
def test_arenas_give_the_plain_paths_bits(vae, monkeypatch, chunk, piece):
    """Decode and encode with the stages' arenas and with every entry a tensor of its own: the same bits, and
    windows were handed out (and entries moved) wherever a stage's calls fill whole slots."""
    torch.manual_seed(1)
    z = torch.randn(1, 16, 5, 5, 7)
    video = torch.rand(1, 3, 13, 40, 56) * 2 - 1
    made = []
    real = CacheArena.get.__func__

    def counting(cls, *a, **k):
        arena = real(cls, *a, **k)
        if arena is not None and all(arena is not m for m in made):
            made.append(arena)
        return arena

    with torch.no_grad():
        monkeypatch.setattr(CacheArena, "get", classmethod(counting))
        got = vae.decode(z, chunk=chunk, piece_frames=piece), vae.encode(video, chunk=chunk, piece_frames=piece)
        monkeypatch.setattr(CacheArena, "get", classmethod(lambda cls, *a, **k: None))
        want = vae.decode(z, chunk=chunk, piece_frames=piece), vae.encode(video, chunk=chunk, piece_frames=piece)
    for g, w in zip(got, want):
        assert g.isfinite().all() and torch.equal(g, w)
    windows = sum(a.windows for a in made)
    if piece == 1:  # one frame a call at the stages after the temporal upsamplers: fewer stages take part
        assert windows > 0
    else:
        assert len(made) >= 4 and windows > 0 and sum(a.moves for a in made) > 0


def test_no_arenas_for_one_call_or_a_batch(vae, monkeypatch):
    """All frames in one call, or a batch of two: no arena is made (and the results are the plain path's)."""
    calls = []
    real = CacheArena.__init__

    def init(self, *a, **k):
        calls.append(a)
        real(self, *a, **k)

    monkeypatch.setattr(CacheArena, "__init__", init)
    with torch.no_grad():
        vae.decode(torch.randn(1, 16, 3, 4, 4))
        vae.decode(torch.randn(2, 16, 3, 4, 4), chunk=1, piece_frames=2)
    assert not calls
    assert vae_cache.__all__ == ["ConvGroup", "CacheArena"]
