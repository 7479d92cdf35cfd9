"""The paths a new user takes with their own model and data: the CLI's default, datasets without a
validation split or in an imagefolder, and a compressed folder that every loader takes."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from hf_vae_compress import data, pipeline
from hf_vae_compress.cli import main
from hf_vae_compress.codec import CONTAINER_NAME, VAECompressionConfig
from hf_vae_compress.data import DatasetError, load_image_dataset
from hf_vae_compress.pipeline import UNCHECKED_BPW
from tests.conftest import tiny_timm

FAST = ["--transform", "identity", "--calibration-batches", "1"]


@pytest.fixture(scope="module")
def train_test_folder(tmp_path_factory):
    """A `save_to_disk` DatasetDict with only `train` and `test`, and columns named as on many Hub
    datasets (`img`, `fine_label`) beside an extra column: nothing is found by its usual name."""
    import datasets

    train = data.load_fashion_mnist("train").select(range(400))
    test = data.load_fashion_mnist("test").select(range(100))

    def renamed(ds):
        ds = ds.rename_columns({"image": "img", "label": "fine_label"})
        return ds.add_column("source_id", list(range(len(ds))))

    folder = tmp_path_factory.mktemp("train-test") / "ds"
    datasets.DatasetDict(train=renamed(train), test=renamed(test)).save_to_disk(str(folder))
    return folder


def test_validation_is_a_stratified_deterministic_half_of_test_the_model_never_trained_on(train_test_folder):
    """No validation split: the accuracy check selects on half of `test`, never on `train`
    (tests/test_selection.py shows why, with a model that memorised its train split)."""
    name = str(train_test_folder)
    validation, report = load_image_dataset(name, "validation"), load_image_dataset(name, "test[report]")
    train = load_image_dataset(name, "train")
    assert validation.column_names == ["image", "label"] == train.column_names
    assert len(train) == 400 and len(validation) + len(report) == 100 and 45 <= len(validation) <= 55
    ids = {np.asarray(im).tobytes() for im in validation["image"]}
    assert not ids & {np.asarray(im).tobytes() for im in report["image"]}  # disjoint
    full = np.bincount(list(report["label"]) + list(validation["label"]), minlength=10)
    held = np.bincount(validation["label"], minlength=10)
    assert np.all(np.abs(held - 0.5 * full) <= 1)  # every class halved
    again = load_image_dataset(name, "validation")
    assert [np.asarray(im).tobytes() for im in again["image"]] == [np.asarray(im).tobytes() for im in validation["image"]]
    assert data.selection(name, None, data.image_columns).holdout["examples"] == len(validation)


def test_unusable_datasets_get_errors_that_name_what_was_found(tmp_path, train_test_folder):
    import datasets

    folder = tmp_path / "no-classlabel"
    datasets.Dataset.from_dict({"pixels": [[0, 1]], "target": [3]}).save_to_disk(str(folder))
    with pytest.raises(DatasetError, match=r"pixels \(\w+\), target \(Value\)"):
        load_image_dataset(str(folder), "test")
    with pytest.raises(DatasetError, match=r"no split 'dev'.*\['train', 'test'\]"):
        load_image_dataset(str(train_test_folder), "dev")
    three = tmp_path / "three-classes"
    ds = load_image_dataset(str(train_test_folder), "test").filter(lambda row: row["label"] < 3)
    ds.cast_column("label", datasets.ClassLabel(names=["a", "b", "c"])).save_to_disk(str(three))
    with pytest.raises(DatasetError, match="predicts 10 classes, the dataset has 3"):
        from hf_vae_compress.tasks import Classification

        Classification(str(three)).score(tiny_timm(), load_image_dataset(str(three), "test"))


def test_default_compress_checks_accuracy_on_a_train_test_dataset(train_test_folder, timm_folder, tmp_path, capsys,
                                                                   monkeypatch):
    out = tmp_path / "default"
    compress = pipeline.Source.compress

    def marked(*args, **kwargs):  # marks on stderr where each probe's compression starts
        print("<compressing>", file=sys.stderr)
        return compress(*args, **kwargs)

    monkeypatch.setattr(pipeline.Source, "compress", marked)
    assert main(["compress", str(timm_folder), str(out), "--dataset", str(train_test_folder), *FAST, "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["accuracy_checked"] and result["warning"] is None
    validation = result["validation"]
    assert validation["budget_pt"] == 0.5 and validation["examples"] == validation["holdout"]["examples"]
    assert validation["within_budget"] and validation["drop_pt"] + validation["drop_se_pt"] <= 0.5
    assert validation["holdout"]["carved_from"] == "test" and validation["holdout"]["stratified_by"] == "label"
    assert validation["split"] == "test[selection]" and validation["report_split"] == "test[report]"
    probes = result["rate_search"]
    assert len(probes) >= 3
    kept = [p for p in probes if p["accepted"]]
    assert result["total_bytes"] == min(p["bytes"] for p in kept) == (out / CONTAINER_NAME).stat().st_size
    stages = result["stage_seconds"]  # where the time went, adding up to the command's own total
    assert {"checks", "model_load", "calibration", "compress", "score", "save"} <= set(stages)
    assert sum(stages.values()) == pytest.approx(result["compress_seconds"], abs=0.1)

    # every probe is reported on stderr as soon as it is judged, before the next one starts
    events = [line for line in captured.err.splitlines() if "<compressing>" in line or "rate search probe" in line]
    assert ["<compressing>" in line for line in events] == [True, False] * len(probes)
    for line, probe in zip(events[1::2], probes):
        verdict = "accepted" if probe["accepted"] else "rejected"
        assert (f"probe {probe['probe']}/{len(probes)}: {probe['bits_per_weight']:.3f} bits/weight ({probe['bytes']:,} "
                f"bytes), validation drop {probe['validation_drop_pt']:.2f} ± {probe['validation_drop_se_pt']:.2f} pt "
                f"(budget 0.5 pt): {verdict}") in line
        left = len(probes) - probe["probe"]
        assert (f"left for {left} more probe" in line) if left else line.endswith("search done")
        assert probe["estimated_seconds_left"] >= 0 and abs(probe["bits_per_weight"] - 8 * probe["bytes"] / (
            result["num_weights"])) < 1e-9


def test_fixed_rate_still_reports_the_drop_and_no_data_warns(timm_folder, train_test_folder, tmp_path, capsys):
    assert main(["compress", str(timm_folder), str(tmp_path / "fixed"), "--dataset", str(train_test_folder), *FAST,
                 "--target-bpw", "3"]) == 0
    summary = capsys.readouterr().out  # the human summary states the measured drop and where
    assert "validation: top1" in summary and "drop" in summary and "held out from test" in summary
    assert "rate_search" not in summary

    assert main(["compress", str(timm_folder), str(tmp_path / "blind"), "--dataset", "none", "--synthetic-images", "0",
                 *FAST, "--json"]) == 0  # no data and no synthetic images: nothing to check on
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert not result["accuracy_checked"] and result["validation"] is None
    assert "accuracy was not checked" in result["warning"] and "accuracy was not checked" in captured.err
    assert abs(result["bits_per_weight"] - UNCHECKED_BPW) < 0.1 * UNCHECKED_BPW  # the conservative rate


def test_a_last_compression_releases_the_calibration_and_refuses_another(timm_folder, train_test_folder):
    src = pipeline.Source.open(timm_folder, str(train_test_folder), calibration_batches=1, progress=False)
    config = VAECompressionConfig(target_bits_per_weight=3.0, calibration_batches=1)
    probe = src.compress(config, progress=False)
    assert src.calibration.factors  # a rate search's probe keeps them for the next one
    last = src.compress(config, progress=False, last=True)
    assert src.calibration is None
    assert last.report()["total_bytes"] == probe.report()["total_bytes"]
    assert src.validation_drop(last)["examples"] > 0  # the accuracy report needs no calibration
    with pytest.raises(RuntimeError, match="released"):
        src.compress(config, progress=False)


def test_a_failed_last_compression_still_releases_the_calibration(timm_folder, train_test_folder, monkeypatch):
    src = pipeline.Source.open(timm_folder, str(train_test_folder), calibration_batches=1, progress=False)
    config = VAECompressionConfig(target_bits_per_weight=3.0, calibration_batches=1)

    def failing(*args, **kwargs):
        raise MemoryError("out of memory half way")

    monkeypatch.setattr(pipeline, "compress", failing)
    with pytest.raises(MemoryError):
        src.compress(config, progress=False, last=True)
    assert src.calibration is None
    with pytest.raises(RuntimeError, match="released"):  # a retry on half-dropped moments is refused
        src.compress(config, progress=False)


def test_imagefolder_directory_works(tmp_path, timm_folder, capsys):
    from PIL import Image

    test = data.load_fashion_mnist("test").select(range(60))
    for split in ("train", "test"):
        for i, row in enumerate(test):
            folder = tmp_path / "images" / split / data.FASHION_MNIST_CLASSES[row["label"]].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            row["image"].save(folder / f"{i}.png")
    for name in data.FASHION_MNIST_CLASSES:  # every class folder exists, so the labels are the model's 10
        for split in ("train", "test"):
            empty = tmp_path / "images" / split / name.replace("/", "-")
            if not any(empty.glob("*.png")):
                Image.fromarray(np.zeros((28, 28), np.uint8), mode="L").save(empty / "blank.png")
    images = str(tmp_path / "images")
    found = load_image_dataset(images, "test")
    assert found.features["label"].num_classes == 10
    folders = found.features["label"].names  # sorted by the folder names, not in the model's order
    relabelled = data.fit_labels(tiny_timm(), found)
    assert relabelled.features["label"].names == data.FASHION_MNIST_CLASSES
    assert [data.FASHION_MNIST_CLASSES[i].replace("/", "-") for i in relabelled["label"]] == \
        [folders[i] for i in found["label"]]
    assert main(["compress", str(timm_folder), str(tmp_path / "out"), "--dataset", images, *FAST,
                 "--max-accuracy-drop", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["validation"]["holdout"]["carved_from"] == "test" and result["validation"]["budget_pt"] == 2
    assert result["validation"]["drop_pt"] <= 2 and len(result["rate_search"]) >= 3


@pytest.fixture(scope="module")
def cli_folders(timm_folder, vit_folder, tmp_path_factory):
    """Both tiny models compressed by the CLI, with a stray file in the source that must not travel."""
    out = {}
    for kind, source in (("timm", timm_folder), ("vit", vit_folder)):
        src = tmp_path_factory.mktemp(f"src-{kind}")
        shutil.copytree(source, src, dirs_exist_ok=True)
        (src / "my_private_notes.json").write_text('{"secret": 1}')
        out[kind] = tmp_path_factory.mktemp(f"cli-{kind}") / "compressed"
        assert main(["compress", str(src), str(out[kind]), "--dataset", "none", "--synthetic-images", "0", *FAST,
                     "--target-bpw", "4"]) == 0
    return out


@pytest.mark.parametrize("kind", ["timm", "vit"])
def test_a_compress_folder_loads_everywhere_with_the_same_logits(cli_folders, kind):
    from transformers import AutoModelForImageClassification

    from hf_vae_compress import create_model
    from hf_vae_compress.pipeline import load_any

    folder = cli_folders[kind]
    assert not (folder / "my_private_notes.json").exists()  # only known side files travel
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "hf_vae_compress" and "auto_map" in config
    assert (folder / "modeling_hf_vae_compress.py").exists() and (folder / "README.md").exists()
    torch.manual_seed(0)
    x = torch.randn(3, 1, 28, 28)

    def logits(model):
        with torch.no_grad():
            out = model.eval()(x)
        return out if isinstance(out, torch.Tensor) else out.logits

    reference = logits(load_any(folder)[0])  # what `evaluate` scores
    loaders = {"from_pretrained": lambda: AutoModelForImageClassification.from_pretrained(folder),
               "remote code": lambda: AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)}
    if kind == "timm":
        loaders["create_model"] = lambda: create_model(f"local-dir:{folder}")
    for name, load in loaders.items():
        assert torch.equal(logits(load()), reference), name


def test_folders_written_before_the_quantization_config_still_load(cli_folders, timm_folder, tmp_path, capsys):
    """Earlier versions' `compress` wrote the source config unchanged beside `model.vaec.safetensors`."""
    from hf_vae_compress import create_model
    from hf_vae_compress.pipeline import load_any

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copyfile(timm_folder / "config.json", legacy / "config.json")
    shutil.copyfile(cli_folders["timm"] / CONTAINER_NAME, legacy / "model.vaec.safetensors")
    expected = load_any(cli_folders["timm"])[0].state_dict()
    for model in (load_any(legacy)[0], create_model(f"local-dir:{legacy}")):
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert main(["inspect", str(legacy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_bytes"] == (legacy / "model.vaec.safetensors").stat().st_size


def test_a_corrupt_image_is_named(tmp_path, timm_folder, capsys):
    """PIL's own error names the file; the CLI reports it as an error (exit 2), and nothing is written."""
    images = tmp_path / "images"
    for i, row in enumerate(data.load_fashion_mnist("test").select(range(40))):
        folder = images / data.FASHION_MNIST_CLASSES[row["label"]].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        row["image"].save(folder / f"{i}.png")
    broken = next(images.glob("*/*.png"))
    broken.write_bytes(b"not a png")
    assert main(["compress", str(timm_folder), str(tmp_path / "out"), "--dataset", str(images), *FAST]) == 2
    err = capsys.readouterr().err
    assert "error: cannot identify image file" in err and str(broken) in err
    assert not (tmp_path / "out").exists()
