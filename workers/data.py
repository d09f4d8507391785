"""Training datasets as uint8 images with a held-out split: digits, an image folder, or a ``.npz``.

``load_dataset`` takes the ``--dataset`` value:

- ``digits``: scikit-learn's bundled 8x8 digits, the same stratified split per fraction (80/20 by default);
- ``folder:PATH``: ``PATH/<class>/*.png|jpg`` (the ImageFolder convention), read with Ray Data so the
  same call reads local disk or object storage (``folder:s3://...``); class names are the sorted folders;
- ``npz:PATH``: arrays ``images`` (N, H, W), (N, H, W, C) or (N, C, H, W) uint8, ``labels`` (N,), and
  optionally ``label_names``.

Everything here fits in memory: the loop indexes one tensor per epoch instead of streaming batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = ["png", "jpg", "jpeg"]


@dataclass(frozen=True)
class ImageDataset:
    """Images as uint8 (N, C, H, W), integer labels (N,), and the label names."""

    images: np.ndarray
    labels: np.ndarray
    label_names: list[str]

    @property
    def colour_mode(self) -> str:
        """``L`` for one channel, ``RGB`` for three (the serving side converts images to this)."""
        return "L" if self.images.shape[1] == 1 else "RGB"


def digits_pixels(values: np.ndarray) -> np.ndarray:
    """scikit-learn digits' 0..16 grey levels as 0..255 uint8 pixels (ink is bright)."""
    return np.rint(values * (255.0 / 16.0)).astype(np.uint8)


def split(data: ImageDataset, held_out_fraction: float, split_seed: int) -> tuple[ImageDataset, ImageDataset]:
    """A stratified (train, held_out) split, the same for the same seed."""
    from sklearn.model_selection import train_test_split

    train_x, test_x, train_y, test_y = train_test_split(
        data.images, data.labels, test_size=held_out_fraction, stratify=data.labels, random_state=split_seed
    )
    return ImageDataset(train_x, train_y, data.label_names), ImageDataset(test_x, test_y, data.label_names)


def load_digits_split(held_out_fraction: float = 0.2, split_seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """The 1,797 8x8 digits, split stratified into (train, held_out) the same way on every call.

    The data ships inside scikit-learn, so nothing is downloaded.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits_pixels(digits.images)[:, None, :, :]  # (N, 1, 8, 8)
    names = [str(d) for d in range(10)]
    return split(ImageDataset(images, digits.target.astype(np.int64), names), held_out_fraction, split_seed)


def as_nchw(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3}, as (N, C, H, W).

    Raises:
        ValueError: not uint8, or a shape none of these fit.
    """
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0..255), got {images.dtype}")
    if images.ndim == 3:
        return images[:, None, :, :]
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    if images.ndim == 4 and images.shape[1] in (1, 3):
        return images
    raise ValueError(f"images must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C 1 or 3; got {images.shape}")


def labelled(labels: np.ndarray, names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Labels as integers 0..K-1 and their names: string labels are numbered in sorted order."""
    if labels.dtype.kind in "iu":
        count = int(labels.max()) + 1
        names = names or [str(i) for i in range(count)]
        if labels.min() < 0 or len(names) < count:
            raise ValueError(f"labels must be in 0..{len(names) - 1}, got {labels.min()}..{labels.max()}")
        return labels.astype(np.int64), names
    names = sorted({str(v) for v in labels})
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[str(v)] for v in labels], dtype=np.int64), names


def load_npz(path: str) -> ImageDataset:
    """A ``.npz`` with ``images`` and ``labels`` (and optionally ``label_names``)."""
    try:
        opened = np.load(path, allow_pickle=False)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:  # neither .npz nor .npy (numpy would need pickles to read it as anything else)
        raise ValueError(f"{path}: not a .npz archive: {exc}") from None
    if not isinstance(opened, np.lib.npyio.NpzFile):  # a .npy holds one array, not named images and labels
        raise ValueError(f"{path}: a single array (.npy); save images and labels with numpy.savez")
    with opened as arrays:
        missing = {"images", "labels"} - set(arrays.files)
        if missing:
            raise ValueError(f"{path}: missing array(s) {sorted(missing)}; it has {arrays.files}")
        names = [str(n) for n in arrays["label_names"]] if "label_names" in arrays.files else None
        images, labels = as_nchw(arrays["images"]), arrays["labels"]
    if labels.ndim != 1:
        raise ValueError(f"{path}: labels must be one class per image (shape (N,)), got shape {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError(f"{path}: no images")
    numbers, names = labelled(labels, names)
    return ImageDataset(images, numbers, names)


def check_folder(root: str) -> None:
    """Raise ValueError if ``root`` is a local path and not a folder (a URI is Ray Data's to check)."""
    if "://" not in root and not Path(root).is_dir():
        raise ValueError(f"{root}: no such folder (expected {root}/<class>/<image>)")


def load_folder(root: str, colour_mode: str = "RGB", image_size: int | None = None) -> ImageDataset:
    """``root/<class>/<image>`` read with Ray Data (``read_images``), each image's class its parent folder.

    Args:
        root: a local directory or any path Ray Data reads (``s3://``, ``gs://``...).
        colour_mode: ``L`` or ``RGB``, what every image is converted to.
        image_size: resize every image to this square size; None keeps sizes, which must then agree.
    """
    import ray.data

    size = (image_size, image_size) if image_size else None
    check_folder(root)
    ds = ray.data.read_images(root, mode=colour_mode, size=size, include_paths=True, file_extensions=IMAGE_EXTENSIONS)
    # Sorted by path: Ray Data yields rows in whatever order its read tasks finish, and the held-out split,
    # the normalisation statistics and so the weights must be the same for the same seed.
    rows = sorted(ds.iter_rows(), key=lambda row: row["path"])
    images = [np.asarray(row["image"], dtype=np.uint8) for row in rows]
    classes = [Path(row["path"]).parent.name for row in rows]
    if not images:
        raise ValueError(f"{root}: no {'/'.join(IMAGE_EXTENSIONS)} images under <class>/ folders")
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise ValueError(f"{root}: images differ in size {sorted(shapes)[:3]}...; pass an image size to resize them")
    labels, names = labelled(np.array(classes))
    if len(names) < 2:
        raise ValueError(f"{root}: found one class folder ({names}); a classifier needs at least two")
    return ImageDataset(as_nchw(np.stack(images)), labels, names)


def load_dataset(
    source: str,
    held_out_fraction: float = 0.2,
    split_seed: int = 0,
    image_size: int | None = None,
    colour_mode: str = "RGB",
) -> tuple[ImageDataset, ImageDataset]:
    """(train, held_out) for a ``--dataset`` value: ``digits``, ``folder:PATH`` or ``npz:PATH``.

    ``image_size`` and ``colour_mode`` apply to folders (``digits`` and ``.npz`` arrays keep theirs).

    Raises:
        ValueError: an unknown kind, or data that cannot be read (the message says which and why).
    """
    check_source(source)
    kind, _, path = source.partition(":")
    if kind == "digits":
        return load_digits_split(held_out_fraction, split_seed)
    if kind == "npz":
        return split(load_npz(path), held_out_fraction, split_seed)
    return split(load_folder(path, colour_mode, image_size), held_out_fraction, split_seed)


def check_source(source: str) -> None:
    """Refuse a ``--dataset`` value of no known kind, before anything is read (or torch imported).

    Raises:
        ValueError: not ``digits``, ``folder:PATH`` or ``npz:PATH``.
    """
    kind, _, path = source.partition(":")
    if not ((kind == "digits" and not path) or (kind in ("npz", "folder") and path)):
        raise ValueError(f"unknown dataset {source!r}; use 'digits', 'folder:PATH' or 'npz:PATH'")
