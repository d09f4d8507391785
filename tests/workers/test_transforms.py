"""Augmentations on uint8 batches: random shift (a crop of the padded image) and random flip."""

import torch

from convray.workers.transforms import Normaliser, normalise, random_flip, random_shift


def test_random_shift_moves_content_by_at_most_the_limit_and_keeps_shape():
    image = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    image[0, 0, 4, 4] = 255
    generator = torch.Generator().manual_seed(0)
    shifted = random_shift(image.repeat(64, 1, 1, 1), 1, generator)
    assert shifted.shape == (64, 1, 8, 8)
    positions = {tuple(map(int, (s[0] == 255).nonzero()[0])) for s in shifted}
    assert positions <= {(r, c) for r in (3, 4, 5) for c in (3, 4, 5)}
    assert len(positions) > 3  # it really moves things


def test_random_shift_of_zero_is_identity():
    x = torch.randint(0, 255, (4, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)


def test_random_flip_mirrors_some_images_left_to_right_and_leaves_the_rest():
    x = torch.arange(64 * 3 * 2 * 4, dtype=torch.int64).reshape(64, 3, 2, 4).to(torch.uint8)
    flipped = random_flip(x, torch.Generator().manual_seed(0))
    mirrored = [bool(torch.equal(f, i.flip(-1))) for f, i in zip(flipped, x, strict=True)]
    unchanged = [bool(torch.equal(f, i)) for f, i in zip(flipped, x, strict=True)]
    assert all(m != u for m, u in zip(mirrored, unchanged, strict=True))  # each image is one or the other
    assert 16 < sum(mirrored) < 48


def test_normalise_maps_pixels_to_standard_scores_per_channel_and_leaves_its_input_alone():
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).repeat(1, 2, 1, 1)
    out = normalise(pixels, mean=[0.2, 0.5], std=[0.5, 0.25])
    assert out.dtype == torch.float32
    expected = torch.tensor([[[(v / 255 - m) / s for v in (0, 51, 255)]] for m, s in ((0.2, 0.5), (0.5, 0.25))])
    assert torch.allclose(out[0], expected)
    floats = pixels.to(torch.float32)
    normalise(floats, mean=[0.2, 0.5], std=[0.5, 0.25])
    assert torch.equal(floats, pixels.to(torch.float32))  # computed in a copy, never in place on the input


def test_a_normaliser_built_once_gives_the_same_numbers_as_normalise():
    pixels = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    normaliser = Normaliser(mean, std, torch.device("cpu"))
    assert torch.equal(normaliser(pixels), normalise(pixels, mean, std))
    assert torch.equal(normaliser(pixels), normaliser(pixels))  # its tensors are not consumed by a call
