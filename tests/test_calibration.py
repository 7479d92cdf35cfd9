"""Calibration: the Fisher's forward passes also measure the layer input moments, within the memory budget."""

import torch
from torch import nn

from hf_vae_compress.codec.calibration import (MAX_ROWS_PER_BATCH, _passes, calibrate, layer_rows, layer_statistics,
                                               output_aware_layers)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _loss(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    return model(batch).square().sum(), len(batch)


def _count_forwards(model: nn.Module) -> list:
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


BATCHES = [torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def test_the_fisher_pass_measures_the_moments_of_separate_passes():
    model = _model()
    calls = _count_forwards(model)
    calibration = calibrate(model, BATCHES, len(BATCHES), _loss, progress=False)
    assert len(calls) == len(BATCHES)  # the Fisher's forward passes only
    separate = layer_statistics(model, BATCHES, output_aware_layers(model))
    assert list(calibration.layers) == list(separate) == ["0.weight", "2.weight", "5.weight"]
    for name, inputs in separate.items():
        assert torch.allclose(calibration.layers[name].second, inputs.second, atol=1e-6)
        assert torch.allclose(calibration.layers[name].mean, inputs.mean, atol=1e-6)
    assert set(calibration.seconds) == {"fisher", "moments"} and all(v >= 0 for v in calibration.seconds.values())


def test_layers_beyond_the_budget_take_passes_of_their_own():
    model = _model()
    layers = output_aware_layers(model)
    budget = 4 * 18 * 18 + 4 * 2 * 18 * 18  # the two convolutions' sums fit, the linear layer's do not
    assert _passes(layers, budget) == [["0.weight", "2.weight"], ["5.weight"]]
    calls = _count_forwards(model)
    split = calibrate(model, BATCHES, len(BATCHES), _loss, progress=False, max_bytes=budget)
    assert len(calls) == 2 * len(BATCHES)  # the Fisher's passes, then one more for the linear layer
    together = calibrate(model, BATCHES, len(BATCHES), _loss, progress=False)
    for name in layers:
        assert torch.allclose(split.layers[name].second, together.layers[name].second, atol=1e-6)
        assert torch.allclose(split.layers[name].mean, together.layers[name].mean, atol=1e-6)


def test_patches_are_the_rows_of_unfold_at_any_geometry():
    conv = nn.Conv2d(6, 6, (3, 5), stride=(2, 1), padding=(2, 0), dilation=(1, 2), groups=3)
    x = torch.randn(3, 6, 11, 12)
    unfolded = nn.functional.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    expected = unfolded.transpose(1, 2).reshape(-1, 6 * 15)
    assert torch.equal(layer_rows(conv, x, torch.Generator().manual_seed(0)), expected)
    many = torch.randn(2 * MAX_ROWS_PER_BATCH // 14 + 1, 6, 11, 12)  # more patches than are kept
    rows = layer_rows(conv, many, torch.Generator().manual_seed(0))
    every = nn.functional.unfold(many, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    every = every.transpose(1, 2).reshape(-1, 6 * 15)
    chosen = torch.randperm(len(every), generator=torch.Generator().manual_seed(0))[:MAX_ROWS_PER_BATCH]
    assert torch.equal(rows, every[chosen])
