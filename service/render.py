"""Arrays -> PNG pictures: feature-map grids, class activation heatmaps over the input, kernel responses.

Rendering is presentation, like ``codecs``: it runs in the front end's thread pool, off the event loop,
so the replica (shared with batched Classify calls) is held only for the forward and backward passes,
and ``workers.replica`` keeps to tensors. The ``convray kernels`` command uses it locally too.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

MIN_TILE_PX = 32  # small maps (8x8, 2x2) are enlarged, pixel for pixel, to at least this size
GAP_PX = 1  # between tiles of a grid
GAP_VALUE = 96  # mid grey, so tile edges show on both black and white tiles
MIN_OVERLAY_PX = 128  # CAM overlays are drawn at least this large
OVERLAY_ALPHA = 0.5  # heatmap weight over the input image

# A "jet"-like ramp (dark blue -> blue -> cyan -> yellow -> red -> dark red), positions in [0, 1].
_RAMP_AT = [0.0, 0.125, 0.375, 0.625, 0.875, 1.0]
_RAMP_RGB = [(0, 0, 143), (0, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 0), (128, 0, 0)]


@dataclass(frozen=True)
class Grid:
    """A PNG grid of a block's channels and its layout."""

    png: bytes
    rows: int
    columns: int
    tile_px: tuple[int, int]  # (height, width) of one channel's tile


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of uint8 pixels (H, W) grey or (H, W, 3) RGB."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def normalise_each(maps: np.ndarray) -> np.ndarray:
    """Scale each map of (C, H, W) to 0..1 by its own minimum and maximum; a constant map becomes 0."""
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1), 0.0)


def tile_scale(height: int, width: int) -> int:
    """The whole-number enlargement that makes a map's longer side at least ``MIN_TILE_PX``."""
    return max(1, math.ceil(MIN_TILE_PX / max(height, width)))


def grid_layout(channels: int) -> tuple[int, int]:
    """(rows, columns) of a near-square grid for ``channels`` tiles: columns = ceil(sqrt(channels))."""
    columns = math.ceil(math.sqrt(channels))
    return math.ceil(channels / columns), columns


def feature_grid(maps: np.ndarray) -> Grid:
    """A greyscale grid of feature maps (C, H, W), each normalised on its own, row by row from the top left.

    Each tile is the map enlarged ``tile_scale`` times (nearest neighbour), with ``GAP_PX`` between tiles,
    so the PNG is ``columns * tile + (columns - 1) * GAP_PX`` wide and likewise high.
    """
    channels, height, width = maps.shape
    rows, columns = grid_layout(channels)
    scale = tile_scale(height, width)
    tile_h, tile_w = height * scale, width * scale
    canvas = np.full(
        (rows * tile_h + (rows - 1) * GAP_PX, columns * tile_w + (columns - 1) * GAP_PX), GAP_VALUE, np.uint8
    )
    tiles = np.round(normalise_each(maps.astype(np.float64)) * 255).astype(np.uint8)
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)  # (C, tile_h, tile_w)
    for c in range(channels):
        top, left = (c // columns) * (tile_h + GAP_PX), (c % columns) * (tile_w + GAP_PX)
        canvas[top : top + tile_h, left : left + tile_w] = tiles[c]
    return Grid(encode_png(canvas), rows, columns, (tile_h, tile_w))


def heat_colours(values: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) for values in 0..1 on the jet-like ramp (0 dark blue, 1 dark red)."""
    channels = [np.interp(values, _RAMP_AT, [rgb[i] for rgb in _RAMP_RGB]) for i in range(3)]
    return np.round(np.stack(channels, axis=-1)).astype(np.uint8)


def resize_float(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """A float map (h, w) resized bilinearly to (height, width)."""
    image = Image.fromarray(values.astype(np.float32))  # mode "F"
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float64)


def cam_overlay(image: np.ndarray, cam: np.ndarray) -> bytes:
    """PNG of a class activation map (h, w) as a heatmap laid over the input image uint8 (C, H, W).

    The map is scaled to 0..1 by its own minimum and maximum, resized bilinearly over the image, and
    blended with weight ``OVERLAY_ALPHA``; the input is enlarged pixel for pixel to at least
    ``MIN_OVERLAY_PX`` on its longer side, so an 8x8 input gives a 128x128 picture.
    """
    channels, height, width = image.shape
    scale = max(1, math.ceil(MIN_OVERLAY_PX / max(height, width)))
    out_h, out_w = height * scale, width * scale
    base = image.transpose(1, 2, 0).repeat(scale, axis=0).repeat(scale, axis=1).astype(np.float64)
    if channels == 1:
        base = np.repeat(base, 3, axis=2)
    heat = heat_colours(normalise_each(resize_float(cam, out_h, out_w)[None])[0])
    blended = (1 - OVERLAY_ALPHA) * base + OVERLAY_ALPHA * heat
    return encode_png(np.round(blended).clip(0, 255).astype(np.uint8))


def response_image(response: np.ndarray, signed: bool) -> np.ndarray:
    """uint8 pixels (H, W) or (H, W, 3) for a kernel response (C, H, W).

    ``signed`` responses (edge kernels, whose weights sum to 0) are shown as magnitude, scaled so the
    strongest is 255; others (blurs, sharpen) are clipped to 0..255 like an ordinary image.
    """
    if signed:
        magnitude = np.abs(response)
        peak = magnitude.max()
        values = magnitude * (255.0 / peak) if peak > 0 else magnitude
    else:
        values = response
    pixels = np.round(values).clip(0, 255).astype(np.uint8)
    return pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
