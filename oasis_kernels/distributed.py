"""Routed attention over several processes (``torch.distributed``): the sequence split across ranks.

Each rank holds the tokens ``token_slices(grid, P)[rank]`` of every video in the batch,
``[B, n_rank, heads, D]``. :func:`routed_attention` runs Ulysses (head-parallel) attention: one
all-to-all gives each rank all the tokens of ``heads / P`` heads, the ordinary routed attention runs
on them with the layer plan's modes for those heads, and a second all-to-all returns each rank's
tokens with all heads. Uneven token counts are fine (the collectives take per-rank sizes); the head
count must divide by P. Autograd runs through both collectives (each one's backward is the other).

A global head costs T intra heads' FLOPs (9 at A; ~20 in measured time) and far more than a window
head, so contiguous head blocks would leave one rank with all the global heads: :func:`balance_heads`
gives a head order whose blocks of ``heads / P`` cost about the same (:func:`head_costs`, the cost
model: FLOPs, i.e. (query, key) pairs per head); fold it
into the model's q/k/v rows and o columns (``RoutingPlan`` of the permuted modes), as the routed
layer already does for its own head order.

Not here yet: the frame-parallel hybrid (local heads without the all-to-all), and timings on
several GPUs; docs/DISTRIBUTED.md models the communication of both.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .api import routed_attention as _routed_attention
from .plan import Mode, RoutingPlan, normalize_grid

__all__ = ["token_slices", "head_costs", "balance_heads", "routed_attention"]


def token_slices(grid, world_size: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` token range of each rank: whole frames when there are at least as many
    frames as ranks (earlier ranks one frame more when they do not divide), else an even split of the
    tokens (earlier ranks one token more)."""
    t, h, w = normalize_grid(grid)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    n = t * h * w
    unit, units = (h * w, t) if t >= world_size else (1, n)
    if units < world_size:
        raise ValueError(f"{n} tokens cannot be split across {world_size} ranks")
    base, extra = divmod(units, world_size)
    out, start = [], 0
    for r in range(world_size):
        stop = start + (base + (r < extra)) * unit
        out.append((start, stop))
        start = stop
    return out


def _axis_pairs(length: int, radius: int) -> int:
    """Sum over positions of the number of positions within ``radius`` on an axis of ``length``."""
    return sum(min(i + radius, length - 1) - max(i - radius, 0) + 1 for i in range(length))


def head_costs(plan: RoutingPlan, head_dim: int = 128) -> list[float]:
    """Forward FLOPs of each head at the plan's grid: 4 d x (query, key) pairs; a global head pairs all
    N^2, an intra head N x H W, a window head the clipped boxes' pairs."""
    t, h, w = plan.grid
    n = t * h * w
    pt, ph, pw = plan.window
    pairs = {Mode.GLOBAL: n * n, Mode.INTRA: n * h * w,
             Mode.WINDOW: _axis_pairs(t, pt // 2) * _axis_pairs(h, ph // 2) * _axis_pairs(w, pw // 2)}
    return [4.0 * head_dim * pairs[m] for m in plan.modes]


def balance_heads(plan: RoutingPlan, world_size: int, head_dim: int = 128) -> tuple[int, ...]:
    """A head order whose consecutive blocks of ``heads / world_size`` heads (rank 0's, rank 1's, ...)
    cost about the same: the longest-processing-time rule (the costliest head first, to the cheapest
    rank that has room). Its largest block costs at most the mean plus one head's cost."""
    heads = len(plan.modes)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1 or heads % world_size:
        allowed = [p for p in range(1, heads + 1) if heads % p == 0]
        raise ValueError(f"{heads} heads do not split across {world_size!r} ranks; use one of {allowed}")
    per_rank = heads // world_size
    costs = head_costs(plan, head_dim)
    load = [0.0] * world_size
    members: list[list[int]] = [[] for _ in range(world_size)]
    for hd in sorted(range(heads), key=lambda i: (-costs[i], i)):
        r = min((r for r in range(world_size) if len(members[r]) < per_rank), key=lambda r: (load[r], r))
        members[r].append(hd)
        load[r] += costs[hd]
    return tuple(hd for r in range(world_size) for hd in sorted(members[r]))


def _group_info(group):
    return dist.get_world_size(group), dist.get_rank(group)


def _exchange(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    """``all_to_all_single`` over dim 0 with per-rank row counts."""
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts,
                           group=group)
    return out


def _tokens_to_heads(x: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """``[B, n_rank, H, D]`` (this rank's tokens, all heads) -> ``[B, N, H/P, D]`` (all tokens, this
    rank's heads)."""
    world, rank = _group_info(group)
    b, n, h, d = x.shape
    hp = h // world
    send = x.view(b, n, world, hp, d).permute(2, 1, 0, 3, 4).reshape(world * n, b * hp * d)  # rank-major rows
    recv = _exchange(send, [n] * world, counts, group)  # rows: rank 0's tokens, rank 1's, ...
    return recv.view(sum(counts), b, hp, d).transpose(0, 1).contiguous()


def _heads_to_tokens(y: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """The inverse: ``[B, N, H/P, D]`` -> ``[B, n_rank, H, D]``."""
    world, rank = _group_info(group)
    b, n_all, hp, d = y.shape
    send = y.transpose(0, 1).reshape(n_all, b * hp * d)  # rows in token order = rank 0's, rank 1's, ...
    mine = counts[rank]
    recv = _exchange(send, counts, [mine] * world, group)  # rows: (head block of rank j, my tokens)
    return recv.view(world, mine, b, hp, d).permute(2, 1, 0, 3, 4).reshape(b, mine, world * hp, d)


class _TokensToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, group):
        ctx.counts, ctx.group = counts, group
        return _tokens_to_heads(x, counts, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_tokens(grad, ctx.counts, ctx.group), None, None


class _HeadsToTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, counts, group):
        ctx.counts, ctx.group = counts, group
        return _heads_to_tokens(y, counts, group)

    @staticmethod
    def backward(ctx, grad):
        return _tokens_to_heads(grad, ctx.counts, ctx.group), None, None


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RoutingPlan, group=None,
                     strategy: str = "auto") -> torch.Tensor:
    """Routed attention of the whole sequence, each rank holding its token slice.

    Args:
        q, k, v: ``[B, stop - start, heads, D]``, this rank's tokens ``token_slices(plan.grid, P)[rank]``.
        plan: the whole layer's :class:`RoutingPlan` (its modes in the heads' order).
        group: the process group (default: the world).
        strategy: ``"auto"`` or ``"ulysses"`` (the only one so far).

    Returns:
        ``[B, stop - start, heads, D]``: this rank's tokens of the attention output.
    """
    if strategy not in ("auto", "ulysses"):
        raise ValueError(f"strategy must be 'auto' or 'ulysses' (the frame-parallel hybrid is not built yet), "
                         f"got {strategy!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("oasis_kernels.distributed.routed_attention needs torch.distributed initialised")
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a RoutingPlan, got {type(plan).__name__}")
    world, rank = _group_info(group)
    heads = len(plan.modes)
    if heads % world:
        allowed = [p for p in range(1, heads + 1) if heads % p == 0]
        raise ValueError(f"{heads} heads do not split across {world} ranks; use one of {allowed}")
    slices = token_slices(plan.grid, world)
    counts = [stop - start for start, stop in slices]
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4 or x.shape[1] != counts[rank] or x.shape[2] != heads:
            raise ValueError(f"{name} must be [B, {counts[rank]}, {heads}, D] (rank {rank}'s tokens of grid "
                             f"{plan.grid}), got {tuple(x.shape)}")
    if world == 1:
        return _routed_attention(q, k, v, plan)
    hp = heads // world
    mine = RoutingPlan(plan.grid, plan.modes[rank * hp:(rank + 1) * hp], plan.window)
    qh, kh, vh = (_TokensToHeads.apply(x, counts, group) for x in (q, k, v))
    out = _routed_attention(qh, kh, vh, mine)
    return _HeadsToTokens.apply(out, counts, group)

