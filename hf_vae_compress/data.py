"""Image-classification data as `datasets.Dataset`, plus the preprocessing a model asks for.

Fashion-MNIST is read offline from the IDX files of the Debian package `dataset-fashion-mnist`
(or any folder named by ``HF_VAE_COMPRESS_FASHION_MNIST_DIR``), and from the Hub when online.
The 60k training images are split once, deterministically, into ``train`` (55k) and a held-out
``validation`` split (5k): reference models never see ``validation``, so codec settings can be
chosen on it without touching ``test``.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

logger = logging.getLogger(__name__)

FASHION_MNIST = "fashion_mnist"
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
FASHION_MNIST_DIR_ENV = "HF_VAE_COMPRESS_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# Mean and std of the 60k training pixels in [0, 1]: the normalisation the reference models use.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
VALIDATION_SIZE = 5000
SPLITS = ("train", "validation", "test")
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def fashion_mnist_pretrained_cfg(size: int = 28) -> dict:
    """timm ``pretrained_cfg`` entries for a 1-channel Fashion-MNIST model fed ``size`` x ``size``
    images (28 is native; a larger size makes every loader upsample)."""
    return dict(
        input_size=(1, size, size), mean=(FASHION_MNIST_MEAN,), std=(FASHION_MNIST_STD,), crop_pct=1.0,
        interpolation="bilinear", num_classes=10, label_names=FASHION_MNIST_CLASSES,
    )


class DataNotFoundError(FileNotFoundError):
    """Raised when a dataset is neither on disk nor reachable, with instructions to get it."""


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get(FASHION_MNIST_DIR_ENV, FASHION_MNIST_DEFAULT_DIR))


def _read_idx(path: Path) -> np.ndarray:
    """Read one (optionally gzipped) IDX file into a uint8 array, checking its magic number."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {np.prod(dims)} values, found {data.size}")
    return data.reshape(dims)


def _find_idx(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / name.removesuffix(".gz")):
        if candidate.exists():
            return candidate
    return None


def _load_idx_arrays(part: str) -> tuple[np.ndarray, np.ndarray] | None:
    directory = fashion_mnist_dir()
    paths = [_find_idx(directory, name) for name in _IDX_FILES[part]]
    if any(p is None for p in paths):
        return None
    return _read_idx(paths[0]), _read_idx(paths[1])


def _load_hub_arrays(part: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Fashion-MNIST from the Hub, when online; ``None`` when it cannot be reached."""
    import datasets

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return None
    try:
        ds = datasets.load_dataset(FASHION_MNIST_HUB_ID, split=part)
    except Exception as err:  # noqa: BLE001 - any failure here means "not available online"
        logger.info("Fashion-MNIST is not reachable on the Hub: %s", err)
        return None
    images = np.stack([np.asarray(im, dtype=np.uint8) for im in ds["image"]])
    return images, np.asarray(ds["label"], dtype=np.uint8)


def fashion_mnist_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) of one split: the fast path for training."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    part = "test" if split == "test" else "train"
    arrays = _load_idx_arrays(part) or _load_hub_arrays(part)
    if arrays is None:
        raise DataNotFoundError(
            f"Fashion-MNIST was not found in {fashion_mnist_dir()} and the Hub ({FASHION_MNIST_HUB_ID}) "
            "is not reachable. Install it with `apt-get install -y dataset-fashion-mnist` (as root), "
            f"or point {FASHION_MNIST_DIR_ENV} at a folder holding the four IDX files."
        )
    images, labels = arrays
    if part == "test":
        return images, labels
    order = np.random.default_rng(0).permutation(len(labels))
    keep = np.sort(order[-VALIDATION_SIZE:] if split == "validation" else order[:-VALIDATION_SIZE])
    return images[keep], labels[keep]


def load_fashion_mnist(split: str = "test"):
    """Fashion-MNIST as a `datasets.Dataset` with a PIL ``image`` column and a ``label`` ClassLabel.

    The Arrow table is cached under the `datasets` cache, keyed by the source files, so only the
    first call pays for encoding the images.
    """
    import datasets

    images, labels = fashion_mnist_arrays(split)
    key = hashlib.sha256(images.tobytes()[:1 << 20] + labels.tobytes()).hexdigest()[:16]
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "hf_vae_compress" / f"fashion_mnist-{split}-{key}"
    if cache.exists():
        return datasets.load_from_disk(str(cache))
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_MNIST_CLASSES)}
    )
    from PIL import Image

    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(im, mode="L") for im in images], "label": labels.tolist()},
        features=features,
    )
    try:
        ds.save_to_disk(str(cache))
        ds = datasets.load_from_disk(str(cache))
    except OSError as err:
        logger.warning("could not cache Fashion-MNIST at %s: %s", cache, err)
    return ds


def load_image_dataset(name: str, split: str = "test"):
    """Any image-classification dataset: ``fashion_mnist``, a `save_to_disk` folder, or a Hub name."""
    import datasets

    if name in (FASHION_MNIST, FASHION_MNIST_HUB_ID):
        return load_fashion_mnist(split)
    path = Path(name)
    if path.is_dir() and (path / "dataset_info.json").exists():
        return datasets.load_from_disk(str(path))
    if path.is_dir() and (path / split / "dataset_info.json").exists():
        return datasets.load_from_disk(str(path / split))
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - re-raised with instructions
        raise DataNotFoundError(f"could not load dataset {name!r} split {split!r}: {err}") from err


def image_transform(model: torch.nn.Module) -> Callable:
    """The eval preprocessing that the model's own config asks for, PIL image -> tensor.

    timm models carry it in ``pretrained_cfg`` (resolved with timm's ``resolve_data_config``);
    transformers models carry it in their image processor, saved beside the weights.
    """
    import torchvision.transforms as T

    import timm.data

    if hasattr(model, "pretrained_cfg"):
        cfg = timm.data.resolve_data_config({}, model=model)
    elif hasattr(model, "timm_model"):  # transformers' TimmWrapper: the checkpoint's cfg is in its config
        cfg = timm.data.resolve_data_config({}, pretrained_cfg=model.config.pretrained_cfg)
    else:
        return _transformers_transform(model)
    mode = "L" if cfg["input_size"][0] == 1 else "RGB"
    return T.Compose([T.Lambda(lambda im: im.convert(mode)), timm.data.create_transform(**cfg)])


def load_image_processor(model: torch.nn.Module):
    """The image processor saved beside a transformers model: it owns the resize (and a detector's
    box post-processing)."""
    from transformers import AutoImageProcessor

    source = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    try:
        return AutoImageProcessor.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"no image processor found for {source!r}; save one with the model "
            "(image_processor.save_pretrained) so its preprocessing is known"
        ) from err


def image_mode(config) -> str:
    """PIL mode for the channels the model (or its backbone) takes: ``"L"`` for one, else ``"RGB"``."""
    channels = getattr(config, "num_channels", None) or getattr(getattr(config, "backbone_config", None),
                                                                "num_channels", 3)
    return "L" if channels == 1 else "RGB"


def _transformers_transform(model: torch.nn.Module) -> Callable:
    import torchvision.transforms as T

    proc = load_image_processor(model)
    size = proc.size
    hw = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    mode = image_mode(model.config)
    steps = [T.Lambda(lambda im: im.convert(mode)), T.Resize(hw), T.ToTensor()]
    if getattr(proc, "do_normalize", True):
        steps.append(T.Normalize(proc.image_mean, proc.image_std))
    return T.Compose(steps)


def with_transform(dataset, transform: Callable, image_column: str = "image", label_column: str = "label"):
    """A view of ``dataset`` yielding ``{"pixel_values", "labels"}`` tensors, decoded lazily."""

    def apply(batch):
        return {
            "pixel_values": [transform(im) for im in batch[image_column]],
            "labels": batch[label_column],
        }

    return dataset.with_transform(apply)


def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
        "labels": torch.as_tensor([b["labels"] for b in batch]),
    }
