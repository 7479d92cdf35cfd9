"""The portable VAE (``vae-int``) against the float VAE (``vae``): bytes and distortion (issue 24, item 1).

The budget: the integer decoder may cost at most 0.5 % more bytes than the float decoder at the
same distortion. For one reference model, one shared calibration (Fisher and steps allocated by
it, as the library does), and each target rate, both transforms are compressed with the library's
own pipeline (nearest rounding: neither has a weight grid for output-aware rounding) and measured:

- ``bytes``: the container as written;
- ``weight_mse``: mean squared error of the coded weights; ``relative_mse``: over their mean square;
- ``fisher_distortion``: the Fisher-weighted squared error of the coded weights (the calibration's
  diagonal Fisher, the quantity the steps are allocated on), summed;
- ``verified``: the decode matched every checksum on this machine.

Equal distortion is read off each transform's own rate-distortion line: between two rates,
``log(distortion)`` is interpolated linearly in bytes, and ``extra_bytes_pct`` is the portable VAE's
bytes at the float VAE's distortion over the float VAE's bytes, minus one (positive: the portable
decoder costs bytes). Distortions are measured, not timed, so a loaded machine changes nothing
but ``seconds`` (marked as such). Writes ``benchmarks/results/portable_vae.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from hf_vae_compress.codec import VAECompressionConfig, compress
from hf_vae_compress.pipeline import Source

logger = logging.getLogger("portable_vae")

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "benchmarks" / "results" / "portable_vae.json"
KINDS = ("vae", "vae-int")


def distortions(model: torch.nn.Module, decoded: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor],
                coded: list[str]) -> dict:
    """Weight MSE, relative MSE and Fisher-weighted squared error of the ``coded`` tensors."""
    original = model.state_dict()
    squared = {n: (decoded[n].float() - original[n].float()).pow(2) for n in coded}
    count = sum(s.numel() for s in squared.values())
    energy = sum(float(original[n].float().pow(2).sum()) for n in coded)
    error = sum(float(s.sum()) for s in squared.values())
    weighted = sum(float((fisher[n] * squared[n]).sum()) for n in coded if n in fisher)
    return dict(weight_mse=error / count, relative_mse=error / energy, fisher_distortion=weighted)


def measure(src: Source, kind: str, rate: float) -> dict:
    config = VAECompressionConfig(target_bits_per_weight=rate, transform=kind, rounding="nearest")
    start = time.perf_counter()
    compressed = compress(src.model, config, calibration=src.calibration, progress=False)
    seconds = time.perf_counter() - start
    decoded = compressed.decode(allow_unverified=True)
    verified = True
    try:
        compressed.decode(allow_unverified=False)
    except Exception as err:  # noqa: BLE001 (recorded: a float decoder may fail its own checks)
        verified, reason = False, repr(err)
    coded = [e["name"] for e in compressed.header["tensors"] if e["codec"] == kind]
    report = compressed.report()
    row = dict(kind=kind, target_bpw=rate, bytes=report["total_bytes"], ratio_vs_fp32=round(report["ratio_vs_fp32"], 3),
               decoder_bytes=report["parts"]["decoder"], linear_maps=len(compressed.header["transform"]["linear_maps"]),
               coded_tensors=len(coded), portable=compressed.portable, verified=verified,
               compress_seconds_dev_loaded=round(seconds, 1), **distortions(src.model, decoded, src.calibration.fisher, coded))
    if not verified:
        row["verify_error"] = reason
    logger.info("%s", row)
    return row


def bytes_at(rows: list[dict], distortion: float, key: str) -> float | None:
    """Bytes at ``distortion`` on the line through ``rows`` (log distortion, linear in bytes)."""
    (b0, d0), (b1, d1) = sorted((r["bytes"], r[key]) for r in rows)
    if d0 == d1:
        return None
    return b0 + (b1 - b0) * (math.log(distortion) - math.log(d0)) / (math.log(d1) - math.log(d0))


def compare(rows: list[dict], key: str) -> list[dict]:
    """Per rate: the portable VAE's bytes at the float VAE's distortion, and the extra it costs."""
    portable = [r for r in rows if r["kind"] == "vae-int"]
    out = []
    for row in (r for r in rows if r["kind"] == "vae"):
        at = bytes_at(portable, row[key], key) if len(portable) == 2 else None
        out.append(dict(target_bpw=row["target_bpw"], distortion=key, float_bytes=row["bytes"],
                        portable_bytes_at_same_distortion=None if at is None else round(at),
                        extra_bytes_pct=None if at is None else round(100 * (at / row["bytes"] - 1), 3)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-resnet18")
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(0)
    start = time.perf_counter()
    src = Source.open(ROOT / "reference_models" / args.model, "default", VAECompressionConfig.calibration_batches,
                      progress=False)
    calibration_seconds = time.perf_counter() - start
    rows = [measure(src, kind, rate) for rate in args.rates for kind in KINDS]
    result = dict(
        model=args.model, rates=args.rates, rows=rows,
        same_distortion=[*compare(rows, "fisher_distortion"), *compare(rows, "weight_mse")] if len(args.rates) == 2 else [],
        calibration_seconds_dev_loaded=round(calibration_seconds, 1), torch=torch.__version__, numpy=np.__version__,
        machine=platform.machine(), processor=platform.processor(),
        commit=subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        note="compress seconds measured on a shared 2-core machine with other jobs running (dev, loaded)",
    )
    OUTPUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["same_distortion"], indent=2))


if __name__ == "__main__":
    main()
