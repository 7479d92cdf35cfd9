import json

import datasets
import numpy as np
import pytest
import torch

from hf_vae_compress import VAECompressionConfig, compress, detection
from hf_vae_compress.cli import main
from hf_vae_compress.data import FASHION_MNIST_CLASSES
from hf_vae_compress.detection import (
    detection_collate, evaluate_detection, is_detection_model, load_detection_dataset, load_fashion_mnist_scenes,
    mean_average_precision,
)
from hf_vae_compress.models import load_model, read_config
from hf_vae_compress.pipeline import Source
from hf_vae_compress.tasks import task_for

SIZE = 128


def tiny_detector(seed: int = 0) -> torch.nn.Module:
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig

    torch.manual_seed(seed)
    backbone = RTDetrResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1],
                                  layer_type="basic", out_indices=[2, 3, 4])
    config = RTDetrConfig(
        backbone_config=backbone, freeze_backbone_batch_norms=False, encoder_in_channels=[8, 16, 16],
        encoder_hidden_dim=16, hidden_expansion=0.5, encoder_ffn_dim=32, encoder_attention_heads=2, d_model=32,
        decoder_in_channels=[16, 16, 16], decoder_ffn_dim=32, decoder_attention_heads=2, decoder_layers=1,
        num_queries=10, num_denoising=4, num_labels=10, id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
    )
    return RTDetrForObjectDetection(config).eval()


def processor():
    from transformers import RTDetrImageProcessor

    return RTDetrImageProcessor(size={"height": SIZE, "width": SIZE})


@pytest.fixture(scope="module")
def scenes():
    return load_fashion_mnist_scenes("test", num_scenes=16)


@pytest.fixture(scope="module")
def detector_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-rtdetr")
    tiny_detector().save_pretrained(folder)
    processor().save_pretrained(folder)
    return folder


def test_scenes_have_tight_boxes_inside_the_image(scenes):
    ids = [i for objects in scenes["objects"] for i in objects["id"]]
    assert len(ids) == len(set(ids))
    for row in scenes:
        pixels = np.asarray(row["image"])
        assert pixels.shape == (SIZE, SIZE) and row["width"] == row["height"] == SIZE
        objects = row["objects"]
        assert 1 <= len(objects["bbox"]) <= 4
        assert all(0 <= c < len(FASHION_MNIST_CLASSES) for c in objects["category"])
        covered = np.zeros(pixels.shape, dtype=bool)
        for (x, y, w, h), area in zip(objects["bbox"], objects["area"]):
            x, y, w, h = int(x), int(y), int(w), int(h)
            assert x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE and area == w * h
            lit = pixels[y:y + h, x:x + w] > 0
            assert lit[0].any() and lit[-1].any() and lit[:, 0].any() and lit[:, -1].any()  # no empty border
            covered[y:y + h, x:x + w] = True
        assert not (pixels[~covered] > 0).any()  # and no lit pixel outside every box


def test_scenes_regenerate_byte_identical_from_the_seed():
    first = load_fashion_mnist_scenes("validation", num_scenes=20, seed=3)
    again = load_fashion_mnist_scenes("validation", num_scenes=20, seed=3)
    other = load_fashion_mnist_scenes("validation", num_scenes=20, seed=4)
    assert first.data.table.equals(again.data.table)
    assert not first.data.table.equals(other.data.table)


def test_scenes_use_only_their_own_splits_items(monkeypatch):
    sources = {"train": (50, [0, 1, 2]), "validation": (100, [3, 4]), "test": (200, [5, 6, 7])}

    def fake_arrays(split):
        value, labels = sources[split]
        images = np.zeros((10 * len(labels), 28, 28), dtype=np.uint8)
        images[:, 4:24, 4:24] = value
        return images, np.repeat(labels, 10).astype(np.uint8)

    monkeypatch.setattr(detection, "fashion_mnist_arrays", fake_arrays)
    for split, (value, labels) in sources.items():
        scenes = load_fashion_mnist_scenes(split, num_scenes=10)
        assert {c for objects in scenes["objects"] for c in objects["category"]} <= set(labels)
        assert max(int(np.asarray(image).max()) for image in scenes["image"]) == value


def test_default_scene_counts_use_each_item_about_once():
    assert [detection.default_num_scenes(split) for split in ("train", "validation", "test")] == [22000, 2000, 4000]


def _shifted(objects: dict, shift: float, label_offset: int = 0) -> dict:
    boxes = torch.tensor(objects["bbox"])
    boxes[:, 0] += shift * boxes[:, 2]
    boxes[:, 2:] += boxes[:, :2]
    labels = (torch.tensor(objects["category"]) + label_offset) % len(FASHION_MNIST_CLASSES)
    return {"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": labels}


def test_map_is_one_on_ground_truth_and_lower_on_shifted_boxes(scenes):
    objects = scenes["objects"]
    exact = mean_average_precision([_shifted(o, 0.0) for o in objects], objects)
    assert exact["map"] == exact["map_50"] == exact["map_75"] == pytest.approx(1.0)
    # Shifted by 30 % of their width the boxes keep IoU 0.7 / 1.3 = 0.54: they count at IoU 0.50 only,
    # one of the ten thresholds that `map` averages.
    shifted = mean_average_precision([_shifted(o, 0.3) for o in objects], objects)
    assert shifted["map_50"] == pytest.approx(1.0) and shifted["map_75"] == 0.0
    assert shifted["map"] == pytest.approx(0.1)
    wrong_class = mean_average_precision([_shifted(o, 0.0, label_offset=1) for o in objects], objects)
    assert wrong_class["map"] == 0.0


def _detections(scores: list[float], boxes: list[list[float]] | None = None) -> dict:
    """One image's detections of class 1, xyxy, at the given scores."""
    boxes = boxes or [[10, 10, 40, 40], [60, 60, 90, 90], [20, 70, 50, 100], [80, 10, 110, 40]]
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores),
            "labels": torch.ones(len(scores), dtype=torch.long)}


def test_boxes_the_original_is_unsure_of_are_dont_care_and_a_lost_sure_box_still_counts():
    """A sure box (0.9), two unsure ones either side of 0.5 and a rejected one (0.2). A weight change
    that only swaps the unsure boxes across 0.5 costs mAP against the boxes thresholded at 0.5, not
    against the sure boxes with the unsure ones don't care; losing the sure box costs both."""
    original = [_detections([0.9, 0.55, 0.45, 0.2])]
    swapped = [_detections([0.88, 0.45, 0.55, 0.2])]
    lost = [_detections([0.88, 0.45, 0.55, 0.2], [[70, 10, 100, 40], [60, 60, 90, 90], [20, 70, 50, 100],
                                                    [80, 10, 110, 40]])]
    thresholded = detection.own_boxes(original)
    banded = detection.own_boxes(original, *detection.UNSURE_SCORES)
    assert banded[0]["category"] == [1, 1, 1] and banded[0]["iscrowd"] == [0, 1, 1]
    assert mean_average_precision(original, thresholded)["map"] == mean_average_precision(original, banded)["map"] == 1
    assert mean_average_precision(swapped, thresholded)["map"] < 0.9  # a false positive ranked above a match
    assert mean_average_precision(swapped, banded)["map"] == pytest.approx(1.0)
    assert mean_average_precision(lost, banded)["map"] == 0.0


def test_without_a_sure_box_there_is_nothing_to_agree_on():
    unsure = [_detections([0.6, 0.55, 0.45, 0.2]), _detections([0.5, 0.4, 0.3, 0.1])]
    assert detection.own_boxes(unsure, *detection.UNSURE_SCORES) == [{"bbox": [], "category": [], "iscrowd": []}] * 2
    assert [len(o["category"]) for o in detection.own_boxes(unsure)] == [2, 1]


def test_collate_gives_normalised_cxcywh_labels_the_loss_takes(scenes):
    rows = [scenes[i] for i in range(4)]
    batch = detection_collate(processor(), mode="L")(rows)
    assert batch["pixel_values"].shape == (4, 1, SIZE, SIZE)
    x, y, w, h = rows[0]["objects"]["bbox"][0]
    expected = torch.tensor([x + w / 2, y + h / 2, w, h]) / SIZE
    assert torch.allclose(batch["labels"][0]["boxes"][0], expected)
    assert batch["labels"][0]["class_labels"].tolist() == rows[0]["objects"]["category"]
    loss = tiny_detector().train()(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_evaluate_detection_on_a_random_detector(scenes):
    model = tiny_detector()
    result = evaluate_detection(model, scenes, processor(), batch_size=8, progress=False)
    assert {"map", "map_50", "map_75", "num_examples", "num_params"} <= result.keys()
    assert 0.0 <= result["map"] <= result["map_50"] <= 1.0
    assert result["num_examples"] == 16
    assert result["num_params"] == sum(p.numel() for p in model.parameters())


def test_detectors_are_told_from_classifiers(detector_folder, vit_folder):
    from transformers import AutoModelForObjectDetection

    model = AutoModelForObjectDetection.from_pretrained(detector_folder)
    assert is_detection_model(model) and is_detection_model(read_config(detector_folder))
    assert is_detection_model(tiny_detector())  # built from a config: no `architectures` yet
    assert not is_detection_model(load_model(vit_folder)) and not is_detection_model(read_config(vit_folder))


def test_cli_evaluate_prints_map_for_a_detector(capsys, tmp_path, detector_folder, scenes):
    scenes.save_to_disk(str(tmp_path / "scenes"))
    assert main(["evaluate", str(detector_folder), "--dataset", str(tmp_path / "scenes"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"map", "map_50", "num_params", "weights_bytes", "load_seconds"} <= result.keys()
    assert result["num_examples"] == 16 and result["dataset"] == str(tmp_path / "scenes")


def test_detector_calibration_uses_its_own_loss_with_the_box_terms(tmp_path, scenes):
    from hf_vae_compress.codec.importance import fisher_diagonal
    from hf_vae_compress.tasks import Detection

    scenes.save_to_disk(str(tmp_path / "scenes"))
    model = tiny_detector()
    model.name_or_path = str(tmp_path / "proc")
    processor().save_pretrained(tmp_path / "proc")
    batches, loss_fn = Detection(str(tmp_path / "scenes")).calibration(model, num_batches=1)
    held_out = len(load_detection_dataset(str(tmp_path / "scenes"), "validation"))
    assert 0 < held_out < 16  # one dataset, no splits: validation is held out of it, and calibration never sees it
    assert len(batches) == 1 and len(batches[0]["labels"]) == 16 - held_out
    fisher = fisher_diagonal(model, batches, 1, loss_fn, progress=False)
    box_head = [f for name, f in fisher.items() if "bbox_embed" in name]
    assert box_head and sum(f.sum() for f in box_head) > 0  # box regression weights get a sensitivity


def test_cli_compresses_a_detector_and_evaluates_the_container(capsys, tmp_path, detector_folder, scenes):
    data = str(tmp_path / "scenes")
    scenes.save_to_disk(data)
    out = tmp_path / "compressed"
    assert main(["compress", str(detector_folder), str(out), "--dataset", data, "--transform", "identity",
                 "--target-bpw", "2", "--calibration-batches", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parts"]["bitstreams"] > 0 and report["bits_per_weight"] < 16  # tiny: mostly raw fp16 tensors
    # the boxes' labels sit inside `objects`: a labelled dataset, checked by mAP against them, not by agreement
    assert report["check"] == "labelled accuracy" and report["validation"]["metric"] == "map"
    assert main(["evaluate", str(out), "--dataset", data, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["weights_bytes"] == report["total_bytes"] and result["num_examples"] == 16
    assert 0.0 <= result["map"] <= result["map_50"] <= 1.0


def test_finetuning_a_detector_lowers_its_own_loss(tmp_path, scenes):
    from hf_vae_compress.finetune import FinetuneConfig, finetune
    from hf_vae_compress.tasks import Detection

    scenes.save_to_disk(str(tmp_path / "scenes"))
    processor().save_pretrained(tmp_path / "proc")
    model = tiny_detector()
    model.name_or_path = str(tmp_path / "proc")
    task = Detection(str(tmp_path / "scenes"))
    data = task.train_data(model)
    compressed = compress(model, VAECompressionConfig(target_bits_per_weight=4, transform="identity"), progress=False)

    def loss(c) -> float:
        student = tiny_detector()
        student.load_state_dict(c.decode())
        with torch.no_grad():
            return float(student.eval()(**task.sample(data, torch.arange(task.num_examples(data)))).loss)

    tuned = finetune(compressed, model, data, FinetuneConfig(steps=30, batch_size=8, rate_weight=0.0),
                     progress=False, task=task)
    assert loss(tuned) < loss(compressed)


def test_a_compressed_detector_saves_with_a_detection_card_and_loads_with_transformers(tmp_path, detector_folder,
                                                                                        scenes):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForObjectDetection

    from hf_vae_compress import CompressedModel
    from hf_vae_compress.hub import CardInfo, save_pretrained
    from hf_vae_compress.pipeline import load_compressed

    data = str(tmp_path / "scenes")
    scenes.save_to_disk(data)
    compressed = compress(load_model(detector_folder), VAECompressionConfig(target_bits_per_weight=4), progress=False)
    out = save_pretrained(compressed, detector_folder, tmp_path / "repo", CardInfo(dataset=data))
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForObjectDetection": "modeling_hf_vae_compress.HfVaeCompressForObjectDetection"}
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "object-detection" and "object-detection" in card.data.tags
    result = card.data.eval_results[0]
    assert result.metric_type == "mean_average_precision" and 0.0 <= result.metric_value <= 1.0
    assert "AutoModelForObjectDetection.from_pretrained" in card.text and "mAP@0.5" in card.text

    reference = load_compressed(out).state_dict()
    written = CompressedModel.load(out).header  # sealed on writing: one more field, the stored bytes' hash
    assert {k: written[k] for k in compressed.header} == compressed.header and len(written) == len(compressed.header) + 1
    for kwargs in ({}, {"trust_remote_code": True}):
        model = AutoModelForObjectDetection.from_pretrained(out, **kwargs)
        state = model.state_dict()
        assert type(model).__name__ == "RTDetrForObjectDetection"
        assert all(torch.equal(state[k], v) for k, v in reference.items())


def test_the_detector_keeps_selecting_on_its_held_out_validation_scenes():
    """fashion_mnist_scenes: validation scenes (from items no training scene uses) unless a whole
    split is named; scenes are rendered per split, so a slice is refused by name."""
    from hf_vae_compress.data import DatasetError
    from hf_vae_compress.tasks import Detection

    chosen = Detection().selection()
    assert (chosen.split, chosen.report_split, chosen.trained_on_risk) == ("validation", "test", False)
    named = Detection(validation_split="train").selection()
    assert named.split == "train" and named.trained_on_risk and "may have trained" in named.description
    first = load_detection_dataset(detection.FASHION_MNIST_SCENES, "validation", 3, validation_split="test")
    assert first["image"] == load_fashion_mnist_scenes("test", num_scenes=3)["image"]
    with pytest.raises(DatasetError, match=r"builds scenes per split.*'test\[:10%\]'"):
        Detection(validation_split="test[:10%]").selection()


def test_the_detectors_accuracy_check_counts_its_validation_scenes(tmp_path, detector_folder):
    """``validation.examples`` is the number of scenes scored (7), not of a scene's columns (5)."""
    data = str(tmp_path / "scenes")
    datasets.DatasetDict(train=load_fashion_mnist_scenes("train", num_scenes=4),
                         validation=load_fashion_mnist_scenes("validation", num_scenes=7)).save_to_disk(data)
    model = load_model(detector_folder)
    src = Source(detector_folder, model, task_for(model, data))
    compressed = compress(model, VAECompressionConfig(target_bits_per_weight=4, transform="identity"), progress=False)
    validation = src.validation_drop(compressed)
    assert validation["metric"] == "map" and validation["split"] == "validation"
    assert validation["examples"] == validation["memorisation"]["examples"] == 7
    assert len(load_detection_dataset(data, "validation").column_names) == 5  # what the count once was
