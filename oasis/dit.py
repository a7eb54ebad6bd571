"""Wan2.1's text-to-video DiT with routed self-attention heads (OASIS, sec. 3.3).

The module names follow Wan2.1's own checkpoints (``blocks.0.self_attn.q``, ...), so its state
dict is Wan2.1's layout; :mod:`oasis.checkpoint` maps diffusers' names onto it.

Numerics follow Wan2.1 / diffusers: the time embedding, the modulation and every LayerNorm run in
float32 (:meth:`WanDiT.cast` keeps those parameters in float32), the matmuls in the model's dtype.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import oasis_kernels as ok
import oasis_kernels.distributed as ok_distributed
from oasis_kernels.routing import RoutingFile, load_routing

from .config import WanConfig
from .dit_kernels import GATED, PLAIN, fused_rows_apply, qk_norm_rope, row_norm

__all__ = ["WanDiT", "WanBlock", "WanSelfAttention", "WanCrossAttention", "Routing", "rope_tables",
           "rotate_half_order", "timestep_embedding"]

# what set_routing takes: a routing file (path or object), one list of modes per layer, or None
Routing = Union[str, Path, RoutingFile, Sequence[Sequence[Union[str, ok.Mode]]], None]


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 if it is float64: the precision norms and modulation run in."""
    return x if x.dtype == torch.float64 else x.float()


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding ``[B, dim]`` float64 (cos half first, base 10000), as Wan2.1 computes it."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _axis_angles(length: int, channels: int, theta: float, device) -> torch.Tensor:
    """Rotation angles ``[length, channels // 2]`` of one RoPE axis (float64)."""
    inv = 1.0 / torch.pow(theta, torch.arange(0, channels, 2, dtype=torch.float64, device=device) / channels)
    return torch.arange(length, dtype=torch.float64, device=device)[:, None] * inv[None]


def rope_tables(grid, config: WanConfig, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of the 3D rotary embedding, each ``[N, head_dim // 2]`` in ``dtype``, tokens t-major.

    Column ``i`` is the angle of the checkpoint's channel pair ``(2i, 2i+1)`` of every head; the first
    pairs follow the frame index, then the row, then the column (Wan2.1's 44/42/42 split for head_dim
    128). :func:`apply_rope` applies them to q/k in rotate-half order, where that pair is ``(i, i + D/2)``.
    """
    t, h, w = grid
    ct, ch, cw = config.rope_split
    at = _axis_angles(t, ct, config.rope_theta, device)[:, None, None, :].expand(t, h, w, -1)
    ah = _axis_angles(h, ch, config.rope_theta, device)[None, :, None, :].expand(t, h, w, -1)
    aw = _axis_angles(w, cw, config.rope_theta, device)[None, None, :, :].expand(t, h, w, -1)
    angles = torch.cat([at, ah, aw], dim=-1).reshape(t * h * w, -1)
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def rotate_half_order(head_dim: int) -> tuple[int, ...]:
    """The channel order of q and k inside each head: channel ``j`` is the checkpoint's channel
    ``rotate_half_order(D)[j]`` (the even channels, then the odd ones), so the checkpoint's interleaved
    RoPE pair ``(2i, 2i+1)`` is the pair ``(i, i + D/2)``. q and k of a head share it, so q.k is unchanged."""
    return tuple(range(0, head_dim, 2)) + tuple(range(1, head_dim, 2))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, N, heads, D]`` in rotate-half order (channel ``i`` pairs with ``i + D/2``, see
    :func:`rotate_half_order`) by ``cos, sin [N, D/2]``; float32 inside. Contiguous halves, not
    interleaved pairs, so that the compiled kernel reads and writes whole vectors."""
    xf = _wide(x)
    a, b = xf.chunk(2, dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([a * c - b * s, a * s + b * c], dim=-1).to(x.dtype)


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in float32, weight applied in the input dtype (Wan2.1)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _wide(x)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed and returned in float32 (float64 for float64 inputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _wide(x)
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


def _permute_heads(t: torch.Tensor, order: Sequence[int] | None, heads: int, dim: int,
                   channels: Sequence[int] | None = None) -> torch.Tensor:
    """Head block ``i`` of the result is head block ``order[i]`` of ``t`` along ``dim`` (q/k/v rows, o
    columns), and inside every head, channel ``j`` is channel ``channels[j]``; ``None``: as they are."""
    shape = list(t.shape)
    out = t.reshape(shape[:dim] + [heads, shape[dim] // heads] + shape[dim + 1:])
    for d, index in ((dim, order), (dim + 1, channels)):
        if index is not None:
            out = out.index_select(d, torch.tensor(list(index), dtype=torch.long, device=t.device))
    return out.reshape(shape)


class _Attention(nn.Module):
    """The projections Wan2.1's self- and cross-attention share: q, k, v, o and the q/k RMSNorms."""

    def __init__(self, config: WanConfig):
        super().__init__()
        dim = config.dim
        self.heads, self.head_dim = config.num_heads, config.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, config.eps) if config.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, config.eps) if config.qk_norm else nn.Identity()


class WanSelfAttention(_Attention):
    """Self-attention over the video tokens; each head follows its routed pattern.

    ``set_modes`` permutes the q/k/v rows, the q/k RMSNorm weights and the o columns once so the
    heads of each mode are contiguous (one slice per head group for the kernels). Inside every head,
    the q/k rows and RMSNorm weights are kept in rotate-half order (:func:`rotate_half_order`), so
    RoPE works on contiguous halves. The state dict is always in the checkpoint's order, heads and
    channels: saving un-permutes, loading permutes.
    """

    def __init__(self, config: WanConfig):
        super().__init__(config)
        self.modes: tuple[ok.Mode, ...] = (ok.Mode.GLOBAL,) * self.heads  # checkpoint head order
        self.window: tuple[int, int, int] = (3, 5, 5)
        self.order: tuple[int, ...] = tuple(range(self.heads))  # kernel head i is checkpoint head order[i]
        # q/k channel j of every head is checkpoint channel channels[j] (fixed: RoPE on contiguous halves)
        self.channels: tuple[int, ...] = rotate_half_order(self.head_dim)
        self._plans: dict = {}
        self.sequence_group = None  # WanDiT.set_sequence_parallel: the process group splitting the tokens
        self.register_state_dict_post_hook(_unpermute_state)
        self.register_load_state_dict_pre_hook(self._permute_loaded)

    # -- the permuted tensors --------------------------------------------------
    def _head_tensors(self):
        """(tensor, dim) pairs whose head blocks follow ``order``."""
        out = [(self.q.weight, 0), (self.q.bias, 0), (self.k.weight, 0), (self.k.bias, 0),
               (self.v.weight, 0), (self.v.bias, 0), (self.o.weight, 1)]
        if isinstance(self.norm_q, RMSNorm):
            out += [(self.norm_q.weight, 0), (self.norm_k.weight, 0)]
        return out

    # state-dict key -> the dim of its head blocks; the keys whose channels are in rotate-half order
    _HEAD_KEYS = {"q.weight": 0, "q.bias": 0, "k.weight": 0, "k.bias": 0, "v.weight": 0, "v.bias": 0,
                  "o.weight": 1, "norm_q.weight": 0, "norm_k.weight": 0}
    _ROTATED_KEYS = frozenset({"q.weight", "q.bias", "k.weight", "k.bias", "norm_q.weight", "norm_k.weight"})

    def _permute_loaded(self, module, state_dict, prefix, *args):
        _permute_state(state_dict, prefix, self.order, self.channels, self.heads)

    @torch.no_grad()
    def set_modes(self, modes: Sequence, window=(3, 5, 5)) -> None:
        """Route head ``i`` (checkpoint order) with ``modes[i]``; permute the weights to match."""
        modes = tuple(ok.Mode.parse(m) for m in modes)
        if len(modes) != self.heads:
            raise ValueError(f"routing names {len(modes)} heads but the layer has {self.heads}")
        window = ok.normalize_window(window)
        order = ok.RoutingPlan((1, 1, 1), modes, window).head_permutation()
        # from the current kernel order back to checkpoint order, then on to the new kernel order
        back = _inverse(self.order)
        step = tuple(back[i] for i in order)
        if step != tuple(range(self.heads)):
            for t, dim in self._head_tensors():
                t.copy_(_permute_heads(t, step, self.heads, dim))
        self.order = order
        self.modes, self.window = modes, window
        self._plans.clear()

    def plan(self, grid) -> ok.RoutingPlan:
        """The layer's plan for a token grid, in kernel head order (cached per grid)."""
        plan = self._plans.get(grid)
        if plan is None:
            plan = self._plans[grid] = ok.RoutingPlan(grid, [self.modes[i] for i in self.order], self.window)
        return plan

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """``x [B, N, dim]`` -> q, k, v ``[B, N, heads, head_dim]`` (q and k normed and rotated, their
        channels in rotate-half order: the same per head for both, so q.k is the checkpoint's)."""
        b, n, _ = x.shape
        if fused_rows_apply(x) and isinstance(self.norm_q, RMSNorm):  # RMSNorm + RoPE of q and k in one pass
            q, k = qk_norm_rope(self.q(x), self.k(x), self.norm_q.weight, self.norm_k.weight, *rope, self.heads,
                                self.norm_q.eps)
            return q, k, self.v(x).view(b, n, self.heads, self.head_dim)
        q = self.norm_q(self.q(x)).view(b, n, self.heads, self.head_dim)
        k = self.norm_k(self.k(x)).view(b, n, self.heads, self.head_dim)
        v = self.v(x).view(b, n, self.heads, self.head_dim)
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def attend(self, q, k, v, grid) -> torch.Tensor:
        """Routed attention with this layer's plan: ``[B, N, heads, head_dim]`` (kernel head order);
        under sequence parallelism ``q, k, v`` are this rank's tokens of ``grid``."""
        if self.sequence_group is not None:
            return ok_distributed.routed_attention(q, k, v, self.plan(grid), self.sequence_group)
        return ok.routed_attention(q, k, v, self.plan(grid))

    def forward(self, x: torch.Tensor, grid, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.o(self.attend(*self.project(x, rope), grid).flatten(2))


#: a routing file's layer names that name a block of this DiT: ours (``blocks.3.self_attn``, ``blocks.3``) and
#: diffusers' (``transformer_blocks.3.attn1``)
_BLOCK_NAME = re.compile(r"(?:^|\.)(?:blocks|transformer_blocks)\.(\d+)(?:\.|$)")


def _layers_by_block(routing: RoutingFile, num_layers: int) -> list:
    """The routing file's layers in block order, matched by name (a file's order is not trusted: a file
    of another model, or one whose layers were reordered, would route other blocks)."""
    by_block = {}
    for layer in routing.layers:
        match = _BLOCK_NAME.search(layer.name)
        block = int(match[1]) if match else None
        if block is None or block >= num_layers or block in by_block:
            why = "names no block of this DiT" if block is None else (
                f"names block {block} of {num_layers}" if block >= num_layers else f"names block {block} twice")
            raise ValueError(f"routing file layer {layer.name!r} {why} (blocks.N.self_attn, blocks.N or "
                             f"transformer_blocks.N.attn1)")
        by_block[block] = layer
    return [by_block[i] for i in range(num_layers)]


#: optimizer steps taken in this process, counted by torch.optim's post-step hook (registered when a DiT
#: first caches its context's K/V): a fused optimizer (the trainer's AdamW) writes the weights without
#: bumping their version counters, so the cache's key counts the steps as well as the versions
_optimizer_steps = 0
_step_hook = None


def _count_optimizer_steps() -> None:
    global _step_hook

    def bump(optimizer, args, kwargs):
        global _optimizer_steps
        _optimizer_steps += 1

    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(bump)


class _GatherFrames(torch.autograd.Function):
    """Every rank's frames ``[B, C, t_rank, H, W]`` -> the whole ``[B, C, T, H, W]`` on every rank; the
    backward keeps this rank's frames of the gradient (each rank computes the same loss of the whole)."""

    @staticmethod
    def forward(ctx, out, sizes, group):
        rank = torch.distributed.get_rank(group)
        most = max(sizes)
        padded = out.new_zeros((*out.shape[:2], most, *out.shape[3:]))
        padded[:, :, :out.shape[2]] = out
        parts = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(parts, padded.contiguous(), group=group)
        ctx.start, ctx.size = sum(sizes[:rank]), sizes[rank]
        return torch.cat([p[:, :, :n] for p, n in zip(parts, sizes)], dim=2)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, :, ctx.start:ctx.start + ctx.size], None, None


class _OwnFramesGradient(torch.autograd.Function):
    """Identity on ``[B, C, T, H, W]``; the backward keeps frames ``start .. stop`` of the gradient
    and zeroes the others."""

    @staticmethod
    def forward(ctx, x, start, stop):
        ctx.start, ctx.stop = start, stop
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        out = torch.zeros_like(grad)
        out[:, :, ctx.start:ctx.stop] = grad[:, :, ctx.start:ctx.stop]
        return out, None, None


def _inverse(order: Sequence[int]) -> tuple[int, ...]:
    out = [0] * len(order)
    for i, j in enumerate(order):
        out[j] = i
    return tuple(out)


def _permute_state(state_dict, prefix: str, order: Sequence[int], channels: Sequence[int], heads: int) -> None:
    """Checkpoint order -> the layer's: head blocks by ``order``, q/k channels inside each head by
    ``channels`` (with the inverses, the layer's order -> the checkpoint's)."""
    order = None if tuple(order) == tuple(range(heads)) else order
    channels = None if tuple(channels) == tuple(range(len(channels))) else channels
    for key, dim in WanSelfAttention._HEAD_KEYS.items():
        within = channels if key in WanSelfAttention._ROTATED_KEYS else None
        if prefix + key in state_dict and (order is not None or within is not None):
            state_dict[prefix + key] = _permute_heads(state_dict[prefix + key], order, heads, dim, within)


def _unpermute_state(module: WanSelfAttention, state_dict, prefix, local_metadata):
    _permute_state(state_dict, prefix, _inverse(module.order), _inverse(module.channels), module.heads)


class WanCrossAttention(_Attention):
    """Cross-attention from the video tokens to the (text) context tokens."""

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of embedded context tokens ``[Bc, L, dim]``, each ``[Bc, heads, L, head_dim]``."""
        b, l, _ = context.shape
        k = self.norm_k(self.k(context)).view(b, l, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(context).view(b, l, self.heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, _ = x.shape
        k, v = kv
        q = self.norm_q(self.q(x)).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        if k.shape[0] != b:  # one constant context for every video of the batch
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))
        return self.o(y.transpose(1, 2).flatten(2))


class WanBlock(nn.Module):
    """One DiT block: modulated self-attention, cross-attention, modulated FFN (six-way modulation)."""

    def __init__(self, config: WanConfig):
        super().__init__()
        dim = config.dim
        self.norm1 = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(config)
        self.norm3 = FP32LayerNorm(dim, config.eps, elementwise_affine=True) if config.cross_attn_norm else None
        self.cross_attn = WanCrossAttention(config)
        self.norm2 = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    # The block runs as two regions around the routed attention, so that torch.compile can fuse
    # each region's float32 norms, modulation and RoPE once for all blocks (the same code whatever
    # the layer), while each layer's routing plan stays outside the compiled code.
    def attention_inputs(self, x, e, rope):
        """Region 1: modulated norm, then q, k, v ``[B, N, heads, head_dim]``."""
        shift, scale = (self.modulation[:, :2].to(e.dtype) + e[:, :2]).chunk(2, dim=1)
        # the same in one pass over x (oasis/dit_kernels.py; its modulation is float32, as e is here
        # outside autocast)
        if fused_rows_apply(x) and e.dtype == torch.float32:
            return self.self_attn.project(row_norm(x, self.norm1.eps, shift=shift, scale=scale)[1], rope)
        return self.self_attn.project((self.norm1(x) * (1 + scale) + shift).to(x.dtype), rope)

    def after_attention(self, x, attn, e, kv):
        """Region 2: output projection and gated residual, cross-attention, modulated FFN."""
        dtype = x.dtype
        gate, c_shift, c_scale, c_gate = (self.modulation[:, 2:].to(e.dtype) + e[:, 2:]).chunk(4, dim=1)
        # the same, each norm one pass with its residual (float32 modulation, as e is outside autocast)
        if fused_rows_apply(x) and self.norm3 is not None and e.dtype == torch.float32:
            x, xc = row_norm(x, self.norm3.eps, residual=self.self_attn.o(attn.flatten(2)), gate=gate,
                             residual_kind=GATED, weight=self.norm3.weight, bias=self.norm3.bias)
            x, h = row_norm(x, self.norm2.eps, residual=self.cross_attn(xc, kv), residual_kind=PLAIN,
                            shift=c_shift, scale=c_scale)
            return (_wide(x) + self.feed_forward(h) * c_gate).to(dtype)
        x = (_wide(x) + self.self_attn.o(attn.flatten(2)) * gate).to(dtype)
        xc = x if self.norm3 is None else self.norm3(x).to(dtype)
        x = x + self.cross_attn(xc, kv)
        y = self.feed_forward((self.norm2(x) * (1 + c_scale) + c_shift).to(dtype))
        return (_wide(x) + y * c_gate).to(dtype)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``ffn`` with its tanh-GELU applied by the first matmul's epilogue on CUDA (cuBLASLt's GELU is
        the tanh form), which saves a pass over the ``[N, ffn_dim]`` hidden layer."""
        first, second = self.ffn[0], self.ffn[2]
        # the epilogue op has no derivative: training takes the plain path; under autocast the
        # float32 weights come in the activations' dtype, as autocast gives them to a Linear
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or first.weight.requires_grad)
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and not wants_grad:
            hidden = torch._addmm_activation(first.bias.to(x.dtype), x.flatten(0, -2), first.weight.to(x.dtype).t(),
                                             use_gelu=True)
            return second(hidden.unflatten(0, x.shape[:-1]))
        return self.ffn(x)

    def forward(self, x, e, grid, rope, kv, regions=None):
        """``x [B, N, dim]``, ``e [B, 6, dim]`` float32 time projection, ``kv`` the context's K/V;
        ``regions``: compiled forms of (attention_inputs, after_attention), see WanDiT.compile_regions."""
        before, after = regions or (WanBlock.attention_inputs, WanBlock.after_attention)
        q, k, v = before(self, x, e, rope)
        return after(self, x, self.self_attn.attend(q, k, v, grid), e, kv)


class WanHead(nn.Module):
    def __init__(self, config: WanConfig):
        super().__init__()
        self.norm = FP32LayerNorm(config.dim, config.eps, elementwise_affine=False)
        self.head = nn.Linear(config.dim, config.out_channels * math.prod(config.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, config.dim) / config.dim ** 0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.to(e.dtype) + e[:, None]).chunk(2, dim=1)
        return self.head((self.norm(x) * (1 + scale) + shift).to(x.dtype))


# parameters kept in float32 by WanDiT.cast (Wan2.1 and diffusers keep them so): small, and
# their rounding would move every token's modulation
_FP32_PARAMS = ("time_embedding.", "time_projection.", "modulation", "norm1.", "norm2.", "norm3.", "head.norm.")


def checkpointed_blocks(value, num_layers: int) -> int:
    """The number of blocks ``activation_checkpointing = value`` checkpoints: True is all of them,
    False none, an int 0..num_layers that many."""
    if isinstance(value, bool):
        return num_layers if value else 0
    if not isinstance(value, int) or not 0 <= value <= num_layers:
        raise ValueError(f"activation_checkpointing must be True, False or a number of blocks in "
                         f"0..{num_layers}, got {value!r}")
    return value


class WanDiT(nn.Module):
    """Wan2.1's text-to-video DiT (``model(latents, timestep, context) -> [B, C_out, T, H, W]``).

    Same call and numbers as diffusers' ``WanTransformer3DModel(hidden_states, timestep,
    encoder_hidden_states).sample`` when every head is global. Self-attention runs
    ``oasis_kernels.routed_attention`` with each layer's plan (see :meth:`set_routing`).

    The cross-attention context is usually constant (OASIS drops the prompt extractor):
    :meth:`set_context` embeds it once and keeps each layer's K/V, and ``context=None`` in the
    call uses them. They are recomputed when a weight they depend on changed (in-place updates
    bump the tensors' version counters) and, while training, on every call so gradients flow.
    """

    def __init__(self, config: WanConfig | None = None):
        super().__init__()
        self.config = config = config or WanConfig()
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, config.patch_size, config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.head = WanHead(config)
        self.context: torch.Tensor | None = None
        self._kv_cache: tuple | None = None
        self._rope: dict = {}
        self._regions = None
        self._compiled_trunk = None
        self._checkpointed_blocks = 0
        self.sequence_group = None

    @property
    def activation_checkpointing(self) -> int:
        """Training: how many blocks recompute their activations in the backward instead of keeping
        them (the first ones). ``True`` sets every block, ``False`` none; a number between trades
        memory for speed: each block not checkpointed keeps its activations (about 30 values of
        ``dim`` per token, bf16 under autocast) and skips one forward in the backward."""
        return self._checkpointed_blocks

    @activation_checkpointing.setter
    def activation_checkpointing(self, value):
        self._checkpointed_blocks = checkpointed_blocks(value, len(self.blocks))

    # -- construction ------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, *, routing: Routing = None, window=(3, 5, 5), dtype=torch.float32,
                        device="cpu") -> "WanDiT":
        """Load a local checkpoint folder in diffusers' or Wan2.1's layout (see :mod:`oasis.checkpoint`)."""
        from .checkpoint import load_dit

        return load_dit(path, routing=routing, window=window, dtype=dtype, device=device)

    def save_pretrained(self, path, *, layout: str = "diffusers", max_shard_bytes: int | None = None) -> None:
        """Write ``config.json`` + safetensors in ``layout`` ``"diffusers"`` or ``"wan"``."""
        from .checkpoint import save_dit

        save_dit(self, path, layout=layout, max_shard_bytes=max_shard_bytes)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> "WanDiT":
        """Random weights in place (Wan2.1's scheme: Xavier-uniform matmuls, zero biases, unit norms),
        except that the output head is random too rather than zero, so an untrained model's output
        depends on its input. Works on any device, e.g. after ``to_empty`` from the meta device."""
        def uniform_(t, bound):
            t.copy_((torch.rand(t.shape, generator=generator, device=t.device if generator is None else "cpu",
                                dtype=torch.float32) * 2 - 1).to(t) * bound)

        for name, p in self.named_parameters():
            if name.endswith("modulation"):
                uniform_(p, 3 ** 0.5 / p.shape[-1] ** 0.5)  # the variance of Wan's randn / sqrt(dim)
            elif p.dim() >= 2:
                fan_out, fan_in = p.shape[0], p[0].numel()
                uniform_(p, (6.0 / (fan_in + fan_out)) ** 0.5)
            elif ".norm" in name or name.startswith("norm"):
                p.fill_(1.0)
            else:
                p.zero_()
        self._kv_cache = None
        return self

    def cast(self, dtype: torch.dtype) -> "WanDiT":
        """Move the matmul weights to ``dtype``; the time embedding, modulations and norms stay float32."""
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
        for name, p in self.named_parameters():
            keep = dtype != torch.float64 and any(k in name for k in _FP32_PARAMS)
            p.data = p.data.to(torch.float32 if keep else dtype)
        self._kv_cache = None
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def compile_model(self, enabled: bool = True, **options) -> "WanDiT":
        """torch.compile the whole model's compute (``_trunk``: embeddings, every block with its
        routed attention, the head), forward and backward one graph each under autograd; ``forward``
        keeps the input checks and the caches outside it. Not with sequence parallelism (its
        collectives would break the graph) nor with :meth:`compile_regions` (one or the other).
        ``options`` go to ``torch.compile`` (``mode="reduce-overhead"``: CUDA graphs)."""
        if enabled and self.sequence_group is not None:
            raise ValueError("compile_model does not take a sequence-parallel DiT; use compile_regions")
        self._compiled_trunk = None
        if enabled:
            self._regions = None
            self._compiled_trunk = torch.compile(self._trunk, **options)
        return self

    def compile_regions(self, enabled: bool = True, **options) -> "WanDiT":
        """torch.compile each block's two regions around the routed attention (``WanBlock``).

        One compilation serves all blocks (their code is the same; parameters are inputs), and no
        routing plan enters compiled code, so a calibrated routing with a different plan per layer
        does not recompile. ``options`` go to ``torch.compile``. ``enabled=False`` returns to eager.
        """
        self._regions = None
        if enabled:
            self._compiled_trunk = None
            self._regions = (torch.compile(WanBlock.attention_inputs, **options),
                             torch.compile(WanBlock.after_attention, **options))
        return self

    # -- routing --------------------------------------------------------------------
    def set_routing(self, routing: Routing, window=(3, 5, 5)) -> None:
        """Route every layer's heads.

        Args:
            routing: a routing file path or :class:`~oasis_kernels.routing.RoutingFile` (its window
                wins), or one list of modes per layer (``[["global", "intra", ...], ...]``), or
                ``None`` for all global.
            window: the window of window heads, when ``routing`` is a list.
        """
        per_layer = self._routing_modes(routing, window)
        if isinstance(routing, (str, Path, RoutingFile)):
            window = (load_routing(routing) if isinstance(routing, (str, Path)) else routing).window
        for block, modes in zip(self.blocks, per_layer):
            block.self_attn.set_modes(modes, window)

    def _routing_modes(self, routing, window) -> list:
        cfg = self.config
        if routing is None:
            return [["global"] * cfg.num_heads] * cfg.num_layers
        if isinstance(routing, (str, Path)):
            path = Path(routing)
            if not path.is_file():
                raise ValueError(f"routing file {str(path)!r} does not exist")
            routing = load_routing(path)
        if isinstance(routing, RoutingFile):
            routing.check_model(cfg.num_layers, cfg.num_heads)
            return [layer.modes for layer in _layers_by_block(routing, cfg.num_layers)]
        if isinstance(routing, (str, bytes)) or not isinstance(routing, Sequence):
            raise TypeError(f"routing must be a path, a RoutingFile, a list of modes per layer or None, "
                            f"got {type(routing).__name__}")
        routing = list(routing)
        if len(routing) != cfg.num_layers:
            raise ValueError(f"routing lists {len(routing)} layers but the model has {cfg.num_layers}")
        for i, modes in enumerate(routing):
            if isinstance(modes, (str, bytes)) or len(modes) != cfg.num_heads:
                raise ValueError(f"routing layer {i} must list {cfg.num_heads} modes, got {modes!r}")
        return routing

    @property
    def routing(self) -> list[tuple[ok.Mode, ...]]:
        """Each layer's modes in checkpoint head order."""
        return [b.self_attn.modes for b in self.blocks]

    # -- several processes ---------------------------------------------------------------
    def set_sequence_parallel(self, group=None, enabled: bool = True) -> None:
        """Split each call's tokens across the ranks of ``group`` (default: the world): every rank passes
        the whole latents and gets the whole output, but computes only its frames
        (``oasis_kernels.distributed.token_slices``; attention through
        ``oasis_kernels.distributed.routed_attention``), so activations and attention divide by P.
        ``enabled=False`` returns to one process. Needs ``torch.distributed`` initialised and at least
        P latent frames per call."""
        if enabled and not torch.distributed.is_initialized():
            raise RuntimeError("set_sequence_parallel needs torch.distributed initialised (e.g. under torchrun)")
        if enabled and self._compiled_trunk is not None:
            raise ValueError("a DiT compiled whole (compile_model) cannot split its tokens; compile_model(False) "
                             "first, or compile_regions")
        group = (group or torch.distributed.group.WORLD) if enabled else None
        self.sequence_group = group
        for b in self.blocks:
            b.self_attn.sequence_group = group

    def own_frames_gradient(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents [B, C, T, H, W]`` unchanged; under sequence parallelism its gradient keeps only this
        rank's latent frames, as the DiT's own output does. Training sums the parameters' gradients
        over the group (each rank's come from its frames): a path around the DiT (the residual of
        eq. 4) must then count each frame on one rank only, which this does."""
        if self.sequence_group is None:
            return latents
        pt, ph, pw = self.config.patch_size
        grid = (latents.shape[2] // pt, latents.shape[3] // ph, latents.shape[4] // pw)
        f0, f1 = self._frames_of_rank(grid)
        return _OwnFramesGradient.apply(latents, f0 * pt, f1 * pt)

    def _frames_of_rank(self, grid) -> tuple[int, int]:
        """This rank's ``[first, last)`` token frames of ``grid`` under sequence parallelism."""
        world = torch.distributed.get_world_size(self.sequence_group)
        rank = torch.distributed.get_rank(self.sequence_group)
        if grid[0] < world:
            raise ValueError(f"sequence parallelism over {world} ranks needs at least {world} latent frames per "
                             f"call, got {grid[0]}")
        start, stop = ok_distributed.token_slices(grid, world)[rank]
        return start // (grid[1] * grid[2]), stop // (grid[1] * grid[2])

    # -- the constant context ----------------------------------------------------------
    def set_context(self, context: torch.Tensor | None) -> None:
        """Keep ``context [L, text_dim]`` or ``[1, L, text_dim]`` for calls with ``context=None``."""
        if context is not None:
            if not isinstance(context, torch.Tensor):
                raise TypeError(f"context must be a tensor, got {type(context).__name__}")
            if context.dim() == 2:
                context = context[None]
            if context.dim() != 3 or context.shape[-1] != self.config.text_dim:
                raise ValueError(f"context must be [L, {self.config.text_dim}] or [B, L, {self.config.text_dim}], "
                                 f"got {tuple(context.shape)}")
            context = context.detach()
        self.context, self._kv_cache = context, None

    def _kv_inputs(self):
        out = list(self.text_embedding.parameters())
        for b in self.blocks:
            out += [b.cross_attn.k.weight, b.cross_attn.k.bias, b.cross_attn.v.weight, b.cross_attn.v.bias]
            if isinstance(b.cross_attn.norm_k, RMSNorm):
                out.append(b.cross_attn.norm_k.weight)
        return out

    def _context_kv(self, context: torch.Tensor | None) -> list:
        if context is not None:
            return self._embed_context(context)
        if self.context is None:
            raise ValueError("no context: pass context=[B, L, text_dim] or call set_context() first")
        if torch.is_grad_enabled() and any(p.requires_grad for p in self._kv_inputs()):
            return self._embed_context(self.context)  # training: gradients flow into the K/V weights
        if torch.compiler.is_compiling():
            if self._kv_cache is not None:
                return self._kv_cache[1]
            return self._embed_context(self.context)
        _count_optimizer_steps()
        key = (_optimizer_steps, tuple((id(p), p._version, p.dtype, p.device) for p in self._kv_inputs()))
        if self._kv_cache is None or self._kv_cache[0] != key:
            with torch.no_grad():
                self._kv_cache = (key, self._embed_context(self.context))
        return self._kv_cache[1]

    def _embed_context(self, context: torch.Tensor) -> list:
        ctx = context.to(self.device, self.text_embedding[0].weight.dtype)
        ctx = self.text_embedding(ctx)
        return [b.cross_attn.context_kv(ctx) for b in self.blocks]

    # -- forward ----------------------------------------------------------------------------
    def rope(self, grid) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        key = (grid, self.device, dtype)
        tables = self._rope.get(key)
        if tables is None:
            tables = self._rope[key] = rope_tables(grid, self.config, self.device, dtype)
        return tables

    def forward(self, latents: torch.Tensor, timestep, context: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the flow-matching velocity.

        Args:
            latents: ``[B, C_in, T, H, W]`` (``H, W`` multiples of the patch size).
            timestep: ``[B]`` (or a number) on Wan's 0..1000 scale.
            context: ``[B, L, text_dim]`` text embeddings, or ``None`` for the one kept by
                :meth:`set_context`.

        Returns:
            ``[B, C_out, T, H, W]`` in the model's dtype.
        """
        cfg = self.config
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
            raise ValueError(f"latents must be [B, {cfg.in_channels}, T, H, W], got "
                             f"{getattr(latents, 'shape', type(latents).__name__)}")
        b, c, t, h, w = latents.shape
        pt, ph, pw = cfg.patch_size
        if c != cfg.in_channels or t % pt or h % ph or w % pw or b == 0:
            raise ValueError(f"latents {tuple(latents.shape)} must be [B>0, {cfg.in_channels}, T, H, W] with "
                             f"(T, H, W) multiples of the patch {cfg.patch_size}")
        timestep = torch.as_tensor(timestep, device=latents.device).reshape(-1)
        if timestep.numel() == 1:
            timestep = timestep.expand(b)
        if timestep.numel() != b:
            raise ValueError(f"timestep has {timestep.numel()} entries for a batch of {b}")
        grid = (t // pt, h // ph, w // pw)
        full = None
        if self.sequence_group is not None:  # this rank's frames only; the output gathered at the end
            f0, f1 = self._frames_of_rank(grid)
            full, latents = latents, latents[:, :, f0 * pt:f1 * pt]
        kv = self._context_kv(context)
        rope = self.rope(grid)
        for block in self.blocks:  # each layer's plan made and cached here, outside the compute below
            block.self_attn.plan(grid)
        if full is not None:
            n0, n1 = f0 * grid[1] * grid[2], f1 * grid[1] * grid[2]
            rope = (rope[0][n0:n1], rope[1][n0:n1])
        out = (self._compiled_trunk or self._trunk)(latents, timestep, kv, rope, grid)
        if full is None:
            return out
        world = torch.distributed.get_world_size(self.sequence_group)
        hw = grid[1] * grid[2]
        sizes = [(stop - start) // hw * pt for start, stop in ok_distributed.token_slices(grid, world)]
        return _GatherFrames.apply(out, sizes, self.sequence_group)

    def _trunk(self, latents: torch.Tensor, timestep: torch.Tensor, kv: list, rope, grid) -> torch.Tensor:
        """The model's compute on checked inputs, its caches (RoPE tables, plans, context K/V) already
        filled by ``forward``: what :meth:`compile_model` compiles, with no write to any cache (inside
        a checkpointed block a write is a side effect torch.compile refuses, and a cache filled on the
        first compiled call would compile it again on the second)."""
        cfg = self.config
        b, _, t, h, w = latents.shape
        pt, ph, pw = cfg.patch_size
        x = self.patch_embedding(latents.to(self.dtype)).flatten(2).transpose(1, 2)
        # float32 (the parameters WanDiT.cast keeps), float64 in a float64 model
        e = self.time_embedding(timestep_embedding(timestep, cfg.freq_dim).to(self.time_embedding[0].weight.dtype))
        e6 = self.time_projection(e).unflatten(1, (6, cfg.dim))
        for i, (block, layer_kv) in enumerate(zip(self.blocks, kv)):
            if i < self._checkpointed_blocks and torch.is_grad_enabled():
                # keep only each block's input; its activations are recomputed in the backward. The
                # blocks draw no random numbers (no dropout), so no RNG state is stashed: stashing
                # also refuses a forward that initialises CUDA, which a compiled region did on a GPU
                # host with a CPU model (test_compiled_regions_train_as_eager, H200, 1c7b31f)
                x = torch.utils.checkpoint.checkpoint(block, x, e6, grid, rope, layer_kv, self._regions,
                                                      use_reentrant=False, preserve_rng_state=False)
            else:
                x = block(x, e6, grid, rope, layer_kv, self._regions)
        x = self.head(x, e)
        local = (t // pt, grid[1], grid[2])
        x = x.view(b, *local, pt, ph, pw, cfg.out_channels)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, cfg.out_channels, t, h, w)
