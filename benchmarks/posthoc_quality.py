"""Post-hoc quality: what output-aware rounding and the free corrections buy (``make bench-posthoc``).

For every reference model, one shared calibration (:class:`~hf_vae_compress.pipeline.Source`)
and, per variant, the library's own rate search (:func:`~hf_vae_compress.search.search_smallest`:
the smallest container whose validation drop plus one standard error fits the task's budget).
The chosen container is then scored on the **test** split. Variants (config fields):

- ``nearest``: round to the nearest level (the previous pipeline, in format v2);
- ``nearest+corrections``: the same, with bias and norm corrections;
- ``output_aware``: GPTQ error compensation on the entropy-coded grid (the default);
- ``output_aware+corrections``: with bias and norm corrections as well;
- ``output_aware+tensor_steps``: one absolute step per tensor (``normalization="tensor"``, as
  NNCodec does) instead of a step relative to each row's RMS;
- ``output_aware+unfolded_batchnorm``: BatchNorm's running statistics stored as they are, not
  folded into its weight and bias (rows measured before folding became the default are this);
- ``rate_aware``: GPTQ with each level chosen against its symbol's code length, the code length's
  quadratic part moved into ``H`` as a ridge (CERWU, :mod:`hf_vae_compress.codec.output_aware`), at
  ``RATE_SCALE`` times the measured ECSQ slope.

Rows are merged into the JSON: a model or variant not measured keeps its previous row. Each row
records the commit it was measured at, how many BatchNorms its container stores folded (rows
without the count predate folding) and, for ``rate_aware``, the ``rate_scale`` it ran with.

Every step is deterministic given the calibration subset; the subset is a random draw, so
``--calibration-seeds`` reruns the search on other draws (rows ``variant (calibration seed N)``).
``previous_headline`` is last session's post-hoc headline from ``rate_accuracy.json`` (the
smallest container of our pipeline within budget on validation, any transform), the reference
the ratio ``vs_previous`` is measured against.

Timing (``--timing``): fixed-rate compress of resnet18 with each rounding, and of a 25 M-weight
timm ``resnet50`` (random weights, random calibration images: only the time is measured).
Writes ``benchmarks/results/posthoc_quality.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from hf_vae_compress.codec import VAECompressionConfig, compress
from hf_vae_compress.codec.calibration import calibrate
from hf_vae_compress.codec.output_aware import RATE_SCALE
from hf_vae_compress.models import load_model
from hf_vae_compress.pipeline import Source
from hf_vae_compress.search import search_smallest
from hf_vae_compress.tasks import Classification, task_for

logger = logging.getLogger("posthoc_quality")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUTPUT = RESULTS / "posthoc_quality.json"
REFERENCES = ["fmnist-resnet18", "fmnist-mobilenetv3", "fmnist-vit", "fmnist-rtdetr"]
VARIANTS = {
    "nearest": dict(rounding="nearest"),
    "nearest+corrections": dict(rounding="nearest", correct_biases=True, correct_norms=True),
    "output_aware": dict(rounding="output_aware"),
    "output_aware+corrections": dict(rounding="output_aware", correct_biases=True, correct_norms=True),
    "output_aware+tensor_steps": dict(rounding="output_aware", normalization="tensor"),
    "output_aware+unfolded_batchnorm": dict(rounding="output_aware", fold_batchnorm=False),
    "rate_aware": dict(rounding="rate_aware"),
}
PREVIOUS_METHODS = ("ours", "ours-identity-ablation")


def previous_headline(model: str) -> dict | None:
    """Last session's post-hoc headline of our pipeline (any transform) from rate_accuracy.json."""
    data = json.loads((RESULTS / "rate_accuracy.json").read_text())
    metric = "map" if "rtdetr" in model else "top1"
    budget = data["budget_pt"][metric]
    rows = [r for r in data["rows"] if r["model"] == model and r["method"] in PREVIOUS_METHODS
            and r["val_drop"] <= budget]
    if not rows:
        return None
    best = min(rows, key=lambda r: r["bytes"])
    return dict(method=best["method"], setting=best["setting"], bytes=best["bytes"],
                ratio_vs_fp32=best["ratio_vs_fp32"], test_drop_pt=best.get(f"{metric}_drop"))


def test_drop(src: Source, compressed, held_out, base: float) -> float:
    """Drop in points of the task metric on ``held_out`` (the test split) from ``base``."""
    scorer = copy.deepcopy(src.model)
    scorer.load_state_dict(compressed.decode(), strict=True)
    return 100 * (base - src.task.score(scorer, held_out)[src.task.metric])


def measure_model(name: str, variants: list[str], previous: dict | None, seed: int = 0) -> dict:
    """Search every variant of ``variants`` on one model, calibrated on draw ``seed``; rows not
    measured here keep their ``previous`` values."""
    start = time.perf_counter()
    src = Source.open(ROOT / "reference_models" / name, "default", VAECompressionConfig.calibration_batches,
                      progress=False, calibration_seed=seed)
    calibration_seconds = time.perf_counter() - start
    test = src.task.prepare(src.model, src.task.load("test"))
    base = src.task.score(src.model, test)[src.task.metric]
    out = dict(model=name, calibration_seconds=round(calibration_seconds, 1), budget_pt=src.task.budget_pt,
               metric=src.task.metric, previous_headline=previous_headline(name),
               variants=dict((previous or {}).get("variants", {})))
    for variant in variants:
        config = VAECompressionConfig(**VARIANTS[variant])
        result = search_smallest(src, None, src.task.budget_pt, "default", config, progress=False)
        row = dict(config=VARIANTS[variant], search_seconds=round(result.seconds, 1), probes=result.probes,
                   commit=_commit())
        if config.rounding == "rate_aware":
            row["rate_scale"] = RATE_SCALE
        if result.compressed is not None:
            report = result.compressed.report()
            row.update(bytes=report["total_bytes"], ratio_vs_fp32=report["ratio_vs_fp32"],
                       bits_per_weight=report["bits_per_weight"],
                       side_information_fraction=report["side_information_fraction"],
                       batchnorm_folded=result.compressed.batchnorm_folded,
                       validation=result.validation, test_drop_pt=test_drop(src, result.compressed, test, base))
            previous = out["previous_headline"]
            if previous:
                row["vs_previous"] = previous["bytes"] / report["total_bytes"]
        key = variant if seed == 0 else f"{variant} (calibration seed {seed})"
        logger.info("%s %s: %s", name, key, {k: v for k, v in row.items() if k not in ("probes", "validation")})
        out["variants"][key] = dict(row, calibration_seed=seed)
    return out


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()


def _timed(model: torch.nn.Module, batches: list, config: VAECompressionConfig) -> dict:
    start = time.perf_counter()
    calibration = calibrate(model, batches, len(batches), Classification.fisher_loss(), progress=False)
    calibrated = time.perf_counter()
    compressed = compress(model, config, progress=False, calibration=calibration)
    done = time.perf_counter()
    return dict(calibration_seconds=round(calibrated - start, 1), compress_seconds=round(done - calibrated, 1),
                total_seconds=round(done - start, 1), bytes=len(compressed.to_bytes()))


def measure_timing(bpw: float) -> dict:
    """Fixed-rate compress wall-clock, nearest against output-aware, on resnet18 (its own
    calibration data) and on a random-weight timm resnet50 (random 224 x 224 images)."""
    import timm

    out = dict(threads=torch.get_num_threads(), target_bits_per_weight=bpw)
    resnet18 = load_model(ROOT / "reference_models" / "fmnist-resnet18")
    batches, _ = task_for(resnet18, "default").calibration(resnet18, VAECompressionConfig.calibration_batches)
    generator = torch.Generator().manual_seed(0)
    resnet50 = timm.create_model("resnet50", pretrained=False).eval()
    random_images = [torch.randn(32, 3, 224, 224, generator=generator)
                     for _ in range(VAECompressionConfig.calibration_batches)]
    for name, model, data in (("fmnist-resnet18", resnet18, batches), ("timm-resnet50-random", resnet50, random_images)):
        out[name] = dict(num_weights=sum(p.numel() for p in model.parameters()))
        for rounding in ("nearest", "output_aware"):
            config = VAECompressionConfig(target_bits_per_weight=bpw, rounding=rounding)
            out[name][rounding] = _timed(model, data, config)
            logger.info("timing %s %s: %s", name, rounding, out[name][rounding])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=REFERENCES)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--calibration-seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--timing", action="store_true", help="also time resnet18 and a timm resnet50")
    parser.add_argument("--timing-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    previous = json.loads(OUTPUT.read_text()) if OUTPUT.exists() else {}
    models = dict(previous.get("models", {}))
    if not args.timing_only:
        for name in args.models:
            for seed in args.calibration_seeds:
                models[name] = measure_model(name, args.variants, models.get(name), seed)
                _write(previous, models, previous.get("timing"))
    if args.timing or args.timing_only:
        _write(previous, models, measure_timing(0.5))


def _write(previous: dict, models: dict, timing: dict | None) -> None:
    result = dict(previous, models=models, timing=timing, selection="search_smallest: smallest probe whose "
                  "validation drop + 1 SE fits the budget (mAP: no SE); drop reported on test",
                  platform=dict(python=platform.python_version(), machine=platform.machine(),
                                torch=torch.__version__, threads=torch.get_num_threads()))
    OUTPUT.write_text(json.dumps(result, indent=1, default=_plain) + "\n")


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(type(value))


if __name__ == "__main__":
    main()
