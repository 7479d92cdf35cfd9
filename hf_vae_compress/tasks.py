"""What "accuracy" means for a model: its metric, its data, and the loss that ranks its weights.

The codec core is task-agnostic; the rate search, fine-tuning, the CLI, the Hub card and the
benchmarks get what depends on the task a model was trained for from here:

* ``selection()``, ``load(split)`` and ``prepare(model, dataset)``: which held-out split the
  accuracy check selects on (the dataset's ``validation`` split, a half of ``test``, or what the
  user names in ``validation_split``) and that data, preprocessed once so that many candidate
  weights can be scored on it;
* ``score(model, data)``: a dict whose ``metric`` entry (``top1`` or COCO ``map``) is the number
  budgets are written against;
* ``calibration(model, num_batches)``: training-split batches, and ``fisher_loss()``, the loss
  whose gradients measure each tensor's sensitivity (the codec core knows nothing of a model's
  outputs: the task says what its loss is);
* ``train_data``, ``sample``, ``model_inputs`` and ``finetune_loss``: what fine-tuning trains on;
* ``pipeline_tag``, ``auto_class``, ``metric_title``, ``metric_type`` and ``describe``: how the
  model card names the task and prints its score.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .data import (
    FASHION_MNIST, Selection, collate, fit_labels, image_columns, image_mode, image_transform, load_image_dataset,
    load_image_processor, selection, with_transform,
)
from .detection import (
    FASHION_MNIST_SCENES, detection_collate, evaluate_detection, is_detection_model, load_detection_dataset,
    scenes_selection,
)
from .evaluate import as_tensors, evaluate, logits_of, predict

DEFAULT_DATASET = "default"  # the task's own data: Fashion-MNIST items, or scenes of them for a detector
CALIBRATION_SPLIT = "train"  # calibration and fine-tuning data: ``train`` less whatever the selection took from it
CALIBRATION_BATCH = 32


@dataclass(frozen=True)
class Classification:
    """Top-1 accuracy of an image classifier."""

    dataset: str = FASHION_MNIST
    metric: str = "top1"
    budget_pt: float = 0.5  # the drop a "no meaningful loss" claim is held to
    validation_split: str | None = None  # the user's selection split or slice; None: the automatic rule
    # how the Hub names the task, its auto class and its metric (model card metadata)
    pipeline_tag: ClassVar[str] = "image-classification"
    auto_class: ClassVar[str] = "AutoModelForImageClassification"
    metric_title: ClassVar[str] = "Top-1 accuracy"
    metric_type: ClassVar[str] = "accuracy"

    @staticmethod
    def describe(scores: dict) -> str:
        lo, hi = scores["top1_ci95"]
        return f"{100 * scores['top1']:.2f} % [{100 * lo:.1f}, {100 * hi:.1f}]"

    def load(self, split: str):
        return load_image_dataset(self.dataset, split, self.validation_split)

    def selection(self) -> Selection:
        """The split the accuracy check selects on, and how it was chosen."""
        return selection(self.dataset, self.validation_split, image_columns)

    def prepare(self, model: torch.nn.Module, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        return as_tensors(fit_labels(model, dataset), image_transform(model))

    def per_example(self, model: torch.nn.Module, data) -> np.ndarray:
        """1 where the model is right on an example of ``prepare``'s tensors, else 0: what a paired
        comparison of two models on the same examples needs."""
        preds, labels = predict(model, data, progress=False)
        return (preds == labels).astype(np.float64)

    def score(self, model: torch.nn.Module, data, batch_size: int = 256, progress: bool = False) -> dict:
        if not isinstance(data, tuple):  # a dataset, not tensors from `prepare`
            data = fit_labels(model, data)
        return evaluate(model, data, batch_size=batch_size, progress=progress)

    def calibration(self, model: torch.nn.Module, num_batches: int, seed: int = 0) -> tuple[list, Callable]:
        subset = _subset(fit_labels(model, self.load(CALIBRATION_SPLIT)), num_batches, seed)
        loader = torch.utils.data.DataLoader(with_transform(subset, image_transform(model)),
                                             batch_size=CALIBRATION_BATCH, collate_fn=collate)
        return [batch["pixel_values"] for batch in itertools.islice(loader, num_batches)], self.fisher_loss()

    @staticmethod
    def fisher_loss() -> "SampledLabelLoss":
        """A fresh sampled-label loss (its label stream starts again: one per calibration pass)."""
        return SampledLabelLoss()

    def train_data(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prepare(model, self.load(CALIBRATION_SPLIT))

    def num_examples(self, data: tuple[torch.Tensor, torch.Tensor]) -> int:
        return len(data[1])

    def sample(self, data: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor) -> dict:
        return {"pixel_values": data[0][index], "labels": data[1][index]}

    def model_inputs(self, batch: dict) -> tuple[tuple, dict]:
        return (batch["pixel_values"],), {}  # timm models take the image positionally

    def finetune_loss(self, output, batch: dict, model: torch.nn.Module, distill_weight: float) -> torch.Tensor:
        """Cross-entropy on the labels + KL to the original model's logits."""
        with torch.no_grad():
            teacher = logits_of(model(batch["pixel_values"]))
        logits = logits_of(output)
        distill = F.kl_div(logits.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")
        return F.cross_entropy(logits, batch["labels"]) + distill_weight * distill


@dataclass(frozen=True)
class Detection:
    """COCO box mAP@[.5:.95] of a transformers object detector."""

    dataset: str = FASHION_MNIST_SCENES
    metric: str = "map"
    budget_pt: float = 1.0  # detectors are scored on a coarser metric; the detection issue's budget
    validation_split: str | None = None  # the user's selection split or slice; None: the automatic rule
    pipeline_tag: ClassVar[str] = "object-detection"
    auto_class: ClassVar[str] = "AutoModelForObjectDetection"
    metric_title: ClassVar[str] = "COCO box mAP@[.5:.95]"
    metric_type: ClassVar[str] = "mean_average_precision"

    @staticmethod
    def describe(scores: dict) -> str:
        return f"{100 * scores['map']:.2f} (mAP@0.5 {100 * scores['map_50']:.2f})"

    def load(self, split: str, num_scenes: int | None = None):
        return load_detection_dataset(self.dataset, split, num_scenes, self.validation_split)

    def selection(self) -> Selection:
        """The split the accuracy check selects on, and how it was chosen."""
        if self.dataset == FASHION_MNIST_SCENES:
            return scenes_selection(self.validation_split)
        return selection(self.dataset, self.validation_split)

    def prepare(self, model: torch.nn.Module, dataset):
        return dataset  # scenes are preprocessed per batch by the model's image processor

    def score(self, model: torch.nn.Module, data, batch_size: int = 64, progress: bool = False) -> dict:
        return evaluate_detection(model, data, batch_size=batch_size, progress=progress)

    def per_example(self, model: torch.nn.Module, data) -> None:
        """mAP is a whole-set metric: no per-example scores to pair."""
        return None

    def calibration(self, model: torch.nn.Module, num_batches: int, seed: int = 0) -> tuple[list, Callable]:
        """Labelled scenes and :meth:`fisher_loss`."""
        subset = _subset(self.load(CALIBRATION_SPLIT, num_batches * CALIBRATION_BATCH), num_batches, seed)
        collate_fn = detection_collate(load_image_processor(model), image_mode(model.config))
        rows = [subset[i] for i in range(len(subset))]
        return [collate_fn(rows[i: i + CALIBRATION_BATCH]) for i in range(0, len(rows), CALIBRATION_BATCH)], \
            self.fisher_loss()

    @staticmethod
    def fisher_loss() -> Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]]:
        """The detector's own loss (classification + box terms) on labelled scenes: the
        sampled-label Fisher has no box term, and box regression is where detectors are fragile."""
        return _detection_loss

    def train_data(self, model: torch.nn.Module) -> tuple[object, Callable]:
        """The training scenes and the collate that labels them for the detector's loss."""
        return self.load(CALIBRATION_SPLIT), detection_collate(load_image_processor(model), image_mode(model.config))

    def num_examples(self, data) -> int:
        """Scenes in ``train_data``'s ``(scenes, collate)`` or in ``prepare``'s dataset."""
        return len(data[0]) if isinstance(data, tuple) else len(data)

    def sample(self, data, index: torch.Tensor) -> dict:
        scenes, collate_fn = data
        return collate_fn([scenes[int(i)] for i in index])

    def model_inputs(self, batch: dict) -> tuple[tuple, dict]:
        return (), {"pixel_values": batch["pixel_values"], "labels": batch["labels"]}

    def finetune_loss(self, output, batch: dict, model: torch.nn.Module, distill_weight: float) -> torch.Tensor:
        """The detector's own loss against the labels (Hungarian-matched classes and boxes).

        Not distillation: RT-DETR-style detectors pick their queries from the encoder's scores, so
        the student's and the teacher's query ``i`` need not be the same object.
        """
        return output.loss


class SampledLabelLoss:
    """A classifier's Fisher loss without labels: cross-entropy (summed over the batch) against
    labels sampled from the model's own predictive distribution.

    The score of a sampled label has zero mean, so the square of a batch's summed gradient divided
    by the batch size is an unbiased estimate of the per-example squared gradient. The labels come
    from one seeded stream over the batches it is called on, in order.
    """

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, model: torch.nn.Module, batch) -> tuple[torch.Tensor, int]:
        logits = logits_of(model(**batch) if isinstance(batch, dict) else model(batch)).float()
        sampled = torch.multinomial(logits.detach().softmax(-1), 1, generator=self.generator).squeeze(1)
        return F.cross_entropy(logits, sampled, reduction="sum"), logits.shape[0]


def _detection_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    output = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
    return output.loss * len(batch["labels"]), len(batch["labels"])  # summed, as the Fisher estimate expects


def _subset(dataset, num_batches: int, seed: int):
    """A fixed random subset of ``num_batches`` calibration batches."""
    take = min(len(dataset), num_batches * CALIBRATION_BATCH)
    return dataset.shuffle(seed=seed).select(range(take))


Task = Classification | Detection


def task_for(model, dataset: str | None = None, validation_split: str | None = None) -> Task:
    """The task a model (or its config, or a ``config.json`` dict) was trained for, on ``dataset``
    (or that task's default dataset), selecting on ``validation_split`` (None: the automatic rule
    of :func:`~hf_vae_compress.data.dataset_split`)."""
    kind = Detection if is_detection_model(model) else Classification
    default = kind()
    return kind(dataset if dataset and dataset != DEFAULT_DATASET else default.dataset,
                validation_split=validation_split)
