"""Training datasets: the digits split, a .npz of arrays, and an image folder read with Ray Data."""

import numpy as np
import pytest
from PIL import Image

from convray.workers.data import as_nchw, labelled, load_dataset, load_digits_split
from convray.workers.repository import ModelRepository
from convray.workers.train import TrainConfig, train_and_publish


def bars(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """8x8 noisy images of a horizontal (label 0) or vertical (label 1) bright bar at a random place."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (count, 8, 8)).astype(np.uint8)
    labels = np.arange(count) % 2
    for image, label, at in zip(images, labels, rng.integers(1, 7, count), strict=True):
        if label == 0:
            image[at, 1:7] = 255
        else:
            image[1:7, at] = 255
    return images, labels


def test_the_digits_split_is_stratified_and_the_same_every_time():
    train, held_out = load_digits_split()
    again, _ = load_digits_split()
    assert np.array_equal(train.labels, again.labels)
    assert train.images.shape[1:] == (1, 8, 8) and len(held_out.labels) == 360
    assert np.bincount(held_out.labels).min() >= 35  # every class held out in proportion


def test_arrays_in_any_layout_become_nchw_and_string_labels_are_numbered_in_sorted_order():
    assert as_nchw(np.zeros((2, 5, 6), np.uint8)).shape == (2, 1, 5, 6)
    assert as_nchw(np.zeros((2, 5, 6, 3), np.uint8)).shape == (2, 3, 5, 6)
    assert as_nchw(np.zeros((2, 3, 5, 6), np.uint8)).shape == (2, 3, 5, 6)
    with pytest.raises(ValueError, match="must be uint8"):
        as_nchw(np.zeros((2, 5, 6), np.float32))
    numbers, names = labelled(np.array(["dog", "cat", "dog"]))
    assert names == ["cat", "dog"] and numbers.tolist() == [1, 0, 1]


def test_an_npz_dataset_is_split_with_its_label_names(tmp_path):
    images, labels = bars(100, seed=0)
    path = tmp_path / "bars.npz"
    np.savez(path, images=images, labels=labels, label_names=np.array(["row", "column"]))
    train, held_out = load_dataset(f"npz:{path}", held_out_fraction=0.25)
    assert (len(train.labels), len(held_out.labels)) == (75, 25)
    assert train.label_names == ["row", "column"] and train.colour_mode == "L"
    with pytest.raises(ValueError, match="missing array"):
        np.savez(tmp_path / "bad.npz", pictures=images)
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")


def save_npy(path, array) -> None:
    """One array in .npy format under ``path`` as given (``numpy.save`` would add .npy to the name)."""
    with open(path, "wb") as file:
        np.save(file, array)


@pytest.mark.parametrize(
    ("save", "message"),
    [
        (lambda path, images, labels: save_npy(path, images), r"a single array \(.npy\); save images and labels"),
        (lambda path, images, labels: np.savez(path, images=images, labels=labels[:, None]), r"shape \(N,\)"),
        (lambda path, images, labels: np.savez(path, images=images[:0], labels=labels[:0]), "no images"),
        (lambda path, images, labels: path.write_bytes(b"not numpy at all"), "not a .npz archive"),
    ],
)
def test_npz_files_that_are_not_one_class_per_image_are_refused_naming_the_file(save, message, tmp_path):
    """Found in review: these failed inside numpy or torch with their own words, one only once training had begun."""
    images, labels = bars(10, seed=0)
    path = tmp_path / "data.npz"
    save(path, images, labels)
    with pytest.raises(ValueError, match=rf"^{path}: .*{message}"):
        load_dataset(f"npz:{path}")


def test_an_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="use 'digits', 'folder:PATH' or 'npz:PATH'"):
        load_dataset("mnist")


@pytest.mark.integration
def test_an_image_folder_read_with_ray_data_trains_a_version_with_its_class_names(ray_address, tmp_path):
    """PNGs in root/<class>/ (the ImageFolder convention) -> Ray Data -> a trained, loadable version."""
    images, labels = bars(120, seed=1)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = tmp_path / "bars" / ("horizontal", "vertical")[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{i}.png")
    config = TrainConfig(
        dataset=f"folder:{tmp_path / 'bars'}", colour_mode="L", workers=0, epochs=6, max_shift_px=0, flip=True
    )
    train_and_publish(config, tmp_path / "repo", "bars", log=lambda line: None)
    loaded = ModelRepository(tmp_path / "repo").load("bars")
    assert loaded.metadata.labels == ["horizontal", "vertical"]
    contract = loaded.metadata.input
    assert (contract.colour_mode, contract.height, contract.width) == ("L", 8, 8)
    assert 0.15 < contract.normalisation.mean[0] < 0.35  # measured on these images: mostly dark, bright bars
    assert loaded.metadata.metrics["held_out_images"] == 24
    assert loaded.metadata.metrics["accuracy"] >= 0.9


@pytest.mark.parametrize("source", ["mnist", "digits:x", "folder:", "npz:", ":digits"])
def test_a_dataset_of_no_known_kind_is_refused_before_anything_is_read(source):
    from convray.workers.data import check_source

    with pytest.raises(ValueError, match="use 'digits', 'folder:PATH' or 'npz:PATH'"):
        check_source(source)
    for known in ("digits", "folder:/no/such/folder", "npz:x.npz"):  # files are read later, where they are used
        check_source(known)
