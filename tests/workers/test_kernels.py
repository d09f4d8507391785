"""Classic fixed kernels through the project's conv block: edges, flat regions, brightness, shapes."""

import numpy as np
import pytest
import torch

from convray.workers.kernels import KERNELS, apply_kernel, kernel_conv
from convray.workers.models import Conv
from convray.workers.spec import conv_output_size


def vertical_edge(height=8, width=10, column=5):
    """Dark (10) left of ``column``, bright (200) from it on: one vertical edge."""
    image = np.full((1, height, width), 10, np.uint8)
    image[:, :, column:] = 200
    return image


def test_kernels_are_the_projects_conv_block_with_no_activation():
    conv = kernel_conv("sobel-x", channels=3)
    assert isinstance(conv, Conv)
    assert isinstance(conv[-1], torch.nn.Identity)  # activation "none"
    layer = conv[1]  # SamePad, then the Conv2d
    assert layer.weight[0, 0].tolist() == KERNELS["sobel-x"] and layer.weight[0, 1].abs().sum() == 0


def test_sobel_x_responds_strongly_on_a_vertical_edge_and_not_at_all_on_flat_regions():
    response = apply_kernel(vertical_edge(), "sobel-x", padding="valid")[0]  # (6, 8); input column j+1 is the centre
    edge_columns = {3, 4}  # centred on input columns 4 and 5, either side of the step
    for j in range(response.shape[1]):
        if j in edge_columns:
            assert np.all(response[:, j] == 4 * 190)  # (1 + 2 + 1) x the step
        else:
            assert np.all(response[:, j] == 0)


def test_sobel_y_does_not_see_a_vertical_edge():
    assert np.all(apply_kernel(vertical_edge(), "sobel-y", padding="valid") == 0)


def test_laplacian_is_zero_on_a_flat_image():
    assert np.all(apply_kernel(np.full((1, 6, 6), 77, np.uint8), "laplacian", padding="valid") == 0)


@pytest.mark.parametrize("name", ["box-blur", "gaussian", "sharpen"])
def test_smoothing_and_sharpening_keep_a_flat_image_as_it_is(name):
    out = apply_kernel(np.full((3, 5, 7), 120, np.uint8), name, padding="valid")
    assert out.shape == (3, 3, 5) and np.allclose(out, 120, atol=1e-4)


@pytest.mark.parametrize("name", ["box-blur", "gaussian"])
def test_blur_preserves_the_mean_brightness(name):
    """With 'full' padding (kernel - 1 on each side) every pixel's weight lands in the output, so the sum is kept."""
    image = np.random.default_rng(0).integers(0, 256, (2, 9, 11)).astype(np.uint8)
    out = apply_kernel(image, name, padding=2)
    assert out.shape == (2, 11, 13)
    assert np.allclose(out.sum(axis=(1, 2)), image.sum(axis=(1, 2)).astype(np.float64), rtol=1e-6)
    same = apply_kernel(image, name, padding="same")
    interior = same[:, 1:-1, 1:-1]  # away from the zero padding, the blurred mean stays within 2% of the input's
    assert abs(interior.mean() - image[:, 1:-1, 1:-1].mean()) / image.mean() < 0.02


def test_each_channel_is_filtered_on_its_own():
    image = np.stack([vertical_edge()[0], np.full((8, 10), 50, np.uint8)])
    response = apply_kernel(image, "sobel-x", padding="valid")
    assert np.abs(response[0]).max() > 0 and np.all(response[1] == 0)


@pytest.mark.parametrize("padding,stride", [("same", 1), ("same", 2), ("valid", 1), ("valid", 2), (1, 3), (0, 1)])
def test_output_size_follows_the_conv_rule(padding, stride):
    out = apply_kernel(np.zeros((1, 9, 12), np.uint8), "gaussian", padding=padding, stride=stride)
    assert out.shape == (1, conv_output_size(9, 3, stride, padding), conv_output_size(12, 3, stride, padding))


def test_unknown_kernel_and_too_small_images_are_refused():
    with pytest.raises(ValueError, match=r"unknown kernel 'emboss'; known kernels: \['box-blur'"):
        apply_kernel(np.zeros((1, 5, 5), np.uint8), "emboss")
    with pytest.raises(ValueError, match="does not fit an image of shape"):
        apply_kernel(np.zeros((1, 2, 2), np.uint8), "sobel-x", padding="valid")
