"""mp4 writing (imageio + its bundled ffmpeg) and side-by-side frames."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def side_by_side(frames: Sequence[np.ndarray], scale: int = 4, gap: int = 4) -> np.ndarray:
    """Tile equally tall uint8 HWC frames left to right, upscaled by `scale` (nearest neighbour)."""
    tiles = [np.asarray(f).repeat(scale, 0).repeat(scale, 1) for f in frames]
    height = max(t.shape[0] for t in tiles)
    spacer = np.full((height, gap, 3), 255, dtype=np.uint8)
    row: list[np.ndarray] = []
    for t in tiles:
        if row:
            row.append(spacer)
        row.append(np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0)), constant_values=255))
    return np.concatenate(row, axis=1)


def write_video(path: str | os.PathLike, frames: Sequence[np.ndarray], fps: int = 20) -> str:
    """Write uint8 HWC frames to an mp4 (H.264); sizes are padded to even numbers for the codec."""
    import imageio.v2 as imageio

    if len(frames) == 0:
        raise ValueError("write_video needs at least one frame")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=1) as writer:
        for frame in frames:
            frame = np.asarray(frame, dtype=np.uint8)
            h, w = frame.shape[:2]
            writer.append_data(np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge"))
    return path


def label(frame: np.ndarray, text: str, scale: int = 4, success: bool = False, strip: int = 14) -> np.ndarray:
    """Upscale a uint8 HWC frame and put `text` in a strip above it; a green strip marks success."""
    from PIL import Image, ImageDraw

    big = np.asarray(frame, dtype=np.uint8).repeat(scale, 0).repeat(scale, 1)
    top = np.full((strip, big.shape[1], 3), (40, 150, 60) if success else (30, 30, 30), dtype=np.uint8)
    image = Image.fromarray(np.concatenate([top, big], axis=0))
    ImageDraw.Draw(image).text((3, 1), text, fill=(255, 255, 255))
    return np.asarray(image)
