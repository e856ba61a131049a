"""A small vision transformer for 28x28x1 inputs: a scaled-down analogue of CLIP's ViT-B/32.

Layout (pre-norm transformer, Dosovitskiy et al. 2021)::

    patch_embed   conv(1 -> dim, kernel = stride = patch)     28x28 -> (28/patch)^2 tokens
    cls_token     learned [1, 1, dim], prepended
    pos_embed     learned [1, 1 + tokens, dim], added
    blocks.i      x = x + attn(ln1(x));  x = x + mlp(ln2(x))   (``depth`` blocks)
    norm          LayerNorm; features = norm(x)[:, 0]          (the class token)

``attn`` is multi-head self-attention with a fused ``qkv`` Linear and an output ``proj`` Linear;
``mlp`` is ``fc2(GELU(fc1(x)))`` with hidden size ``mlp_ratio * dim``. No dropout, so training is a
deterministic function of the data order and the initial weights.

Defaults (``vit_s``): patch 7 (a 4x4 token grid, like ViT-B/32's 7x7 grid on 224 px), dim 64, depth 4,
4 heads, mlp_ratio 2. Trained with Adam/AdamW, as CLIP-ViT is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention: ``proj(softmax(Q K^T / sqrt(d_head)) V)`` with Q, K, V from one Linear."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    """``fc2(GELU(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViTBackbone(nn.Module):
    """Feature extractor ``[B, 1, 28, 28] -> [B, dim]`` (the normalised class token).

    Args:
        patch: patch size; must divide the image size.
        dim: token width. depth: number of transformer blocks. heads: attention heads.
        mlp_ratio: MLP hidden size / dim. image_size, in_channels: input geometry.
    """

    def __init__(
        self,
        patch: int = 7,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        image_size: int = 28,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"patch {patch} does not divide image size {image_size}")
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + tokens, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.feature_dim = dim
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]
