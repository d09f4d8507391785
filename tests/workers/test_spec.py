"""The CNN spec: validation and the output-shape rules of convolution and pooling."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from convray.workers.models import Conv
from convray.workers.spec import CNNSpec, ConvBlock, conv_output_size, output_shapes, pool_output_size


def small_spec(**overrides):
    spec = {
        "in_channels": 1,
        "blocks": [{"type": "conv", "filters": 4}, {"type": "pool", "kind": "max", "window": 2}],
        "head": {"type": "gap"},
        "num_classes": 3,
    }
    spec.update(overrides)
    return spec


CONV_CASES = [
    (size, kernel, stride, padding)
    for size in (1, 5, 8, 28, 224)
    for kernel in (1, 3, 5, 7)
    for stride in (1, 2, 3)
    for padding in (0, 1, 2)
    if size + 2 * padding >= kernel
]


@pytest.mark.parametrize("size,kernel,stride,padding", CONV_CASES)
def test_conv_output_size_follows_the_formula_and_torch(size, kernel, stride, padding):
    formula = math.floor((size + 2 * padding - kernel) / stride) + 1
    real = F.conv2d(torch.zeros(1, 1, size, size), torch.zeros(1, 1, kernel, kernel), stride=stride, padding=padding)
    assert conv_output_size(size, kernel, stride, padding) == formula == real.shape[-1]


@pytest.mark.parametrize("size,stride", [(8, 1), (8, 2), (7, 2), (224, 3), (5, 4)])
def test_same_padding_gives_ceil_of_size_over_stride(size, stride):
    conv = Conv(1, ConvBlock(filters=1, kernel_size=3, stride=stride, padding="same"))
    real = conv(torch.zeros(1, 1, size, size))
    assert conv_output_size(size, 3, stride, "same") == math.ceil(size / stride) == real.shape[-1]


def test_valid_padding_is_zero_padding():
    assert conv_output_size(8, 3, 1, "valid") == 6
    assert conv_output_size(8, 3, 2, "valid") == 3


@pytest.mark.parametrize("size,window,stride,expected", [(8, 2, 2, 4), (7, 2, 2, 3), (8, 3, 1, 6), (4, 4, 4, 1)])
def test_pool_output_size(size, window, stride, expected):
    real = F.max_pool2d(torch.zeros(1, 1, size, size), window, stride)
    assert pool_output_size(size, window, stride) == expected == real.shape[-1]


def test_output_shapes_track_channels_and_sizes_through_the_blocks():
    spec = CNNSpec.model_validate(
        small_spec(
            blocks=[
                {"type": "conv", "filters": 8, "kernel_size": 3, "padding": "valid"},
                {"type": "pool", "kind": "avg", "window": 2},
                {"type": "dropout", "rate": 0.5},
                {"type": "conv", "filters": 16, "kernel_size": 3, "stride": 2, "padding": 1},
            ]
        )
    )
    assert output_shapes(spec, 28, 20) == [
        ("block0_conv", (8, 26, 18)),
        ("block1_pool", (8, 13, 9)),
        ("block2_dropout", (8, 13, 9)),
        ("block3_conv", (16, 7, 5)),
    ]


def test_output_shapes_refuse_a_spec_that_shrinks_the_map_to_nothing():
    spec = CNNSpec.model_validate(small_spec(blocks=[{"type": "conv", "filters": 2}] + [{"type": "pool"}] * 4))
    with pytest.raises(ValueError, match=r"blocks\[4\] \(pool\) shrinks the feature map to 0x0 \(from 1x1\)"):
        output_shapes(spec, 8, 8)
    # A kernel wider than the map: the size is not shown as negative, and the block's input is given.
    spec = CNNSpec.model_validate(
        small_spec(blocks=[{"type": "conv", "filters": 2, "kernel_size": 15, "padding": "valid"}])
    )
    with pytest.raises(ValueError, match=r"blocks\[0\] \(conv\) shrinks the feature map to 0x0 \(from 8x8\)"):
        output_shapes(spec, 8, 8)


def test_spec_round_trips_through_json():
    spec = CNNSpec.model_validate(small_spec(output="sigmoid"))
    assert CNNSpec.model_validate_json(spec.model_dump_json()) == spec


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"blocks": [{"type": "conv", "filters": 0}]}, "blocks.0.conv.filters"),
        ({"blocks": [{"type": "conv", "filters": 4, "padding": "full"}]}, "blocks.0.conv.padding"),
        ({"blocks": [{"type": "pool", "kind": "median"}]}, "blocks.0.pool.kind"),
        ({"blocks": [{"type": "pool"}]}, "at least one 'conv' block"),
        ({"blocks": [{"type": "dropout", "rate": 1.0}]}, "blocks.0.dropout.rate"),
        ({"blocks": [{"type": "conv", "filters": 4, "kernal_size": 3}]}, "kernal_size"),
        ({"head": {"type": "dense"}}, "head"),
        ({"output": "relu"}, "output"),
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 1}, "a softmax over 1 class is always 1.0: use output 'sigmoid'"),
    ],
)
def test_invalid_specs_are_rejected_naming_the_field(overrides, message):
    with pytest.raises(ValidationError, match=message):
        CNNSpec.model_validate(small_spec(**overrides))


@pytest.mark.parametrize(
    "field,value",
    [("filters", True), ("filters", "8"), ("kernel_size", True), ("stride", "2"), ("padding", True),
     ("batch_norm", "yes"), ("batch_norm", 1)],
)  # fmt: skip
def test_counts_and_switches_of_another_json_type_are_refused_not_coerced(field, value):
    """Found in review: "filters": true trained and published a one-filter model."""
    block = {"type": "conv", "filters": 4, field: value}
    with pytest.raises(ValidationError, match=f"blocks.0.conv.{field}"):
        CNNSpec.model_validate_json(json.dumps(small_spec(blocks=[block])))


def test_leaky_relu_slope_defaults_to_0_01():
    spec = CNNSpec.model_validate(
        small_spec(blocks=[{"type": "conv", "filters": 2, "activation": {"kind": "leaky_relu"}}])
    )
    assert spec.blocks[0].activation.negative_slope == 0.01
