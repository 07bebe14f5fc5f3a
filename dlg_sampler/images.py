"""Sample grids for looking at: square-ish, with a light border around every tile, tiny images upscaled."""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageOps

#: Colour of the border between tiles: light, so dark-background samples (digits) stay apart.
GRID_FILL = 255


def to_uint8(images: torch.Tensor, *, rgb: bool = False) -> torch.Tensor:
    """``images [N, C, H, W]`` in ``[-1, 1]`` -> ``[N, H, W, C]`` uint8 on the CPU, ``round((x + 1) * 127.5)``;
    ``rgb``: one channel repeated to three (what FID tools feed their Inception network)."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return arr.expand(-1, -1, -1, 3).contiguous() if rgb and arr.shape[-1] == 1 else arr.contiguous()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``images [N, C, H, W]`` in ``[-1, 1]`` (C = 1 or 3) -> ``N`` PIL images (grayscale for C = 1)."""
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in to_uint8(images).numpy()]


def image_grid(images: torch.Tensor | list[Image.Image], *, padding: int = 2, min_tile: int = 64) -> Image.Image:
    """One grid image of ``images`` (a tensor ``[N, C, H, W]`` in ``[-1, 1]``, or PIL images of one size).

    ``ceil(sqrt(N))`` columns, so the grid is about square for any ``N``; tiles smaller than ``min_tile`` px are
    upscaled by an integer factor (nearest neighbour, pixels stay visible); every tile gets a ``padding`` px border
    of :data:`GRID_FILL`, and the last row is completed with empty tiles. Built with diffusers'
    ``make_image_grid``.
    """
    from diffusers.utils import make_image_grid

    tiles = to_pil(images) if isinstance(images, torch.Tensor) else list(images)
    if not tiles:
        raise ValueError("image_grid needs at least one image.")
    scale = max(1, min_tile // max(tiles[0].size))
    fill = GRID_FILL if tiles[0].mode == "L" else (GRID_FILL,) * len(tiles[0].mode)
    tiles = [ImageOps.expand(t.resize((t.width * scale, t.height * scale), Image.NEAREST), border=padding, fill=fill)
             for t in tiles]
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    tiles += [Image.new(tiles[0].mode, tiles[0].size, fill)] * (rows * cols - len(tiles))
    return make_image_grid(tiles, rows, cols)
