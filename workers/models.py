"""CNN blocks as small torch modules, and ``build_model`` which assembles them from a ``CNNSpec``.

Every module maps (N, C, H, W) feature maps to feature maps, except the heads, which map them to
(N, num_classes) logits. ``CNN.probabilities`` applies the spec's output activation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from convray.workers.spec import (
    Activation,
    CNNSpec,
    ConvBlock,
    DropoutBlock,
    FCHead,
    GAPFCHead,
    GAPHead,
    PoolBlock,
    output_shapes,
)


def make_activation(activation: Activation) -> nn.Module:
    """The torch module for an activation spec."""
    if activation.kind == "relu":
        return nn.ReLU()
    if activation.kind == "leaky_relu":
        return nn.LeakyReLU(activation.negative_slope)
    return nn.Identity()


class SamePad(nn.Module):
    """Zero padding that makes a conv's output ceil(in / stride), with any extra pixel after.

    torch's own ``padding='same'`` only allows stride 1; this follows TensorFlow's rule for any stride.
    """

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def _pads(self, size: int) -> tuple[int, int]:
        out = math.ceil(size / self.stride)
        total = max((out - 1) * self.stride + self.kernel_size - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        """Pad ``x`` so the following conv keeps ceil(size / stride)."""
        top, bottom = self._pads(x.shape[-2])
        left, right = self._pads(x.shape[-1])
        return F.pad(x, (left, right, top, bottom))


class Conv(nn.Sequential):
    """Convolution, optional batch norm, activation: the CNN's feature extractor block."""

    def __init__(self, in_channels: int, block: ConvBlock) -> None:
        layers: list[nn.Module] = []
        if block.padding == "same":
            layers.append(SamePad(block.kernel_size, block.stride))
        pad = block.padding if isinstance(block.padding, int) else 0
        layers.append(
            nn.Conv2d(in_channels, block.filters, block.kernel_size, block.stride, pad, bias=not block.batch_norm)
        )
        if block.batch_norm:
            layers.append(nn.BatchNorm2d(block.filters))
        layers.append(make_activation(block.activation))
        super().__init__(*layers)


class MinPool2d(nn.Module):
    """Minimum over each window: the max of the negated map, negated back."""

    def __init__(self, window: int, stride: int) -> None:
        super().__init__()
        self.window, self.stride = window, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        """Window minima."""
        return -F.max_pool2d(-x, self.window, self.stride)


class SumPool2d(nn.Module):
    """Sum over each window: the window mean times the window area (no padding, so no edge bias)."""

    def __init__(self, window: int, stride: int) -> None:
        super().__init__()
        self.window, self.stride = window, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        """Window sums."""
        return F.avg_pool2d(x, self.window, self.stride) * (self.window * self.window)


def make_pool(block: PoolBlock) -> nn.Module:
    """The torch module for a pooling spec."""
    stride = block.stride or block.window
    if block.kind == "max":
        return nn.MaxPool2d(block.window, stride)
    if block.kind == "avg":
        return nn.AvgPool2d(block.window, stride)
    if block.kind == "sum":
        return SumPool2d(block.window, stride)
    if block.kind == "min":
        return MinPool2d(block.window, stride)
    return nn.Identity()


class GlobalAvgPool(nn.Module):
    """Mean over all positions of each map: (N, C, H, W) -> (N, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-map means."""
        return x.mean(dim=(-2, -1))


def _dense_stack(in_features: int, head: FCHead | GAPFCHead, num_classes: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in head.hidden:
        layers += [nn.Linear(in_features, width), make_activation(head.activation)]
        if head.dropout:
            layers.append(nn.Dropout(head.dropout))
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return layers


def make_head(head: FCHead | GAPHead | GAPFCHead, features: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The head for the last block's feature shape (C, H, W), producing (N, num_classes) logits."""
    channels, height, width = features
    if isinstance(head, FCHead):
        return nn.Sequential(nn.Flatten(), *_dense_stack(channels * height * width, head, num_classes))
    if isinstance(head, GAPHead):
        return nn.Sequential(nn.Conv2d(channels, num_classes, kernel_size=1), GlobalAvgPool())
    return nn.Sequential(GlobalAvgPool(), *_dense_stack(channels, head, num_classes))


class CNN(nn.Module):
    """A CNN built from a spec: ``features`` (the blocks, in order) then ``head``."""

    def __init__(self, spec: CNNSpec, height: int, width: int) -> None:
        super().__init__()
        self.spec = spec
        shapes = output_shapes(spec, height, width)  # validates the sizes first, with a clear message
        blocks: list[nn.Module] = []
        channels = spec.in_channels
        for block in spec.blocks:
            if isinstance(block, ConvBlock):
                blocks.append(Conv(channels, block))
                channels = block.filters
            elif isinstance(block, PoolBlock):
                blocks.append(make_pool(block))
            elif isinstance(block, DropoutBlock):
                blocks.append(nn.Dropout(block.rate))
        self.features = nn.Sequential(*blocks)
        self.head = make_head(spec.head, shapes[-1][1], spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for normalised images (N, C, H, W)."""
        return self.head(self.features(x))

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities: softmax over classes, or an independent sigmoid per class."""
        logits = self(x)
        return torch.sigmoid(logits) if self.spec.output == "sigmoid" else torch.softmax(logits, dim=-1)


def fold_batch_norm(model: CNN) -> CNN:
    """Fold every conv block's batch norm into its convolution, in place, for inference.

    In eval mode batch norm is a fixed per-channel affine map, so it can live in the conv's weights
    and bias: the same outputs (to float rounding) with one op fewer per block. Block outputs, and so
    feature maps and class activation maps, are unchanged. Only for a model that will not be trained.
    """
    model.eval()
    for block in model.features:
        if not isinstance(block, Conv):
            continue
        for index in range(1, len(block)):
            conv, norm = block[index - 1], block[index]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                block[index - 1] = fuse_conv_bn_eval(conv, norm)
                block[index] = nn.Identity()
    return model


def fold_same_padding(model: CNN) -> CNN:
    """Let each convolution do its own 'same' padding where that padding is symmetric, in place.

    With stride 1 and an odd kernel, 'same' pads (kernel - 1) / 2 zeros on every side whatever the
    input size, which ``nn.Conv2d`` does itself inside the convolution: the same numbers, one op and one
    copy of the map fewer per block. Other strides and even kernels keep their ``SamePad``.
    """
    for block in model.features:
        if not isinstance(block, Conv) or not isinstance(block[0], SamePad):
            continue
        pad, conv = block[0], block[1]
        if pad.stride == 1 and pad.kernel_size % 2 == 1 and isinstance(conv, nn.Conv2d) and conv.padding == (0, 0):
            conv.padding = (pad.kernel_size // 2, pad.kernel_size // 2)
            block[0] = nn.Identity()
    return model


def prepare_for_inference(model: CNN) -> CNN:
    """The serving form of a trained model: eval mode, batch norm and symmetric padding folded in."""
    return fold_same_padding(fold_batch_norm(model))


MAX_PARAMETERS = 1_000_000_000
"""Most parameters a spec may give a model: 4 GB of fp32 weights, 40 times ResNet-50. Every field of a spec can
be within its bounds and the whole still need tens of GB (two 4096-filter 31x31 convolutions: 64 GB)."""


def parameter_count(spec: CNNSpec, height: int, width: int) -> int:
    """How many parameters ``spec`` has at this input size, counted without allocating them (torch's meta device).

    Raises:
        ValueError: the spec does not fit the input size (``output_shapes``), or it has over ``MAX_PARAMETERS``.
    """
    with torch.device("meta"):
        count = sum(p.numel() for p in CNN(spec, height, width).parameters())
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"the spec has {count:,} parameters at {height}x{width} ({count * 4 / 1e9:.1f} GB of fp32 weights), "
            f"over the limit of {MAX_PARAMETERS:,}: use fewer filters, smaller kernels or smaller dense layers"
        )
    return count


def build_model(spec: CNNSpec, height: int, width: int) -> CNN:
    """Build the torch module for ``spec`` at input size ``height`` x ``width`` (randomly initialised).

    Raises:
        ValueError: the spec does not fit the input size, or is too large (``parameter_count``).
    """
    parameter_count(spec, height, width)  # before allocating what could be tens of GB
    return CNN(spec, height, width)
