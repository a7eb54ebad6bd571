"""Routed attention over several processes (``torch.distributed``): the sequence split across ranks.

Each rank holds the tokens ``token_slices(grid, P)[rank]`` of every video in the batch,
``[B, n_rank, heads, D]``. :func:`routed_attention` runs Ulysses (head-parallel) attention: one
all-to-all gives each rank all the tokens of ``heads / P`` heads, the ordinary routed attention runs
on them with the layer plan's modes for those heads, and a second all-to-all returns each rank's
tokens with all heads. Uneven token counts are fine (the collectives take per-rank sizes); the head
count must divide by P. Autograd runs through both collectives (each one's backward is the other).

A global head costs T intra heads' FLOPs (9 at A; ~20 in measured time) and far more than a window
head, so contiguous head blocks would leave one rank with all the global heads (the DiT groups its
heads by mode): :func:`balance_heads` gives a head order whose blocks of ``heads / P`` cost about the
same (:func:`head_costs`, the cost model: FLOPs, i.e. (query, key) pairs per head), and Ulysses
sends each rank that order's block. The order is applied by the gather that lays out the
all-to-all's send buffer (a copy made anyway) and undone by the scatter of the return, so it costs
no pass of its own and follows each call's grid; nothing is folded into the model's weights, whose
heads stay grouped by mode for the one-GPU path and the hybrid.

The frame-parallel hybrid (``strategy="hybrid"``, the default where it can run) keeps the local
heads off the all-to-alls: with whole frames on each rank, intra heads exchange nothing and window
heads only the k and v of the window's temporal radius from each neighbour (point to point); only
the global heads take the all-to-alls. docs/DISTRIBUTED.md models both's traffic; timings on
several GPUs are not measured yet. :func:`rank_calls` lists the attention calls each rank makes (the
plans the layer builds, collectives aside), which one GPU can time rank by rank
(benchmarks/rank_share_bench.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .api import routed_attention as _routed_attention
from .plan import Mode, RoutingPlan, normalize_grid

__all__ = ["token_slices", "head_costs", "balance_heads", "RankCall", "rank_calls", "routed_attention"]


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


def _head_blocks(heads: int, world: int) -> list[int]:
    """Heads per rank: as even as possible, earlier ranks one more."""
    base, extra = divmod(heads, world)
    return [base + (r < extra) for r in range(world)]


def _tokens_to_heads(x: torch.Tensor, counts: list[int], group, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """``[B, n_rank, H, D]`` (this rank's tokens, all heads) -> ``[B, N, H_rank, D]`` (all tokens, this
    rank's block of heads; blocks as :func:`_head_blocks` of the heads in ``order``, default as they are).
    The order costs nothing: it is the gather that lays out the send buffer, a copy made anyway."""
    world, rank = _group_info(group)
    b, n, h, d = x.shape
    blocks = _head_blocks(h, world)
    rows = x.permute(2, 1, 0, 3)  # [H, n, B, D] view
    if order is not None:
        rows = rows[_head_index(order, x.device)]
    send = rows.reshape(h * n, b * d)  # rows (head, token): rank j's heads are one run
    recv = _exchange(send, [hj * n for hj in blocks], [blocks[rank] * c for c in counts], group)
    parts = torch.split(recv, [blocks[rank] * c for c in counts])  # from each rank: (my heads, its tokens)
    y = torch.cat([p.view(blocks[rank], c, b, d) for p, c in zip(parts, counts)], dim=1)  # [H_rank, N, B, D]
    return y.permute(2, 1, 0, 3).contiguous()


def _heads_to_tokens(y: torch.Tensor, counts: list[int], group, heads: int,
                     order: tuple[int, ...] | None = None) -> torch.Tensor:
    """The inverse: ``[B, N, H_rank, D]`` -> ``[B, n_rank, H, D]``."""
    world, rank = _group_info(group)
    b, n_all, hr, d = y.shape
    blocks = _head_blocks(heads, world)
    mine = counts[rank]
    send = torch.cat([p.permute(2, 1, 0, 3).reshape(hr * c, b * d)  # to rank i: (my heads, its tokens)
                      for p, c in zip(torch.split(y, counts, dim=1), counts)])
    recv = _exchange(send, [hr * c for c in counts], [hj * mine for hj in blocks], group)
    x = recv.view(heads, mine, b, d)  # rows (head, my token), heads in order: rank 0's block first
    if order is None:
        return x.permute(2, 1, 0, 3).contiguous()
    out = x.new_empty(b, mine, heads, d)
    out.permute(2, 1, 0, 3)[_head_index(order, x.device)] = x  # head order[i] is row block i: one scatter
    return out


class _TokensToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, group, order=None):
        ctx.counts, ctx.group, ctx.heads, ctx.order = counts, group, x.shape[2], order
        return _tokens_to_heads(x, counts, group, order)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_tokens(grad, ctx.counts, ctx.group, ctx.heads, ctx.order), None, None, None


class _HeadsToTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, counts, group, heads, order=None):
        ctx.counts, ctx.group, ctx.order = counts, group, order
        return _heads_to_tokens(y, counts, group, heads, order)

    @staticmethod
    def backward(ctx, grad):
        return _tokens_to_heads(grad, ctx.counts, ctx.group, ctx.order), None, None, None, None


class _Halo(torch.autograd.Function):
    """``[B, n, ...]`` (this rank's whole frames) -> the same with ``r`` frames of each neighbour's
    tokens around it (none past the sequence's ends); the backward returns the halo's gradients to
    their owners."""

    @staticmethod
    def forward(ctx, x, r_tokens, group):
        world, rank = _group_info(group)
        ctx.r, ctx.group = r_tokens, group
        first, last = x[:, :r_tokens].contiguous(), x[:, -r_tokens:].contiguous()
        prev = torch.empty_like(first) if rank > 0 else first[:, :0]
        nxt = torch.empty_like(last) if rank < world - 1 else last[:, :0]
        _p2p([(first, rank - 1, "send"), (last, rank + 1, "send"), (prev, rank - 1, "recv"),
              (nxt, rank + 1, "recv")], world, group)
        ctx.sizes = (prev.shape[1], x.shape[1], nxt.shape[1])
        return torch.cat([prev, x, nxt], dim=1)

    @staticmethod
    def backward(ctx, g):
        world, rank = _group_info(ctx.group)
        n_prev, n, n_next = ctx.sizes
        r = ctx.r
        g_prev, g_mid, g_next = g[:, :n_prev].contiguous(), g[:, n_prev:n_prev + n], g[:, n_prev + n:].contiguous()
        from_prev = torch.empty_like(g_mid[:, :r]) if rank > 0 else None
        from_next = torch.empty_like(g_mid[:, -r:]) if rank < world - 1 else None
        _p2p([(g_prev, rank - 1, "send"), (g_next, rank + 1, "send"), (from_prev, rank - 1, "recv"),
              (from_next, rank + 1, "recv")], world, ctx.group)
        out = g_mid.clone()
        if from_prev is not None:
            out[:, :r] += from_prev
        if from_next is not None:
            out[:, -r:] += from_next
        return out, None, None


class _GatherTokens(torch.autograd.Function):
    """This rank's tokens ``[B, n_rank, h, D]`` -> every rank's, ``[B, N, h, D]`` (an all-gather, each slice
    padded to the largest); the backward returns to each rank the sum of the ranks' gradients of its
    tokens, added in rank order in at least float32 (an all-to-all of the slices and a local sum: the same bits on
    every run, and gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, counts, group):
        ctx.counts, ctx.group = counts, group
        most = max(counts)
        padded = x.new_zeros((x.shape[0], most, *x.shape[2:]))
        padded[:, :x.shape[1]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:, :c] for p, c in zip(parts, counts)], dim=1)

    @staticmethod
    def backward(ctx, g):
        world, rank = _group_info(ctx.group)
        b, n, h, d = g.shape
        mine = ctx.counts[rank]
        send = g.permute(1, 0, 2, 3).reshape(n, b * h * d)  # rows are tokens: rank j's are one run
        recv = _exchange(send, ctx.counts, [mine] * world, ctx.group).view(world, mine, b, h, d)
        wide = torch.promote_types(g.dtype, torch.float32)  # float64 stays float64
        total = recv[0].to(wide)
        for part in recv[1:]:
            total += part.to(wide)
        return total.to(g.dtype).permute(1, 0, 2, 3).contiguous(), None, None


#: the rank's queries over all the tokens (rectangular global attention): cuDNN first where it runs, as
#: the package's global heads (backends/dense.py), then PyTorch's other kernels
_ROWS_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                  SDPBackend.MATH]


def _global_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Global heads: this rank's queries ``[B, n, h, D]`` over every token's k and v ``[B, N, h, D]``."""
    with _rows_backends():
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _rows_backends():
    try:
        return sdpa_kernel(_ROWS_BACKENDS, set_priority=True)
    except TypeError:  # PyTorch before 2.6 has no priority order: these backends, in PyTorch's own order
        return sdpa_kernel(_ROWS_BACKENDS)


def _p2p(ops, world, group):
    """Point-to-point sends and receives to neighbours that exist, posted together (no ordering deadlock)."""
    reqs = []
    for tensor, peer, kind in ops:
        if tensor is None or not 0 <= peer < world or tensor.numel() == 0:
            continue
        peer = dist.get_global_rank(group, peer) if group is not None else peer
        reqs.append(dist.P2POp(dist.isend if kind == "send" else dist.irecv, tensor, peer, group))
    if reqs:
        for req in dist.batch_isend_irecv(reqs):
            req.wait()


def _hybrid_problem(plan: RoutingPlan, world: int) -> str | None:
    """Why the frame-parallel hybrid cannot run this plan on ``world`` ranks (None: it can)."""
    t = plan.grid[0]
    if t < world:
        return f"{t} frames for {world} ranks (each rank needs whole frames)"
    if any(m == Mode.WINDOW for m in plan.modes) and t // world < plan.window[0] // 2:
        return f"a rank's {t // world} frames are fewer than the window's temporal radius {plan.window[0] // 2}"
    return None


@functools.lru_cache(maxsize=256)
def _head_index(heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(heads, device=device)  # made once per plan: no host-to-device copy per call


def _take_heads(x: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """Heads ``heads`` of ``[B, N, H, D]``: a view for a run of consecutive heads, else a gather."""
    if heads == list(range(heads[0], heads[0] + len(heads))):
        return x[:, :, heads[0]:heads[0] + len(heads)]
    return x.index_select(2, _head_index(tuple(heads), x.device))


class RankCall(NamedTuple):
    """One attention call of a rank: ``plan`` over its ``plan.num_tokens`` tokens or, where ``queries`` is
    set, that many of them as queries (the rank's frames) of ``plan``'s global heads over all its tokens."""
    plan: RoutingPlan
    queries: int | None = None


def _gathers_globals(plan: RoutingPlan, world: int, global_heads: str) -> bool:
    """Whether the hybrid's global heads take the all-gather (else the all-to-all): ``"auto"`` where their
    count does not divide by the ranks, so that whole heads would leave the ranks unequal."""
    if global_heads == "auto":
        return plan.modes.count(Mode.GLOBAL) % world != 0
    return global_heads == "all_gather"


def _hybrid_parts(plan: RoutingPlan, counts: list[int], world: int, rank: int,
                  global_heads: str) -> list[tuple[Mode, list[int], RankCall | None]]:
    """What rank ``rank`` computes in the hybrid, mode by mode: ``(mode, the plan's heads of that mode, this
    rank's call or None)``. Global heads, all-to-all: its share of the heads (as even as they go: 5 over 2
    ranks, 3 and 2; None for a rank left without one) over all the tokens; all-gather: every global head,
    its own frames' queries over all the tokens. Intra: its frames; window: its frames with the window's
    temporal radius of each neighbour's frames around them (none past the sequence's ends)."""
    _, h, w = plan.grid
    frames = counts[rank] // (h * w)
    rt = plan.window[0] // 2
    parts = []
    for mode in (Mode.GLOBAL, Mode.INTRA, Mode.WINDOW):
        heads = [i for i, m in enumerate(plan.modes) if m == mode]
        if not heads:
            continue
        if mode == Mode.GLOBAL and _gathers_globals(plan, world, global_heads):
            call = RankCall(RoutingPlan(plan.grid, [Mode.GLOBAL] * len(heads), plan.window), counts[rank])
        elif mode == Mode.GLOBAL:
            mine = _head_blocks(len(heads), world)[rank]
            call = RankCall(RoutingPlan(plan.grid, [Mode.GLOBAL] * mine, plan.window)) if mine else None
        elif mode == Mode.INTRA:
            call = RankCall(RoutingPlan((frames, h, w), [Mode.INTRA] * len(heads), plan.window))
        else:
            halo = rt * ((rank > 0) + (rank < world - 1))
            call = RankCall(RoutingPlan((frames + halo, h, w), [Mode.WINDOW] * len(heads), plan.window))
        parts.append((mode, heads, call))
    return parts


def _hybrid(q, k, v, plan: RoutingPlan, counts: list[int], group, global_heads: str) -> torch.Tensor:
    world, rank = _group_info(group)
    _, h, w = plan.grid
    outs, order = [], []
    for mode, heads, call in _hybrid_parts(plan, counts, world, rank, global_heads):
        qm, km, vm = (_take_heads(x, heads) for x in (q, k, v))
        if mode == Mode.GLOBAL and call is not None and call.queries is not None:  # all-gather of k and v
            out = _global_rows(qm, _GatherTokens.apply(km, counts, group), _GatherTokens.apply(vm, counts, group))
        elif mode == Mode.GLOBAL:  # Ulysses among the global heads
            parts = [_TokensToHeads.apply(x, counts, group) for x in (qm, km, vm)]
            if call is not None:
                attended = _routed_attention(*parts, call.plan)
            else:  # more ranks than global heads: none here (empty), but k and v stay in the graph so
                # this rank runs the backward's collectives with the others
                attended = parts[0] + (parts[1].sum() + parts[2].sum()) * 0
            out = _HeadsToTokens.apply(attended, counts, group, len(heads))
        elif mode == Mode.INTRA:  # whole frames: nothing to exchange
            out = _routed_attention(qm, km, vm, call.plan)
        else:  # k and v of the neighbours' nearest frames; queries padded with zeros there, outputs dropped
            r = plan.window[0] // 2 * h * w
            kx, vx = _Halo.apply(km, r, group), _Halo.apply(vm, r, group)
            before = r if rank > 0 else 0
            after = kx.shape[1] - km.shape[1] - before
            qx = torch.cat([qm.new_zeros(qm.shape[0], before, *qm.shape[2:]), qm,
                            qm.new_zeros(qm.shape[0], after, *qm.shape[2:])], dim=1)
            full = _routed_attention(qx, kx, vx, call.plan)
            out = full[:, before:before + qm.shape[1]]
        outs.append(out)
        order += heads
    out = torch.cat(outs, dim=2)
    if order == list(range(len(order))):  # heads grouped by mode (a permuted plan, as the DiT's): in place
        return out
    return _take_heads(out, sorted(range(len(order)), key=order.__getitem__))


def _check_settings(strategy, balanced, global_heads) -> None:
    if strategy not in ("auto", "ulysses", "hybrid"):
        raise ValueError(f"strategy must be 'auto', 'ulysses' or 'hybrid', got {strategy!r}")
    if not isinstance(balanced, bool):
        raise TypeError(f"balanced must be True or False, got {balanced!r}")
    if global_heads not in ("auto", "all_to_all", "all_gather"):
        raise ValueError(f"global_heads must be 'auto', 'all_to_all' or 'all_gather', got {global_heads!r}")


def _uses_hybrid(plan: RoutingPlan, world: int, strategy: str) -> bool:
    """Whether a layer of ``plan`` over ``world`` ranks runs the hybrid (else Ulysses); the errors of a
    strategy that cannot run."""
    problem = _hybrid_problem(plan, world)
    if strategy == "hybrid" and problem:
        raise ValueError(f"the hybrid strategy cannot run here: {problem}")
    hybrid = world > 1 and not problem and strategy in ("auto", "hybrid")
    heads = len(plan.modes)
    if not hybrid and heads % world:
        allowed = [p for p in range(1, heads + 1) if heads % p == 0]
        raise ValueError(f"{heads} heads do not split across {world} ranks; use one of {allowed}")
    return hybrid


def _ulysses_heads(plan: RoutingPlan, world: int, rank: int, head_dim: int, balanced: bool):
    """Ulysses' head order (None: the plan's own) and the heads rank ``rank`` attends: block ``rank`` of it."""
    hp = len(plan.modes) // world
    order = _balanced_order(plan, world, head_dim) if balanced else None
    taken = order[rank * hp:(rank + 1) * hp] if order is not None else range(rank * hp, (rank + 1) * hp)
    return order, RoutingPlan(plan.grid, [plan.modes[i] for i in taken], plan.window)


def rank_calls(plan: RoutingPlan, world_size: int, strategy: str = "auto", *, balanced: bool = True,
               global_heads: str = "auto", head_dim: int = 128) -> list[list[RankCall]]:
    """The attention calls of one layer on each of ``world_size`` ranks, the collectives aside: for rank
    r, the calls it makes (:class:`RankCall`: a plan on ``[B, plan.num_tokens, len(plan.modes), D]``
    tensors, or some of its tokens as the queries of its global heads). Ulysses: its block of heads over
    all the tokens; the hybrid: its share of the global heads over all the tokens, or its frames' queries
    of every global head over all the tokens, its frames of the intra heads, its frames and the halo of
    the window heads. The same calls :func:`routed_attention` makes with the same settings, and the same
    errors; what one GPU can time of a layer on several (benchmarks/rank_share_bench.py)."""
    _check_settings(strategy, balanced, global_heads)
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a RoutingPlan, got {type(plan).__name__}")
    counts = [stop - start for start, stop in token_slices(plan.grid, world_size)]
    if world_size == 1:
        _uses_hybrid(plan, 1, strategy)
        return [[RankCall(plan)]]
    if _uses_hybrid(plan, world_size, strategy):
        return [[call for _, _, call in _hybrid_parts(plan, counts, world_size, r, global_heads) if call is not None]
                for r in range(world_size)]
    return [[RankCall(_ulysses_heads(plan, world_size, r, head_dim, balanced)[1])] for r in range(world_size)]


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RoutingPlan, group=None,
                     strategy: str = "auto", *, balanced: bool = True, global_heads: str = "auto") -> torch.Tensor:
    """Routed attention of the whole sequence, each rank holding its token slice.

    Args:
        q, k, v: ``[B, stop - start, heads, D]``, this rank's tokens ``token_slices(plan.grid, P)[rank]``.
        plan: the whole layer's :class:`RoutingPlan` (its modes in the heads' order).
        group: the process group (default: the world).
        strategy: ``"ulysses"`` (every head through the all-to-alls; the head count must divide
            by P), ``"hybrid"`` (frame-parallel: ranks hold whole frames, intra heads exchange
            nothing, window heads a halo of the window's temporal radius from each neighbour, global
            heads as ``global_heads`` says), or ``"auto"``: the hybrid where it can run (less traffic,
            docs/DISTRIBUTED.md), else Ulysses.
        balanced: Ulysses gives each rank a block of heads of about equal cost (:func:`balance_heads`);
            ``False`` gives rank r the plan's heads ``r * heads / P`` onwards as they are (what the cost
            balance is measured against).
        global_heads: the hybrid's global heads. ``"all_to_all"``: Ulysses among them, each rank whole
            heads over all the tokens (split as evenly as they go: 5 over 4 ranks leave one rank two);
            ``"all_gather"``: every rank gathers every global head's k and v and attends its own
            frames' queries (an equal share on every rank, for ~P/2 times the all-to-all's traffic);
            ``"auto"``: the all-gather where the global heads do not divide by P, else the all-to-all.

    Returns:
        ``[B, stop - start, heads, D]``: this rank's tokens of the attention output.
    """
    _check_settings(strategy, balanced, global_heads)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("oasis_kernels.distributed.routed_attention needs torch.distributed initialised")
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a RoutingPlan, got {type(plan).__name__}")
    world, rank = _group_info(group)
    heads = len(plan.modes)
    hybrid = _uses_hybrid(plan, world, strategy)
    slices = token_slices(plan.grid, world)
    counts = [stop - start for start, stop in slices]
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4 or x.shape[1] != counts[rank] or x.shape[2] != heads:
            raise ValueError(f"{name} must be [B, {counts[rank]}, {heads}, D] (rank {rank}'s tokens of grid "
                             f"{plan.grid}), got {tuple(x.shape)}")
    if world == 1:
        return _routed_attention(q, k, v, plan)
    if hybrid:
        return _hybrid(q, k, v, plan, counts, group, global_heads)
    order, mine = _ulysses_heads(plan, world, rank, q.shape[-1], balanced)
    qh, kh, vh = (_TokensToHeads.apply(x, counts, group, order) for x in (q, k, v))
    out = _routed_attention(qh, kh, vh, mine)
    return _HeadsToTokens.apply(out, counts, group, heads, order)


@functools.lru_cache(maxsize=256)
def _balanced_order(plan: RoutingPlan, world: int, head_dim: int) -> tuple[int, ...] | None:
    """:func:`balance_heads`' order for Ulysses (None where it is the heads' own order)."""
    order = balance_heads(plan, world, head_dim)
    return None if order == tuple(range(len(order))) else order

