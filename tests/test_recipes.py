"""The training recipes' schedule and input-size helpers (the recipes themselves run for minutes to an hour)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
from train_reference import augment, build, fit_to_budget, image_size, one_cycle, resized  # noqa: E402

from hf_vae_compress.data import image_transform, load_fashion_mnist  # noqa: E402


class _OneProcess:
    num_processes = 1

    @staticmethod
    def reduce(tensor, reduction):
        return tensor


def test_one_cycle_warms_up_peaks_and_decays_to_zero():
    factors = [one_cycle(step, 100) for step in range(101)]
    assert factors[0] < factors[5] < factors[14] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[15:], factors[16:]))
    assert factors[100] == pytest.approx(0.0, abs=1e-9)


def test_fit_to_budget_plans_the_steps_that_fit_and_never_more_than_planned():
    # 0.5 s a step and 10 minutes: 95 % of 1200 steps fit
    assert fit_to_budget(5000, 30, 15.0, 10, _OneProcess()) == 1140
    assert fit_to_budget(500, 30, 15.0, 10, _OneProcess()) == 500
    assert fit_to_budget(5000, 30, 15.0, 0.01, _OneProcess()) == 30  # already over: stop where it is


def test_an_upsampled_reference_model_is_trained_and_loaded_at_the_same_size():
    """The MobileNet trains on 56x56 upsampled images; its pretrained_cfg makes loaders resize alike."""
    size = image_size("fmnist-mobilenetv3")
    assert size == 56 and image_size("fmnist-resnet18") == 28
    model = build("fmnist-mobilenetv3")
    image = load_fashion_mnist("test").select(range(1))[0]["image"]
    assert image_transform(model)(image).shape == (1, size, size)
    batch = resized(augment(torch.zeros(2, 1, 28, 28)), size)
    assert batch.shape == (2, 1, size, size)
    assert resized(batch[:, :, :28, :28], 28).shape == (2, 1, 28, 28)
