"""CIFAR-10 python-format loader, its error messages, augmentation and standardization."""

from __future__ import annotations

import pickle
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from hfl_lab._exceptions import ConfigError
from trainer.data import BatchStream, Cifar10, augment, load_cifar10, standardize


def _linked_copy(cifar_dir: Path, tmp_path: Path) -> Path:
    """A batches folder of symlinks to the shared files, so one file can be broken cheaply."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for source in (cifar_dir / "cifar-10-batches-py").iterdir():
        (folder / source.name).symlink_to(source)
    return folder


@pytest.fixture(scope="module")
def cifar(cifar_dir: Path) -> Cifar10:
    return load_cifar10(cifar_dir)


def test_subset_loads_with_expected_shapes_and_labels(cifar: Cifar10) -> None:
    assert cifar.train_images.shape == (4660, 32, 32, 3)
    assert cifar.test_images.shape == (846, 32, 32, 3)
    assert cifar.train_images.dtype == np.uint8 and cifar.test_images.dtype == np.uint8
    assert cifar.train_labels.shape == (4660,) and cifar.test_labels.shape == (846,)
    assert cifar.train_labels.dtype == np.int64
    assert set(np.unique(cifar.train_labels)) == set(range(10))
    assert cifar.test_labels.min() >= 0 and cifar.test_labels.max() <= 9


def test_channel_major_rows_become_nhwc(cifar_dir: Path, cifar: Cifar10) -> None:
    # Arrange: the raw first row holds the R plane, then G, then B.
    with open(cifar_dir / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][0]

    # Assert
    np.testing.assert_array_equal(cifar.train_images[0, :, :, 0].ravel(), raw[:1024])
    np.testing.assert_array_equal(cifar.train_images[0, :, :, 2].ravel(), raw[2048:])


def test_accepts_the_batches_folder_itself(cifar_dir: Path) -> None:
    data = load_cifar10(cifar_dir / "cifar-10-batches-py")
    assert data.test_images.shape == (846, 32, 32, 3)


def test_missing_folder_raises_config_error_with_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_cifar10(tmp_path / "nowhere")
    message = str(excinfo.value)
    assert "does not exist" in message
    assert "data_path" in message and "python version" in message


def test_missing_batch_file_is_named(tmp_path: Path, cifar_dir: Path) -> None:
    # Arrange
    folder = _linked_copy(cifar_dir, tmp_path)
    (folder / "data_batch_3").unlink()

    # Act / Assert
    with pytest.raises(ConfigError, match="data_batch_3 is missing"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize(
    "content",
    [
        b"not a pickle at all",
        pickle.dumps({b"labels": [1, 2]}),
        pickle.dumps({b"data": 1, b"labels": [1]}),
    ],
)
def test_corrupt_batch_file_raises_config_error(
    tmp_path: Path, cifar_dir: Path, content: bytes
) -> None:
    # Arrange
    folder = _linked_copy(cifar_dir, tmp_path)
    (folder / "test_batch").unlink()
    (folder / "test_batch").write_bytes(content)

    # Act
    with pytest.raises(ConfigError) as excinfo:
        load_cifar10(tmp_path)

    # Assert
    message = str(excinfo.value)
    assert "test_batch" in message
    assert "corrupt" in message or "expected (N, 3072)" in message
    assert "Fix:" in message and "data_path" in message


def test_augmentation_preserves_shape_and_is_seeded(cifar: Cifar10) -> None:
    images = cifar.train_images[:64]
    first = augment(images, np.random.default_rng(7))
    again = augment(images, np.random.default_rng(7))
    other = augment(images, np.random.default_rng(8))
    assert first.shape == (64, 32, 32, 3) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    # Some crops/flips must differ from the plain standardized image.
    plain = standardize(images)
    assert 0 < np.mean([np.array_equal(a, b) for a, b in zip(first, plain, strict=True)]) < 0.5


def test_augmentation_crops_from_the_zero_padded_image() -> None:
    # Arrange: a single bright pixel in the corner.
    image = np.zeros((1, 32, 32, 3), np.uint8)
    image[0, 0, 0] = 255
    positions: set[tuple[int, int]] = set()

    # Act
    for seed in range(60):
        out = augment(image, np.random.default_rng(seed))[0, :, :, 0]
        if out.max() == out.min():
            continue  # the crop cut the pixel off
        hot = np.argwhere(out == out.max())
        positions.update((int(r), int(c)) for r, c in hot)

    # Assert: shifts of at most 4 pixels, horizontal flips mirror the column.
    rows = {r for r, _ in positions}
    cols = {c for _, c in positions}
    assert rows <= set(range(5)) and len(rows) > 1
    assert len(positions) > 5
    assert cols <= set(range(5)) | set(range(27, 32)) and cols & set(range(27, 32))


def test_standardization_gives_zero_mean_unit_std(cifar: Cifar10) -> None:
    x = standardize(cifar.test_images[:100])
    assert x.dtype == np.float32
    np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(1, 2, 3)), 1, atol=1e-4)
    flat = standardize(np.full((1, 32, 32, 3), 9, np.uint8))
    assert np.all(flat == 0)  # uniform image: adjusted stddev avoids dividing by zero


def test_batch_stream_is_deterministic_and_reshuffles_each_epoch(cifar: Cifar10) -> None:
    # Arrange
    indices = np.arange(100)
    stream = BatchStream(cifar.train_images, cifar.train_labels, indices, 32, seed=3)
    twin = BatchStream(cifar.train_images, cifar.train_labels, indices, 32, seed=3)

    # Act
    batches = list(islice(stream, 6))
    resumed = list(islice(twin.batches(start_step=4), 2))

    # Assert
    assert stream.steps_per_epoch == 3
    assert all(x.shape == (32, 32, 32, 3) and y.shape == (32,) for x, y in batches)
    np.testing.assert_array_equal(batches[4][0], resumed[0][0])
    np.testing.assert_array_equal(batches[5][1], resumed[1][1])
    epoch0 = np.concatenate([y for _, y in batches[:3]])
    epoch1 = np.concatenate([y for _, y in batches[3:]])
    assert not np.array_equal(epoch0, epoch1)
    assert sorted(epoch0.tolist()) != [] and len(epoch0) == 96


def test_batch_stream_rejects_batches_larger_than_the_share(cifar: Cifar10) -> None:
    with pytest.raises(ConfigError, match="batch size 64"):
        BatchStream(cifar.train_images, cifar.train_labels, np.arange(10), 64)
