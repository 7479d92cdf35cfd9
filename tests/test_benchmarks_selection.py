"""The equal-accuracy comparison of benchmarks/rate_accuracy.py: NNCodec's strongest configuration
is chosen on validation alone, within the budget, and a family's QP search finds the coarsest QP
that fits with each QP asked once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from rate_accuracy import coarsest_within  # noqa: E402
from report import OURS_DEFAULT, SWEEP, equal_accuracy, equal_accuracy_lines, strongest_within_budget  # noqa: E402

BUDGETS = {"top1": 0.5, "map": 1.0}


def _row(method: str, nbytes: int, val_drop: float, test_drop: float | None = None, setting=None) -> dict:
    row = dict(model="m", method=method, setting=setting if setting is not None else nbytes, bytes=nbytes,
               metric="top1", val_drop=val_drop)
    if test_drop is not None:
        row["top1_drop"] = test_drop
    return row


def test_strongest_is_the_smallest_nncodec_row_within_budget_on_validation():
    rows = [
        _row("nncodec-qp", 900, 0.1, 0.1),
        _row(SWEEP, 500, 0.6, 0.0, setting=dict(rule="qp", qp=-20, dq=True, lambda_scale=8.0)),  # over on val
        _row(SWEEP, 700, 0.5, 2.0, setting=dict(rule="qp", qp=-22, dq=False, lambda_scale=2.0)),  # test ignored
        _row("nncodec-our-allocation", 800, 0.2, 0.3),
        _row("ours", 100, 0.0, 0.0),  # not NNCodec
    ]
    best = strongest_within_budget(rows, 0.5)
    assert best["bytes"] == 700 and best["method"] == SWEEP
    assert strongest_within_budget(rows, 0.05) is None


def test_equal_accuracy_reports_the_winner_its_drops_and_the_ratio():
    rows = [_row(OURS_DEFAULT, 300, 0.3, 0.25, setting="rate search"),
            _row(SWEEP, 600, 0.4, setting=dict(rule="our-allocation", qp_offset=-3, dq=True, lambda_scale=2.0)),
            _row(SWEEP, 400, 0.9, setting=dict(rule="our-allocation", qp_offset=-1, dq=True, lambda_scale=2.0)),
            _row("nncodec-opt_qp", 1000, 0.0, 0.1)]
    rows[0]["search_validation"] = dict(drop_pt=0.3, drop_se_pt=0.15)
    c = equal_accuracy(rows, BUDGETS)
    assert c["ratio"] == pytest.approx(0.5)
    assert c["nncodec"]["bytes"] == 600 and c["nncodec"]["test_drop_pt"] is None  # not scored on test yet
    assert "QP offset -3, DQ on, lambda_scale 2" in c["nncodec"]["config"]
    assert (c["nncodec_configurations"], c["nncodec_within_budget"]) == (3, 2)
    assert c["ours"]["test_drop_pt"] == 0.25 and c["ours"]["search_drop_se_pt"] == 0.15
    table = "\n".join(equal_accuracy_lines({"equal_accuracy": [c]}))
    assert "| 300 |" in table and "| 600 |" in table and "0.50x" in table and "on 1 of 1 models" in table


def test_equal_accuracy_needs_our_default_and_says_when_no_nncodec_fits():
    assert equal_accuracy([_row("nncodec-qp", 100, 0.0, 0.0)], BUDGETS) is None
    c = equal_accuracy([_row(OURS_DEFAULT, 300, 0.3, 0.2), _row("nncodec-qp", 100, 3.0, 3.0)], BUDGETS)
    assert c["nncodec"] is None and c["ratio"] is None


@pytest.mark.parametrize("threshold", [-37, -31, -26, -25, -24, -19, -13])  # within a walk of 16 QPs
@pytest.mark.parametrize("start", [-25, -27, -23])
def test_coarsest_within_finds_the_threshold_asking_each_qp_once(threshold, start):
    asked = []

    def fits(qp: int) -> bool:
        asked.append(qp)
        return qp <= threshold

    assert coarsest_within(fits, start, 2, (-128, 127), max_walk=8) == threshold
    assert len(asked) == len(set(asked))
    assert len(asked) <= abs(threshold - start) // 2 + 4  # a walk, then one bisection of a 2-QP bracket


def test_coarsest_within_stops_at_the_bounds_and_gives_up_after_its_walk():
    assert coarsest_within(lambda qp: True, 0, 4, (-10, 10)) == 10
    assert coarsest_within(lambda qp: qp <= -9, 0, 4, (-10, 10)) == -9
    assert coarsest_within(lambda qp: False, 0, 4, (-10, 10)) is None
    assert coarsest_within(lambda qp: qp <= -50, 0, 2, (-128, 127), max_walk=8) is None  # beyond 16 QPs
