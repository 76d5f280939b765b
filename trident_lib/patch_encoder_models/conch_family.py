"""CONCH encoders. v1.5 (TITAN's patch encoder) is built here from timm parts and loads the published
``pytorch_model_vision.bin`` as is; v1 is an open_clip CoCa model that only the CONCH package builds."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..weights import load_into, load_state_dict
from .base import IMAGENET, OPENAI_CLIP, EncoderSpec, register


class AttentionalPooler(nn.Module):
    """CoCa attentional pooling: learned queries cross-attend to the tokens. Parameter names follow the
    CONCH checkpoints: ``query``, ``ln_q`` (queries), ``ln_k`` (context), bias-free ``to_q``/``to_kv``/``to_out``."""

    def __init__(self, d_model: int = 768, context_dim: int = 1024, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.heads = n_head
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, N, context_dim) -> (B, n_queries, d_model)
        q = self.to_q(self.ln_q(self.query)).expand(tokens.shape[0], -1, -1)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)

        def heads(t):  # (B, n, h*d) -> (B, h, n, d)
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))  # softmax(q k^T / sqrt(d)) v
        return self.to_out(out.transpose(1, 2).flatten(2))


def grid_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The (1, 1 + side², C) position embedding for a rows × cols token grid, bicubically resampled the way
    DINO/iBOT (and so TRIDENT) do it: scale factors with a +0.1 offset, so that floor() lands on the grid."""
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    side = math.isqrt(grid.shape[1])
    if (rows, cols) == (side, side):
        return pos_embed
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic",
                         align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1).to(pos_embed.dtype)
    return torch.cat([cls_pos, grid], dim=1)


class ConchV15(nn.Module):
    """CONCH v1.5 vision tower: a ViT-L/16 trunk (LayerScale 1.0, class token, timm key layout), the contrast
    attentional pooler (one 768-d query over all trunk tokens) and a LayerNorm: 768-d.

    Built at ``img_size`` 224 (14 × 14 grid); any other input size gets an interpolated grid at run time
    (448 px -> 28 × 28). ``embed_dim``/``depth``/``num_heads`` can be shrunk for tests."""

    def __init__(self, img_size: int = 224, embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 pool_dim: int = 768, pool_heads: int = 8):
        super().__init__()
        self.trunk = VisionTransformer(img_size=img_size, patch_size=16, embed_dim=embed_dim, depth=depth,
                                       num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True, init_values=1.0,
                                       num_classes=0)
        self.attn_pool_contrast = AttentionalPooler(pool_dim, embed_dim, pool_heads, n_queries=1)
        self.ln_contrast = nn.LayerNorm(pool_dim)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normed trunk tokens (class token first). The patch projection is called directly so that any
        input size divisible by 16 works."""
        t = self.trunk
        p = t.patch_embed.patch_size[0]
        tokens = t.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([t.cls_token.expand(x.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + grid_pos_embed(t.pos_embed, x.shape[-2] // p, x.shape[-1] // p).to(tokens.dtype)
        return t.norm(t.blocks(tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.forward_features(x))[:, 0])


def load_conch_v15(model: ConchV15, path: str) -> None:
    """The published file is a flat dict (``trunk.*``, ``attn_pool_contrast.*``, ``ln_contrast.*``), loaded
    strictly; a position grid that differs from the model's is resized first (bilinear, as TRIDENT does)."""
    sd = load_state_dict(path, "conch_v15")
    pos = sd.get("trunk.pos_embed")
    if pos is not None and pos.shape != model.trunk.pos_embed.shape:
        sd["trunk.pos_embed"] = resample_abs_pos_embed(pos, new_size=list(model.trunk.patch_embed.grid_size),
                                                       num_prefix_tokens=1, interpolation="bilinear",
                                                       antialias=False)
    load_into(model, sd, "conch_v15", path)


# -- CONCH v1: the CONCH package builds the CoCa model; its checkpoint is read as any other ---------------

def build_conch_v1():
    # Only the architecture from the CONCH package: the weights are read like every other encoder's (tensors
    # only, from the local file, loaded strictly), not by the package's own loader.
    from conch.open_clip_custom import create_model

    return create_model("conch_ViT-B-16")


def conch_v1_image_embedding(model, x):
    # The contrast pooler's output before the projection and L2 normalisation: 512-d.
    return model.encode_image(x, proj_contrast=False, normalize=False)


register(
    EncoderSpec("conch_v15", 768, ConchV15, IMAGENET, size=448, precision="fp16", hub_repo="MahmoodLab/conchv1_5",
                weight_files=("pytorch_model_vision.bin",), patch_size=512, load_weights=load_conch_v15,
                licence="CC-BY-NC-ND-4.0",
                notes="native build (no CONCH package); 448-px inputs use a 28 × 28 interpolated position grid"),
    EncoderSpec("conch_v1", 512, build_conch_v1, OPENAI_CLIP, size=448, interpolation="bicubic", precision="fp32",
                hub_repo="MahmoodLab/conch", patch_size=512, requires=("conch",),
                install="pip install git+https://github.com/Mahmoodlab/CONCH",
                forward=conch_v1_image_embedding, licence="CC-BY-NC-ND-4.0"),
)
