"""Top-1 evaluation of an image classifier on a `datasets.Dataset`, with a bootstrap interval.

On 10k test images top-1 carries about +-0.3 pt of sampling noise, as large as the accuracy
budgets this project works to, so every result carries a 95 % bootstrap interval.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import collate, image_transform, split_transform, with_transform

logger = logging.getLogger(__name__)

# Images per scoring forward pass. Why not more: on CPU the activations of a large batch fall out of
# cache (resnet50 at 224 px, channels-last, scored 23 images/s in batches of 64 and 18 in batches of
# 256, dev) and they set the peak memory of a search that scores while holding calibration
# statistics (0.8 GB per activation tensor of resnet50 at 256 images).
SCORING_BATCH = 64


def logits_of(output) -> torch.Tensor:
    """timm returns a tensor, transformers a ModelOutput with ``.logits``."""
    return output if isinstance(output, torch.Tensor) else output.logits


def bootstrap_interval(correct: np.ndarray, num_resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean of a 0/1 vector."""
    rng = np.random.default_rng(seed)
    n = len(correct)
    means = np.array([correct[rng.integers(0, n, n)].mean() for _ in range(num_resamples)])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def as_tensors(dataset, transform: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocess a whole dataset once: for evaluating many models that share a preprocessing.

    Each image is written into one preallocated tensor as it is transformed: stacking a list of
    them held the split twice (1.2 GB for 1,000 images at 224 px), at the peak of a compress."""
    if len(dataset) == 0:
        raise ValueError("the dataset has no images")
    images = iter(dataset["image"])
    first = transform(next(images))
    x = torch.empty((len(dataset), *first.shape), dtype=first.dtype)
    x[0] = first
    for i, image in enumerate(images, start=1):
        x[i] = transform(image)
    return x, torch.as_tensor(dataset["label"])


@dataclass(frozen=True)
class HeldImages:
    """A preprocessed image split held as 8-bit pixels, (N, C, H, W) uint8, and made the model's
    float inputs a batch at a time, as it is taken (``finish``: the preprocessing's ToTensor scaling
    and normalisation, :func:`~hf_vae_compress.data.split_transform`): a batch is bit for bit the
    rows of the float split. Why: a split preprocessed once and scored many times is held through
    calibration and rounding too; as float32 it was 602 MB for 1,000 images at 224 px, a fifth of
    a fixed-rate compress's 3 GB budget, and as uint8 it is 151 MB.

    Taken like the float tensor it stands for: ``images[index]`` (an index tensor or a slice) and
    ``images.split(size)`` give float batches, ``len(images)`` the number of images."""

    pixels: torch.Tensor
    finish: Callable[[torch.Tensor], torch.Tensor]

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index) -> torch.Tensor:
        return self.finish(self.pixels[index])

    def split(self, size: int) -> Iterator[torch.Tensor]:
        """Consecutive float batches of at most ``size`` images, each made when it is reached."""
        return (self.finish(part) for part in self.pixels.split(size))


@dataclass(frozen=True)
class Batches(Sequence):
    """``images`` in consecutive batches of ``size`` (the last may be shorter), each made when it is
    taken: calibration passes over its batches several times and keeps them (norm correction reruns
    them), and held as :class:`HeldImages` they cost a quarter of float32's memory between passes."""

    images: HeldImages | torch.Tensor
    size: int

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.size)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        start = index % len(self) * self.size
        return self.images[start:start + self.size]


def held_tensors(dataset, transform: Callable) -> tuple[HeldImages | torch.Tensor, torch.Tensor]:
    """:func:`as_tensors`, with the images held as :class:`HeldImages` where ``transform`` can be
    cut after its 8-bit steps (:func:`~hf_vae_compress.data.split_transform`; the float tensor otherwise)."""
    split = split_transform(transform)
    if split is None:
        return as_tensors(dataset, transform)
    to_pixels, finish = split
    pixels, labels = as_tensors(dataset, to_pixels)
    return HeldImages(pixels, finish), labels


@torch.inference_mode()
def predict(model: torch.nn.Module, data, transform: Callable | None = None, batch_size: int = SCORING_BATCH,
            progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true labels over a dataset with ``image`` and ``label`` columns, or over
    ``(pixel_values, labels)`` already preprocessed (a tensor or :class:`HeldImages`, whose
    batches are made one at a time)."""
    model.eval()
    if isinstance(data, tuple):
        batches = ({"pixel_values": x, "labels": y} for x, y in zip(data[0].split(batch_size), data[1].split(batch_size)))
        total = math.ceil(len(data[1]) / batch_size)
    else:
        batches = torch.utils.data.DataLoader(with_transform(data, transform or image_transform(model)),
                                              batch_size=batch_size, collate_fn=collate)
        total = len(batches)
    preds, labels = [], []
    channels_last = True
    for batch in tqdm(batches, total=total, desc="evaluate", unit="batch", disable=not progress, leave=False):
        output, channels_last = _forward(model, batch["pixel_values"], channels_last)
        preds.append(logits_of(output).argmax(-1))
        labels.append(batch["labels"])
    return torch.cat(preds).numpy(), torch.cat(labels).numpy()


@torch.no_grad()
def batch_logits(model: torch.nn.Module, images, batch_size: int = SCORING_BATCH) -> torch.Tensor:
    """``model``'s float logits over ``images`` (a tensor or :class:`HeldImages`), computed as
    :func:`predict` computes them: the labels a model gives itself must be the predictions that
    scoring it again gives, to the bit."""
    model.eval()
    logits, channels_last = [], True
    for batch in images.split(batch_size):
        output, channels_last = _forward(model, batch, channels_last)
        logits.append(logits_of(output).float())
    return torch.cat(logits)


def _forward(model: torch.nn.Module, images: torch.Tensor, channels_last: bool):
    """``model(images)``, with a 4-D batch laid out channels-last while ``channels_last`` holds, and
    whether to keep doing so. Why: the same values in NHWC order run convolutions 1.5-2x faster on
    CPU (oneDNN), and scoring is most of an accuracy-checked compress. A model that views its input
    as contiguous (``x.view(n, -1)`` on the image) raises on that layout; it is scored as given,
    from then on."""
    if not channels_last or images.dim() != 4:
        return model(images), channels_last
    try:
        return model(images.contiguous(memory_format=torch.channels_last)), True
    except RuntimeError as error:
        logger.debug("scoring in the contiguous layout: the model refused channels-last input (%s)", error)
        return model(images), False


def evaluate(model: torch.nn.Module, data, transform: Callable | None = None, batch_size: int = SCORING_BATCH,
             progress: bool = True) -> dict:
    """Top-1 accuracy with its 95 % bootstrap interval, example and parameter counts.

    ``data`` is a `datasets.Dataset` (preprocessed with the model's own transform unless one is
    given) or a ``(pixel_values, labels)`` pair from :func:`as_tensors` or :func:`held_tensors`.
    """
    preds, labels = predict(model, data, transform, batch_size, progress)
    correct = (preds == labels).astype(np.float64)
    lo, hi = bootstrap_interval(correct)
    return {
        "top1": float(correct.mean()),
        "top1_ci95": [lo, hi],
        "num_examples": int(len(labels)),
        "num_params": int(sum(p.numel() for p in model.parameters())),
    }
