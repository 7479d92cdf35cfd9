"""Compressing without labelled data: synthetic images made from the model (``--dataset none``) and
a folder of the user's unlabelled images, both deciding the rate by agreement with the original."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_vae_compress import cli, data
from hf_vae_compress.cli import main
from hf_vae_compress.codec import CompressedModel, VAECompressionConfig
from hf_vae_compress.loading import find_container
from hf_vae_compress.models import load_model
from hf_vae_compress.pipeline import Source
from hf_vae_compress.search import SearchResult, describe_refusal
from hf_vae_compress.synthetic import (
    PRIOR_BATCHNORM, PRIOR_CLASS_INVERSION, SYNTHETIC_BUDGET_SHARE, SyntheticConfig, _mixture_targets,
)
from hf_vae_compress.tasks import CHECK_LABELLED, CHECK_SYNTHETIC, CHECK_UNLABELLED, synthetic_task

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--transform", "identity", "--calibration-batches", "1"]
TINY_SYNTHETIC = ["--synthetic-images", "48", "--synthetic-calibration-images", "16", "--synthetic-steps", "4"]
TINY = SyntheticConfig(calibration_images=8, check_images=16, steps=3, batch_size=8)


@pytest.mark.parametrize("kind", ["timm", "vit"])
def test_synthetic_images_are_seeded_within_the_input_range_and_follow_the_models_prior(kind, timm_folder, vit_folder):
    model = load_model(timm_folder if kind == "timm" else vit_folder)
    first, again = (synthetic_task(model, TINY, progress=False) for _ in range(2))
    other = synthetic_task(model, SyntheticConfig(**{**TINY.__dict__, "seed": 1}), progress=False)
    assert torch.equal(first.calibration_images, again.calibration_images)
    assert torch.equal(first.check_images, again.check_images)
    assert not torch.equal(first.check_images, other.check_images)
    assert first.calibration_images.shape == (8, 1, 28, 28) and first.check_images.shape == (16, 1, 28, 28)
    # within what the preprocessing makes of black and white pixels (mean 0.286, std 0.353)
    low, high = (0 - data.FASHION_MNIST_MEAN) / data.FASHION_MNIST_STD, (1 - data.FASHION_MNIST_MEAN) / data.FASHION_MNIST_STD
    images = torch.cat([first.calibration_images, first.check_images])
    assert images.min() >= low - 1e-5 and images.max() <= high + 1e-5
    assert first.synthetic["prior"] == (PRIOR_BATCHNORM if kind == "timm" else PRIOR_CLASS_INVERSION)
    assert first.synthetic["seconds"] > 0 and first.synthetic["loss_end"] < first.synthetic["loss_start"]


def test_a_tiny_model_without_data_gets_synthetic_calibration_and_an_agreement_checked_rate(timm_folder, tmp_path,
                                                                                           capsys):
    out = tmp_path / "out"
    assert main(["compress", str(timm_folder), str(out), "--dataset", "none", *FAST, *TINY_SYNTHETIC, "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    validation = result["validation"]
    assert result["check"] == validation["check"] == CHECK_SYNTHETIC and not result["accuracy_checked"]
    assert validation["examples"] == 48 and validation["synthetic"]["calibration_images"] == 16
    # BatchNorm-statistics images keep 0/1 agreement: the original agrees with itself
    assert validation["metric"] == "agreement" and validation["base"] == 1.0
    assert validation["synthetic"]["seconds"] > 0
    assert validation["allowed_pt"] == pytest.approx(SYNTHETIC_BUDGET_SHARE * validation["budget_pt"])
    assert "not accuracy" in result["warning"] and "not accuracy" in captured.err
    probes = result["rate_search"]
    assert len(probes) >= 3 and all(p["accepted"] == (p["validation_drop_pt"] + p["validation_drop_se_pt"]
                                                      <= validation["allowed_pt"]) for p in probes)
    assert validation["drop_pt"] + validation["drop_se_pt"] <= validation["allowed_pt"]
    # the synthetic images calibrated output-aware rounding, as data would
    assert CompressedModel.load(find_container(out)).header["config"]["rounding"] == "output_aware"
    card = (out / "README.md").read_text().split("## How accuracy was checked", 1)[1].split("##", 1)[0]
    assert f"**{CHECK_SYNTHETIC}**" in card and "not an accuracy check" in card


def test_images_without_batchnorm_are_inverted_towards_two_class_mixtures_of_every_confidence():
    """The class-inversion prior's targets: ``p`` in [1/2, 1] on the round-robin class, ``1 - p`` on
    one other class, so margins ``2p - 1`` spread from the decision boundary to full confidence."""
    targets = _mixture_targets(5, 2000, 10, torch.Generator().manual_seed(0))
    assert torch.allclose(targets.sum(1), torch.ones(2000)) and ((targets > 0).sum(1) == 2).all()
    first = targets[torch.arange(2000), (torch.arange(2000) + 5) % 10]
    assert (first >= 0.5).all() and torch.equal(first, targets.max(1).values)
    margins = 2 * first - 1
    assert margins.min() < 0.05 and margins.max() > 0.95 and abs(float(margins.mean()) - 0.5) < 0.05
    assert torch.equal(targets, _mixture_targets(5, 2000, 10, torch.Generator().manual_seed(0)))


def test_expected_agreement_charges_a_changed_prediction_the_originals_probability_margin(timm_folder, vit_folder):
    """On class-mixture images a classifier's drop is the original's top probability less its
    probability of the compressed model's class: 0 for the original, at most the disagreement rate."""
    assert synthetic_task(load_model(vit_folder), TINY, progress=False).expected  # no BatchNorm: mixture images
    model = load_model(timm_folder).eval()
    plain = synthetic_task(model, TINY, progress=False)
    assert not plain.expected and plain.metric == "agreement"  # BatchNorm images: 0/1 agreement
    task = dataclasses.replace(plain, expected=True)
    assert task.metric == "expected_agreement"
    held = task.prepare(model, task.check_images)
    images, labels, probabilities = held
    own = task.own_scores(held)
    assert np.allclose(own, probabilities.max(-1).values.numpy()) and np.allclose(task.per_example(model, held), own)
    other = load_model(timm_folder).eval()
    with torch.no_grad():  # a classifier that always says the original's least likely class
        head = other.get_classifier()
        head.weight.neg_()
        head.bias.neg_()
    scores = task.per_example(other, held)
    least = probabilities.argmin(-1)
    assert np.allclose(scores, probabilities[torch.arange(len(labels)), least].numpy())
    drop = own - scores
    disagree = (torch.as_tensor(task.base.per_example(other, held[:2])) == 0).numpy()
    assert (drop >= -1e-12).all() and (drop <= disagree + 1e-12).all() and drop.mean() > 0
    assert task.score(other, held)["expected_agreement"] == pytest.approx(scores.mean())


def test_the_originals_expected_agreement_is_paired_with_each_probes_in_the_scoring_order(vit_folder):
    """The base's per-example scores (its top probabilities, known without scoring) are in the order
    probes are scored in: scoring the original itself as a probe gives a drop of exactly 0 +- 0."""
    src = Source.open(vit_folder, None, 1, progress=False, synthetic=TINY)
    assert len(set(src.base_scores.round(6))) > 1  # not all alike, so the order matters
    compressed = src.compress(VAECompressionConfig(transform="identity", target_bits_per_weight=4.0,
                                                   calibration_batches=1), progress=False)
    compressed.decode = lambda: src.model.state_dict()  # the original's own weights, as a probe
    result = src.validation_drop(compressed)
    assert result["drop_pt"] == pytest.approx(0, abs=1e-9) and result["drop_se_pt"] == pytest.approx(0, abs=1e-9)


def test_no_synthetic_images_keeps_the_unchecked_fixed_rate(timm_folder, tmp_path, capsys):
    assert main(["compress", str(timm_folder), str(tmp_path / "blind"), "--dataset", "none", "--synthetic-images", "0",
                 *FAST, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["check"] == "none" and result["validation"] is None and "accuracy was not checked" in result["warning"]
    assert main(["compress", str(timm_folder), str(tmp_path / "x"), "--dataset", "none", "--synthetic-images", "0",
                 "--max-accuracy-drop", "1"]) == 2
    assert "needs images to check on" in capsys.readouterr().err


@pytest.fixture(scope="module")
def unlabelled_folder(tmp_path_factory):
    """80 Fashion-MNIST test images as PNG files in one folder: no class folders, no labels."""
    folder = tmp_path_factory.mktemp("unlabelled")
    for i, row in enumerate(data.load_fashion_mnist("test").select(range(80))):
        row["image"].save(folder / f"{i:03d}.png")
    return folder


def test_a_folder_of_unlabelled_images_decides_the_rate_by_agreement(unlabelled_folder, timm_folder, tmp_path, capsys):
    assert data.is_unlabelled(str(unlabelled_folder)) and not data.is_unlabelled(str(timm_folder))
    out = tmp_path / "out"
    assert main(["compress", str(timm_folder), str(out), "--dataset", str(unlabelled_folder), *FAST,
                 "--max-accuracy-drop", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    validation = result["validation"]
    assert result["check"] == CHECK_UNLABELLED and result["accuracy_checked"] and validation["synthetic"] is None
    assert validation["examples"] == 48 and validation["allowed_pt"] == 2  # 32 calibrated (one batch), 48 checked
    assert validation["drop_pt"] + validation["drop_se_pt"] <= 2 and len(result["rate_search"]) >= 3
    card = (out / "README.md").read_text()
    assert f"**{CHECK_UNLABELLED}**" in card and "not an accuracy check" not in card
    refused = main(["compress", str(timm_folder), str(tmp_path / "y"), "--dataset", str(unlabelled_folder),
                    "--validation-split", "test"])
    assert refused == 2 and "needs a dataset with labels" in capsys.readouterr().err


def test_a_datasets_dataset_without_labels_is_unlabelled(tmp_path):
    import datasets

    images = [row["image"] for row in data.load_fashion_mnist("test").select(range(4))]
    datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()})) \
        .save_to_disk(str(tmp_path / "ds"))
    assert data.is_unlabelled(str(tmp_path / "ds"))
    loaded = data.load_unlabelled_images(str(tmp_path / "ds"))
    assert [np.asarray(a).tobytes() for a in loaded] == [np.asarray(b).tobytes() for b in images]


def test_the_synthetic_path_needs_no_dataset_package(timm_folder, tmp_path):
    """``datasets`` blocked (an import of it fails): --dataset none still compresses and checks."""
    script = (
        "import sys, json; sys.modules['datasets'] = None\n"
        "from hf_vae_compress.cli import main\n"
        f"code = main(['compress', {str(timm_folder)!r}, {str(tmp_path / 'out')!r}, '--dataset', 'none', "
        f"*{FAST + TINY_SYNTHETIC!r}, '--target-bpw', '3', '--json'])\n"
        "assert 'datasets' not in sys.modules or sys.modules['datasets'] is None\n"
        "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["check"] == CHECK_SYNTHETIC and result["validation"]["examples"] == 48


def test_a_detector_without_data_checks_against_its_own_boxes(tmp_path, capsys):
    """A tiny random detector: synthetic images from its backbone's BatchNorm statistics calibrate it
    (the Fisher of its own loss against its own boxes) and a fixed rate is scored as mAP against the
    original's boxes, or, where it finds none it is confident of, said to be uncheckable."""
    from tests.test_detection import processor, tiny_detector

    folder = tmp_path / "detector"
    tiny_detector().save_pretrained(folder)
    processor().save_pretrained(folder)
    assert main(["compress", str(folder), str(tmp_path / "out"), "--dataset", "none", *FAST, "--synthetic-images", "4",
                 "--synthetic-calibration-images", "4", "--synthetic-steps", "1", "--target-bpw", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    validation = result["validation"]
    assert validation["metric"] == "map_vs_original" and validation["synthetic"]["prior"] == PRIOR_BATCHNORM
    assert "don't care" in validation["selection"]  # the boxes the original is unsure of (see test_detection)
    assert result["check"] == CHECK_SYNTHETIC and not result["accuracy_checked"]
    if not validation["rate_checked"]:
        assert "nothing to agree on" in result["warning"]
    else:
        assert validation["base"] > 0.9  # the original's own confident boxes: it finds them all


def _probe(bpw: float, drop_pt: float, se_pt: float | None, examples: int) -> dict:
    return dict(probe=1, probes=2, bits_per_weight=bpw, bytes=int(bpw * 1000), validation_drop_pt=drop_pt,
                validation_drop_se_pt=se_pt, split_examples=examples, accepted=False)


def test_a_refused_search_says_what_the_finest_rate_measured_and_what_to_do(timm_folder, tmp_path, capsys, monkeypatch):
    probes = [_probe(1.0, 30.0, 4.0, 128), _probe(7.5, 0.78125, 0.78125, 128)]
    text = describe_refusal(probes, 0.25, CHECK_SYNTHETIC)
    assert "the finest of 2 probes, 7.500 bits/weight (7,500 bytes), measured 0.78 ± 0.78 pt" in text
    assert "one changed prediction is 0.78 pt, more than the 0.25 pt allowed" in text
    assert "--dataset" in text and "--target-bpw" in text and "{" not in text  # no raw probe dicts
    fine = describe_refusal([_probe(2.0, 0.6, 0.1, 5000)], 0.5, CHECK_LABELLED)  # 0.02 pt per example: no such clause
    assert "changed prediction" not in fine and "--dataset" not in fine and CHECK_LABELLED in fine
    assert "changed prediction" not in describe_refusal([_probe(2.0, 3.0, None, 16)], 1.0, CHECK_SYNTHETIC)  # mAP

    monkeypatch.setattr(cli, "search_smallest", lambda *a, **k: SearchResult(None, None, probes, 0.0))
    out = tmp_path / "out"
    assert main(["compress", str(timm_folder), str(out), "--dataset", "none", *FAST, *TINY_SYNTHETIC]) == 2
    err = capsys.readouterr().err
    assert f"error: no rate tried kept the drop on {CHECK_SYNTHETIC} within 0.25 pt" in err and not out.exists()
