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
  model card names the task and prints its score;
* ``check`` and ``budget_share``: which kind of check the selection split gives (:data:`CHECKS`) and
  the share of the budget its drop may use.

Without labels the original model labels the data itself (:class:`Agreement`): a classifier's top-1
*agreement* with it bounds the accuracy drop on the same images (the drop is at most the
disagreement rate), and a detector's mAP against the original's own boxes plays the same role. The
images are the user's unlabelled ones (:func:`unlabelled_task`) or, with no data at all, made from
the model (:func:`synthetic_task`, :mod:`hf_vae_compress.synthetic`), where agreement is not accuracy
and a classifier whose images were inverted towards class mixtures is scored by *expected*
agreement (see :class:`Agreement`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data import (
    FASHION_MNIST, HOLDOUT_MAX, HOLDOUT_SEED, DatasetError, Selection, fit_labels, image_columns, image_mode,
    image_transform, load_image_dataset, load_image_processor, load_unlabelled_images, model_labels, selection,
)
from .detection import (
    FASHION_MNIST_SCENES, OWN_BOX_SCORE, UNSURE_SCORES, box_labels, detect, detection_collate, evaluate_detection,
    is_detection_model, load_detection_dataset, mean_average_precision, own_boxes, scenes_selection,
)
from .evaluate import SCORING_BATCH, Batches, HeldImages, batch_logits, evaluate, held_tensors, logits_of, predict
from .synthetic import (
    PRIOR_CLASS_INVERSION, SYNTHETIC_BUDGET_SHARE, SyntheticConfig, SyntheticImages, input_bounds, synthesize,
)

DEFAULT_DATASET = "default"  # the task's own data: Fashion-MNIST items, or scenes of them for a detector
CALIBRATION_SPLIT = "train"  # calibration and fine-tuning data: ``train`` less whatever the selection took from it
CALIBRATION_BATCH = 32
Prepared = tuple[HeldImages | torch.Tensor, torch.Tensor]  # a classifier's preprocessed images and labels

# Which check decided a rate (stats["validation"]["check"], the model card): the kinds, in words.
CHECK_LABELLED = "labelled accuracy"
CHECK_UNLABELLED = "agreement on the user's unlabelled images"
CHECK_SYNTHETIC = "agreement on synthetic images"
CHECK_NONE = "none"
CHECKS = (CHECK_LABELLED, CHECK_UNLABELLED, CHECK_SYNTHETIC, CHECK_NONE)


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
    check: ClassVar[str] = CHECK_LABELLED
    budget_share: ClassVar[float] = 1.0  # labelled accuracy may use the whole budget
    per_example_metric: ClassVar[bool] = True  # top-1 is a mean of per-example scores (per_example, subset)

    @staticmethod
    def describe(scores: dict) -> str:
        lo, hi = scores["top1_ci95"]
        return f"{100 * scores['top1']:.2f} % [{100 * lo:.1f}, {100 * hi:.1f}]"

    def load(self, split: str):
        return load_image_dataset(self.dataset, split, self.validation_split)

    def selection(self) -> Selection:
        """The split the accuracy check selects on, and how it was chosen."""
        return selection(self.dataset, self.validation_split, image_columns)

    def prepare(self, model: torch.nn.Module, dataset) -> Prepared:
        """The images, preprocessed once and held as 8-bit pixels where the model's preprocessing
        allows (:class:`~hf_vae_compress.evaluate.HeldImages`), and the labels in the model's order."""
        return held_tensors(fit_labels(model, dataset), image_transform(model))

    def per_example(self, model: torch.nn.Module, data) -> np.ndarray:
        """1 where the model is right on an example of ``prepare``'s tensors, else 0: what a paired
        comparison of two models on the same examples needs."""
        preds, labels = predict(model, data, progress=False)
        return (preds == labels).astype(np.float64)

    @staticmethod
    def subset(data: Prepared, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples ``index`` of ``prepare``'s tensors (as float images), for scoring part of a split."""
        return _take(data, index)

    @staticmethod
    def own_scores(data) -> None:
        """The base model's per-example scores when the data fixes them without scoring: never for labels."""
        return None

    def score(self, model: torch.nn.Module, data, batch_size: int = SCORING_BATCH, progress: bool = False) -> dict:
        if not isinstance(data, tuple):  # a dataset, not tensors from `prepare`
            data = fit_labels(model, data)
        return evaluate(model, data, batch_size=batch_size, progress=progress)

    def calibration(self, model: torch.nn.Module, num_batches: int, seed: int = 0) -> tuple[Batches, Callable]:
        """A seeded subset of the training split in ``num_batches`` batches, held as 8-bit pixels and
        made float as each batch is taken (:class:`~hf_vae_compress.evaluate.Batches`), and :meth:`fisher_loss`."""
        subset = _subset(fit_labels(model, self.load(CALIBRATION_SPLIT)), num_batches, seed)
        return Batches(held_tensors(subset, image_transform(model))[0], CALIBRATION_BATCH), self.fisher_loss()

    @staticmethod
    def fisher_loss() -> "SampledLabelLoss":
        """A fresh sampled-label loss (its label stream starts again: one per calibration pass)."""
        return SampledLabelLoss()

    def train_data(self, model: torch.nn.Module) -> Prepared:
        return self.prepare(model, self.load(CALIBRATION_SPLIT))

    def num_examples(self, data: Prepared) -> int:
        return len(data[1])

    def sample(self, data: Prepared, index: torch.Tensor) -> dict:
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
    check: ClassVar[str] = CHECK_LABELLED
    budget_share: ClassVar[float] = 1.0
    per_example_metric: ClassVar[bool] = False  # mAP is a whole-set metric

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

    @staticmethod
    def own_scores(data) -> None:
        """mAP has no per-example scores (see :meth:`per_example`)."""
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


def _take(data: tuple, index: torch.Tensor) -> tuple:
    """Rows ``index`` of every tensor of a ``prepare``d pair."""
    return tuple(part[index] for part in data)


def _subset(dataset, num_batches: int, seed: int):
    """A fixed random subset of ``num_batches`` calibration batches."""
    take = min(len(dataset), num_batches * CALIBRATION_BATCH)
    return dataset.shuffle(seed=seed).select(range(take))


@dataclass(frozen=True, eq=False)
class Agreement:
    """How closely a compressed model follows the original on images without labels: each image's
    label is the original's own prediction (a classifier's top-1 class; a detector's boxes scored at
    least ``OWN_BOX_SCORE``).

    The base model agrees with itself, so the drop is the compressed model's disagreement: for a
    classifier the top-1 drop on these images is at most that rate (a changed prediction can turn
    a right answer wrong, never two). ``check`` says whose images they are; ``budget_share`` how
    much of the budget the drop may use (less than all on synthetic images, which are not the
    images the model is used on). ``calibration_images`` and ``check_images`` are disjoint and
    already preprocessed for the model.

    With ``expected`` a classifier's example scores the original's probability of the class the
    compressed model predicts, and the original's own score is its top probability: the drop is
    the accuracy drop expected were the original's probabilities the truth (each changed prediction
    costs the original's probability margin between the two classes, not a whole point), never more
    than the disagreement rate. It is used only on images *placed* across the confidence range, the
    class-mixture inversion of a model without BatchNorm (:mod:`~hf_vae_compress.synthetic`): those
    near the boundary flip under almost any weight error, where a flip costs the expected accuracy
    almost nothing, so counting flips there rejects nearly every rate (fmnist-vit: 2 of 128 flipped
    at 4.8 bits/weight). Everywhere else 0/1 agreement stays the check: on the user's images it
    bounds the drop, and on BatchNorm-statistics images, which are not placed by confidence, it is
    the stricter of the two (there the expected drop let fmnist-resnet18 lose 0.82 pt of test top-1
    at 85x, where 0/1 agreement kept 0.07 pt at 34x: benchmarks/results/datafree.json).

    With ``unsure_scores`` ``(low, high)`` a detector's targets are its boxes scored at least
    ``high``, and those scored in ``[low, high)`` are don't care (COCO crowd regions:
    :data:`~hf_vae_compress.detection.UNSURE_SCORES`). Used on synthetic images, where the
    original's boxes are of middling confidence and which of them clear one threshold flips under any
    weight change; the user's images keep the single threshold ``OWN_BOX_SCORE``, whose check measured
    about twice the test drop on fmnist-rtdetr's validation scenes, where the band would have let a
    container 1.1 pt below on test pass (its drop there 0.5-0.75 pt, allowed 1.0).
    """

    base: Classification | Detection
    calibration_images: torch.Tensor
    check_images: torch.Tensor
    check: str
    description: str
    budget_share: float = 1.0
    synthetic: dict | None = None  # how synthetic images were made and what they cost (SyntheticImages.describe)
    expected: bool = False  # a classifier is scored by expected agreement, not 0/1 (see the docstring)
    unsure_scores: tuple[float, float] | None = None  # a detector's don't-care score band (see the docstring)
    validation_split: None = None  # the images are the selection: no split to name

    @property
    def detector(self) -> bool:
        return isinstance(self.base, Detection)

    @property
    def metric(self) -> str:
        return "map_vs_original" if self.detector else "expected_agreement" if self.expected else "agreement"

    @property
    def per_example_metric(self) -> bool:
        """A classifier's agreement is a mean of per-example scores; a detector's mAP is not."""
        return not self.detector

    @property
    def budget_pt(self) -> float:
        return self.base.budget_pt

    @property
    def dataset(self) -> str:
        return self.check

    def selection(self) -> Selection:
        return Selection(split="synthetic" if self.check == CHECK_SYNTHETIC else "unlabelled", report_split=None,
                         comparison_split=None, trained_on_risk=False, description=self.description)

    def load(self, split: str) -> torch.Tensor:
        return self.check_images

    def prepare(self, model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The images with ``model``'s own labels (it is handed the original): a detector's
        confident boxes, a classifier's top-1 class and, for expected agreement, its probabilities."""
        if self.detector:
            return images, own_boxes(detect(model, images), *(self.unsure_scores or (OWN_BOX_SCORE,)))
        probabilities = batch_logits(model, images).softmax(-1)
        labels = probabilities.argmax(-1)
        return (images, labels, probabilities) if self.expected else (images, labels)

    def per_example(self, model: torch.nn.Module, data) -> np.ndarray | None:
        """1 where ``model`` predicts the original's class, or with ``expected`` the original's
        probability of the class it predicts; None for a detector (mAP is whole-set)."""
        if self.detector:
            return None
        preds, labels = predict(model, data[:2], progress=False)
        if self.expected:
            return data[2][torch.arange(len(preds)), torch.as_tensor(preds)].double().numpy()
        return (preds == labels).astype(np.float64)

    @staticmethod
    def subset(data: tuple[torch.Tensor, object], index: torch.Tensor) -> tuple[torch.Tensor, object]:
        """The images ``index`` of ``prepare``'s classifier tensors, with their labels."""
        return _take(data, index)

    def own_scores(self, data) -> np.ndarray | None:
        """The original's per-example scores, known without scoring it again: a classifier's labels
        here *are* its predictions (``prepare``), so all ones, or with ``expected`` its top
        probabilities; None for a detector."""
        if self.detector:
            return None
        return data[2].max(-1).values.double().numpy() if self.expected else np.ones(self.num_examples(data))

    def score(self, model: torch.nn.Module, data, batch_size: int = SCORING_BATCH, progress: bool = False) -> dict:
        if self.detector:
            return {self.metric: mean_average_precision(detect(model, data[0]), data[1])["map"]}
        scores = evaluate(model, data[:2], batch_size=batch_size, progress=progress)
        expected = {self.metric: float(self.per_example(model, data).mean())} if self.expected else {}
        return {self.metric: scores["top1"], **scores, **expected}

    def num_examples(self, data) -> int:
        return len(data[0])

    def calibration(self, model: torch.nn.Module, num_batches: int, seed: int = 0) -> tuple[list, Callable]:
        """Every calibration image, in batches, and the Fisher loss without labels: labels sampled
        from a classifier's own predictions, or a detector's loss against its own boxes."""
        batches = list(self.calibration_images.split(CALIBRATION_BATCH))
        if not self.detector:
            return batches, self.base.fisher_loss()
        size = tuple(self.calibration_images.shape[-2:])
        return [{"pixel_values": b, "labels": box_labels(own_boxes(detect(model, b)), size)} for b in batches], \
            self.base.fisher_loss()

    def train_data(self, model: torch.nn.Module):
        raise ValueError(f"fine-tuning needs labelled data; the data here is {self.check}")


def _preprocess(model: torch.nn.Module, images: list, detector: bool) -> torch.Tensor:
    """PIL images as the model's inputs, by its own preprocessing."""
    if detector:
        mode = image_mode(model.config)
        return load_image_processor(model)(images=[im.convert(mode) for im in images],
                                           return_tensors="pt")["pixel_values"]
    transform = image_transform(model)
    return torch.stack([transform(im) for im in images])


def _num_classes(model: torch.nn.Module) -> int | None:
    """How many classes a classifier predicts (None for a detector)."""
    if is_detection_model(model):
        return None
    count = model_labels(model)[0]
    return int(count) if count else None


def synthetic_task(model: torch.nn.Module, config: SyntheticConfig, progress: bool = True) -> Agreement:
    """:class:`Agreement` on images made from ``model`` (:func:`~hf_vae_compress.synthetic.synthesize`),
    within what its preprocessing can produce: the preprocessed all-black and all-white images."""
    detector = is_detection_model(model)
    black, white = (_preprocess(model, [Image.new("RGB", (64, 64), (value,) * 3)], detector)[0] for value in (0, 255))
    call = (lambda m, x: m(pixel_values=x)) if detector else None
    images: SyntheticImages = synthesize(model, input_bounds(black, white), config, _num_classes(model), call,
                                         progress)
    base = Detection() if detector else Classification()
    expected = not detector and images.prior == PRIOR_CLASS_INVERSION  # images placed across the confidence range
    low, high = UNSURE_SCORES
    what = (f"COCO box mAP@[.5:.95] against the original's own boxes scored at least {high:.2f}, those it scores "
            f"in [{low:.2f}, {high:.2f}) don't care (as COCO crowd regions)") if detector else \
        ("expected top-1 agreement with the original (the accuracy drop expected were the original's probabilities "
         "the truth)") if expected else "top-1 agreement with the original"
    description = (f"{what[0].upper()}{what[1:]} on {len(images.check):,} synthetic images made from the model "
                   f"itself ({images.prior} prior, {config.steps} steps, seed {config.seed}; "
                   f"{len(images.calibration):,} others calibrated). Agreement on synthetic images is not accuracy: "
                   f"they are not the images the model is used on, so the drop there is held to "
                   f"{SYNTHETIC_BUDGET_SHARE:.0%} of the budget.")
    return Agreement(base, images.calibration, images.check, CHECK_SYNTHETIC, description, SYNTHETIC_BUDGET_SHARE,
                     images.describe(), expected=expected, unsure_scores=UNSURE_SCORES if detector else None)


def unlabelled_task(model: torch.nn.Module, dataset: str, calibration_batches: int, seed: int = HOLDOUT_SEED,
                    max_check: int = HOLDOUT_MAX) -> Agreement:
    """:class:`Agreement` on the user's unlabelled images: a seeded permutation gives the first
    ``calibration_batches`` batches (at most half the images) to calibration and up to ``max_check``
    of the rest to the check, so the check never scores an image that was calibrated on."""
    images = load_unlabelled_images(dataset)
    if len(images) < 2:
        raise DatasetError(f"the unlabelled dataset {dataset!r} holds {len(images)} image(s): at least two are needed, "
                           "one to calibrate on and one to check")
    order = np.random.default_rng(seed).permutation(len(images))
    take = min(calibration_batches * CALIBRATION_BATCH, len(images) // 2)
    detector = is_detection_model(model)
    calibration = _preprocess(model, [images[i] for i in order[:take]], detector)
    check = _preprocess(model, [images[i] for i in order[take:take + max_check]], detector)
    base = Detection(dataset) if detector else Classification(dataset)
    what = f"COCO box mAP@[.5:.95] against the original's own boxes (score >= {OWN_BOX_SCORE})" if detector else \
        "top-1 agreement with the original (the accuracy drop on these images is at most the disagreement rate)"
    description = (f"{what[0].upper()}{what[1:]} on {len(check):,} of the user's {len(images):,} unlabelled images "
                   f"in {dataset!r} (seed {seed}; {len(calibration):,} others calibrated). If the model trained on "
                   "these images, it may agree more on them than on new ones.")
    return Agreement(base, calibration, check, CHECK_UNLABELLED, description)


Task = Classification | Detection | Agreement


def task_for(model, dataset: str | None = None, validation_split: str | None = None) -> Task:
    """The task a model (or its config, or a ``config.json`` dict) was trained for, on ``dataset``
    (or that task's default dataset), selecting on ``validation_split`` (None: the automatic rule
    of :func:`~hf_vae_compress.data.dataset_split`)."""
    kind = Detection if is_detection_model(model) else Classification
    default = kind()
    return kind(dataset if dataset and dataset != DEFAULT_DATASET else default.dataset,
                validation_split=validation_split)
