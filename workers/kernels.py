"""Classic fixed image kernels (Sobel, Laplacian, blurs, sharpen) run through the CNN's own conv block.

``apply_kernel`` builds a ``workers.models.Conv`` from a ``ConvBlock`` spec (activation ``none``, no
batch norm), sets its weights to the kernel and runs it: the same arithmetic as a CNN's first layer.
Each image channel is filtered on its own (the weight is the kernel on the channel's own input, zero
on the others), so an RGB image stays RGB.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from convray.workers.models import Conv
from convray.workers.spec import Activation, ConvBlock

# Weights as torch.nn.functional.conv2d applies them (cross-correlation, no flip).
KERNELS: dict[str, list[list[float]]] = {
    "sobel-x": [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]],  # responds to vertical edges (change along x)
    "sobel-y": [[-1, -2, -1], [0, 0, 0], [1, 2, 1]],  # responds to horizontal edges (change along y)
    "laplacian": [[0, 1, 0], [1, -4, 1], [0, 1, 0]],
    "box-blur": [[1 / 9] * 3] * 3,
    "gaussian": [[1 / 16, 2 / 16, 1 / 16], [2 / 16, 4 / 16, 2 / 16], [1 / 16, 2 / 16, 1 / 16]],
    "sharpen": [[0, -1, 0], [-1, 5, -1], [0, -1, 0]],
}
Padding = Literal["same", "valid"] | int


def kernel_conv(name: str, channels: int, padding: Padding = "same", stride: int = 1) -> Conv:
    """A ``Conv`` block applying kernel ``name`` to each of ``channels`` channels separately.

    Raises:
        ValueError: unknown kernel name (the message lists the known ones) or a bad padding/stride.
    """
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; known kernels: {sorted(KERNELS)}")
    kernel = torch.tensor(KERNELS[name], dtype=torch.float32)  # (k, k)
    block = ConvBlock(
        filters=channels,
        kernel_size=kernel.shape[0],
        stride=stride,
        padding=padding,
        batch_norm=False,
        activation=Activation(kind="none"),
    )
    conv = Conv(channels, block)
    layer = next(m for m in conv if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        layer.weight.zero_()  # (out, in, k, k)
        for c in range(channels):
            layer.weight[c, c] = kernel
        layer.bias.zero_()
    return conv.eval()


def apply_kernel(pixels: np.ndarray, name: str, padding: Padding = "same", stride: int = 1) -> np.ndarray:
    """Filter float or uint8 pixels (C, H, W) with kernel ``name``; returns float32 (C, H', W').

    Pixel values are used as they are (0..255 for uint8), so a blur keeps brightness and an edge
    kernel gives 0 on flat regions.

    Raises:
        ValueError: unknown kernel, bad padding/stride, or an image smaller than the kernel.
    """
    if pixels.ndim != 3:
        raise ValueError(f"pixels must be (C, H, W), got shape {pixels.shape}")
    conv = kernel_conv(name, pixels.shape[0], padding, stride)
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None]  # (1, C, H, W)
    with torch.no_grad():
        try:
            out = conv(x)
        except RuntimeError as exc:
            raise ValueError(f"kernel {name!r} does not fit an image of shape {pixels.shape}: {exc}") from None
    return out[0].numpy()
