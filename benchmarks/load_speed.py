"""Decode + load speed and peak memory against plain fp32 safetensors, measured in the same run.

A timm ``resnet50`` (random init: speed does not depend on training) is saved as fp32
safetensors and compressed data-free at 1 bit/weight (``--transforms``: the identity transform,
the default, and the VAE). Both paths build the architecture the same way, then:

* fp32: ``safetensors.torch.load_file`` + ``load_state_dict``;
* ours: ``CompressedModel.load(...)`` and its tensors (entropy decode + transform + checks),
  streamed into the model's parameters with ``iter_decoded`` (see ``_load``).

Two builds, each used on both sides: ``timm`` (``timm.create_model``, which runs the random
init, about 0.18 s of the fp32 path) and ``meta`` (built on the meta device, then
``load_state_dict(assign=True)``: no init, no second copy of the weights), which leaves the load
itself to compare. The entropy stage alone (``unpack``: pcodec decode of every stream) is timed
too. Each is timed ``--repeats`` times, alternating, and the medians are compared.

Peak memory: each path runs once more in a fresh subprocess that reports its own ``ru_maxrss``
(the interpreter, torch and timm included, as a user would see it). Writes
``benchmarks/results/load_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hf_vae_compress import CONTAINER_NAME, CompressedModel, VAECompressionConfig, compress

RESULTS = Path(__file__).resolve().parent / "results"
BUILDS = ("timm", "meta")


def _build(architecture: str, build: str) -> torch.nn.Module:
    import timm

    if build == "meta":
        with torch.device("meta"):
            return timm.create_model(architecture, pretrained=False).eval()
    return timm.create_model(architecture, pretrained=False).eval()


def _load(architecture: str, build: str, path: Path) -> torch.nn.Module:
    """One full load: build, read the weights (fp32 safetensors or our container), load them.

    Into a built model, ours streams: each tensor is copied into its parameter as it comes out of
    ``iter_decoded``, so no second copy of the model is ever held. A meta build has no storage to
    copy into: it takes the decoded dict with ``assign=True``, like the fp32 path.
    """
    model = _build(architecture, build)
    if path.name == CONTAINER_NAME and build == "timm":
        target = model.state_dict()
        with torch.no_grad():
            for name, tensor in CompressedModel.load(path).iter_decoded():
                target.pop(name).copy_(tensor)
        if target:
            raise KeyError(f"the container does not cover {sorted(target)[:5]}")
        return model
    state = CompressedModel.load(path).decode() if path.name == CONTAINER_NAME else load_file(str(path))
    model.load_state_dict(state, strict=True, assign=build == "meta")
    return model


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _peak_rss_kib() -> int:
    """This process's peak RSS: VmHWM (reset by exec; ``ru_maxrss`` is not, a forked child starts at
    its parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: Linux-like ru_maxrss in KiB


def _peak_rss_mib(architecture: str, build: str, path: Path) -> float:
    """Peak RSS of a fresh process that loads the model once (MiB)."""
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(path), "--architecture", architecture,
                          "--build", build], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["max_rss_mib"]


def _measure(args, fp32_path: Path, container: Path, num_weights: int) -> dict:
    result = {}
    for build in BUILDS:
        times = {"fp32": [], "ours": [], "decode": [], "entropy": []}
        for _ in range(args.repeats):
            times["fp32"].append(_timed(lambda: _load(args.architecture, build, fp32_path)))
            times["ours"].append(_timed(lambda: _load(args.architecture, build, container)))
            times["decode"].append(_timed(lambda: CompressedModel.load(container).decode()))
            times["entropy"].append(_timed(lambda: CompressedModel.load(container).unpack()))
        med = {k: statistics.median(v) for k, v in times.items()}
        rss = {path: _peak_rss_mib(args.architecture, build, p) for path, p in (("fp32", fp32_path), ("ours", container))}
        result[build] = dict(fp32_load_s=med["fp32"], ours_load_s=med["ours"], ratio=med["ours"] / med["fp32"],
                             decode_s=med["decode"], entropy_s=med["entropy"],
                             decode_weights_per_s=num_weights / med["decode"],
                             fp32_peak_rss_mib=rss["fp32"], ours_peak_rss_mib=rss["ours"],
                             rss_ratio=rss["ours"] / rss["fp32"], samples=times)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", default="resnet50")
    parser.add_argument("--transforms", nargs="+", default=["vae", "identity"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS / "load_speed.json")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--build", choices=BUILDS, default="timm", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        _load(args.architecture, args.build, args.rss_child)
        print(json.dumps({"max_rss_mib": _peak_rss_kib() / 1024}))
        return

    torch.manual_seed(0)
    state = _build(args.architecture, "timm").state_dict()
    num_weights = sum(v.numel() for v in state.values() if v.is_floating_point())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(fp32_path))
        fp32_bytes = fp32_path.stat().st_size
        for transform in args.transforms:
            config = VAECompressionConfig(transform=transform)
            compressed = compress(state, config, progress=False)
            container = compressed.save(Path(tmp) / transform)
            report = compressed.report()
            rows.append(dict(transform=transform, config=config.to_dict(), container_bytes=report["total_bytes"],
                             bits_per_weight=report["bits_per_weight"], format_version=report["format_version"],
                             parts=report["parts"], builds=_measure(args, fp32_path, container, num_weights)))
    result = dict(architecture=args.architecture, num_weights=num_weights, threads=torch.get_num_threads(),
                  fp32_bytes=fp32_bytes, rows=rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    summary = [{k: v for k, v in dict(transform=r["transform"], bytes=r["container_bytes"], **b, build=name).items()
                if k != "samples"} for r in rows for name, b in r["builds"].items()]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
