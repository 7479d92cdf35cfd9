"""Image-classification data as `datasets.Dataset`, plus the preprocessing a model asks for.

Fashion-MNIST is read offline from the IDX files of the Debian package `dataset-fashion-mnist`
(or any folder named by ``HF_VAE_COMPRESS_FASHION_MNIST_DIR``), and from the Hub when online.
The 60k training images are split once, deterministically, into ``train`` (55k) and a held-out
``validation`` split (5k): reference models never see ``validation``, so codec settings can be
chosen on it without touching ``test``.

Any other dataset gets a selection split by one rule (:func:`dataset_split`, :func:`selection`):
the accuracy check selects only on data the model did not train on. Its own ``validation`` (or
``valid`` / ``val`` / ``dev``) split when it has one; else a stratified, seeded half of ``test``
(``test[selection]``), leaving the other half (``test[report]``) to report the final model on;
only when there is neither, a hold-out of ``train``, flagged as data the model may have trained
on. A user can name any split or slice instead (``validation_split``).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import logging
import os
from dataclasses import dataclass
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


VALIDATION_NAMES = ("validation", "valid", "val", "dev")  # a dataset's own held-out split, by any of its usual names
SELECTION = "validation"  # what callers ask for to get the split the accuracy check selects on
HOLDOUT_FRACTION = 0.1  # of ``train``, per class, when a dataset has no validation and no test split ...
HOLDOUT_MAX = 5000  # ... at most this many examples: enough to resolve a 0.5 pt drop, cheap to score
HOLDOUT_SEED = 0
TEST_HALF = 0.5  # share of ``test`` in its selection half (``test[selection]``, at most HOLDOUT_MAX examples)
HALVES = ("selection", "report")


@dataclass(frozen=True)
class Selection:
    """Which examples an accuracy check selects on, where the final model should be reported, and
    whether the model may have trained on the selected examples.

    ``split`` loads with :func:`dataset_split` (``validation``, ``test[selection]``, a user's
    ``train[:10%]``). ``report_split`` is data the selection never touched (None when nothing is
    left). ``comparison_split`` is held-out data the model cannot have trained on if it trained on
    ``train`` only, to compare the base model's accuracy with (see the pipeline's memorisation
    check); None when there is none.
    """

    split: str
    report_split: str | None
    comparison_split: str | None
    trained_on_risk: bool
    description: str
    holdout: dict | None = None  # how the examples were carved out of a larger split (None: a split used whole)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


FASHION_MNIST_SELECTION = Selection(
    split="validation", report_split="test", comparison_split="test", trained_on_risk=False,
    description=f"Selected on Fashion-MNIST's validation split: {VALIDATION_SIZE:,} of its 60,000 training images, "
                "held out of the reference models' training (a model trained on all 60,000 has seen them; the "
                "memorisation check compares with test).")


def load_image_dataset(name: str, split: str = "test", validation_split: str | None = None):
    """One split of an image-classification dataset, with its columns named ``image`` and ``label``.

    ``name`` is ``fashion_mnist``, a ``save_to_disk`` folder (one dataset or a ``DatasetDict``), an
    ``imagefolder`` directory (``class_name/*.png``, optionally under ``train/`` and ``test/``), or a
    Hub id. The image and label columns are found by their feature types (``Image``,
    ``ClassLabel``). Splits follow :func:`dataset_split`.
    """
    if name in (FASHION_MNIST, FASHION_MNIST_HUB_ID) and split in SPLITS and validation_split is None:
        return load_fashion_mnist(split)
    return dataset_split(name, split, image_columns, validation_split)


def dataset_split(name: str, split: str, columns: Callable | None = None, validation_split: str | None = None):
    """One split of any dataset by name, where ``validation`` is the split the accuracy check selects on.

    ``split`` is a split name, a ``datasets`` slice (``train[:10%]``, ``test[100:200]``, parts
    joined by ``+``), or a half of a split (``test[selection]``, ``test[report]``: see
    :func:`selection_half`). ``validation`` means ``validation_split`` when given, else, in order:
    the dataset's own validation split (``validation``, ``valid``, ``val`` or ``dev``); the
    selection half of ``test``; a hold-out of ``train`` (see :func:`holdout_indices`). ``train``
    means what is left of it once the selection took its examples, so calibration and fine-tuning
    never see them. A folder with a single dataset and no splits serves ``test`` whole and carves
    ``validation`` / ``train`` out of it. ``columns(dataset, name, splits)`` selects and renames
    the columns a task needs.
    """
    import datasets

    view = _View(name, _open_splits(name), columns)
    parts = [view.rows(key, rows) for key, rows in view.resolve(split, _selection_spec(view.splits, validation_split))]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def selection(name: str, validation_split: str | None = None, columns: Callable | None = None) -> Selection:
    """What :func:`dataset_split` (with the same ``columns`` and ``validation_split``) serves as
    ``validation``, described for logs, JSON and the model card."""
    if name in (FASHION_MNIST, FASHION_MNIST_HUB_ID) and validation_split in (None, SELECTION):
        return FASHION_MNIST_SELECTION
    view = _View(name, _open_splits(name), columns)
    spec = _selection_spec(view.splits, validation_split)
    pieces = view.selection(spec)
    keys = {key for key, _ in pieces}
    examples = sum(len(view.rows(key, rows)) for key, rows in pieces)
    trained_on_risk = bool(keys & {"train", None})
    untouched_test = "test" in view.splits and "test" not in keys
    report = "test" if untouched_test else "test[report]" if spec == "test[selection]" else None
    stratified = "label" if "label" in view.rows(next(iter(keys))).column_names else None
    if validation_split not in (None, SELECTION):
        description = f"Selected on {examples:,} examples of {spec!r}, named by the user."
        holdout = None
    elif spec in view.splits:
        description = f"Selected on the dataset's own {spec!r} split ({examples:,} examples)."
        holdout = None
    elif spec == "test[selection]":
        description = (f"Selected on {examples:,} examples of 'test' (a half, stratified by {stratified}, seed "
                       f"{HOLDOUT_SEED}), as the dataset has no validation split; the final model is to be reported on "
                       "the other half, 'test[report]'.")
        holdout = dict(carved_from="test", examples=examples, fraction=TEST_HALF, max_examples=HOLDOUT_MAX,
                       seed=HOLDOUT_SEED, stratified_by=stratified)
    else:
        carved_from = "train" if "train" in view.splits else "the whole dataset"
        lacking = "no validation and no test split" if "train" in view.splits else "no splits"
        description = (f"Selected on {examples:,} examples held out of {carved_from} (stratified by {stratified}, "
                       f"seed {HOLDOUT_SEED}), as the dataset has {lacking}.")
        holdout = dict(carved_from=carved_from, examples=examples, fraction=HOLDOUT_FRACTION,
                       max_examples=HOLDOUT_MAX, seed=HOLDOUT_SEED, stratified_by=stratified)
    if trained_on_risk:
        description += " The model may have trained on these examples."
    return Selection(split=spec, report_split=report, comparison_split="test" if untouched_test else None,
                     trained_on_risk=trained_on_risk, description=description, holdout=holdout)


def _selection_spec(splits: dict, validation_split: str | None) -> str:
    """The split the accuracy check selects on: the user's, else the dataset's own validation split,
    else the selection half of ``test``, else ``validation`` (a hold-out of ``train``)."""
    if validation_split not in (None, SELECTION):
        return validation_split
    own = next((s for s in VALIDATION_NAMES if s in splits), None)
    if own is not None:
        return own
    return "test[selection]" if "test" in splits else SELECTION


Piece = tuple  # (split key, sorted row indices or None for every row); key None: a folder with no splits


@dataclass
class _View:
    """A dataset's splits with a task's columns, resolving split specs into rows of them."""

    name: str
    splits: dict
    columns: Callable | None

    def rows(self, key: str | None, rows: np.ndarray | None = None):
        dataset = self.splits[key]
        dataset = self.columns(dataset, self.name, self.splits) if self.columns else dataset
        return dataset if rows is None else dataset.select(rows)

    def key(self, split: str) -> str | None:
        if split in self.splits:
            return split
        if None in self.splits and split in ("test", "train"):
            return None
        raise DatasetError(f"dataset {self.name!r} has no split {split!r}; its splits: {_split_names(self.splits)}")

    def resolve(self, spec: str, selection_spec: str | None) -> list[Piece]:
        """Rows of ``spec``. ``selection_spec`` is what ``validation`` means and what ``train``
        leaves out; None while resolving the selection itself, where every name means its raw split."""
        if "+" in spec:
            return [piece for part in spec.split("+") for piece in self.resolve(part.strip(), selection_spec)]
        if spec == SELECTION and selection_spec is not None:
            return self.selection(selection_spec)
        if spec == "train" and selection_spec is not None:
            return [self._train_rest(selection_spec)]
        base, bracket, inner = spec.partition("[")
        if not bracket:
            return [(self.key(spec), None)]
        key = self.key(base)
        if inner.endswith("]") and inner[:-1] in HALVES:
            return [(key, selection_half(_strata(self.rows(key)), report=inner[:-1] == "report"))]
        import datasets

        try:
            absolute = datasets.ReadInstruction.from_spec(spec).to_absolute({base: len(self.splits[key])})
        except (ValueError, AssertionError) as err:
            raise DatasetError(f"cannot read split {spec!r} of {self.name!r}: {err}. Use the datasets slice syntax "
                               "('train[:10%]', 'test[100:200]'), 'test[selection]' or 'test[report]'") from err
        return [(key, np.arange(a.from_, a.to)) for a in absolute]

    def selection(self, spec: str) -> list[Piece]:
        """Rows of the selection split ``spec`` (from :func:`_selection_spec`)."""
        if spec == SELECTION and spec not in self.splits:  # nothing held out by the dataset: carve from train
            key = self.key("train")
            return [(key, holdout_indices(_strata(self.rows(key))))]
        return self.resolve(spec, None)

    def _train_rest(self, selection_spec: str) -> Piece:
        """``train`` less the examples the selection took from it."""
        key = self.key("train")
        taken = [rows if rows is not None else np.arange(len(self.splits[key]))
                 for k, rows in self.selection(selection_spec) if k == key]
        if not taken:
            return key, None
        rest = np.setdiff1d(np.arange(len(self.splits[key])), np.concatenate(taken))
        if len(rest) == 0:
            raise DatasetError(f"the validation split {selection_spec!r} takes every example of {self.name!r}'s "
                               "training data, leaving none to calibrate on; name a part of it, e.g. 'train[:10%]'")
        return key, rest


def _strata(dataset) -> np.ndarray:
    """What hold-outs and halves are stratified by: the class label when there is one."""
    return np.asarray(dataset["label"]) if "label" in dataset.column_names else np.zeros(len(dataset), np.int64)


def selection_half(labels, report: bool = False) -> np.ndarray:
    """Sorted indices of ``test[selection]`` (a stratified, seeded half, at most ``HOLDOUT_MAX``
    examples), or with ``report`` of ``test[report]``, every other example: disjoint, and the same
    on every machine and every run."""
    half = holdout_indices(labels, fraction=TEST_HALF)
    return np.setdiff1d(np.arange(len(labels)), half) if report else half


def stratified_sample(dataset, max_examples: int = HOLDOUT_MAX):
    """At most ``max_examples`` rows of ``dataset``, the same share of every class, seeded."""
    return dataset.select(holdout_indices(_strata(dataset), fraction=1.0, max_examples=max_examples))


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

    if name in (FASHION_MNIST, FASHION_MNIST_HUB_ID):
        return {split: load_fashion_mnist(split) for split in SPLITS}
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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def is_unlabelled(name: str) -> bool:
    """Whether dataset ``name`` holds images without labels: a folder of image files with no class
    folders (read without the ``datasets`` package), or a ``datasets`` dataset with an ``Image``
    column and no ``ClassLabel`` column in any split, saved with ``save_to_disk``. Anything else
    (a Hub id included) is left to the labelled path, which names what it found when it cannot use it."""
    path = Path(name)
    if not path.is_dir():
        return False
    if _image_files(path) and not any(p.is_dir() and _image_files(p) for p in path.iterdir()):
        return True
    if not any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")) \
            and not any((sub / "dataset_info.json").exists() for sub in path.iterdir() if sub.is_dir()):
        return False  # an imagefolder of class folders (or nothing usable): the labelled path explains
    import datasets

    features = [ds.features for ds in _open_splits(name).values()]
    return any(isinstance(f, datasets.Image) for fs in features for f in fs.values()) and \
        not any(_holds(f, datasets.ClassLabel) for fs in features for f in fs.values())


def _holds(feature, kind: type) -> bool:
    """Whether a feature is, or nests, one of type ``kind``: a detection dataset's labels sit inside
    its ``objects`` column (``{"category": List(ClassLabel)}``), not at the top level."""
    if isinstance(feature, kind):
        return True
    if isinstance(feature, dict):
        return any(_holds(f, kind) for f in feature.values())
    if isinstance(feature, (list, tuple)):
        return any(_holds(f, kind) for f in feature)
    inner = getattr(feature, "feature", None)  # List, Sequence, LargeList
    return inner is not None and _holds(inner, kind)


def load_unlabelled_images(name: str) -> list:
    """Every image of an unlabelled dataset (:func:`is_unlabelled`) as PIL images, in a fixed order:
    a folder's files by name, a ``datasets`` dataset's splits in order, each in row order."""
    from PIL import Image

    path = Path(name)
    if path.is_dir() and _image_files(path):
        images = []
        for file in _image_files(path):
            try:
                with Image.open(file) as image:
                    images.append(image.copy())
            except OSError as err:
                raise DatasetError(f"{file} is not a readable image ({err}); remove it or replace it") from err
        return images
    import datasets

    images = []
    for dataset in _open_splits(name).values():
        column = next(k for k, f in dataset.features.items() if isinstance(f, datasets.Image))
        images += list(dataset[column])
    return images


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
    another order (an ``imagefolder`` sorts its folders) is re-labelled by name. One whose names
    only partly match (``tshirt`` for ``T-shirt/top``) is refused: matching the rest by index would
    put labels on the wrong classes and score a good model as a bad one. One that shares no name
    with the model (e.g. numbered classes) is scored by class index, with a warning.
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
    unmatched = [c for c in classes if _norm(c) not in position]
    if unmatched and len(unmatched) < len(classes):
        found = {_norm(c) for c in classes}
        missing = [n for n in names if _norm(n) not in found]
        raise DatasetError(f"{len(classes) - len(unmatched)} of the dataset's {len(classes)} class names match the "
                           f"model's, but {unmatched} do not (the model's unmatched classes: {missing}). Rename them "
                           "to the model's names (folder names of an imagefolder), or cast the label column to "
                           "ClassLabel(names=[...]) in the model's order")
    if unmatched:
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


def split_transform(transform: Callable) -> tuple[Callable, Callable] | None:
    """``transform`` cut where it turns a PIL image into floats: ``(to_pixels, finish)``, where
    ``to_pixels`` takes an image to its 8-bit pixels, (C, H, W) uint8, and ``finish`` takes a batch
    of them, (N, C, H, W), to what ``transform`` gives for each image, bit for bit (ToTensor's
    division by 255 and the normalisations after it are elementwise, so they give the same values
    on a batch as on one image). None when ``transform`` is not PIL steps, then ToTensor, then only
    normalisations (the shape of :func:`image_transform`'s transforms): there is no such cut.

    Why: a split preprocessed once and scored many times is held as its 8-bit pixels, a quarter
    of float32's memory (see :class:`~hf_vae_compress.evaluate.HeldImages`)."""
    import torchvision.transforms as T

    steps = _flat_steps(transform)
    at = next((i for i, step in enumerate(steps) if isinstance(step, T.ToTensor)), None)
    if at is None or not all(isinstance(step, T.Normalize) for step in steps[at + 1:]):
        return None
    return T.Compose([*steps[:at], _eight_bit_pixels]), functools.partial(_finish, tail=tuple(steps[at + 1:]))


def _flat_steps(transform: Callable) -> list[Callable]:
    """The steps of a (nested) torchvision ``Compose``, in order; any other callable is one step."""
    inner = getattr(transform, "transforms", None)
    if not isinstance(inner, (list, tuple)):
        return [transform]
    return [step for part in inner for step in _flat_steps(part)]


# PIL modes whose pixels ToTensor reads as they are, as uint8, and divides by 255 (it reads "1", "I",
# "I;16" and "F" otherwise): the modes image_transform converts every image to are among them
EIGHT_BIT_MODES = ("L", "RGB", "RGBA", "LA", "P", "CMYK", "YCbCr")


def _eight_bit_pixels(image) -> torch.Tensor:
    """A PIL image's pixels as (C, H, W) uint8, the values ToTensor divides by 255."""
    from torchvision.transforms.functional import pil_to_tensor

    if getattr(image, "mode", None) not in EIGHT_BIT_MODES:
        raise ValueError(f"cannot hold an image of mode {getattr(image, 'mode', type(image).__name__)!r} as 8-bit "
                         f"pixels (only {EIGHT_BIT_MODES}); convert it first")
    return pil_to_tensor(image)


def _finish(pixels: torch.Tensor, tail: tuple) -> torch.Tensor:
    """8-bit pixels as ToTensor scales them (to the default float dtype, divided by 255), then ``tail``."""
    x = pixels.to(torch.get_default_dtype()).div(255)
    for step in tail:
        x = step(x)
    return x


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
