"""Arrays to PNGs: grid layout and size, per-channel normalisation, heatmaps over the input, kernel responses."""

import io

import numpy as np
import pytest
from PIL import Image

from convray.service.render import (
    GAP_VALUE,
    cam_overlay,
    feature_grid,
    grid_layout,
    heat_colours,
    normalise_each,
    response_image,
)


def decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image


@pytest.mark.parametrize(
    "channels,rows,columns", [(1, 1, 1), (2, 1, 2), (3, 2, 2), (10, 3, 4), (32, 6, 6), (64, 8, 8), (65, 8, 9)]
)
def test_grid_layout_is_near_square(channels, rows, columns):
    assert grid_layout(channels) == (rows, columns)


@pytest.mark.parametrize(
    "shape,size",
    [
        ((32, 8, 8), (6 * 32 + 5, 6 * 32 + 5)),  # 8x8 maps enlarged 4x to 32 px tiles, 1 px between
        ((64, 2, 2), (8 * 32 + 7, 8 * 32 + 7)),  # 2x2 enlarged 16x
        ((3, 40, 20), (2 * 40 + 1, 2 * 20 + 1)),  # already large enough: 1x; 2 rows, 2 columns
        ((5, 4, 6), (2 * 24 + 1, 3 * 36 + 2)),  # longer side 6 -> 6x, tiles 24x36; 2 rows, 3 columns
    ],
)
def test_feature_grid_png_decodes_with_the_expected_size(shape, size):
    grid = feature_grid(np.random.default_rng(0).normal(size=shape).astype(np.float32))
    image = decode(grid.png)
    assert image.mode == "L"
    assert (image.height, image.width) == size
    assert grid.rows * grid.tile_px[0] + grid.rows - 1 == image.height


def test_each_tile_is_normalised_on_its_own():
    maps = np.zeros((2, 2, 2), np.float32)
    maps[0] = [[0, 1], [2, 3]]
    maps[1] = [[-500, 0], [0, 500]]  # a thousand times the range of channel 0
    pixels = np.asarray(decode(feature_grid(maps).png))  # 16x enlargement: tiles of 32 px
    first, second = pixels[:32, :32], pixels[:32, 33:]
    assert (first.min(), first.max()) == (0, 255) and (second.min(), second.max()) == (0, 255)
    assert first[0, 16] == 85 and first[16, 0] == 170  # 1/3 and 2/3 of the range
    assert (pixels[:, 32] == GAP_VALUE).all()


def test_a_constant_map_is_black_not_an_error():
    assert np.all(normalise_each(np.full((1, 3, 3), 7.0)) == 0)


def test_cam_overlay_is_an_rgb_picture_of_the_enlarged_input_hottest_where_the_map_peaks():
    image = np.zeros((1, 8, 8), np.uint8)
    cam = np.zeros((2, 2), np.float32)
    cam[1, 0] = 5.0  # bottom left
    picture = decode(cam_overlay(image, cam))
    assert picture.mode == "RGB" and picture.size == (128, 128)
    rgb = np.asarray(picture).astype(int)
    redness = rgb[..., 0] - rgb[..., 2]
    assert (
        redness[120, 4] > 50 and redness[4, 120] < -50
    )  # (dark) red bottom left, blue top right, half-blended with black


def test_cam_overlay_keeps_colour_images_and_their_size():
    picture = decode(cam_overlay(np.full((3, 200, 150), 255, np.uint8), np.ones((7, 5), np.float32)))
    assert picture.mode == "RGB" and picture.size == (150, 200)


def test_heat_colours_run_from_blue_to_red():
    assert heat_colours(np.array([0.0, 0.5, 1.0])).tolist() == [[0, 0, 143], [128, 255, 128], [128, 0, 0]]


def test_edge_responses_are_shown_as_magnitude_and_blurs_are_clipped():
    response = np.array([[[-100.0, 0.0, 60.0]]])
    assert response_image(response, signed=True).tolist() == [[255, 0, 153]]
    assert response_image(np.array([[[-3.0, 100.4, 300.0]]]), signed=False).tolist() == [[0, 100, 255]]
    assert response_image(np.zeros((3, 1, 2)), signed=False).shape == (1, 2, 3)
