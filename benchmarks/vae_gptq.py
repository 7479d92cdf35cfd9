"""The portable VAE inside GPTQ's loop and ``transform="auto"`` against identity + GPTQ (issue 24).

For each model and each fixed target rate, one shared calibration (Fisher and layer inputs, as
the library measures them), four configurations are compressed with the library's own pipeline:

- ``identity``: identity transform + output-aware rounding (GPTQ), the default;
- ``vae-int-nearest``: the portable VAE, its encoder's nearest latents (``rounding="nearest"``);
- ``vae-int-loop``: the portable VAE, latents chosen inside GPTQ's column loop;
- ``auto``: per tensor, identity or the VAE map, by measured bits at equal output error.

Per row: the container's real bytes, ``output_error`` (``sum tr(dW H dWᵀ)`` over the coded layers
with measured inputs: the H-weighted distortion GPTQ minimises), the validation drop (the
library's selection split) and the test drop, in points. ``equal_error`` reads each variant's
bytes at the identity's output error off its own rate-distortion line (log error, linear in
bytes, between its two nearest rates), over the identity's bytes, minus one (negative: smaller).
The VAE's fit runs ``--fit-steps`` steps (recorded). Seconds were measured on a shared, loaded
2-core machine (dev, loaded). Writes ``benchmarks/results/vae_gptq.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import subprocess
import time
from pathlib import Path

import torch

from hf_vae_compress.codec import FitConfig, VAECompressionConfig, compress
from hf_vae_compress.pipeline import Source

logger = logging.getLogger("vae_gptq")

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "benchmarks" / "results" / "vae_gptq.json"
VARIANTS = {"identity": dict(transform="identity"),
            "vae-int-nearest": dict(transform="vae-int", rounding="nearest"),
            "vae-int-loop": dict(transform="vae-int"),
            "auto": dict(transform="auto")}


def output_error(src: Source, decoded: dict[str, torch.Tensor]) -> float:
    """``sum tr(dW H dWᵀ)`` over the layers whose inputs the calibration measured."""
    original = src.model.state_dict()
    total = 0.0
    for name, inputs in src.calibration.layers.items():
        h = inputs.second.double()
        dw = (decoded[name].double() - original[name].double()).reshape(h.shape[0], -1, h.shape[-1])
        total += float(((dw @ h) * dw).sum())
    return total


def test_drop(src: Source, decoded: dict[str, torch.Tensor], test, base: float) -> float:
    scorer = copy.deepcopy(src.model)
    scorer.load_state_dict(decoded, strict=True)
    return 100 * (base - src.task.score(scorer, test)[src.task.metric])


def measure(src: Source, variant: str, rate: float, fit: FitConfig, test, base: float) -> dict:
    config = VAECompressionConfig(target_bits_per_weight=rate, fit=fit, **VARIANTS[variant])
    start = time.perf_counter()
    compressed = compress(src.model, config, calibration=src.calibration, progress=False)
    seconds = time.perf_counter() - start
    decoded = compressed.decode()
    validation = src.validation_drop(compressed)
    coded = [e for e in compressed.header["tensors"] if e["codec"] not in ("float", "raw")]
    row = dict(variant=variant, target_bpw=rate, bytes=len(compressed.to_bytes()), rounding=compressed.config.rounding,
               maps=len(compressed.header["transform"].get("linear_maps", [])), coded_tensors=len(coded),
               output_error=output_error(src, decoded), val_drop_pt=validation["drop_pt"],
               val_drop_se_pt=validation.get("drop_se_pt"), test_drop_pt=test_drop(src, decoded, test, base),
               compress_seconds_dev_loaded=round(seconds, 1))
    logger.info("%s", row)
    return row


def bytes_at(rows: list[dict], error: float) -> float | None:
    """Bytes at ``error`` on the line through the two rows nearest it (log error, linear in bytes)."""
    points = sorted((r["bytes"], math.log(r["output_error"])) for r in rows)
    for (b0, e0), (b1, e1) in zip(points, points[1:]):
        if min(e0, e1) <= math.log(error) <= max(e0, e1) and e0 != e1:
            return b0 + (b1 - b0) * (math.log(error) - e0) / (e1 - e0)
    return None


def equal_error(rows: list[dict]) -> list[dict]:
    out = []
    for ref in (r for r in rows if r["variant"] == "identity"):
        for variant in VARIANTS:
            if variant == "identity":
                continue
            at = bytes_at([r for r in rows if r["variant"] == variant], ref["output_error"])
            out.append(dict(target_bpw=ref["target_bpw"], variant=variant, identity_bytes=ref["bytes"],
                            bytes_at_identity_error=None if at is None else round(at),
                            vs_identity_pct=None if at is None else round(100 * (at / ref["bytes"] - 1), 2)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["fmnist-mobilenetv3"])
    parser.add_argument("--rates", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--fit-steps", type=int, default=FitConfig.train_steps)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    fit = FitConfig(train_steps=args.fit_steps)
    previous = json.loads(OUTPUT.read_text()) if OUTPUT.exists() else {}
    models = dict(previous.get("models", {}))
    for name in args.models:
        torch.manual_seed(0)
        src = Source.open(ROOT / "reference_models" / name, "default", VAECompressionConfig.calibration_batches,
                          progress=False)
        test = src.task.prepare(src.model, src.task.load("test"))
        base = src.task.score(src.model, test)[src.task.metric]
        rows = []
        for rate in args.rates:  # written after every row: a partial run still leaves what it measured
            for variant in args.variants:
                rows.append(measure(src, variant, rate, fit, test, base))
                models[name] = dict(metric=src.task.metric, budget_pt=src.task.budget_pt, fit_steps=args.fit_steps,
                                    rows=rows, equal_error=equal_error(rows))
                _write(models)
        print(json.dumps(models[name]["equal_error"], indent=2))


def _write(models: dict) -> None:
    OUTPUT.write_text(json.dumps(dict(
        models=models, protocol="fixed target rates, one shared calibration; no rate-search (protocol) rows",
        commit=subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        torch=torch.__version__, machine=platform.machine(), processor=platform.processor(), cpu=_cpu(),
        note="seconds measured on a shared 2-core machine with other jobs running (dev, loaded)"), indent=2) + "\n")


def _cpu() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                    if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
