"""Pixel transforms shared by training and serving, so both see exactly the same numbers.

Also the training augmentations (random shift, horizontal flip), applied to uint8 batches before normalising.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from convray.workers.repository import Normalisation


class Normaliser:
    """Maps uint8 pixels (N, C, H, W) to float32 ``(pixels / 255 - mean) / std``, per channel.

    Holds mean and std as tensors on ``device``, built once: a replica normalises every batch, and
    building them per call costs more than the arithmetic on a small image (and a copy to a GPU).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """The normalised batch, a new float32 tensor (``pixels`` is left as it is)."""
        return pixels.to(torch.float32, copy=True).div_(255.0).sub_(self.mean).div_(self.std)


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Map uint8 pixels (N, C, H, W) to float32 ``(pixels / 255 - mean) / std``, per channel."""
    return Normaliser(mean, std, pixels.device)(pixels)


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels in x and y, filling with zeros.

    This is a random crop of the zero-padded image, the same size as the input.
    """
    if max_shift == 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n)[:, None, None, None]
    channels = torch.arange(images.shape[1])[None, :, None, None]
    return padded[batch, channels, rows, cols]


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the images left to right (only for tasks where a mirror keeps the label)."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5  # (N,)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def channel_stats(images: np.ndarray) -> Normalisation:
    """Per-channel mean and std of uint8 images (N, C, H, W), on the 0..1 scale."""
    scaled = images.astype(np.float64) / 255.0
    return Normalisation(
        mean=[round(float(m), 6) for m in scaled.mean(axis=(0, 2, 3))],
        std=[round(max(float(s), 1e-6), 6) for s in scaled.std(axis=(0, 2, 3))],
    )
