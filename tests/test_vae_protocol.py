"""The protocol table's checks (benchmarks/vae_protocol.py): what issue 24's must-show reads off it.

``auto`` may cost at most 0.5 % more bytes than identity on every model, and the VAE or ``auto``
must be at least 5 % smaller on two reference models; a configuration this checkout cannot build
is recorded as not available rather than measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hf_vae_compress.codec import FitConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from vae_protocol import compare, summary, unavailable  # noqa: E402


def _rows(identity: int, **others: int) -> dict:
    return {"identity": dict(bytes=identity), **{name.replace("_", "-"): dict(bytes=b) for name, b in others.items()}}


def test_auto_margin_is_half_a_percent_of_identity_bytes():
    assert compare(_rows(100_000, auto=100_500), True)["auto_within_margin"]
    assert not compare(_rows(100_000, auto=100_501), True)["auto_within_margin"]


def test_learned_win_needs_five_percent_on_two_references():
    models = {"a": dict(compare=compare(_rows(1000, vae_int=950, auto=1000), True)),
              "b": dict(compare=compare(_rows(1000, vae_int=990, auto=949), True)),
              "c": dict(compare=compare(_rows(1000, vae_int=500, auto=1000), False))}  # not a reference
    assert [models[m]["compare"]["learned_wins"] for m in "abc"] == [True, True, True]
    assert summary(models)["learned_wins_on_references"] == 2 and summary(models)["learned_wins_met"]
    models["b"]["compare"] = compare(_rows(1000, vae_int=951, auto=1000), True)
    assert not summary(models)["learned_wins_met"]


def test_auto_never_loses_fails_on_one_model_and_ignores_unmeasured_rows():
    models = {"a": dict(compare=compare(_rows(1000, auto=1000), True)),
              "b": dict(compare=compare({**_rows(1000, auto=1006), "vae-int-structured": dict(not_available="x")},
                                        True))}
    assert summary(models)["auto_models"] == 2 and not summary(models)["auto_never_loses"]
    assert "vae-int-structured" not in models["b"]["compare"]["vs_identity_pct"]


def test_unknown_field_or_value_is_recorded_not_measured():
    assert unavailable(dict(transform="identity"), FitConfig()) is None
    assert unavailable(dict(transform="no-such-transform"), FitConfig()).startswith("not available at ")
    assert unavailable(dict(transform="vae-int", no_such_field="e8"), FitConfig()).startswith("not available at ")
