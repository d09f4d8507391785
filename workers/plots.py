"""The two plots a trained version carries: its training curve and its confusion matrix, as PNG bytes.

Drawn with Pillow (already a dependency, for image decoding) rather than matplotlib: two simple charts
do not justify another dependency and its ~1 s import on the path of a job whose goal is seconds.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (200, 200, 200)
SERIES = {"loss": (31, 119, 180), "accuracy": (255, 127, 14), "val_accuracy": (44, 160, 44)}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    title: str,
    series: dict[str, list[float]],
    top: float,
) -> None:
    """Line chart of each series over epochs inside ``box`` (left, top, right, bottom), y from 0 to ``top``."""
    left, upper, right, lower = box
    draw.rectangle(box, outline=BLACK)
    draw.text((left, upper - 14), title, fill=BLACK)
    for fraction in (0.25, 0.5, 0.75):
        y = lower - fraction * (lower - upper)
        draw.line((left, y, right, y), fill=GREY)
        draw.text((left - 34, y - 6), f"{fraction * top:.2f}", fill=BLACK)
    draw.text((left - 34, upper - 6), f"{top:.2f}", fill=BLACK)
    for row, (name, values) in enumerate(series.items()):
        steps = max(len(values) - 1, 1)
        points = [
            (left + i * (right - left) / steps, lower - min(max(v / top, 0.0), 1.0) * (lower - upper))
            for i, v in enumerate(values)
        ]
        if len(points) > 1:
            draw.line(points, fill=SERIES[name], width=2)
        else:
            draw.point(points, fill=SERIES[name])
        draw.text((right - 110, upper + 6 + 14 * row), name, fill=SERIES[name])
    draw.text(((left + right) // 2 - 15, lower + 4), "epoch", fill=BLACK)


def curve_png(history: Sequence[dict[str, Any]]) -> bytes:
    """Training loss (left) and training / held-out accuracy (right) per epoch."""
    image = Image.new("RGB", (820, 340), WHITE)
    draw = ImageDraw.Draw(image)
    losses = [r["loss"] for r in history]
    _panel(draw, (50, 30, 390, 300), "training loss", {"loss": losses}, max(losses + [1e-9]) * 1.1)
    accuracy = {k: [r[k] for r in history if k in r] for k in ("accuracy", "val_accuracy")}
    _panel(draw, (460, 30, 800, 300), "accuracy", {k: v for k, v in accuracy.items() if v}, 1.0)
    return _png(image)


MAX_GRID_PX = 2000
"""The confusion matrix's grid is at most this wide: cells shrink with many classes (1,000 classes at 36 px would be a
36,000-pixel square, about 4 GB to draw)."""
LABELLED_CELL_PX = 20  # cells smaller than this carry no counts or class names


def confusion_png(confusion: Sequence[Sequence[int]], labels: Sequence[str], cell_px: int = 36) -> bytes:
    """The confusion matrix as a grid (rows: true class, columns: predicted), darker for more images.

    With many classes the cells shrink to keep the grid within ``MAX_GRID_PX`` (one pixel a class past that many
    classes), and below ``LABELLED_CELL_PX`` the grid is shading only.
    """
    classes = len(labels)
    cell_px = min(cell_px, max(1, MAX_GRID_PX // max(classes, 1)))
    if cell_px < LABELLED_CELL_PX:
        return _shaded_confusion_png(confusion, cell_px)
    margin = 60
    size = margin + classes * cell_px + 10
    image = Image.new("RGB", (size, size), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((margin, 4), "predicted ->", fill=BLACK)
    draw.text((2, 20), "true", fill=BLACK)
    for i, row in enumerate(confusion):
        total = max(sum(row), 1)
        draw.text((4, margin + i * cell_px + cell_px // 3), labels[i][:7], fill=BLACK)
        draw.text((margin + i * cell_px + 4, margin - 16), labels[i][:4], fill=BLACK)
        for j, count in enumerate(row):
            shade = int(255 * (1 - count / total))  # fraction of this true class, white (0) to blue (all)
            x, y = margin + j * cell_px, margin + i * cell_px
            draw.rectangle((x, y, x + cell_px, y + cell_px), fill=(shade, shade, 255), outline=GREY)
            if count:
                draw.text((x + 4, y + cell_px // 3), str(count), fill=WHITE if shade < 128 else BLACK)
    return _png(image)


def _shaded_confusion_png(confusion: Sequence[Sequence[int]], cell_px: int) -> bytes:
    """Too many classes for text: each cell one shade, drawn as an array and scaled up, not cell by cell."""
    counts = np.asarray(confusion, dtype=np.float64)
    shade = (255 * (1 - counts / np.maximum(counts.sum(axis=1, keepdims=True), 1))).astype(np.uint8)
    grid = Image.fromarray(np.stack([shade, shade, np.full_like(shade, 255)], axis=-1), "RGB")
    side = len(counts) * cell_px
    margin = 30
    image = Image.new("RGB", (margin + side + 10, margin + side + 10), WHITE)
    image.paste(grid.resize((side, side), Image.Resampling.NEAREST), (margin, margin))
    draw = ImageDraw.Draw(image)
    draw.text((margin, 4), f"predicted -> ({len(counts)} classes)", fill=BLACK)
    draw.text((2, 16), "true", fill=BLACK)
    return _png(image)
