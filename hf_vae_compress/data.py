"""Image-classification data as `datasets.Dataset`, plus the preprocessing a model asks for.

Fashion-MNIST is read offline from the IDX files of the Debian package `dataset-fashion-mnist`
(or any folder named by ``HF_VAE_COMPRESS_FASHION_MNIST_DIR``), and from the Hub when online.
The 60k training images are split once, deterministically, into ``train`` (55k) and a held-out
``validation`` split (5k): reference models never see ``validation``, so codec settings can be
chosen on it without touching ``test``.
"""

from __future__ import annotations

import functools
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


class DatasetError(ValueError):
    """A dataset that exists but cannot be used: no image or label column, no such split, labels
    that do not fit the model. The message names what was found."""


VALIDATION_NAMES = ("validation", "valid", "val")
HOLDOUT_FRACTION = 0.1  # of ``train``, per class, when a dataset has no validation split ...
HOLDOUT_MAX = 5000  # ... at most this many examples: enough to resolve a 0.5 pt drop, cheap to score
HOLDOUT_SEED = 0


def load_image_dataset(name: str, split: str = "test"):
    """One split of an image-classification dataset, with its columns named ``image`` and ``label``.

    ``name`` is ``fashion_mnist``, a ``save_to_disk`` folder (one dataset or a ``DatasetDict``), an
    ``imagefolder`` directory (``class_name/*.png``, optionally under ``train/`` and ``test/``), or a
    Hub id. The image and label columns are found by their feature types (``Image``,
    ``ClassLabel``). Splits follow :func:`dataset_split`.
    """
    if name in (FASHION_MNIST, FASHION_MNIST_HUB_ID):
        return load_fashion_mnist(split)
    return dataset_split(name, split, image_columns)


def dataset_split(name: str, split: str, columns: Callable | None = None):
    """One split of any dataset by name, with ``validation`` carved from ``train`` when it has none.

    Most datasets have no ``validation`` split. One is then held out of ``train`` (see
    :func:`holdout_indices`, stratified by ``label`` when there is one), and ``train`` means what
    is left, so calibration and fine-tuning never see the held-out examples. A folder with a
    single dataset and no splits serves ``test`` whole and carves ``validation`` / ``train`` the
    same way. ``columns(dataset, name, splits)`` selects and renames the columns a task needs.
    """
    splits = _open_splits(name)
    columns = columns or (lambda dataset, *_: dataset)
    validation = next((s for s in VALIDATION_NAMES if s in splits), None)
    if split in VALIDATION_NAMES and validation is not None:
        return columns(splits[validation], name, splits)
    whole = splits.get("train", splits.get(None)) if split in (*VALIDATION_NAMES, "train") else None
    if whole is not None and validation is None:
        whole = columns(whole, name, splits)
        held_out = holdout_indices(_strata(whole))
        if split == "train":
            return whole.select(np.setdiff1d(np.arange(len(whole)), held_out))
        logger.info("%s has no validation split: holding out %d examples of its training data (seed %d)",
                    name, len(held_out), HOLDOUT_SEED)
        return whole.select(held_out)
    if split in splits or (None in splits and split == "test"):
        return columns(splits.get(split, splits.get(None)), name, splits)
    raise DatasetError(f"dataset {name!r} has no split {split!r}; its splits: {_split_names(splits)}")


def _strata(dataset) -> np.ndarray:
    """What the hold-out is stratified by: the class label when there is one."""
    return np.asarray(dataset["label"]) if "label" in dataset.column_names else np.zeros(len(dataset), np.int64)


def holdout(name: str, columns: Callable | None = None) -> dict | None:
    """How :func:`dataset_split` (with the same ``columns``) made the validation split of ``name``,
    for logs and JSON; None when the dataset has its own."""
    if name in (FASHION_MNIST, FASHION_MNIST_HUB_ID):
        return None
    splits = _open_splits(name)
    if any(s in splits for s in VALIDATION_NAMES):
        return None
    whole = splits.get("train", splits.get(None))
    whole = columns(whole, name, splits) if columns else whole
    return dict(carved_from="train" if "train" in splits else "the whole dataset",
                examples=len(holdout_indices(_strata(whole))), fraction=HOLDOUT_FRACTION, max_examples=HOLDOUT_MAX,
                seed=HOLDOUT_SEED, stratified_by="label" if "label" in whole.column_names else None)


def holdout_indices(labels, fraction: float = HOLDOUT_FRACTION, max_examples: int = HOLDOUT_MAX,
                    seed: int = HOLDOUT_SEED) -> np.ndarray:
    """Sorted indices of a deterministic, stratified hold-out: the same share of every class.

    Each class gives ``round(share * count)`` examples (at least one when it has two or more),
    chosen by a seeded permutation, so the held-out split follows the label distribution and is
    the same on every machine and every run.
    """
    labels = np.asarray(labels)
    share = min(fraction, max_examples / max(len(labels), 1))
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = int(round(share * len(members)))
        take = max(take, 1) if len(members) >= 2 else 0
        chosen.append(rng.permutation(members)[:take])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


@functools.lru_cache(maxsize=8)
def _open_splits(name: str) -> dict:
    """Every split of a dataset by name (``None``: a folder holding one dataset and no splits)."""
    import datasets

    path = Path(name)
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
            return {None: datasets.load_from_disk(str(path))}
        if path.is_dir() and (path / "dataset_dict.json").exists():
            return dict(datasets.load_from_disk(str(path)))
        if path.is_dir() and any((sub / "dataset_info.json").exists() for sub in path.iterdir() if sub.is_dir()):
            return {sub.name: datasets.load_from_disk(str(sub)) for sub in sorted(path.iterdir())
                    if (sub / "dataset_info.json").exists()}
        if path.is_dir():
            return dict(datasets.load_dataset("imagefolder", data_dir=str(path)))
        return dict(datasets.load_dataset(name))
    except Exception as err:  # noqa: BLE001 - re-raised with instructions
        raise DataNotFoundError(
            f"could not load dataset {name!r}: {err}. Give a Hub id, a folder written by "
            "`Dataset.save_to_disk`, or an imagefolder directory (class_name/image.png)") from err


def _split_names(splits: dict) -> list[str]:
    return [s if s is not None else "(one dataset, no splits)" for s in splits]


def image_columns(dataset, name: str, splits: dict):
    """``dataset`` with only its image and label columns, named ``image`` and ``label``."""
    import datasets

    features = dataset.features
    images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    labels = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if not images or not labels:
        found = ", ".join(f"{k} ({type(f).__name__})" for k, f in features.items())
        raise DatasetError(
            f"dataset {name!r} needs an Image column and a ClassLabel column; it has {found} in splits "
            f"{_split_names(splits)}. Cast them first, e.g. ds.cast_column('label', ClassLabel(names=[...]))")
    image = next((k for k in ("image", "img") if k in images), images[0])
    label = next((k for k in ("label", "labels") if k in labels), labels[0])
    dataset = dataset.select_columns([image, label])
    return dataset.rename_columns({k: v for k, v in ((image, "image"), (label, "label")) if k != v})


def model_labels(model: torch.nn.Module) -> tuple[int | None, list[str] | None]:
    """The number of classes a classifier predicts and their names, when it says."""
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None) if config is not None else None
    if id2label:
        names = [str(id2label[i]) for i in sorted(id2label, key=int)]
        generic = all(n == f"LABEL_{i}" for i, n in enumerate(names))
        return len(names), None if generic else names
    pretrained = getattr(model, "pretrained_cfg", None) or {}
    count = getattr(model, "num_classes", None) or pretrained.get("num_classes")
    return count, pretrained.get("label_names")


def fit_labels(model: torch.nn.Module, dataset):
    """``dataset`` with its label ids in the model's order, refused when its classes are not the model's.

    A dataset with another number of classes is refused. One whose class names are the model's in
    another order (an ``imagefolder`` sorts its folders) is re-labelled by name; one whose names
    differ is scored by class index, with a warning.
    """
    import datasets

    count, names = model_labels(model)
    classes = dataset.features["label"].names
    if count is not None and count != len(classes):
        raise DatasetError(f"the model predicts {count} classes, the dataset has {len(classes)} ({classes[:10]}); "
                           "use the dataset the model was trained on")
    if names is None or [_norm(n) for n in names] == [_norm(c) for c in classes]:
        return dataset
    position = {_norm(n): i for i, n in enumerate(names)}
    if sorted(position) != sorted(_norm(c) for c in classes):
        logger.warning("the dataset's class names %s differ from the model's %s; scoring by class index",
                       classes[:5], names[:5])
        return dataset
    logger.info("re-labelling %s in the model's class order", classes[:5])
    mapping = np.array([position[_norm(c)] for c in classes])
    dataset = dataset.map(lambda labels: {"label": mapping[np.asarray(labels)].tolist()}, input_columns=["label"],
                          batched=True)
    return dataset.cast_column("label", datasets.ClassLabel(names=list(names)))


def _norm(label: str) -> str:
    return "".join(ch for ch in label.lower() if ch.isalnum())


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
