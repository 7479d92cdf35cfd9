"""Calibration: the Fisher's forward passes also measure the layer input moments, within the memory budgets."""

import os
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from hf_vae_compress.codec import calibration as calibration_module
from hf_vae_compress.codec.calibration import (MAX_ROWS_PER_BATCH, _passes, calibrate, layer_rows, layer_statistics,
                                               output_aware_layers)
from hf_vae_compress.codec.importance import saved_bytes_per_example


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _loss(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    return model(batch).square().sum(), len(batch)


def _count_forwards(model: nn.Module) -> list:
    """The number of examples of every forward of ``model``."""
    calls = []
    model.register_forward_pre_hook(lambda _, args: calls.append(len(args[0])))
    return calls


BATCHES = [torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def test_the_fisher_pass_measures_the_moments_of_separate_passes():
    model = _model()
    calls = _count_forwards(model)
    calibration = calibrate(model, BATCHES, len(BATCHES), _loss, progress=False)
    assert calls == [1] + [8] * len(BATCHES)  # one example's to size the backward, then the Fisher's passes only
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
    assert calls == [1] + [8] * 2 * len(BATCHES)  # the Fisher's passes, then one more for the linear layer
    together = calibrate(model, BATCHES, len(BATCHES), _loss, progress=False)
    for name in layers:
        assert torch.allclose(split.layers[name].second, together.layers[name].second, atol=1e-6)
        assert torch.allclose(split.layers[name].mean, together.layers[name].mean, atol=1e-6)


@pytest.mark.parametrize("conv", [nn.Conv2d(6, 6, (3, 5), stride=(2, 1), padding=(2, 0), dilation=(1, 2), groups=3),
                                  nn.Conv2d(6, 6, 1, stride=2, padding=1)])  # one pixel per row: gathered otherwise
def test_patches_are_the_rows_of_unfold_at_any_geometry(conv):
    x = torch.randn(3, 6, 11, 12)
    unfolded = nn.functional.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    d = conv.in_channels * conv.weight[0, 0].numel()
    expected = unfolded.transpose(1, 2).reshape(-1, d)
    assert torch.equal(layer_rows(conv, x, torch.Generator().manual_seed(0)), expected)
    many = torch.randn(2 * MAX_ROWS_PER_BATCH // 14 + 1, 6, 11, 12)  # more patches than are kept (>= 14 per image)
    rows = layer_rows(conv, many, torch.Generator().manual_seed(0))
    every = nn.functional.unfold(many, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    every = every.transpose(1, 2).reshape(-1, d)
    chosen = torch.randperm(len(every), generator=torch.Generator().manual_seed(0))[:MAX_ROWS_PER_BATCH]
    assert torch.equal(rows, every[chosen])


def _assert_same_statistics(a, b) -> None:
    assert list(a.layers) == list(b.layers)
    for name in a.layers:
        assert torch.allclose(a.layers[name].second, b.layers[name].second, atol=1e-6)
        assert torch.allclose(a.layers[name].mean, b.layers[name].mean, atol=1e-6)
    for name in a.fisher:
        assert torch.allclose(a.fisher[name], b.fisher[name], rtol=1e-4, atol=1e-8)


def test_a_small_activation_budget_splits_the_fisher_batches_and_measures_the_same():
    model = _model()
    per_example = saved_bytes_per_example(model, BATCHES[0])
    calls = _count_forwards(model)
    split = calibrate(model, BATCHES, len(BATCHES), _loss, progress=False, activation_bytes=3 * per_example)
    assert calls == [1] + [3, 3, 2] * len(BATCHES)  # micro-batches of at most 3 examples
    whole = calibrate(model, BATCHES, len(BATCHES), _loss, progress=False)
    assert calls[1 + 9 + 1:] == [8] * len(BATCHES)  # the default budget keeps these small batches whole
    _assert_same_statistics(split, whole)  # every row is kept here, so the moments are those of whole batches


def test_micro_batches_keep_a_batch_s_share_of_the_moment_rows(monkeypatch):
    monkeypatch.setattr(calibration_module, "MAX_ROWS_PER_BATCH", 64)  # fewer than a batch's 8 * 36 patches
    model = _model()
    per_example = saved_bytes_per_example(model, BATCHES[0])
    counted = {}
    for name, budget in [("whole", 1 << 30), ("split", 3 * per_example)]:
        with monkeypatch.context() as patch:
            moments = calibration_module._moments
            patch.setattr(calibration_module, "_moments", lambda module, sums, rows:
                          counted.setdefault(name, []).append(len(rows)) or moments(module, sums, rows))
            calibrate(model, BATCHES, len(BATCHES), _loss, progress=False, activation_bytes=budget)
    assert counted["whole"] == [64, 64, 8] * len(BATCHES)  # two convolutions' 64 rows, the linear layer's 8
    # per micro-batch of 3 (then 2) examples: ceil(64 * 3 / 8) = 24 (then 16) rows: a batch keeps 64 as whole
    assert counted["split"] == [24, 24, 3, 24, 24, 3, 16, 16, 2] * len(BATCHES)


class _Made(Sequence):
    """``BATCHES`` made afresh each time one is taken, counting how many are alive at once (the
    Fisher and the moments must not hold them all, as a list of floats would)."""

    def __init__(self):
        self.made = 0

    def __len__(self) -> int:
        return len(BATCHES)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        self.made += 1
        return BATCHES[index].clone()


def test_a_sequence_of_batches_is_kept_as_it_is_and_measures_what_a_list_does():
    model = _model()
    made = _Made()
    kept = calibrate(model, made, len(BATCHES), _loss, progress=False)
    listed = calibrate(model, list(BATCHES), len(BATCHES), _loss, progress=False)
    assert kept.batches is made  # not listed: norm correction takes its batches from it again
    assert made.made == 1 + len(BATCHES)  # one batch to size the backward, then each once for the Fisher
    for name in listed.layers:
        assert torch.equal(kept.layers[name].second, listed.layers[name].second)
        assert torch.equal(kept.layers[name].mean, listed.layers[name].mean)
    assert all(torch.equal(kept.fisher[n], listed.fisher[n]) for n in listed.fisher)
    assert len(calibrate(model, made, 2, _loss, progress=False).batches) == 2  # a longer sequence is cut


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(calibration_module._MALLOC_TRIM is None or not os.path.exists("/proc/self/statm"),
                    reason="glibc's malloc_trim and /proc are needed")
def test_memory_freed_into_the_heap_is_given_back_after_calibration():
    """Tensors of a few MB freed after a larger one stay in glibc's heap (its mmap threshold rose to
    the larger size), as the Fisher's activations did; release_freed_memory gives them back."""
    large = torch.ones(16 << 18)  # 16 MB, mmapped ...
    del large  # ... and freed: the threshold rises to 16 MB
    held = [torch.ones(1 << 20) for _ in range(100)]  # 100 x 4 MB from the heap
    last = held.pop()  # the heap's top stays in use, so only trimming inside it can give memory back
    held.clear()
    before = _rss_bytes()
    calibration_module.release_freed_memory()
    assert before - _rss_bytes() > 200 << 20  # most of the 396 MB freed
    assert last.sum() == 1 << 20


@pytest.mark.parametrize("d", [5, 8, 13, 40])
def test_the_blocked_gram_sums_the_symmetric_products_of_the_rows(d):
    """Blocks on and below the diagonal are summed, and those above copied from below once the last
    rows are in, so the result is exactly symmetric; every entry is still the sum of products of
    two columns (compared within float tolerance: block shapes may pick other kernels)."""
    g = torch.Generator().manual_seed(d)
    parts = [torch.randn(30, d, generator=g) for _ in range(3)]
    total = None
    for rows in parts:
        total = calibration_module.add_gram(total, rows, block=4)
    result = calibration_module.mirror_gram(total, block=4)
    assert torch.equal(result, result.T)
    every = torch.cat(parts)
    assert torch.allclose(result, every.T @ every, rtol=1e-5, atol=1e-4)
