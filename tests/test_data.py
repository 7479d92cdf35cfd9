import gzip

import datasets

import numpy as np
import pytest
from PIL import Image

from hf_vae_compress import data
from tests.conftest import tiny_timm


def test_fashion_mnist_splits_are_real_and_disjoint():
    test = data.load_fashion_mnist("test")
    assert len(test) == 10_000
    assert test.features["label"].names == data.FASHION_MNIST_CLASSES
    image = test[0]["image"]
    assert isinstance(image, Image.Image) and image.size == (28, 28) and image.mode == "L"
    assert sorted(set(test["label"])) == list(range(10))
    train_x, _ = data.fashion_mnist_arrays("train")
    val_x, val_y = data.fashion_mnist_arrays("validation")
    assert len(train_x) == 55_000 and len(val_x) == data.VALIDATION_SIZE
    train_rows = {row.tobytes() for row in train_x[:, 10]}  # one row per image is enough to tell them apart
    overlap = sum(v.tobytes() in train_rows and v.any() for v in val_x[:200, 10])
    assert overlap < 20  # a handful of identical rows by chance, not the same images
    assert np.bincount(val_y, minlength=10).min() > 350  # every class is held out


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_offline_folder_from_environment(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (7, 28, 28)), np.arange(7) % 10
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(tmp_path))
    x, y = data.fashion_mnist_arrays("test")
    assert np.array_equal(x, images) and np.array_equal(y, labels)
    ds = data.load_fashion_mnist("test")
    assert len(ds) == 7 and np.array_equal(np.asarray(ds[3]["image"]), images[3])


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(data.DataNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        data.load_fashion_mnist("test")


def test_truncated_idx_is_refused(tmp_path, monkeypatch):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3))
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])
    monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match="truncated"):
        data.fashion_mnist_arrays("test")


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown split"):
        data.fashion_mnist_arrays("dev")


def test_model_preprocessing_matches_its_config(timm_folder, vit_folder):
    from hf_vae_compress.models import load_model

    image = data.load_fashion_mnist("test")[0]["image"]
    expected = (np.asarray(image, dtype=np.float32) / 255 - data.FASHION_MNIST_MEAN) / data.FASHION_MNIST_STD
    for folder in (timm_folder, vit_folder):
        x = data.image_transform(load_model(folder))(image)
        assert x.shape == (1, 28, 28)
        np.testing.assert_allclose(x[0].numpy(), expected, atol=1e-5)


def test_fashion_mnist_still_selects_on_its_held_out_validation_split():
    """The reference models' own data: the accuracy check keeps selecting on the 5,000 training
    images they never saw, reports on test, and calibrates on the other 55,000."""
    from hf_vae_compress.tasks import Classification

    chosen = data.selection(data.FASHION_MNIST)
    assert (chosen.split, chosen.report_split, chosen.trained_on_risk, chosen.holdout) == \
        ("validation", "test", False, None)
    task = Classification()
    validation, train = task.load(task.selection().split), task.load("train")
    assert len(validation) == data.VALIDATION_SIZE and len(train) == 55_000
    val_x, val_y = data.fashion_mnist_arrays("validation")
    assert np.array_equal(np.asarray(validation[:5]["image"][0]), val_x[0]) and validation["label"] == val_y.tolist()
    report = task.load("test[report]")  # halves work on the built-in data too
    assert len(report) + len(task.load("test[selection]")) == 10_000


def _labelled(names: list[str]):
    return datasets.Dataset.from_dict({"label": list(range(len(names)))},
                                      features=datasets.Features({"label": datasets.ClassLabel(names=names)}))


def test_class_names_that_only_partly_match_are_refused_by_name(caplog):
    model = tiny_timm()  # the Fashion-MNIST class names
    names = list(data.FASHION_MNIST_CLASSES)
    near = ["tshirt", *names[1:9], "boot"]  # 8 of 10 match, as an imagefolder a user made might
    with pytest.raises(data.DatasetError, match=r"8 of the dataset's 10 class names.*'tshirt', 'boot'"):
        data.fit_labels(model, _labelled(near))
    shuffled = names[::-1]  # every name, another order: re-labelled by name
    assert data.fit_labels(model, _labelled(shuffled))["label"] == list(range(9, -1, -1))
    numbered = [str(i) for i in range(10)]  # no name in common: by index, with a warning
    assert data.fit_labels(model, _labelled(numbered))["label"] == list(range(10))
    assert "scoring by class index" in caplog.text
