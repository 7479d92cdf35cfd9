"""The README generator renders what the recipes and benchmarks measured, and nothing else."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from default_compress import cli_error  # noqa: E402
from report import (UNFOLDED, artifact_link, default_lines, rate_aware_baseline, rate_aware_lines,  # noqa: E402
                    reference_lines, vae_gptq_lines, vae_protocol_lines)


def test_reference_table_has_one_row_per_trained_model_with_its_measured_metric(tmp_path):
    results = {
        "clf": dict(model="clf", top1=0.9167, num_params=1527818, train_seconds=1528.7, num_processes=2, steps=5551),
        "det": dict(model="det", map=0.7377, num_params=1392784, train_seconds=3366.3, num_processes=2),
    }
    for name, result in results.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_result.json").write_text(json.dumps(result))
    (tmp_path / "untrained").mkdir()  # no train_result.json: not listed
    rows = [line for line in reference_lines(tmp_path) if line.startswith("| `")]
    assert rows == ["| `clf` | 1,527,818 | top-1 91.67 % | 25.5 min | 2 | 5551 |",
                    "| `det` | 1,392,784 | mAP@[.5:.95] 0.7377 | 56.1 min | 2 |  |"]


def test_a_row_links_the_committed_artifact_only_when_it_is_the_rows_container(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "weights.vaec.safetensors").write_bytes(b"x" * 1234)
    assert artifact_link("m", 1234, tmp_path) == " ([artifact](benchmarks/results/artifacts/m))"
    assert artifact_link("m", 1235, tmp_path) == ""  # another run's container: its numbers are not these
    assert artifact_link("absent", 1234, tmp_path) == ""


def test_the_learned_transform_table_shows_each_rates_change_against_identity_and_what_auto_kept(tmp_path):
    def point(bpw, variant, pct):
        return dict(target_bpw=bpw, variant=variant, identity_bytes=1000, bytes_at_identity_error=None,
                    vs_identity_pct=pct)
    data = dict(protocol="fixed rates", commit="abcdef1234", cpu="some CPU", models={"m": dict(
        rows=[dict(variant="auto", target_bpw=2.0, maps=1, coded_tensors=5)],
        equal_error=[point(2.0, "vae-int-loop", 12.345), point(2.0, "auto", -0.5), point(3.0, "vae-int-loop", None)])})
    path = tmp_path / "vae_gptq.json"
    path.write_text(json.dumps(data))
    rows = [line for line in vae_gptq_lines(path) if line.startswith("| `")]
    assert rows == ["| `m` | 2.0 | 1,000 | +12.35 % | -0.50 % | 1 of 5 |",
                    "| `m` | 3.0 | 1,000 | n/a | n/a |  |"]
    assert vae_gptq_lines(tmp_path / "absent.json") == []


def test_the_protocol_table_shows_each_configurations_search_result_and_what_was_not_measured(tmp_path):
    def row(config, nbytes, drop, maps=0):
        return dict(config=config, bytes=nbytes, ratio_vs_fp32=4000 / nbytes, test_drop_pt=drop, maps_kept=maps,
                    fit_steps=800, commit="abcdef1234")
    rows = {"identity": row(dict(transform="identity"), 1000, 0.25),
            "vae-int": row(dict(transform="vae-int"), 1200, 0.125),
            "vae-int-structured": dict(config=dict(transform="vae-int"), not_available="no lattice here"),
            "auto": row(dict(transform="auto"), 999, 0.3, maps=2)}
    summary = dict(rule="r", auto_models=1, models_compared=1, auto_never_loses=True, learned_wins_on_references=0,
                   learned_wins_required=2)
    data = dict(protocol="p", summary=summary, models={"m": dict(metric="top1", rows=rows)})
    path = tmp_path / "vae_protocol.json"
    path.write_text(json.dumps(data))
    assert [line for line in vae_protocol_lines(path) if line.startswith("| `")] == [
        "| `m` | 1,000 (4.0x), 0.25 pt | 1,200 (3.3x), 0.12 pt | no lattice here | 999 (4.0x), 0.30 pt, 2 maps "
        "| 800 | `abcdef1` |"]
    assert vae_protocol_lines(tmp_path / "absent.json") == []


def test_the_rate_aware_table_compares_the_larger_container_of_each_variants_draws():
    def row(nbytes, drop, commit="abcdef1234"):
        return dict(bytes=nbytes, ratio_vs_fp32=10_000 / nbytes, test_drop_pt=drop, search_seconds=nbytes / 10,
                    commit=commit)
    variants = {"output_aware": row(1000, 0.1), "output_aware (calibration seed 1)": row(1100, 0.2),
                "rate_aware": row(800, 0.3), "rate_aware (calibration seed 1)": row(880, 0.1, "1234567abc")}
    one_draw = {"output_aware": row(1000, 0.1), "rate_aware": row(500, 0.1)}  # a single draw: not compared
    unmet = {"output_aware": row(100, 0.0), "rate_aware": row(90, 0.0), "rate_aware (calibration seed 1)": row(95, 0.0),
             "output_aware (calibration seed 1)": row(99, 0.0)}
    data = dict(models={"m": dict(metric="top1", variants=variants), "single": dict(metric="top1", variants=one_draw),
                        "small": dict(metric="top1", variants=unmet)})
    lines = rate_aware_lines(data)
    rows = [line for line in lines if line.startswith(("| m |", "| small |"))]
    assert rows == ["| m | 1,100 (9.1x) | 880 (11.4x) | 1.25x | 0.30 pt | 110 / 88 | `1234567`, `abcdef1` |",
                    "| small | 100 (100.0x) | 95 (105.3x) | 1.05x | 0.00 pt | 10 / 10 | `abcdef1` |"]
    assert any("met on 1 of 2 models" in line for line in lines)
    assert rate_aware_lines(dict(models={"single": dict(metric="top1", variants=one_draw)})) == []


def test_rate_aware_rows_from_before_folding_compare_with_the_unfolded_default():
    def row(nbytes, folded=None):
        out = dict(bytes=nbytes, ratio_vs_fp32=10_000 / nbytes, test_drop_pt=0.1, search_seconds=1.0, commit="abcdef1234")
        return out if folded is None else dict(out, batchnorm_folded=folded)
    old_rate = {"rate_aware": row(900), "rate_aware (calibration seed 1)": row(950)}
    unfolded = {UNFOLDED: row(1000, 0), f"{UNFOLDED} (calibration seed 1)": row(1000, 0)}
    folded = {"output_aware": row(800, 5), "output_aware (calibration seed 1)": row(800, 5)}
    assert rate_aware_baseline({**old_rate, **unfolded, **folded}) == UNFOLDED
    assert rate_aware_baseline({**old_rate, **folded}) == "output_aware"  # nothing else to compare with
    new_rate = {"rate_aware": row(700, 5), "rate_aware (calibration seed 1)": row(750, 5)}
    assert rate_aware_baseline({**new_rate, **unfolded, **folded}) == "output_aware"
    data = dict(models={"m": dict(metric="top1", variants={**old_rate, **unfolded, **folded})})
    assert [line for line in rate_aware_lines(data) if line.startswith("| m ")] == [
        "| m (both without BatchNorm folding) | 1,000 (10.0x) | 950 (10.5x) | 1.05x | 0.10 pt | 1 / 1 | `abcdef1` |"]


def test_a_refused_data_free_run_is_shown_as_refused(tmp_path):
    default = dict(bytes=1000, ratio_vs_fp32=10.0, validation=dict(drop_pt=0.2), test_drop_pt=0.3, probes=5,
                   compress_seconds=20.0, commit="abcdef1234")
    row = dict(model="m", reference=False, metric="top1", default=default, default_time_vs_fixed_rate=1.5,
               data_free=dict(failed="no rate tried kept the validation drop within 0.25 pt", commit="1234567abc"))
    path = tmp_path / "default_compress.json"
    path.write_text(json.dumps(dict(rows=[row])))
    assert [line for line in default_lines(path) if line.startswith("| `m`")] == [
        "| `m` (not a reference model) | 1,000 (10.0x) | 0.20 pt | 0.30 pt | 5 | 20 s (1.5x) "
        "| refused: no rate kept the check's budget (`1234567`) | `abcdef1` |"]


def test_a_refused_run_keeps_the_clis_error_line_not_its_progress_bars():
    refusal = "hf-vae-compress compress: error: no rate tried kept the drop on agreement within 0.25 pt"
    stderr = "\n".join(["rate search:  83%|###  | 5/6 [00:02<00:00]", "\x1b[A" * 3, "\rverifying: 100%|####|\r" + refusal])
    assert cli_error(stderr) == refusal
    crash = "Traceback (most recent call last):\n  ...\nRuntimeError: out of memory"
    assert cli_error(crash) == crash  # no error line: the tail, which is all there is
