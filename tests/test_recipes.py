"""The training recipes' schedule helpers (the recipes themselves run for minutes to an hour)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
from train_reference import fit_to_budget, one_cycle  # noqa: E402


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
