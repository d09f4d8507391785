"""The plots a trained version carries: PNGs of a size that does not grow past reason with the class count."""

import io

import numpy as np
from PIL import Image

from convray.workers.plots import MAX_GRID_PX, confusion_png, curve_png


def png_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def test_a_confusion_matrix_of_ten_classes_has_labelled_cells_darker_where_more_images_fell():
    confusion = np.diag(np.full(10, 30)).tolist()
    image = Image.open(io.BytesIO(confusion_png(confusion, [str(i) for i in range(10)]))).convert("RGB")
    assert image.size == (60 + 10 * 36 + 10,) * 2
    on_diagonal, off_diagonal = image.getpixel((60 + 2, 60 + 2)), image.getpixel((60 + 36 + 2, 60 + 2))
    assert on_diagonal[0] < off_diagonal[0]  # all of class 0 predicted 0: the darkest blue


def test_a_confusion_matrix_of_a_thousand_classes_stays_a_few_thousand_pixels_wide():
    """Found in review: at 36 px a cell, 1,000 classes made a 36,070-pixel square, about 3.9 GB to draw: the
    training job's 4 GiB head pod would have been killed after the whole run, at publish."""
    classes = 1000
    confusion = (np.eye(classes, dtype=np.int64) * 5).tolist()
    width, height = png_size(confusion_png(confusion, [f"c{i}" for i in range(classes)]))
    assert width == height and MAX_GRID_PX <= width <= MAX_GRID_PX + 100


def test_the_training_curve_is_a_png():
    history = [{"epoch": e, "loss": 1 / e, "accuracy": 1 - 1 / (e + 1), "val_accuracy": 0.9} for e in range(1, 6)]
    assert png_size(curve_png(history))[0] > 100
