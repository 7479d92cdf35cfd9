import json
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import timm
import torch
import torchvision.transforms as T
from PIL import Image

from hf_vae_compress import evaluate
from hf_vae_compress.cli import main
from hf_vae_compress.codec.importance import fisher_diagonal
from hf_vae_compress.data import collate, image_transform, load_image_dataset, split_transform, with_transform
from hf_vae_compress.evaluate import Batches, HeldImages, as_tensors, bootstrap_interval, held_tensors, predict
from hf_vae_compress.models import load_model, weights_bytes
from hf_vae_compress.tasks import CALIBRATION_BATCH, Classification
from tests.conftest import tiny_timm


def test_evaluate_counts_correct_predictions(timm_folder, small_test_set):
    model = load_model(timm_folder)
    dataset = load_image_dataset(str(small_test_set))
    transform = image_transform(model)
    with torch.no_grad():
        logits = model(torch.stack([transform(im) for im in dataset["image"]]))
    expected = float((logits.argmax(-1).numpy() == np.asarray(dataset["label"])).mean())
    result = evaluate(model, dataset, batch_size=64, progress=False)
    assert result["top1"] == expected
    assert result["num_examples"] == 200
    assert result["num_params"] == sum(p.numel() for p in model.parameters())
    lo, hi = result["top1_ci95"]
    assert lo <= expected <= hi


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(1)
    small = (rng.random(500) < 0.9).astype(float)
    large = (rng.random(20000) < 0.9).astype(float)
    lo_s, hi_s = bootstrap_interval(small)
    lo_l, hi_l = bootstrap_interval(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 3


def test_cli_evaluate_prints_json(capsys, vit_folder, small_test_set):
    assert main(["evaluate", str(vit_folder), "--dataset", str(small_test_set), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_examples"] == 200
    assert 0.0 <= result["top1"] <= 1.0
    assert result["weights_bytes"] == weights_bytes(vit_folder) > 0
    assert result["num_params"] == sum(p.numel() for p in load_model(vit_folder).parameters())


def test_cli_reports_missing_model_clearly(capsys, tmp_path):
    assert main(["evaluate", str(tmp_path), "--json"]) == 2
    assert "config.json" in capsys.readouterr().err


class _WithLogits(torch.nn.Module):
    """The same classifier, answering as transformers does (an output with ``.logits``)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixel_values):
        return SimpleNamespace(logits=self.net(pixel_values))


def test_the_classification_task_supplies_the_fisher_loss():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    batches = [torch.randn(8, 1, 4, 4) for _ in range(3)]
    fisher = fisher_diagonal(net, batches, 3, Classification.fisher_loss(), progress=False)
    again = fisher_diagonal(net, batches, 3, Classification.fisher_loss(), progress=False)  # a fresh label stream
    wrapped = fisher_diagonal(_WithLogits(net), [{"pixel_values": b} for b in batches], 3,
                              Classification.fisher_loss(), progress=False)
    assert all(torch.equal(fisher[k], again[k]) and torch.equal(fisher[k], wrapped[f"net.{k}"]) for k in fisher)
    assert all(f.sum() > 0 for f in fisher.values())



def _rgb_dataset(count: int):
    """Smooth random colour fields (upsampled coarse grids, seeded) with labels over ten classes."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((40, 40), Image.BILINEAR)
              for _ in range(count)]
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(num_classes=10))
    return datasets.Dataset.from_dict(dict(image=images, label=[i % 10 for i in range(count)]), features=features)


def _imagenet_like() -> torch.nn.Module:
    """An RGB timm model preprocessed as ImageNet checkpoints are: bicubic resize, crop 0.95, normalised."""
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=10, pretrained_cfg_overlay=dict(
        input_size=(3, 32, 32), interpolation="bicubic", crop_pct=0.95, mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225))).eval()


def test_a_prepared_split_is_held_as_uint8_and_its_batches_are_the_float_split_s(small_test_set, vit_folder):
    """The held split stores 8-bit pixels (a quarter of float32) and every way it is taken gives
    exactly the values of the per-image float preprocessing, so no score can change. Three
    preprocessings: Fashion-MNIST's (timm), ImageNet's (timm) and a transformers image processor's."""
    fashion = load_image_dataset(str(small_test_set)).select(range(40))
    for name, model, dataset in [("fashion", tiny_timm(), fashion), ("imagenet", _imagenet_like(), _rgb_dataset(40)),
                                 ("vit", load_model(vit_folder), fashion)]:
        images, labels = held_tensors(dataset, image_transform(model))
        floats, float_labels = as_tensors(dataset, image_transform(model))
        assert isinstance(images, HeldImages), name
        assert images.pixels.dtype == torch.uint8 and images.pixels.shape == floats.shape, name
        assert torch.equal(labels, float_labels) and len(images) == len(floats) == 40
        index = torch.tensor([3, 0, 39, 17])
        assert torch.equal(images[index], floats[index]), name
        assert torch.equal(images[5:9], floats[5:9]), name
        assert [len(b) for b in images.split(16)] == [16, 16, 8]
        assert torch.equal(torch.cat(list(images.split(16))), floats), name
        preds, _ = predict(model, (images, labels), batch_size=16, progress=False)
        float_preds, _ = predict(model, (floats, labels), batch_size=16, progress=False)
        assert np.array_equal(preds, float_preds), name
    held, _ = Classification(str(small_test_set)).prepare(tiny_timm(), fashion)
    assert isinstance(held, HeldImages)  # what the accuracy check holds


def test_a_transform_with_float_steps_after_to_tensor_is_held_as_floats():
    """Only PIL steps, ToTensor and normalisations can be cut at the 8-bit pixels: a float step
    after ToTensor (here a blur) keeps the split in float32, with the same values as before."""
    blurred = T.Compose([T.Resize(16), T.ToTensor(), T.GaussianBlur(3, sigma=1.0), T.Normalize((0.5,) * 3, (0.2,) * 3)])
    nested = T.Compose([T.Resize(16), T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.2,) * 3)])])
    assert split_transform(blurred) is None and split_transform(T.Normalize((0.5,), (0.2,))) is None
    assert split_transform(nested) is not None
    dataset = _rgb_dataset(6)
    images, _ = held_tensors(dataset, blurred)
    assert images.dtype == torch.float32 and torch.equal(images, as_tensors(dataset, blurred)[0])


def test_an_image_that_is_not_8_bit_is_refused_by_the_pixel_steps():
    to_pixels, _ = split_transform(T.Compose([T.ToTensor()]))
    assert to_pixels(Image.new("L", (4, 4), 7)).dtype == torch.uint8
    with pytest.raises(ValueError, match="mode 'F'"):
        to_pixels(Image.new("F", (4, 4), 0.5))


def test_calibration_batches_are_held_as_uint8_and_are_the_float_loader_s(small_test_set):
    """The classifier's calibration batches are made from 8-bit pixels as they are taken, with the
    values the per-image float loader gave (the same images, order and batch sizes)."""
    model = tiny_timm()
    task = Classification(str(small_test_set))
    batches, _ = task.calibration(model, num_batches=3, seed=1)
    subset = task.load("train").shuffle(seed=1).select(range(3 * CALIBRATION_BATCH))
    loader = torch.utils.data.DataLoader(with_transform(subset, image_transform(model)),
                                         batch_size=CALIBRATION_BATCH, collate_fn=collate)
    expected = [batch["pixel_values"] for batch in loader]
    assert isinstance(batches, Batches) and batches.images.pixels.dtype == torch.uint8
    assert len(batches) == len(expected) == 3
    assert all(torch.equal(a, b) for a, b in zip(batches, expected))
    assert torch.equal(batches[-1], expected[-1]) and len(batches[0:2]) == 2
    with pytest.raises(IndexError):
        batches[3]


class _Recorder(torch.nn.Module):
    """Classifies images as given and records the layout each batch reached it in; with ``flat``
    it views its input as an MLP on pixels would, which only a contiguous batch allows."""

    def __init__(self, flat: bool):
        super().__init__()
        self.flat, self.layouts = flat, []
        self.head = torch.nn.Linear(3 * 8 * 8, 5)

    def forward(self, x):
        self.layouts.append("channels_last" if not x.is_contiguous() else "contiguous")
        return self.head(x.view(x.shape[0], -1) if self.flat else x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("flat", [False, True])
def test_scoring_lays_batches_out_channels_last_and_falls_back_for_a_model_that_views_them(flat):
    torch.manual_seed(0)
    images, labels = torch.randn(150, 3, 8, 8), torch.randint(0, 5, (150,))
    model = _Recorder(flat).eval()
    with torch.no_grad():
        expected = model.head(images.reshape(150, -1)).argmax(-1).numpy()
    model.layouts.clear()
    preds, true = predict(model, (images, labels), batch_size=64, progress=False)
    np.testing.assert_array_equal(true, labels.numpy())
    np.testing.assert_array_equal(preds, expected)
    # three batches; the viewing model refuses the first channels-last batch once, then gets contiguous ones
    assert model.layouts == (["channels_last", "contiguous", "contiguous", "contiguous"] if flat
                             else ["channels_last"] * 3)
