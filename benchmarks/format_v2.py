"""Format v2 against format v1 on the classifiers' headline containers, at the same allocation.

For each model, the v1 headline container as committed at ``V1_COMMIT`` (read from git history:
the artifacts in ``benchmarks/results/artifacts/`` are format-2 ``save_pretrained`` folders since)
is decoded and scored, then the same model is recompressed in format v2 at
the same setting: the same transform and the same global trade-off ``lam`` the v1 rate search
found (passed as ``beta``), so the per-tensor steps follow the same Fisher allocation and the
byte difference is the format's. Both are scored on the validation and test splits in the same
run, and compared with NNCodec given our allocation at that setting: its row in
``benchmarks/results/rate_accuracy.json`` (``nncodec-our-allocation``; NNCodec is
deterministic, so it is not rerun). ``--mantissa-bits`` adds v2 variants with coarser 1-D
tensors. Writes ``benchmarks/results/format_v2.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

from hf_vae_compress import CompressedModel, VAECompressionConfig
from hf_vae_compress.pipeline import compress_folder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rate_accuracy import RESULTS, ROOT, WORK, Bench  # noqa: E402

logger = logging.getLogger("format_v2")
MODELS = ["fmnist-mobilenetv3", "fmnist-vit", "fmnist-resnet18"]
V1_COMMIT = "5ec2854"  # the last commit whose classifier headline artifacts were version-1 containers


def v1_headline(name: str) -> Path:
    """``name``'s version-1 headline container as committed at :data:`V1_COMMIT` (a legacy folder's
    ``model.vaec.safetensors``), copied out of git history into the benchmark's work folder."""
    blob = subprocess.run(["git", "show", f"{V1_COMMIT}:benchmarks/results/artifacts/{name}/model.vaec.safetensors"],
                          cwd=ROOT, capture_output=True, check=True).stdout
    path = WORK / name / "format-v1-headline.vaec.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return path


def _summary(compressed: CompressedModel, scores: dict, bench: Bench) -> dict:
    report = compressed.report()
    m = bench.task.metric
    return dict(bytes=report["total_bytes"], parts=report["parts"], bits_per_weight=report["bits_per_weight"],
                side_information_bytes=report["side_information_bytes"],
                side_information_fraction=report["side_information_fraction"], **scores,
                val_drop=100 * (bench.base[f"val_{m}"] - scores[f"val_{m}"]), test_drop=100 * (bench.base[m] - scores[m]))


def _nncodec_row(model: str, setting: float) -> dict | None:
    rows = json.loads((RESULTS / "rate_accuracy.json").read_text())["rows"]
    found = [r for r in rows if r["model"] == model and r["method"] == "nncodec-our-allocation"
             and r["setting"] == setting]
    return found[0] if found else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--mantissa-bits", nargs="*", type=int, default=[], help="extra v2 variants")
    parser.add_argument("--output", type=Path, default=RESULTS / "format_v2.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = json.loads(args.output.read_text())["rows"] if args.output.exists() else []
    for name in args.models:
        bench = Bench(name)
        v1 = CompressedModel.load(v1_headline(name))
        v1_config = v1.header["config"]
        row = dict(model=name, transform=v1_config["transform"], setting=v1_config["target_bits_per_weight"],
                   lam=v1.header["lam"], v1=_summary(v1, bench.score(v1.decode()), bench))
        beta = v1.header["lam"] ** 2 * math.log(2) / 6  # lam_from_beta inverted: the same trade-off
        for bits in [VAECompressionConfig.vector_mantissa_bits, *args.mantissa_bits]:
            recorded = {k: v for k, v in v1.config.to_dict().items() if k in v1_config}  # less retired fields
            config = VAECompressionConfig(**{**recorded, "target_bits_per_weight": None, "beta": beta,
                                             "vector_mantissa_bits": bits})
            out = WORK / name / f"format-v2-{config.transform}-lam-mb{bits}"
            compressed = compress_folder(str(bench.folder), out, config, dataset=bench.task.dataset, progress=False)
            v2 = CompressedModel.load(out)
            row[f"v2_mantissa{bits}"] = dict(_summary(v2, bench.score(v2.decode()), bench),
                                             output=str(out), encode_s=compressed.stats["encode_seconds"])
        nnc = _nncodec_row(name, row["setting"])
        if nnc:
            row["nncodec_our_allocation"] = dict(bytes=nnc["bytes"], val_drop=nnc["val_drop"],
                                                 test_drop=nnc[f"{nnc['metric']}_drop"])
        logger.info("%s", json.dumps(row, indent=1))
        results = [r for r in results if r["model"] != name] + [row]
        args.output.write_text(json.dumps({"rows": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
