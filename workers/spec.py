"""The declarative CNN spec: what a model is made of, as JSON-serialisable pydantic models.

A spec lists feature blocks (convolution, pooling, dropout) followed by one head. It is saved
beside the weights in ``model.json`` and turned into a torch module by ``workers.models.build_model``.
``output_shapes`` applies the textbook shape rules, so a spec can be checked before any weights exist.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ActivationName = Literal["relu", "leaky_relu", "none"]
PoolKind = Literal["max", "avg", "sum", "min", "none"]


class _Strict(BaseModel):
    """Base for spec parts: unknown fields are errors, so a typo never passes silently.

    Counts and switches are ``strict`` too: ``"filters": true`` or ``"8"`` is refused, not read as 1 or 8.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


class Activation(_Strict):
    """A pointwise non-linearity."""

    kind: ActivationName = "relu"
    negative_slope: float = Field(0.01, ge=0.0, lt=1.0)
    """Slope for x < 0, used by ``leaky_relu`` only."""


class ConvBlock(_Strict):
    """Convolution (filters x kernel over the input channels), optional batch norm, activation."""

    type: Literal["conv"] = "conv"
    filters: int = Field(gt=0, le=4096, strict=True)
    kernel_size: int = Field(3, gt=0, le=31, strict=True)
    stride: int = Field(1, gt=0, le=16, strict=True)
    padding: Literal["same", "valid"] | Annotated[int, Field(ge=0, le=31, strict=True)] = "same"
    """``same``: output size ceil(in / stride); ``valid``: no padding; an int pads each side."""
    batch_norm: bool = Field(False, strict=True)
    activation: Activation = Activation()


class PoolBlock(_Strict):
    """Pooling over windows: ``max``, ``avg``, ``sum`` or ``min``; ``none`` passes through."""

    type: Literal["pool"] = "pool"
    kind: PoolKind = "max"
    window: int = Field(2, gt=0, le=16, strict=True)
    stride: int | None = Field(None, gt=0, le=16, strict=True)
    """Defaults to the window size (non-overlapping windows)."""


class DropoutBlock(_Strict):
    """Zeroes a fraction ``rate`` of activations while training; identity at inference."""

    type: Literal["dropout"] = "dropout"
    rate: float = Field(ge=0.0, lt=1.0)


Block = Annotated[ConvBlock | PoolBlock | DropoutBlock, Field(discriminator="type")]


class FCHead(_Strict):
    """Flatten, then dense layers (``hidden`` sizes, each with activation and dropout), then classes."""

    type: Literal["fc"] = "fc"
    hidden: list[Annotated[int, Field(gt=0, le=65536, strict=True)]] = []
    activation: Activation = Activation()
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class GAPHead(_Strict):
    """A 1x1 convolution to one feature map per class, then global average pooling; no dense layer."""

    type: Literal["gap"] = "gap"


class GAPFCHead(_Strict):
    """Global average pooling, then dense layers to the classes, as in ResNet-50."""

    type: Literal["gap_fc"] = "gap_fc"
    hidden: list[Annotated[int, Field(gt=0, le=65536, strict=True)]] = []
    activation: Activation = Activation()
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


Head = Annotated[FCHead | GAPHead | GAPFCHead, Field(discriminator="type")]


class CNNSpec(_Strict):
    """A whole CNN: input channels, feature blocks, head, class count and output activation."""

    in_channels: int = Field(gt=0, le=4, strict=True)
    blocks: list[Block] = Field(min_length=1)
    head: Head
    num_classes: int = Field(gt=0, le=100_000, strict=True)
    output: Literal["softmax", "sigmoid"] = "softmax"
    """``softmax`` for single-label classification, ``sigmoid`` for multi-label."""

    @model_validator(mode="after")
    def _has_a_conv_block(self) -> CNNSpec:
        if not any(isinstance(b, ConvBlock) for b in self.blocks):
            raise ValueError("blocks must contain at least one 'conv' block")
        if self.num_classes == 1 and self.output == "softmax":
            raise ValueError("a softmax over 1 class is always 1.0: use output 'sigmoid' for a yes/no model")
        return self


def conv_output_size(size: int, kernel: int, stride: int, padding: str | int) -> int:
    """Output length of a convolution along one axis.

    ``same`` gives ceil(size / stride) (TensorFlow's rule, padding split with the extra pixel after);
    otherwise floor((size + 2 * padding - kernel) / stride) + 1 with ``valid`` meaning padding 0.
    """
    if padding == "same":
        return math.ceil(size / stride)
    pad = 0 if padding == "valid" else int(padding)
    return (size + 2 * pad - kernel) // stride + 1


def pool_output_size(size: int, window: int, stride: int) -> int:
    """Output length of an unpadded pooling window along one axis: floor((size - window) / stride) + 1."""
    return (size - window) // stride + 1


def output_shapes(spec: CNNSpec, height: int, width: int) -> list[tuple[str, tuple[int, int, int]]]:
    """The (channels, height, width) after each feature block, named ``block<i>_<type>``.

    Raises:
        ValueError: a block would shrink the feature map below 1x1; the message names the block.
    """
    channels, shapes = spec.in_channels, []
    for i, block in enumerate(spec.blocks):
        given = f"{height}x{width}"
        if isinstance(block, ConvBlock):
            height = conv_output_size(height, block.kernel_size, block.stride, block.padding)
            width = conv_output_size(width, block.kernel_size, block.stride, block.padding)
            channels = block.filters
        elif isinstance(block, PoolBlock) and block.kind != "none":
            stride = block.stride or block.window
            height = pool_output_size(height, block.window, stride)
            width = pool_output_size(width, block.window, stride)
        if height < 1 or width < 1:
            raise ValueError(
                f"blocks[{i}] ({block.type}) shrinks the feature map to {max(height, 0)}x{max(width, 0)} "
                f"(from {given}); use less pooling or 'same' padding for this input size"
            )
        shapes.append((f"block{i}_{block.type}", (channels, height, width)))
    return shapes


# Named specs for `convray train --preset`; the data decides in_channels and num_classes.
PRESETS: dict[str, dict[str, Any]] = {
    # ~25k parameters; 8x8 grey digits -> 10 classes; ~100 KB of weights.
    "digits-small": {
        "in_channels": 1,
        "blocks": [
            {"type": "conv", "filters": 32, "kernel_size": 3, "padding": "same", "batch_norm": True},
            {"type": "conv", "filters": 32, "kernel_size": 3, "padding": "same", "batch_norm": True},
            {"type": "pool", "kind": "max", "window": 2},
            {"type": "conv", "filters": 64, "kernel_size": 3, "padding": "same", "batch_norm": True},
            {"type": "pool", "kind": "max", "window": 2},
            {"type": "dropout", "rate": 0.1},
        ],
        "head": {"type": "gap_fc", "hidden": []},
        "num_classes": 10,
        "output": "softmax",
    },
}
