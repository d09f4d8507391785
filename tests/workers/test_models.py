"""Each CNN block's arithmetic on hand-made tensors, and the assembled model's shapes and outputs."""

import pytest
import torch

from convray.workers.models import (
    CNN,
    Conv,
    GlobalAvgPool,
    MinPool2d,
    SamePad,
    SumPool2d,
    build_model,
    fold_batch_norm,
    fold_same_padding,
    make_activation,
    make_head,
    make_pool,
    parameter_count,
)
from convray.workers.spec import (
    Activation,
    CNNSpec,
    ConvBlock,
    FCHead,
    GAPFCHead,
    GAPHead,
    PoolBlock,
    output_shapes,
)

# A known 4x4 map, shape (1, 1, 4, 4).
MAP = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [-1.0, -2.0, 0.0, 9.0], [3.0, -4.0, 2.0, 1.0]]).view(
    1, 1, 4, 4
)


def pool(kind, window=2, stride=None):
    return make_pool(PoolBlock(kind=kind, window=window, stride=stride))


def test_max_pooling_takes_each_windows_maximum():
    assert pool("max")(MAP).view(2, 2).tolist() == [[6.0, 8.0], [3.0, 9.0]]


def test_min_pooling_takes_each_windows_minimum():
    assert isinstance(pool("min"), MinPool2d)
    assert pool("min")(MAP).view(2, 2).tolist() == [[1.0, 3.0], [-4.0, 0.0]]


def test_average_pooling_takes_each_windows_mean():
    assert pool("avg")(MAP).view(2, 2).tolist() == [[3.5, 5.5], [-1.0, 3.0]]


def test_sum_pooling_takes_each_windows_sum():
    assert isinstance(pool("sum"), SumPool2d)
    assert pool("sum")(MAP).view(2, 2).tolist() == [[14.0, 22.0], [-4.0, 12.0]]


def test_overlapping_pool_with_stride_1():
    assert pool("max", window=3, stride=1)(MAP).view(2, 2).tolist() == [[7.0, 9.0], [7.0, 9.0]]


def test_pool_none_passes_through():
    assert torch.equal(pool("none")(MAP), MAP)


def test_global_average_pooling_averages_each_map():
    maps = torch.stack([MAP[0, 0], torch.ones(4, 4) * 2]).unsqueeze(0)  # (1, 2, 4, 4)
    assert GlobalAvgPool()(maps).tolist() == [[pytest.approx(MAP.mean().item()), 2.0]]


def test_relu_and_leaky_relu():
    x = torch.tensor([-2.0, -0.5, 0.0, 3.0])
    assert make_activation(Activation(kind="relu"))(x).tolist() == [0.0, 0.0, 0.0, 3.0]
    assert make_activation(Activation(kind="leaky_relu"))(x).tolist() == pytest.approx([-0.02, -0.005, 0.0, 3.0])
    assert make_activation(Activation(kind="leaky_relu", negative_slope=0.2))(x).tolist() == pytest.approx(
        [-0.4, -0.1, 0.0, 3.0]
    )


def conv_with_weights(kernel: torch.Tensor, **block) -> Conv:
    conv = Conv(1, ConvBlock(filters=1, kernel_size=kernel.shape[-1], activation=Activation(kind="none"), **block))
    layer = next(m for m in conv if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        layer.weight.copy_(kernel.view(1, 1, *kernel.shape))
        layer.bias.zero_()
    return conv


def test_convolution_is_a_sliding_dot_product():
    kernel = torch.tensor([[1.0, 0.0], [0.0, -1.0]])  # x[i, j] - x[i+1, j+1]
    out = conv_with_weights(kernel, padding="valid")(MAP).view(3, 3)
    expected = MAP[0, 0, :3, :3] - MAP[0, 0, 1:, 1:]
    assert torch.equal(out, expected)


def test_same_padding_keeps_the_size_and_pads_with_zeros():
    out = conv_with_weights(torch.ones(3, 3), padding="same")(MAP).view(4, 4)
    # The corner sees only its 2x2 neighbourhood; an inner pixel sees its full 3x3.
    assert out[0, 0].item() == 1 + 2 + 5 + 6
    assert out[1, 1].item() == MAP[0, 0, :3, :3].sum().item()


def test_same_padding_with_stride_2_gives_ceil_output_with_extra_pad_after():
    pad = SamePad(kernel_size=3, stride=2)
    assert pad._pads(5) == (1, 1)
    assert pad._pads(4) == (0, 1)
    out = conv_with_weights(torch.ones(3, 3), padding="same", stride=2)(MAP)
    assert out.shape[-2:] == (2, 2)
    assert out.view(2, 2)[0, 0].item() == MAP[0, 0, :3, :3].sum().item()


def test_integer_padding_and_stride():
    out = conv_with_weights(torch.ones(1, 1), padding=1, stride=2)(MAP).view(3, 3)
    # Padded to 6x6 and sampled at rows/cols 0, 2, 4: the zero border, then original rows/cols 1 and 3.
    assert out.tolist() == [[0.0, 0.0, 0.0], [0.0, 6.0, 8.0], [0.0, -4.0, 1.0]]


def test_batch_norm_in_eval_mode_applies_running_statistics():
    conv = Conv(
        1,
        ConvBlock(filters=1, kernel_size=1, padding="valid", batch_norm=True, activation=Activation(kind="none")),
    )
    layer, norm = conv[0], conv[1]
    assert layer.bias is None  # batch norm's shift makes a conv bias redundant
    with torch.no_grad():
        layer.weight.fill_(1.0)
        norm.running_mean.fill_(2.0)
        norm.running_var.fill_(4.0 - norm.eps)
    conv.eval()
    assert torch.allclose(conv(MAP), (MAP - 2.0) / 2.0)


def test_folding_batch_norm_into_the_conv_keeps_every_block_output_and_drops_the_norm_layers():
    spec = CNNSpec.model_validate(
        {
            "in_channels": 1,
            "blocks": [
                {"type": "conv", "filters": 8, "kernel_size": 3, "padding": "same", "batch_norm": True},
                {"type": "pool", "kind": "max", "window": 2},
                {"type": "conv", "filters": 6, "kernel_size": 3, "stride": 2, "batch_norm": True},
                {"type": "conv", "filters": 4, "kernel_size": 1, "batch_norm": False},
            ],
            "head": {"type": "gap_fc", "hidden": []},
            "num_classes": 3,
        }
    )
    torch.manual_seed(0)
    model = build_model(spec, 12, 12)
    with torch.no_grad():  # running statistics far from (0, 1), so an unfolded norm would show
        for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            norm.running_mean.uniform_(-2, 2)
            norm.running_var.uniform_(0.5, 4)
            norm.weight.uniform_(0.5, 2)
            norm.bias.uniform_(-1, 1)
    model.eval()
    x = torch.randn(5, 1, 12, 12)
    with torch.no_grad():
        expected_blocks, y = [], x
        for block in model.features:
            y = block(y)
            expected_blocks.append(y)
        expected = model.probabilities(x)
        fold_batch_norm(model)
        y = x
        for block, want in zip(model.features, expected_blocks, strict=True):
            y = block(y)
            assert torch.allclose(y, want, atol=1e-5)
        assert torch.allclose(model.probabilities(x), expected, atol=1e-6)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_dropout_zeroes_a_fraction_while_training_and_is_identity_in_eval():
    spec = CNNSpec.model_validate(
        {
            "in_channels": 1,
            "blocks": [{"type": "conv", "filters": 1}, {"type": "dropout", "rate": 0.5}],
            "head": {"type": "gap"},
            "num_classes": 2,
        }
    )
    dropout = build_model(spec, 4, 4).features[1]
    x = torch.ones(1, 1, 100, 100)
    dropout.train()
    zero_fraction = (dropout(x) == 0).float().mean().item()
    assert 0.4 < zero_fraction < 0.6
    dropout.eval()
    assert torch.equal(dropout(x), x)


def test_fc_head_flattens_then_dense_layers():
    head = make_head(FCHead(hidden=[5]), (2, 3, 3), num_classes=4)
    assert [type(m).__name__ for m in head] == ["Flatten", "Linear", "ReLU", "Linear"]
    assert head[1].in_features == 2 * 3 * 3
    assert head(torch.randn(7, 2, 3, 3)).shape == (7, 4)


def test_gap_head_is_one_map_per_class_then_global_average():
    head = make_head(GAPHead(), (3, 4, 4), num_classes=2)
    conv = head[0]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[0, 0] = 1.0  # class 0 map = channel 0
        conv.weight[1, 2] = 2.0  # class 1 map = 2 x channel 2
    x = torch.randn(1, 3, 4, 4)
    expected = torch.stack([x[0, 0].mean(), 2 * x[0, 2].mean()]).unsqueeze(0)
    assert torch.allclose(head(x), expected, atol=1e-6)
    assert not any(isinstance(m, torch.nn.Linear) for m in head.modules())


def test_gap_fc_head_averages_then_dense():
    head = make_head(GAPFCHead(), (3, 4, 4), num_classes=2)
    linear = head[1]
    x = torch.randn(2, 3, 4, 4)
    assert torch.allclose(head(x), linear(x.mean(dim=(2, 3))))


def spec_with(head, output="softmax"):
    return CNNSpec.model_validate(
        {
            "in_channels": 3,
            "blocks": [
                {"type": "conv", "filters": 4, "kernel_size": 3, "stride": 2, "padding": "same"},
                {"type": "pool", "kind": "min", "window": 2},
                {
                    "type": "conv",
                    "filters": 6,
                    "kernel_size": 3,
                    "padding": "valid",
                    "activation": {"kind": "leaky_relu", "negative_slope": 0.1},
                },
            ],
            "head": head,
            "num_classes": 5,
            "output": output,
        }
    )


@pytest.mark.parametrize(
    "head",
    [{"type": "fc", "hidden": [8, 8], "dropout": 0.2}, {"type": "gap"}, {"type": "gap_fc", "hidden": [8]}],
)
def test_feature_shapes_match_the_spec_formula_for_every_head(head):
    spec = spec_with(head)
    model = build_model(spec, 32, 24)
    x = torch.randn(2, 3, 32, 24)
    shapes = []
    for block in model.features:
        x = block(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [shape for _, shape in output_shapes(spec, 32, 24)]
    assert model(torch.randn(2, 3, 32, 24)).shape == (2, 5)


def test_softmax_output_sums_to_one_and_sigmoid_output_is_independent():
    x = torch.randn(3, 3, 16, 16)
    softmax_model: CNN = build_model(spec_with({"type": "gap"}), 16, 16).eval()
    assert torch.allclose(softmax_model.probabilities(x).sum(dim=1), torch.ones(3), atol=1e-5)
    sigmoid_model = build_model(spec_with({"type": "gap"}, output="sigmoid"), 16, 16).eval()
    probs = sigmoid_model.probabilities(x)
    assert torch.allclose(probs, torch.sigmoid(sigmoid_model(x)))
    assert ((probs > 0) & (probs < 1)).all()


def test_folding_symmetric_same_padding_into_the_conv_keeps_every_block_output():
    spec = CNNSpec.model_validate(
        {
            "in_channels": 2,
            "blocks": [
                {"type": "conv", "filters": 4, "kernel_size": 3, "padding": "same"},  # folded: pads 1 all round
                {"type": "conv", "filters": 4, "kernel_size": 5, "padding": "same"},  # folded: pads 2
                {"type": "conv", "filters": 4, "kernel_size": 4, "padding": "same"},  # even kernel: 1 before, 2 after
                {"type": "conv", "filters": 4, "kernel_size": 3, "stride": 2, "padding": "same"},  # depends on size
            ],
            "head": {"type": "gap_fc", "hidden": []},
            "num_classes": 3,
        }
    )
    torch.manual_seed(0)
    model = build_model(spec, 9, 9).eval()
    x = torch.randn(3, 2, 9, 9)
    with torch.no_grad():
        expected_blocks, y = [], x
        for block in model.features:
            y = block(y)
            expected_blocks.append(y)
        fold_same_padding(model)
        y = x
        for block, want in zip(model.features, expected_blocks, strict=True):
            y = block(y)
            assert y.shape == want.shape
            assert torch.allclose(y, want, atol=1e-6)
    kept = [isinstance(block[0], SamePad) for block in model.features]
    assert kept == [False, False, True, True]


def test_parameters_are_counted_without_allocating_them_and_a_model_too_large_is_refused_before_it_is_built():
    """Found in review: two 4096-filter 31x31 convolutions, each field within its bounds, asked for 64 GB and
    ended `convray train` with an allocator traceback (and a model of a few GB would have been built)."""
    small = CNNSpec(in_channels=1, blocks=[ConvBlock(filters=4, kernel_size=3)], head=GAPHead(), num_classes=3)
    assert parameter_count(small, 8, 8) == sum(p.numel() for p in build_model(small, 8, 8).parameters())
    huge = CNNSpec(in_channels=1, blocks=[ConvBlock(filters=4096, kernel_size=31)] * 2, head=GAPHead(), num_classes=10)
    with pytest.raises(ValueError, match=r"the spec has 16,126,889,994 parameters at 8x8 \(64.5 GB"):
        build_model(huge, 8, 8)
