"""Training data: scikit-learn's bundled handwritten digits, as uint8 images with a fixed split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageDataset:
    """Images as uint8 (N, C, H, W), integer labels (N,), and the label names."""

    images: np.ndarray
    labels: np.ndarray
    label_names: list[str]


def digits_pixels(values: np.ndarray) -> np.ndarray:
    """scikit-learn digits' 0..16 grey levels as 0..255 uint8 pixels (ink is bright)."""
    return np.rint(values * (255.0 / 16.0)).astype(np.uint8)


def load_digits_split(held_out_fraction: float = 0.2, split_seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """The 1,797 8x8 digits, split stratified into (train, held_out) the same way on every call.

    The data ships inside scikit-learn, so nothing is downloaded.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits_pixels(digits.images)[:, None, :, :]  # (N, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=held_out_fraction, stratify=labels, random_state=split_seed
    )
    names = [str(d) for d in range(10)]
    return ImageDataset(train_x, train_y, names), ImageDataset(test_x, test_y, names)
