"""The portable VAE inside GPTQ's loop and ``transform="auto"`` against identity + GPTQ (issue 24).

For each model and each fixed target rate, one shared calibration (Fisher and layer inputs, as
the library measures them), four configurations are compressed with the library's own pipeline:

- ``identity``: identity transform + output-aware rounding (GPTQ), the default;
- ``vae-int-nearest``: the portable VAE, its encoder's nearest latents (``rounding="nearest"``);
- ``vae-int-loop``: the portable VAE, latents chosen inside GPTQ's column loop;
- ``vae-int-d4``, ``vae-int-e8``: the same with structured latents (``latent_quantizer``, issue 24
  item 4): each mapped chunk's latents on a D4 (two blocks and a scalar) or E8 (one block and a
  scalar) lattice, started at the lattice point closest to the encoder's latent and moved to lattice
  neighbours while that lowers the chunk's output error;
- ``auto``: per tensor, identity or the VAE map, by measured bits at equal output error.

Per row: the container's real bytes, ``output_error`` (``sum tr(dW H dWᵀ)`` over the coded layers
with measured inputs: the H-weighted distortion GPTQ minimises), the validation drop (the
library's selection split) and the test drop, in points. ``equal_error`` reads each variant's
bytes at the identity's output error off its own rate-distortion line (log error, linear in
bytes, between its two nearest rates), over the identity's bytes, minus one (negative: smaller);
for the lattice variants also against ``vae-int-loop``'s bytes at the same error (scalar latents).
A model rerun for some variants keeps its other rows; every row records its commit.

``--source-model`` adds what the lattices do on i.i.d. unit Gaussian and Laplacian sources (no
model): per step, the mean squared error and the bits per dimension the container's coder would
spend (order-0 entropy of each basis coordinate, summed) and an ideal joint coder (the entropy of
the lattice point), read at scalar rounding's errors. It shows where the lattice's gain goes.
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
from hf_vae_compress.codec.lattice import LATENT_QUANTIZERS, chunk_basis, coordinates
from hf_vae_compress.pipeline import Source

logger = logging.getLogger("vae_gptq")

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "benchmarks" / "results" / "vae_gptq.json"
VARIANTS = {"identity": dict(transform="identity"),
            "vae-int-nearest": dict(transform="vae-int", rounding="nearest"),
            "vae-int-loop": dict(transform="vae-int"),
            "vae-int-d4": dict(transform="vae-int", latent_quantizer="d4"),
            "vae-int-e8": dict(transform="vae-int", latent_quantizer="e8"),
            "auto": dict(transform="auto")}
LATTICE_VARIANTS = ("vae-int-d4", "vae-int-e8")
SCALAR_LATENTS = "vae-int-loop"  # what the lattice variants are compared with at equal error


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
               compress_seconds_dev_loaded=round(seconds, 1), commit=_commit(short=True), machine_loaded=True)
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
    """Per identity row and measured variant, the variant's bytes at the identity's output error."""
    out = []
    measured = [v for v in VARIANTS if v != "identity" and any(r["variant"] == v for r in rows)]
    for ref in (r for r in rows if r["variant"] == "identity"):
        at = {v: bytes_at([r for r in rows if r["variant"] == v], ref["output_error"]) for v in measured}
        for variant in measured:
            row = dict(target_bpw=ref["target_bpw"], variant=variant, identity_bytes=ref["bytes"],
                       bytes_at_identity_error=_round(at[variant]), vs_identity_pct=_pct(at[variant], ref["bytes"]))
            if variant in LATTICE_VARIANTS:
                row["vs_scalar_latents_pct"] = _pct(at[variant], at.get(SCALAR_LATENTS))
            out.append(row)
    return out


def equal_rate(rows: list[dict]) -> list[dict]:
    """Per rate, each lattice variant's bytes and output error against scalar latents' and the
    identity's at the same target rate (what a rate with no second lattice row still compares)."""
    by = {(r["variant"], r["target_bpw"]): r for r in rows}
    out = []
    for (variant, rate), row in sorted(by.items(), key=lambda item: (item[0][1], item[0][0])):
        if variant not in LATTICE_VARIANTS:
            continue
        entry = dict(target_bpw=rate, variant=variant, bytes=row["bytes"], output_error=row["output_error"])
        for reference in (SCALAR_LATENTS, "identity"):
            if (reference, rate) in by:
                ref = by[reference, rate]
                entry[f"bytes_vs_{reference}_pct"] = _pct(row["bytes"], ref["bytes"])
                entry[f"error_vs_{reference}"] = round(row["output_error"] / ref["output_error"], 3)
        out.append(entry)
    return out


def _round(value: float | None) -> int | None:
    return None if value is None else round(value)


def _pct(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else round(100 * (value / reference - 1), 2)


def _entropy(values: torch.Tensor) -> float:
    """Empirical entropy in bits of the rows of ``values`` (one symbol per row)."""
    _, counts = torch.unique(values, dim=0, return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * torch.log2(p)).sum())


def source_model(samples: int = 400_000) -> dict:
    """The lattices on i.i.d. sources (see the module's docstring): per source and quantizer, points
    (step, mse, coded bits per dimension, joint bits per dimension where the alphabet is small enough
    to count), and the bits each spends at scalar rounding's errors."""
    generator = torch.Generator().manual_seed(0)
    sources = {"gaussian": torch.randn(samples, 8, generator=generator, dtype=torch.float64),
               "laplacian": torch.distributions.Laplace(0.0, 2 ** -0.5).sample((samples, 8)).double()}
    steps = [0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8]
    out = {}
    for source, x in sources.items():
        curves = {}
        for name in LATENT_QUANTIZERS:
            basis = chunk_basis(name, 8)
            points = []
            for step in steps:
                k = coordinates(name, x / step)
                coded = sum(_entropy(k[:, j]) for j in range(8)) / 8
                joint = _entropy(k) / 8 if coded * 8 < 14 else None  # a countable alphabet only
                points.append(dict(step=step, mse=float(((x - step * (k @ basis.T)) ** 2).mean()), coded_bpd=round(coded, 4),
                                   joint_bpd=None if joint is None else round(joint, 4)))
            curves[name] = points
        out[source] = dict(curves=curves, at_scalar_error=_at_scalar_error(curves))
    return dict(samples=samples, dims=8, note="bits per dimension; coded: order-0 entropy per basis coordinate "
                "(the container's coder); joint: entropy of the lattice point (a coder the format does not have)",
                sources=out)


def _at_scalar_error(curves: dict) -> list[dict]:
    """Per scalar point, each lattice's coded and joint bits at that mse (log mse, linear in bits)."""
    out = []
    for ref in curves["scalar"]:
        row = dict(mse=round(ref["mse"], 5), scalar_coded_bpd=ref["coded_bpd"], scalar_joint_bpd=ref["joint_bpd"])
        for name in LATENT_QUANTIZERS[1:]:
            for kind in ("coded_bpd", "joint_bpd"):
                line = [dict(bytes=p[kind], output_error=p["mse"]) for p in curves[name] if p[kind] is not None]
                at = bytes_at([dict(r, variant=name) for r in line], ref["mse"])
                row[f"{name}_{kind}"] = None if at is None else round(at, 4)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["fmnist-mobilenetv3"])
    parser.add_argument("--rates", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--fit-steps", type=int, default=FitConfig.train_steps)
    parser.add_argument("--source-model", action="store_true", help="add the lattices on i.i.d. sources")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="the JSON (kept rows are read from it)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    fit = FitConfig(train_steps=args.fit_steps)
    previous = json.loads(args.output.read_text()) if args.output.exists() else {}
    models = dict(previous.get("models", {}))
    extra = {k: previous[k] for k in ("lattice_source_model",) if k in previous}
    if args.source_model:
        extra["lattice_source_model"] = source_model()
        _write(args.output, models, extra)
    for name in args.models:
        torch.manual_seed(0)
        src = Source.open(ROOT / "reference_models" / name, "default", VAECompressionConfig.calibration_batches,
                          progress=False)
        test = src.task.prepare(src.model, src.task.load("test"))
        base = src.task.score(src.model, test)[src.task.metric]
        rows = _kept_rows(models.get(name), args.fit_steps)
        for rate in args.rates:  # written after every row: a partial run still leaves what it measured
            for variant in args.variants:
                rows = [r for r in rows if (r["variant"], r["target_bpw"]) != (variant, rate)]
                rows.append(measure(src, variant, rate, fit, test, base))
                models[name] = dict(metric=src.task.metric, budget_pt=src.task.budget_pt, fit_steps=args.fit_steps,
                                    rows=rows, equal_error=equal_error(rows), equal_rate=equal_rate(rows))
                _write(args.output, models, extra)
        print(json.dumps(models[name]["equal_error"], indent=2))


def _kept_rows(previous: dict | None, fit_steps: int) -> list[dict]:
    """The rows a model's earlier run measured with the same fit steps (a rerun replaces a variant's
    row at a rate and keeps the others)."""
    if previous is None or previous.get("fit_steps") != fit_steps:
        return []
    return list(previous["rows"])


def _commit(short: bool = False) -> str:
    command = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True).stdout.strip()


def _write(output: Path, models: dict, extra: dict) -> None:
    output.write_text(json.dumps(dict(
        models=models, protocol="fixed target rates, one shared calibration; no rate-search (protocol) rows",
        **extra, commit=_commit(),
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
