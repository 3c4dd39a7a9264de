"""Pixel-shuffle projector (nanoVLM / Idefics3 style): fewer visual tokens, wider features, then an MLP."""

from __future__ import annotations

import torch
from torch import nn


def pixel_shuffle(feats_NPD: torch.Tensor, factor: int) -> torch.Tensor:
    """Merge each ``factor x factor`` block of a square patch grid into one token.

    (N, P, D) with P = g*g  ->  (N, P / factor^2, D * factor^2); the spatial layout inside a block is
    kept in the channel order, so no information is lost, only token count traded for width.
    """
    n, p, d = feats_NPD.shape
    g = int(round(p**0.5))
    if g * g != p or g % factor:
        raise ValueError(f"pixel_shuffle: {p} patches is not a square grid divisible by {factor}")
    h = g // factor
    x = feats_NPD.reshape(n, h, factor, h, factor, d)  # (N, rows, r, cols, c, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, rows, cols, r, c, D)
    return x.reshape(n, h * h, factor * factor * d)


class PixelShuffleProjector(nn.Module):
    """``pixel_shuffle`` then Linear-GELU-Linear into the language model's width."""

    def __init__(self, in_dim: int, out_dim: int, shuffle: int = 2):
        super().__init__()
        self.shuffle = shuffle
        self.in_dim = in_dim
        self.out_dim = out_dim
        wide = in_dim * shuffle * shuffle
        self.mlp = nn.Sequential(nn.Linear(wide, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, feats_NPD: torch.Tensor) -> torch.Tensor:
        """(N, P, in_dim) -> (N, P / shuffle^2, out_dim)."""
        return self.mlp(pixel_shuffle(feats_NPD, self.shuffle))
