"""Feature maps, CAM and Grad-CAM on small CNNs with set weights, checked against hand computations."""

import numpy as np
import pytest
import torch

from convray.workers.explain import block_names, cam_applies, choose_method, explain
from convray.workers.models import build_model
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


def small_spec(head, in_channels=1, num_classes=3):
    return CNNSpec(
        in_channels=in_channels,
        blocks=[
            ConvBlock(filters=4, kernel_size=3, padding="same"),
            PoolBlock(kind="max", window=2),
            ConvBlock(filters=6, kernel_size=3, stride=2, padding="valid", batch_norm=True),
            DropoutBlock(rate=0.2),
        ],
        head=head,
        num_classes=num_classes,
    )


def seeded_model(spec, height=12, width=10):
    torch.manual_seed(0)
    model = build_model(spec, height, width).eval()
    with torch.no_grad():  # batch norm with non-trivial statistics, so eval mode matters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("head", [GAPHead(), GAPFCHead(), GAPFCHead(hidden=[5]), FCHead(hidden=[7])])
def test_feature_maps_have_the_shapes_output_shapes_predicts(head):
    spec = small_spec(head)
    model = seeded_model(spec)
    names = block_names(model)
    result = explain(model, torch.randn(1, 1, 12, 10), names, top_k=2)
    expected = output_shapes(spec, 12, 10)
    assert (
        result.blocks
        == [name for name, _ in expected]
        == ["block0_conv", "block1_pool", "block2_conv", "block3_dropout"]
    )
    assert result.shapes == [shape for _, shape in expected]
    assert [m.shape for m in result.feature_maps] == [shape for _, shape in expected]
    assert all(m.dtype == np.float32 for m in result.feature_maps)


def test_blocks_come_back_in_network_order_and_channels_are_capped():
    model = seeded_model(small_spec(GAPHead()))
    result = explain(model, torch.randn(1, 1, 12, 10), ["block2_conv", "block0_conv"], top_k=1, max_channels=3)
    assert result.blocks == ["block0_conv", "block2_conv"]
    assert result.shapes == [(4, 12, 10), (6, 2, 2)]  # full shapes, though only 3 channels are returned
    assert [m.shape for m in result.feature_maps] == [(3, 12, 10), (3, 2, 2)]


def test_feature_maps_are_the_blocks_outputs():
    model = seeded_model(small_spec(GAPHead()))
    x = torch.randn(1, 1, 12, 10)
    result = explain(model, x, ["block0_conv"], top_k=1)
    with torch.no_grad():
        assert np.allclose(result.feature_maps[0], model.features[0](x)[0].numpy())


def test_probabilities_and_top_classes_match_the_models_output():
    model = seeded_model(small_spec(GAPFCHead(), num_classes=5))
    x = torch.randn(1, 1, 12, 10)
    result = explain(model, x, [], top_k=3)
    with torch.no_grad():
        expected = model.probabilities(x)[0].numpy()
    assert np.allclose(result.probabilities, expected, atol=1e-6)
    assert result.classes.tolist() == np.argsort(-expected, kind="stable")[:3].tolist()
    assert result.feature_maps == [] and result.cams.shape == (3, 2, 2)


def last_maps(model, x):
    with torch.no_grad():
        return model.features(x)[0]  # (C, h, w)


def test_cam_on_a_gap_model_is_the_class_weights_times_the_last_feature_maps():
    model = seeded_model(small_spec(GAPHead()))
    with torch.no_grad():  # set weights: class k's 1x1 conv weights are distinct, known numbers
        model.head[0].weight.copy_(
            torch.tensor([[1.0, -2, 0, 3, 0.5, -1], [0, 1, 1, 0, -1, 2], [2, 0, -1, 1, 0, 0]])[..., None, None]
        )
    x = torch.randn(1, 1, 12, 10)
    result = explain(model, x, [], top_k=3, method="cam")
    assert result.method == "cam" and result.cam_block == "block3_dropout"
    maps = last_maps(model, x).numpy()  # (6, 2, 2)
    weights = model.head[0].weight[:, :, 0, 0].detach().numpy()
    for k, cam in zip(result.classes, result.cams, strict=True):
        by_hand = sum(weights[k, c] * maps[c] for c in range(6))
        assert np.allclose(cam, by_hand, atol=1e-5)
    # CAM's mean plus the bias is the class logit: the map really decomposes the score.
    with torch.no_grad():
        logits = model(x)[0].numpy()
    bias = model.head[0].bias.detach().numpy()
    assert np.allclose(result.cams.mean(axis=(1, 2)) + bias[result.classes], logits[result.classes], atol=1e-5)


def test_cam_on_a_gap_fc_model_uses_the_dense_weights():
    model = seeded_model(small_spec(GAPFCHead()))
    x = torch.randn(1, 1, 12, 10)
    result = explain(model, x, [], top_k=2)
    assert result.method == "cam"
    weights = model.head[1].weight.detach().numpy()  # (classes, C)
    by_hand = np.einsum("kc,chw->khw", weights[result.classes], last_maps(model, x).numpy())
    assert np.allclose(result.cams, by_hand, atol=1e-5)


def test_grad_cam_on_a_gap_model_is_the_positive_part_of_cam_over_the_map_area():
    """For a linear GAP head the class score's gradient is w_kc / (h*w) everywhere, so Grad-CAM = ReLU(CAM) / (h*w)."""
    model = seeded_model(small_spec(GAPHead()))
    x = torch.randn(1, 1, 12, 10)
    cam = explain(model, x, [], top_k=3, method="cam")
    grad = explain(model, x, [], top_k=3, method="grad_cam")
    assert grad.method == "grad_cam" and grad.classes.tolist() == cam.classes.tolist()
    assert np.allclose(grad.cams, np.maximum(cam.cams, 0) / 4, atol=1e-6)  # last maps are 2x2


def test_grad_cam_on_an_fc_model_finds_each_class_where_its_evidence_is():
    """Channel 0 sees bright pixels, channel 1 dark ones; class 0 sums channel 0, class 1 channel 1.

    A bright blob top left and a dark blob bottom right: Grad-CAM puts class 0 top left, class 1 bottom right.
    """
    spec = CNNSpec(
        in_channels=1,
        blocks=[ConvBlock(filters=2, kernel_size=1, padding="valid", activation=Activation(kind="relu"))],
        head=FCHead(),
        num_classes=2,
    )
    model = build_model(spec, 8, 8).eval()
    with torch.no_grad():
        conv = model.features[0][0]
        conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        conv.bias.zero_()
        dense = model.head[1]  # Flatten, Linear(2 * 8 * 8, 2); flattening is channel-major
        dense.weight.zero_()
        dense.weight[0, :64] = 1.0
        dense.weight[1, 64:] = 1.0
        dense.bias.zero_()
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 1:3, 1:3] = 2.0  # bright, top left
    x[0, 0, 5:7, 5:7] = -1.0  # dark, bottom right (weaker, so class 0 ranks first)
    result = explain(model, x, [], top_k=2)
    assert result.method == "grad_cam" and result.classes.tolist() == [0, 1]
    top_left = np.zeros((8, 8), bool)
    top_left[1:3, 1:3] = True
    bottom_right = np.zeros((8, 8), bool)
    bottom_right[5:7, 5:7] = True
    assert (result.cams[0] > 0).tolist() == top_left.tolist()
    assert (result.cams[1] > 0).tolist() == bottom_right.tolist()


def test_method_choice_follows_the_head():
    assert cam_applies(small_spec(GAPHead())) and cam_applies(small_spec(GAPFCHead()))
    assert not cam_applies(small_spec(GAPFCHead(hidden=[5]))) and not cam_applies(small_spec(FCHead()))
    assert choose_method(small_spec(GAPFCHead()), "auto") == "cam"
    assert choose_method(small_spec(GAPFCHead(hidden=[5])), "auto") == "grad_cam"
    assert choose_method(small_spec(FCHead()), "auto") == "grad_cam"
    assert choose_method(small_spec(GAPHead()), "grad_cam") == "grad_cam"
    with pytest.raises(ValueError, match="CAM needs a 'gap' head .* head is 'gap_fc' with hidden layers"):
        choose_method(small_spec(GAPFCHead(hidden=[5])), "cam")
    with pytest.raises(ValueError, match="head is 'fc'; ask for Grad-CAM"):
        choose_method(small_spec(FCHead()), "cam")


def test_grad_cam_runs_for_gap_fc_with_hidden_layers():
    model = seeded_model(small_spec(GAPFCHead(hidden=[5])))
    result = explain(model, torch.randn(1, 1, 12, 10), [], top_k=3)
    assert result.method == "grad_cam" and result.cams.shape == (3, 2, 2) and (result.cams >= 0).all()


def test_bad_requests_are_refused_with_the_reason():
    model = seeded_model(small_spec(GAPHead()))
    x = torch.randn(1, 1, 12, 10)
    with pytest.raises(
        ValueError, match=r"unknown block\(s\) \['block9_conv'\]; this model's blocks are \['block0_conv'"
    ):
        explain(model, x, ["block9_conv"], top_k=1)
    with pytest.raises(ValueError, match="top_k must be between 1 and the model's 3 classes, got 4"):
        explain(model, x, [], top_k=4)
    with pytest.raises(ValueError, match="one image"):
        explain(model, torch.randn(2, 1, 12, 10), [], top_k=1)
