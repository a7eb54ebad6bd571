"""A tiny DiT-like stack whose attention goes through oasis_kernels (for calibration tests).

Also a factory for ``oasis-route calibrate --model toy_dit:build``.
"""

import torch
from torch import nn

import oasis_kernels as ok

GRID = (2, 3, 5)
HEADS, HEAD_DIM, LAYERS = 4, 16, 3


class ToySelfAttention(nn.Module):
    def __init__(self, dim, heads, grid):
        super().__init__()
        self.heads, self.grid = heads, grid
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.plan = ok.RoutingPlan(grid, ["global"] * heads)
        self.captured = None

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).unbind(2)
        self.captured = (q.detach(), k.detach())
        return self.proj(ok.routed_attention(q, k, v, self.plan).reshape(b, n, c))


class ToyBlock(nn.Module):
    def __init__(self, dim, heads, grid):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.self_attn = ToySelfAttention(dim, heads, grid)

    def forward(self, x):
        return x + self.self_attn(self.norm(x))


class ToyDiT(nn.Module):
    def __init__(self, layers=LAYERS, heads=HEADS, head_dim=HEAD_DIM, grid=GRID):
        super().__init__()
        self.blocks = nn.ModuleList(ToyBlock(heads * head_dim, heads, grid) for _ in range(layers))

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


def build():
    torch.manual_seed(0)
    return ToyDiT()
