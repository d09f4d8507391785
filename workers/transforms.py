"""Pixel transforms shared by training and serving, so both see exactly the same numbers."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Map uint8 pixels (N, C, H, W) to float32 ``(pixels / 255 - mean) / std``, per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    return (pixels.to(torch.float32) / 255.0 - mean_t) / std_t
