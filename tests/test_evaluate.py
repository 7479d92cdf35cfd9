import json
from types import SimpleNamespace

import numpy as np
import torch

from hf_vae_compress import evaluate
from hf_vae_compress.cli import main
from hf_vae_compress.codec.importance import fisher_diagonal
from hf_vae_compress.data import image_transform, load_image_dataset
from hf_vae_compress.evaluate import bootstrap_interval
from hf_vae_compress.models import load_model, weights_bytes
from hf_vae_compress.tasks import Classification


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
