"""The Fisher's backward passes within an activation budget: micro-batches give the whole batch's Fisher."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_vae_compress.codec.importance import (even_bounds, examples_per_backward, fisher_diagonal,
                                              saved_bytes_per_example, split_batch)


def _classifier() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 5))


def _labelled_loss(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cross-entropy against labels fixed by the input (each example's own), summed."""
    labels = (batch.flatten(1).sum(1) > 0).long()
    return F.cross_entropy(model(batch), labels, reduction="sum"), len(batch)


class _Detector(nn.Module):
    """Takes keyword inputs, as transformers models do; its loss needs per-example label dicts."""

    def __init__(self):
        super().__init__()
        self.net = _classifier()

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values * pixel_mask[:, None])


def _dict_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    out = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
    targets = torch.stack([label["class_labels"] for label in batch["labels"]])
    assert batch["scale"] == 2.0  # a value that is not per example reaches every micro-batch whole
    return batch["scale"] * F.cross_entropy(out, targets, reduction="sum"), len(batch["labels"])


def _images(seed: int, count: int = 10) -> torch.Tensor:
    return torch.randn(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _dict_batch(seed: int, count: int = 10) -> dict:
    generator = torch.Generator().manual_seed(100 + seed)
    return {"pixel_values": _images(seed, count), "pixel_mask": torch.randint(0, 2, (count, 8, 8), generator=generator),
            "labels": [{"class_labels": torch.randint(0, 5, (), generator=generator)} for _ in range(count)],
            "scale": 2.0}


def _counting(loss_fn):
    sizes = []

    def loss(model, batch):
        value, size = loss_fn(model, batch)
        sizes.append(size)
        return value, size
    return loss, sizes


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-7), name
    assert all(f.sum() > 0 for f in a.values())


@pytest.mark.parametrize("make_model, make_batch, loss_fn", [(_classifier, _images, _labelled_loss),
                                                             (_Detector, _dict_batch, _dict_loss)])
def test_micro_batches_give_the_whole_batch_fisher(make_model, make_batch, loss_fn):
    batches = [make_batch(i) for i in range(3)]
    whole_loss, whole_sizes = _counting(loss_fn)
    whole = fisher_diagonal(make_model(), batches, 3, whole_loss, progress=False, per_backward=10)
    split_loss, split_sizes = _counting(loss_fn)
    split = fisher_diagonal(make_model(), batches, 3, split_loss, progress=False, per_backward=3)
    assert whole_sizes == [10, 10, 10]
    assert split_sizes == [3, 3, 2, 2] * 3  # at most 3 examples per backward, near-equal parts
    _assert_close(split, whole)


def test_a_batch_within_the_budget_goes_whole_to_the_loss():
    batches = [_images(i) for i in range(2)]
    seen = []

    def loss(model, batch):
        seen.append(batch)
        return _labelled_loss(model, batch)

    fisher_diagonal(_classifier(), batches, 2, loss, progress=False)  # a small model: the rule keeps the batch
    assert len(seen) == 2 and all(a is b for a, b in zip(seen, batches))


def test_saved_bytes_are_the_activations_of_one_example():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    # the first layer keeps its input (10 floats), ReLU its output (20), which the last layer's input shares;
    # weights are not counted, nor the rest of the batch the example is cut from
    assert saved_bytes_per_example(model, torch.randn(64, 10)) == 4 * (10 + 20)
    per_example = saved_bytes_per_example(_classifier(), _images(0))
    assert per_example >= 4 * 3 * 8 * 8 + 4 * 4 * 8 * 8  # at least the input and one feature map
    assert examples_per_backward(_classifier(), _images(0), budget=4 * per_example + 1) == 4
    assert examples_per_backward(_classifier(), _images(0), budget=1) == 1


def test_the_rule_bounds_every_backward_of_a_large_batch():
    per_example = saved_bytes_per_example(_classifier(), _images(0))
    budget = 3 * per_example  # three examples' activations
    loss, sizes = _counting(_labelled_loss)
    per_backward = examples_per_backward(_classifier(), _images(0), budget)
    fisher_diagonal(_classifier(), [_images(0, 32)], 1, loss, progress=False, per_backward=per_backward)
    assert sum(sizes) == 32 and max(sizes) * per_example <= budget


def test_split_batch_cuts_tensors_lists_and_dicts_along_the_batch():
    batch = _dict_batch(0, 5)
    first, second = split_batch(batch, even_bounds(5, 3))
    assert torch.equal(first["pixel_values"], batch["pixel_values"][:3])
    assert torch.equal(second["pixel_mask"], batch["pixel_mask"][3:])
    assert first["labels"] == batch["labels"][:3] and second["labels"] == batch["labels"][3:]
    assert first["scale"] == second["scale"] == 2.0
    assert [len(p) for p in split_batch(torch.zeros(7, 2), even_bounds(7, 2))] == [2, 2, 2, 1]
    assert even_bounds(10, 10) == [(0, 10)] and even_bounds(10, 4) == [(0, 4), (4, 7), (7, 10)]
