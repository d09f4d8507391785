"""Augmentations on uint8 batches: random shift (a crop of the padded image) and random flip."""

import torch

from convray.workers.transforms import random_flip, random_shift


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
