"""Image grids as PNG files (Pillow)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from pagkit.store import atomic_write


def grid(images: np.ndarray, ncols: int = 8, pad: int = 2, scale: int = 2) -> np.ndarray:
    """Tile uint8 images ``[N, H, W]`` into one uint8 image with ``ncols`` columns."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"grid takes uint8 images [N, H, W], got {images.dtype} {images.shape}")
    n, h, w = images.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    out = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    return np.kron(out, np.ones((scale, scale), dtype=np.uint8)) if scale > 1 else out


def titled(panels: Sequence[np.ndarray], titles: Sequence[str], gap: int = 12) -> Image.Image:
    """Panels (uint8 2-D arrays) side by side, each with a title above it."""
    height = max(p.shape[0] for p in panels) + 18
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    x = 0
    for panel, title in zip(panels, titles, strict=True):
        canvas.paste(Image.fromarray(panel), (x, 18))
        draw.text((x + 2, 3), title, fill=0)
        x += panel.shape[1] + gap
    return canvas


def save_png(image: Image.Image | np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write a PNG atomically (no partial file on failure)."""
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
