"""GenBio-PathFM: a DINOv3-style ViT-g/16 (rotary positions, 4 storage tokens, SwiGLU) that sees one channel.
Built here with DINOv3's own parameter names, so its model.pth loads as published, strictly.

Its rotary embedding is computed in bf16 and queries and keys are rotated in bf16, as GenBio's code does
(timm's DINOv3 port computes it in fp32; ``rope_dtype`` selects either)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import GENBIO, EncoderSpec, register


def swiglu_hidden(dim: int, ratio: float = 4, align: int = 64) -> int:
    hidden = int(dim * ratio * 2 / 3)  # DINOv3's SwiGLU FFN: two thirds of dim x ratio, rounded up to ``align``
    return hidden + (-hidden % align)


class RopeEmbedding(nn.Module):
    """Axial rotary angles: pixel-centre coordinates scaled to [-1, 1] per axis, 2 pi c / period."""

    def __init__(self, head_dim: int, base: float = 100, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        periods = base ** (2 * torch.arange(head_dim // 4) / (head_dim // 2))
        self.register_buffer("periods", periods.to(dtype))  # persistent: the published file carries it

    def forward(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        dd = {"device": self.periods.device, "dtype": self.dtype}
        ys, xs = torch.arange(0.5, rows, **dd) / rows, torch.arange(0.5, cols, **dd) / cols
        coords = 2 * torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1) - 1
        angles = (2 * math.pi * coords[:, :, None] / self.periods.to(self.dtype)).flatten(1).tile(2)
        return angles.sin(), angles.cos()


def _rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate the patch tokens (the last ``len(sin)``); class and storage tokens pass, in the rope dtype."""
    dtype, x = x.dtype, x.to(sin.dtype)
    prefix = x.shape[-2] - sin.shape[0]
    p = x[..., prefix:, :]
    half1, half2 = p.chunk(2, dim=-1)
    return torch.cat([x[..., :prefix, :], p * cos + torch.cat([-half2, half1], dim=-1) * sin], dim=-2).to(dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(_rotate(q, *rope), _rotate(k, *rope), v)
        return self.proj(out.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads), LayerScale(dim)
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim, eps=1e-6), SwiGLU(dim, swiglu_hidden(dim)), LayerScale(dim)

    def forward(self, x, rope):
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, patch, patch)


class GenBioPathFM(nn.Module):
    """Each RGB channel runs as its own grey image; the three normed class tokens are concatenated (R, G, B)."""

    def __init__(self, embed_dim: int = 1536, depth: int = 40, num_heads: int = 24, patch_size: int = 16,
                 storage_tokens: int = 4, rope_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, storage_tokens, embed_dim))
        self.patch_embed = PatchEmbed(embed_dim, patch_size)
        self.rope_embed = RopeEmbedding(embed_dim // num_heads, dtype=rope_dtype)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.patch_embed.proj(x.reshape(b * c, 1, h, w))
        rope = self.rope_embed(*t.shape[-2:])
        t = t.flatten(2).transpose(1, 2)
        n = len(t)
        t = torch.cat([self.cls_token.expand(n, -1, -1), self.storage_tokens.expand(n, -1, -1), t], dim=1)
        for block in self.blocks:
            t = block(t, rope)
        return self.norm(t[:, 0]).reshape(b, -1)


register(EncoderSpec("genbio-pathfm", 4608, GenBioPathFM, GENBIO, crop=False, precision="bf16",
                     hub_repo="genbio-ai/genbio-pathfm", weight_files=("model.pth",), patch_size=224,
                     ignore_prefixes=("mask_token",), licence="GenBio AI Community License"))  # pre-training only
