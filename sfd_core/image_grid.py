"""Tile uint8 images into one grid image (for sample previews and reports)."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from sfd_core.imaging import encode_image


def make_grid(images: np.ndarray, columns: int | None = None, padding: int = 2, background: int = 255) -> np.ndarray:
    """[N, H, W, 3] uint8 -> one [rows*(H+p)+p, cols*(W+p)+p, 3] uint8 image, filled row-major.

    ``columns`` defaults to the smallest square that holds N; empty cells and borders get ``background``."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
    count, height, width, _ = images.shape
    if count == 0:
        raise ValueError("cannot make a grid of zero images")
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, 3),
                   background, dtype=np.uint8)
    for i, image in enumerate(images):
        top = padding + (i // columns) * (height + padding)
        left = padding + (i % columns) * (width + padding)
        grid[top:top + height, left:left + width] = image
    return grid


def grid_png(images: np.ndarray, columns: int | None = None, padding: int = 2) -> bytes:
    """``make_grid`` encoded as lossless PNG bytes."""
    return encode_image(Image.fromarray(make_grid(images, columns, padding)), "png")
