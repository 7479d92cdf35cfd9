"""The equal-accuracy comparison of benchmarks/rate_accuracy.py: NNCodec's strongest configuration
is chosen on validation alone, within the budget, and a family's QP search finds the coarsest QP
that fits with each QP asked once. The headline artifacts it commits are our default's container
and the same default's with fine-tuning, each a full folder that stock ``from_pretrained`` loads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageClassification

import hf_vae_compress  # noqa: F401 - registers the quantizer, as a user's import does
from hf_vae_compress import VAECompressionConfig, compress
from tests.conftest import tiny_vit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import rate_accuracy  # noqa: E402
from rate_accuracy import artifact_rows, coarsest_within, save_headline_artifacts  # noqa: E402
from report import (OURS_DEFAULT, OURS_DEFAULT_FINETUNED, SWEEP, equal_accuracy, equal_accuracy_lines,  # noqa: E402
                    finetuned_lines, strongest_within_budget)

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


def _searched(method: str, model: str, nbytes: int, test_drop: float, steps: int = 300) -> dict:
    return dict(_row(method, nbytes, 0.1, test_drop, setting=f"rate search, {steps} fine-tuning steps"), model=model,
                ratio_vs_fp32=1000 / nbytes, search_validation=dict(drop_pt=0.2, drop_se_pt=0.1),
                compress_seconds_dev_loaded=120.0, commit="0123456789",
                cli=f"hf-vae-compress compress {model} OUT --finetune-steps {steps} --finetune-schedule cosine")


def test_the_fine_tuned_table_pairs_each_models_two_defaults_and_counts_the_target():
    rows = [_searched(OURS_DEFAULT, "a", 300, 0.2), _searched(OURS_DEFAULT_FINETUNED, "a", 200, 0.3),  # 1.5x: met
            _searched(OURS_DEFAULT, "b", 300, 0.2), _searched(OURS_DEFAULT_FINETUNED, "b", 250, 0.1, 1000),  # 1.2x
            _searched(OURS_DEFAULT, "c", 300, 0.2)]  # no fine-tuned run: not in the table
    table = "\n".join(finetuned_lines({"rows": rows}))
    assert "| 1.50x | 300 |" in table and "| 1.20x | 1,000 |" in table and "`c`" not in table
    assert "+0.20 ± 0.10 / +0.30" in table and "on 1 of 2 models (a)" in table
    assert finetuned_lines({"rows": rows[4:]}) == []
    for row in rows[:2]:  # mAP: no standard error, the drop alone
        row["search_validation"] = dict(drop_pt=0.7, drop_se_pt=0.0)
    assert "| +0.70 / +0.20 |" in "\n".join(finetuned_lines({"rows": rows}))


def test_a_model_keeps_one_row_per_default_whatever_its_steps_and_every_setting_of_other_methods():
    """A rerun of the fine-tuned default at other steps replaces its row (and so its artifact)."""
    key = rate_accuracy._key
    assert key(_searched(OURS_DEFAULT_FINETUNED, "a", 200, 0.3)) == key(_searched(OURS_DEFAULT_FINETUNED, "a", 150, 0.3, 1000))
    assert key(_searched(OURS_DEFAULT_FINETUNED, "a", 200, 0.3)) != key(_searched(OURS_DEFAULT_FINETUNED, "b", 200, 0.3))
    assert key(_searched(OURS_DEFAULT, "a", 300, 0.2)) != key(_searched(OURS_DEFAULT_FINETUNED, "a", 300, 0.2))
    assert key(_row("ours", 100, 0.0, setting=0.5)) != key(_row("ours", 100, 0.0, setting=0.7))


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


def test_the_artifacts_are_the_default_and_the_fine_tuned_default_that_this_run_measured():
    rows = [_row(OURS_DEFAULT, 400, 0.3, 0.3, setting="rate search"), _row("ours-identity-ablation", 100, 0.1, 0.1),
            _row("ours-identity-ablation+finetune", 90, 0.1, 0.1, setting=dict(start_bpw=0.3, rate_weight=1.0)),
            _row(OURS_DEFAULT_FINETUNED, 250, 0.4, 0.2, setting="rate search, 300 fine-tuning steps")]
    chosen = artifact_rows(rows, {OURS_DEFAULT, OURS_DEFAULT_FINETUNED, "ours-identity-ablation+finetune"})
    assert (chosen[""]["method"], chosen[""]["bytes"]) == (OURS_DEFAULT, 400)
    assert (chosen["-finetuned"]["method"], chosen["-finetuned"]["bytes"]) == (OURS_DEFAULT_FINETUNED, 250)
    assert artifact_rows(rows, {OURS_DEFAULT_FINETUNED}).keys() == {"-finetuned"}
    assert artifact_rows(rows, {SWEEP}) == {}  # a rerun that measured neither keeps the committed artifacts


def test_an_artifact_is_a_full_folder_that_stock_from_pretrained_loads(vit_folder, tmp_path, monkeypatch):
    """The benchmark's output may be a bare container (as old runs left): the artifact is written
    through save_pretrained from the base model, so transformers loads it to the library's decode."""
    compressed = compress(tiny_vit(), VAECompressionConfig(target_bits_per_weight=3.0, transform="identity",
                                                           rounding="nearest"), progress=False)
    compressed.save(tmp_path / "run")
    monkeypatch.setattr(rate_accuracy, "ROOT", tmp_path)
    monkeypatch.setattr(rate_accuracy, "RESULTS", tmp_path / "results")
    row = dict(_row(OURS_DEFAULT, 1, 0.0, 0.0, setting="rate search"), output="run")
    save_headline_artifacts([row], {OURS_DEFAULT}, vit_folder)
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "results" / "artifacts" / "m")
    assert model.config.quantization_config.quant_method == "hf_vae_compress"
    state = model.state_dict()
    decoded = compressed.decode()
    assert decoded.keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in decoded.items())
