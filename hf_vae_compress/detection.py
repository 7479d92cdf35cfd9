"""Object detection on Fashion-MNIST scenes: the dataset, the training collate and mAP evaluation.

A scene is a black canvas with 1 to ``max_items`` real Fashion-MNIST items pasted at random
scale and position, each with a COCO-style ``[x, y, w, h]`` box tight around its non-zero pixels.
Scenes of a split are built only from that split's items (``train``, ``validation`` and ``test``
never share an item, and the accuracy check selects on ``validation``: :func:`scenes_selection`),
and they are a pure function of the seed, so a detector's test mAP means the same on every machine. mAP is measured by torchmetrics (pycocotools underneath), never by
hand-written box matching.
"""

from __future__ import annotations

import io
import logging
import math
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import (
    FASHION_MNIST_CLASSES, SELECTION, SPLITS, DatasetError, Selection, dataset_split, fashion_mnist_arrays, image_mode,
    load_image_processor,
)

logger = logging.getLogger(__name__)

FASHION_MNIST_SCENES = "fashion_mnist_scenes"
ITEM_SIZE = 28
# Items of 22-56 px: the smallest still covers a few stride-8 cells, the largest fits 4 to a 128 scene.
ITEM_SCALES = (0.8, 2.0)
# The most of the smaller of two boxes the other may cover: every item stays recognisable.
MAX_OVERLAP = 0.2
PLACEMENT_TRIES = 20


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection of two ``[x, y, w, h]`` boxes over the area of the smaller one."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0) / min(a[2] * a[3], b[2] * b[3])


def _item_order(num_items: int, rng: np.random.Generator) -> Iterator[int]:
    """Item indices in random order, each used once before any is reused."""
    while True:
        yield from rng.permutation(num_items).tolist()


def _render_scene(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, order: Iterator[int],
                  image_size: int, max_items: int) -> tuple[np.ndarray, list[list[int]], list[int]]:
    """One canvas with its tight boxes and classes; an item that finds no free spot is left out."""
    from PIL import Image

    canvas = np.zeros((image_size, image_size), dtype=np.uint8)
    boxes: list[np.ndarray] = []
    categories: list[int] = []
    for _ in range(int(rng.integers(1, max_items + 1))):
        index = next(order)
        size = round(ITEM_SIZE * rng.uniform(*ITEM_SCALES))
        patch = np.asarray(Image.fromarray(images[index]).resize((size, size), Image.Resampling.BILINEAR))
        ys, xs = np.nonzero(patch)
        if len(ys) == 0:
            continue
        for _ in range(PLACEMENT_TRIES):
            x0, y0 = rng.integers(0, image_size - size + 1, size=2)
            box = np.array([x0 + xs.min(), y0 + ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1])
            if all(_overlap(box, other) <= MAX_OVERLAP for other in boxes):
                region = canvas[y0:y0 + size, x0:x0 + size]
                np.maximum(region, patch, out=region)  # overlapping items blend, so no box loses its pixels
                boxes.append(box)
                categories.append(int(labels[index]))
                break
    return canvas, [b.tolist() for b in boxes], categories


def default_num_scenes(split: str, max_items: int = 4) -> int:
    """Scenes that use each of the split's items about once: 22k train, 2k validation, 4k test.

    More would only repeat items at new positions (a training run can ask for that); fewer would
    leave test items unused and widen the sampling noise of mAP.
    """
    return _scenes_using_each_item_once(len(fashion_mnist_arrays(split)[1]), max_items)


def _scenes_using_each_item_once(num_items: int, max_items: int) -> int:
    return round(num_items / ((1 + max_items) / 2))  # scenes hold (1 + max_items) / 2 items on average


def scene_features():
    """The columns of the Hub's COCO-style detection datasets, with the classes as a ClassLabel."""
    import datasets

    return datasets.Features({
        "image": datasets.Image(),
        "image_id": datasets.Value("int64"),
        "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
        "objects": {
            "id": datasets.List(datasets.Value("int64")),
            "area": datasets.List(datasets.Value("float32")),
            "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
            "category": datasets.List(datasets.ClassLabel(names=FASHION_MNIST_CLASSES)),
        },
    })


def load_fashion_mnist_scenes(split: str = "test", num_scenes: int | None = None, image_size: int = 128,
                              max_items: int = 4, seed: int = 0):
    """Detection scenes built from one Fashion-MNIST split, as a `datasets.Dataset`.

    The same arguments give byte-identical scenes; the split is mixed into the seed so the splits'
    layouts differ too. ``num_scenes`` defaults to :func:`default_num_scenes`.
    """
    import datasets
    from PIL import Image

    if image_size < math.ceil(ITEM_SIZE * ITEM_SCALES[1]):
        raise ValueError(f"image_size {image_size} is smaller than the largest item")
    images, labels = fashion_mnist_arrays(split)
    if num_scenes is None:
        num_scenes = _scenes_using_each_item_once(len(labels), max_items)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    order = _item_order(len(labels), rng)
    rows: dict[str, list] = {"image": [], "image_id": [], "width": [], "height": [], "objects": []}
    next_id = 0
    for image_id in range(num_scenes):
        canvas, boxes, categories = _render_scene(rng, images, labels, order, image_size, max_items)
        png = io.BytesIO()
        Image.fromarray(canvas).save(png, format="PNG")
        rows["image"].append({"bytes": png.getvalue(), "path": None})
        rows["image_id"].append(image_id)
        rows["width"].append(image_size)
        rows["height"].append(image_size)
        rows["objects"].append({"id": list(range(next_id, next_id + len(boxes))), "bbox": boxes,
                                "area": [float(w * h) for _, _, w, h in boxes], "category": categories})
        next_id += len(boxes)
    logger.info("built %d %s scenes with %d items", num_scenes, split, next_id)
    return datasets.Dataset.from_dict(rows, features=scene_features())


def load_detection_dataset(name: str, split: str = "test", num_scenes: int | None = None,
                           validation_split: str | None = None):
    """``fashion_mnist_scenes`` (``num_scenes`` of them: default, every item once), or any COCO-style
    dataset by name (see :func:`~hf_vae_compress.data.dataset_split`, which also says what
    ``validation`` means and how ``validation_split`` changes it)."""
    if name == FASHION_MNIST_SCENES:
        return load_fashion_mnist_scenes(scenes_selection(validation_split).split if split == SELECTION else split,
                                         num_scenes)
    dataset = dataset_split(name, split, validation_split=validation_split)
    return dataset.select(range(min(num_scenes, len(dataset)))) if num_scenes else dataset


def scenes_selection(validation_split: str | None = None) -> Selection:
    """What the accuracy check selects on for ``fashion_mnist_scenes``: its ``validation`` scenes,
    built from Fashion-MNIST's held-out validation items, or the whole split the user names.

    Scenes are rendered per split, so only whole splits can be named (no slices). mAP is a
    whole-set metric with no per-example scores, so there is no comparison split.
    """
    split = validation_split or SELECTION
    if split not in SPLITS:
        raise DatasetError(f"{FASHION_MNIST_SCENES} builds scenes per split; name one of {list(SPLITS)}, "
                           f"not {split!r}")
    trained = split == "train"
    return Selection(
        split=split, report_split="test" if split != "test" else None, comparison_split=None, trained_on_risk=trained,
        description=f"Selected on {FASHION_MNIST_SCENES}' {split!r} scenes, built from Fashion-MNIST's {split} items only."
                    + (" The model may have trained on these items." if trained else ""))


def is_detection_model(model_or_config) -> bool:
    """Whether a model, its config or a ``config.json`` dict names an ``...ForObjectDetection`` class."""
    config = getattr(model_or_config, "config", model_or_config)
    names = config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)
    if isinstance(model_or_config, torch.nn.Module):
        names = [type(model_or_config).__name__, *(names or [])]
    return any(name.endswith("ForObjectDetection") for name in names or [])


def coco_annotation(row: dict) -> dict:
    """One dataset row's objects in the COCO form the transformers image processors take."""
    objects = row["objects"]
    return {"image_id": row["image_id"], "annotations": [
        {"bbox": bbox, "category_id": category, "area": area, "iscrowd": 0}
        for bbox, category, area in zip(objects["bbox"], objects["category"], objects["area"])
    ]}


def detection_collate(image_processor, mode: str = "L") -> Callable[[list[dict]], dict]:
    """A DataLoader collate: ``pixel_values`` plus ``labels``, one dict per image.

    The image processor resizes the images and turns the boxes into the normalised
    ``(cx, cy, w, h)`` that the transformers detection losses match against, so training and
    evaluation cannot disagree about the box convention.
    """

    def collate(rows: list[dict]) -> dict:
        encoded = image_processor(images=[row["image"].convert(mode) for row in rows],
                                  annotations=[coco_annotation(row) for row in rows], return_tensors="pt")
        labels = [dict(label) for label in encoded.pop("labels")]
        return {**encoded, "labels": labels}

    return collate


def _target(objects: dict) -> dict[str, torch.Tensor]:
    """COCO ``objects`` as a torchmetrics target; an ``iscrowd`` list (1: don't care) is kept."""
    boxes = torch.tensor(objects["bbox"], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]  # COCO xywh -> xyxy, the post-processor's format
    target = {"boxes": boxes, "labels": torch.tensor(objects["category"], dtype=torch.long)}
    if "iscrowd" in objects:
        target["iscrowd"] = torch.tensor(objects["iscrowd"], dtype=torch.long)
    return target


def mean_average_precision(predictions: list[dict], objects: list[dict]) -> dict[str, float]:
    """COCO box mAP of ``{"boxes" (xyxy pixels), "scores", "labels"}`` predictions against rows' ``objects``
    (an ``iscrowd`` list in them marks don't-care boxes, as :func:`own_boxes` writes)."""
    from torchmetrics.detection import MeanAveragePrecision

    # The rows given are this process's whole job: no gathering from other ranks, which may be training.
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", sync_on_compute=False)
    metric.update(predictions, [_target(o) for o in objects])
    scores = metric.compute()
    return {key: float(scores[key]) for key in ("map", "map_50", "map_75", "mar_100")}


@torch.inference_mode()
def evaluate_detection(model: torch.nn.Module, dataset, image_processor=None, batch_size: int = 64,
                       progress: bool = True) -> dict:
    """COCO mAP (box IoU) of a transformers detector on a COCO-style `datasets.Dataset`.

    Every detection the post-processor returns is scored (threshold 0): mAP integrates over the
    score ranking itself, and a threshold would only cut the recall axis short.
    """
    processor = image_processor or load_image_processor(model)
    mode = image_mode(model.config)
    device = next(model.parameters()).device  # the recipe scores a model it is training on GPU
    model.eval()
    predictions, objects = [], []
    batches = dataset.iter(batch_size=batch_size)
    for batch in tqdm(batches, desc="evaluate", unit="batch", total=math.ceil(len(dataset) / batch_size),
                      disable=not progress, leave=False):
        images = [image.convert(mode) for image in batch["image"]]
        outputs = model(**processor(images=images, return_tensors="pt").to(device))
        detections = processor.post_process_object_detection(
            outputs, threshold=0.0, target_sizes=[(image.height, image.width) for image in images])
        predictions += [{key: value.cpu() for key, value in found.items()} for found in detections]
        objects += batch["objects"]
    return {
        **mean_average_precision(predictions, objects),
        "num_examples": len(dataset),
        "num_params": int(sum(p.numel() for p in model.parameters())),
    }


# A detection the model itself is more likely right than wrong about: what "the original's own
# boxes" are when there are no labels (targets of the agreement mAP and of the label-free Fisher).
OWN_BOX_SCORE = 0.5
# On synthetic images the original's boxes are its sure ones (score >= 2/3) and those it is unsure of,
# the middle third of the score range, are "don't care" (COCO crowd regions: a prediction matched to
# one is neither a true nor a false positive, and missing one costs nothing). Why: on images made from
# BatchNorm statistics a detector's boxes are of middling confidence (fmnist-rtdetr: none of 128 images
# has a box at 0.9, half of those at 0.5 or more lie below 0.6), and which of them clear 0.5 flips
# under any weight change: weights + 0.1 % of their std (test mAP -0.04 pt) cost 0.4-0.6 pt of mAP
# against boxes thresholded at 0.5, as much as the allowed drop; against the sure boxes (125, on 82 of
# the 128 images) 0.00, while weights + 3 % of their std (test mAP -1.05 / -1.24 pt) cost 11 / 29 pt.
# Thirds were chosen a priori (sure / unsure / sure-not), not measured on any model; datafree.json
# records what they gave. With so few sure boxes the check is still coarse: + 1 % (test -0.01 pt) cost
# 3 pt on one of two draws.
UNSURE_SCORES = (1 / 3, 2 / 3)


@torch.inference_mode()
def detect(model: torch.nn.Module, pixel_values: torch.Tensor, image_processor=None, threshold: float = 0.0,
           batch_size: int = 64) -> list[dict]:
    """The post-processed detections (``boxes`` xyxy in the input's pixels, ``scores``, ``labels``)
    of a detector on images already preprocessed into ``pixel_values``."""
    processor = image_processor or load_image_processor(model)
    model.eval()
    size = tuple(pixel_values.shape[-2:])
    found = []
    for batch in pixel_values.split(batch_size):
        outputs = model(pixel_values=batch)
        detections = processor.post_process_object_detection(outputs, threshold=threshold,
                                                              target_sizes=[size] * len(batch))
        found += [{key: value.cpu() for key, value in d.items()} for d in detections]
    return found


def own_boxes(detections: list[dict], min_score: float = OWN_BOX_SCORE, sure_score: float | None = None) -> list[dict]:
    """A detector's detections scored at least ``min_score`` as dataset ``objects`` (COCO
    ``[x, y, w, h]`` and category): the targets against which another model's agreement with it is scored.

    With ``sure_score`` the objects also carry ``iscrowd``: 1 (don't care) on boxes scored below
    it, and where no image has a box scored at least ``sure_score`` every image's objects are empty
    (nothing to agree on: a mAP over don't-care regions alone is undefined).
    """
    objects = []
    for d in detections:
        keep = d["scores"] >= min_score
        boxes = d["boxes"][keep].float()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
        objects.append({"bbox": xywh.tolist(), "category": d["labels"][keep].tolist()})
        if sure_score is not None:
            objects[-1]["iscrowd"] = (d["scores"][keep] < sure_score).long().tolist()
    if sure_score is not None and not any(0 in o["iscrowd"] for o in objects):
        return [{"bbox": [], "category": [], "iscrowd": []} for _ in objects]
    return objects


def box_labels(objects: list[dict], size: tuple[int, int]) -> list[dict]:
    """``objects`` as the labels transformers' detection losses take: class ids and normalised
    ``(cx, cy, w, h)`` boxes in an image of ``size`` (height, width)."""
    height, width = size
    labels = []
    for o in objects:
        xywh = torch.tensor(o["bbox"], dtype=torch.float32).reshape(-1, 4)
        cxcywh = torch.cat([xywh[:, :2] + xywh[:, 2:] / 2, xywh[:, 2:]], 1) / torch.tensor([width, height] * 2)
        labels.append({"class_labels": torch.tensor(o["category"], dtype=torch.long), "boxes": cxcywh})
    return labels
