"""`make demo`: compress the embedded default model with the default settings and show what it costs.

1. compresses ``reference_models/fmnist-resnet18`` as ``hf-vae-compress compress`` does with no rate
   argument: the smallest container whose top-1 drop on the validation split is within 0.5 pt
   (Fisher allocation from the train split);
2. evaluates before and after on the Fashion-MNIST test split;
3. reloads the compressed folder from disk in a fresh decode and checks it gives the same logits;
4. prints bytes, ratio vs fp32 and top-1 before/after, and the output folder.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hf_vae_compress import VAECompressionConfig
from hf_vae_compress.data import load_fashion_mnist
from hf_vae_compress.evaluate import evaluate, logits_of
from hf_vae_compress.models import load_model
from hf_vae_compress.pipeline import Source, load_compressed
from hf_vae_compress.search import describe_probe, search_smallest

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "reference_models" / "fmnist-resnet18"))
    parser.add_argument("--out-dir", default=str(ROOT / "outputs" / "demo" / "fmnist-resnet18-vaec"))
    args = parser.parse_args()

    test = load_fashion_mnist("test")
    original = load_model(args.model)
    before = evaluate(original, test)

    start = time.perf_counter()
    source = Source.open(args.model, "fashion_mnist", VAECompressionConfig.calibration_batches)
    budget = source.task.budget_pt
    search = search_smallest(source, args.out_dir, budget, "fashion_mnist", VAECompressionConfig(),
                             on_probe=lambda probe: print(describe_probe(probe, budget), flush=True))
    if search.compressed is None:
        raise SystemExit(f"no rate kept the validation drop within {budget} pt: {search.probes}")
    encode_seconds = time.perf_counter() - start
    report = search.compressed.report()

    start = time.perf_counter()
    reloaded = load_compressed(args.out_dir)
    load_seconds = time.perf_counter() - start
    after = evaluate(reloaded, test)

    probe = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        again = load_compressed(args.out_dir)
        identical = torch.equal(logits_of(reloaded(probe)), logits_of(again(probe)))

    fp32 = report["fp32_safetensors_bytes"]
    rows = [
        ("fp32 safetensors", fp32, 8 * fp32 / report["num_weights"], 1.0, before["top1"]),
        ("hf-vae-compress", report["total_bytes"], report["bits_per_weight"], fp32 / report["total_bytes"],
         after["top1"]),
    ]
    print(f"\n{'model: fmnist-resnet18':<24}{'bytes':>14}{'bits/weight':>13}{'ratio':>8}{'top-1':>9}")
    for name, nbytes, bpw, ratio, top1 in rows:
        print(f"{name:<24}{nbytes:>14,}{bpw:>13.3f}{ratio:>7.1f}x{100 * top1:>8.2f}%")
    print(f"\ntop-1 drop: {100 * (before['top1'] - after['top1']):+.2f} pt "
          f"(95% interval of the compressed top-1: {100 * after['top1_ci95'][0]:.2f}-{100 * after['top1_ci95'][1]:.2f}%)")
    print(f"validation drop {search.validation['drop_pt']:.2f} pt (budget {search.validation['budget_pt']} pt), "
          f"{len(search.probes)} rates tried")
    print(f"compress {encode_seconds:.1f} s, decode+load {load_seconds:.2f} s, "
          f"two decodes from disk bit-identical: {identical}")
    print(f"output folder: {args.out_dir}")
    print(f"re-evaluate with: hf-vae-compress evaluate {args.out_dir} --dataset fashion_mnist --split test")


if __name__ == "__main__":
    main()
