"""The accuracy check selects only on data the model did not train on.

The setting of issue 21: a dataset with only ``train`` and ``test``, and a model trained on all of
``train`` until it memorised it. Selecting on a hold-out of ``train`` then measures nothing (the
base and every compressed copy score 100 %), so the check must select on half of ``test``, leave
the other half to report on, and say so; where it is told to select on training data it must
detect the memorisation and refuse to call the result an accuracy check.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from hf_vae_compress import data
from hf_vae_compress.codec import CompressedModel, VAECompressionConfig
from hf_vae_compress.evaluate import as_tensors
from hf_vae_compress.models import save_timm
from hf_vae_compress.pipeline import MEMORISATION_Z, Source, UncheckedAccuracyError, memorisation_check
from hf_vae_compress.search import search_smallest
from hf_vae_compress.tasks import Classification
from tests.conftest import tiny_timm

FAST = VAECompressionConfig(transform="identity", calibration_batches=1)
TRAIN, TEST = 200, 300


def _images(dataset) -> list[bytes]:
    return [np.asarray(image).tobytes() for image in dataset["image"]]


@pytest.fixture(scope="module")
def train_test(tmp_path_factory):
    """A `save_to_disk` DatasetDict with only `train` and `test`, and one with only `train`."""
    import datasets

    train = data.load_fashion_mnist("train").select(range(TRAIN))
    test = data.load_fashion_mnist("test").select(range(TEST))
    root = tmp_path_factory.mktemp("selection")
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(root / "train-test"))
    datasets.DatasetDict(train=train).save_to_disk(str(root / "train-only"))
    return root / "train-test", root / "train-only"


@pytest.fixture(scope="module")
def memorised(train_test, tmp_path_factory):
    """A tiny timm model trained on every example of `train` until it gets all of them right."""
    model = tiny_timm().train()
    x, y = as_tensors(data.load_fashion_mnist("train").select(range(TRAIN)), data.image_transform(model))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    for step in range(400):
        batch = torch.randperm(TRAIN, generator=generator)[:50]
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 9:
            with torch.no_grad():
                if (model.eval()(x).argmax(-1) == y).all():
                    break
            model.train()
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(-1) == y).all(), "the fixture model did not memorise its training split"
    folder = tmp_path_factory.mktemp("memorised")
    save_timm(model, folder)
    return folder


def test_test_is_split_into_disjoint_stratified_deterministic_halves(train_test):
    name = str(train_test[0])
    selection, report = (data.load_image_dataset(name, f"test[{half}]") for half in data.HALVES)
    assert len(selection) + len(report) == TEST and abs(len(selection) - TEST / 2) <= 10
    assert not set(_images(selection)) & set(_images(report))  # disjoint ...
    assert set(_images(selection)) | set(_images(report)) == set(_images(data.load_image_dataset(name, "test")))
    labels = np.asarray(data.load_image_dataset(name, "test")["label"])
    half = np.bincount(selection["label"], minlength=10)
    assert np.all(np.abs(half - np.bincount(labels, minlength=10) / 2) <= 1)  # ... every class halved
    data._open_splits.cache_clear()  # a fresh read picks the same examples
    assert _images(data.load_image_dataset(name, "test[selection]")) == _images(selection)
    assert np.array_equal(data.selection_half(labels), data.selection_half(labels.copy()))
    # what the accuracy check loads as `validation` is the selection half; `train` stays whole
    assert _images(data.load_image_dataset(name, "validation")) == _images(selection)
    assert len(data.load_image_dataset(name, "train")) == TRAIN
    chosen = data.selection(name, None, data.image_columns)
    assert (chosen.split, chosen.report_split, chosen.trained_on_risk) == ("test[selection]", "test[report]", False)
    assert chosen.holdout["carved_from"] == "test" and "test[report]" in chosen.description
    assert _images(Classification(name).load("test[report]")) == _images(report)  # what `evaluate --split` loads


def test_a_model_trained_on_all_of_train_is_checked_on_half_of_test(memorised, train_test, tmp_path, caplog):
    name = str(train_test[0])
    with caplog.at_level(logging.INFO, logger="hf_vae_compress"):
        src = Source.open(memorised, name, FAST.calibration_batches, progress=False)
    assert "test[selection]" in caplog.text
    chosen = src.check_selection()
    assert chosen["split"] == "test[selection]" and chosen["accuracy_checked"] and chosen["warning"] is None
    assert chosen["memorisation"]["base"] < 1.0  # what a hold-out of train would have hidden: it scores 100 % there
    base_on_train = Classification(name).score(src.model, data.load_image_dataset(name, "train"))["top1"]
    assert base_on_train == 1.0

    result = search_smallest(src, tmp_path / "out", 3.0, name, FAST, probes=3, progress=False)
    assert result.compressed is not None
    validation = result.validation
    assert validation["split"] == "test[selection]" and validation["report_split"] == "test[report]"
    assert validation["accuracy_checked"] and not validation["trained_on_risk"]
    assert validation["examples"] == len(data.load_image_dataset(name, "test[selection]"))
    assert "half" in validation["selection"] and validation["holdout"]["carved_from"] == "test"
    assert result.compressed.stats["validation"] == validation  # what the model card renders
    # the report half, never selected on: the kept container's drop there is within the budget (+ noise)
    model = tiny_timm()
    model.load_state_dict(CompressedModel.load(tmp_path / "out").decode())
    report = data.load_image_dataset(name, "test[report]")
    task = Classification(name)
    base, compressed = (task.per_example(m, task.prepare(m, report)) for m in (src.model, model))
    se = 100 * np.std(base - compressed, ddof=1) / np.sqrt(len(base))
    assert 100 * (base.mean() - compressed.mean()) <= 3.0 + 3 * se


def test_memorisation_on_a_train_slice_is_detected_and_refused(memorised, train_test, tmp_path, caplog):
    name = str(train_test[0])
    with caplog.at_level(logging.WARNING, logger="hf_vae_compress"):
        src = Source.open(memorised, name, FAST.calibration_batches, progress=False, validation_split="train[:25%]")
    chosen = src.check_selection()
    memorisation = chosen["memorisation"]
    assert chosen["split"] == "train[:25%]" and chosen["trained_on_risk"] and chosen["comparison_split"] == "test"
    assert memorisation["detected"] and memorisation["base"] == 1.0 and memorisation["comparison"] < 1.0
    assert memorisation["gap_pt"] > MEMORISATION_Z * memorisation["gap_se_pt"]
    # the comparison sample is as large as the selection split (50 of test's 300), and still detects it
    assert abs(memorisation["comparison_examples"] - memorisation["examples"]) <= 5
    assert not chosen["accuracy_checked"] and "likely trained on these examples" in chosen["warning"]
    assert "likely trained" in caplog.text
    # a fixed rate is still measured, but not called a check and never within budget
    validation = src.validation_drop(src.compress(FAST, progress=False))
    assert not validation["accuracy_checked"] and not validation["within_budget"]
    assert validation["examples"] == TRAIN // 4 and validation["warning"] == chosen["warning"]
    # a budget cannot be kept on memorised data: refused before the first probe
    with pytest.raises(UncheckedAccuracyError, match="no rate search.*validation_split"):
        search_smallest(src, tmp_path / "out", 3.0, name, FAST, probes=3, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_train_only_dataset_warns_and_a_saturated_hold_out_is_no_check(memorised, train_test, caplog):
    name = str(train_test[1])
    with caplog.at_level(logging.WARNING, logger="hf_vae_compress"):
        chosen = Source.open(memorised, name, FAST.calibration_batches, progress=False).check_selection()
    assert chosen["holdout"]["carved_from"] == "train" and chosen["trained_on_risk"]
    assert chosen["comparison_split"] is None and chosen["report_split"] is None  # nothing else to compare with
    assert chosen["memorisation"]["saturated"] and chosen["memorisation"]["detected"] and not chosen["accuracy_checked"]
    assert "may have trained" in chosen["description"] and "likely trained" in caplog.text


def test_validation_split_names_any_slice_and_calibration_never_sees_it(train_test):
    name = str(train_test[0])
    train = data.load_image_dataset(name, "train[:100%]")  # the raw split, nothing taken out
    chosen = data.selection(name, "train[:25%]", data.image_columns)
    assert chosen.split == "train[:25%]" and chosen.trained_on_risk and chosen.report_split == "test"
    selected = data.load_image_dataset(name, "validation", "train[:25%]")
    assert _images(selected) == _images(train)[:TRAIN // 4]
    rest = data.load_image_dataset(name, "train", "train[:25%]")  # what calibration and fine-tuning draw from
    assert _images(rest) == _images(train)[TRAIN // 4:]
    sliced = data.selection(name, "test[:100]", data.image_columns)
    assert (sliced.report_split, sliced.comparison_split, sliced.trained_on_risk) == (None, None, False)
    assert len(data.load_image_dataset(name, "validation", "test[:100]")) == 100
    assert len(data.load_image_dataset(name, "train[:10]+test[:5]")) == 15
    with pytest.raises(data.DatasetError, match="leaving none to calibrate"):
        data.load_image_dataset(name, "train", "train")
    with pytest.raises(data.DatasetError, match="test\\[foo\\].*slice syntax"):
        data.load_image_dataset(name, "test[foo]")


def test_memorisation_threshold_is_three_binomial_standard_errors():
    # the reference models' validation / test top-1 (91.7 % vs 91.0 % on 5,000 each) is no memorisation
    assert not memorisation_check(0.9174, 5000, (0.9104, 5000), known_held_out=True)["detected"]
    # 3 pt above on 1,000 examples each is under 3 SE (3.7 pt); 5 pt is over (3.5 pt)
    below, above = (memorisation_check(p, 1000, (0.90, 1000), known_held_out=True) for p in (0.93, 0.95))
    assert below["gap_se_pt"] == pytest.approx(100 * np.sqrt(0.93 * 0.07 / 1000 + 0.9 * 0.1 / 1000))
    assert not below["detected"] and above["detected"] and above["gap_pt"] == pytest.approx(5.0)
    # 100 % with nothing to compare with, or on a split that may be training data: no check
    assert memorisation_check(1.0, 40, None, known_held_out=False)["detected"]
    # 100 % on a held-out split that scores alike elsewhere: a perfect model, not a memorising one
    assert not memorisation_check(1.0, 5000, (0.9996, 5000), known_held_out=True)["detected"]
