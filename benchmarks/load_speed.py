"""Decode + load speed and peak memory against plain fp32 safetensors, measured in the same run.

Each timm architecture (``--architectures``; random init: speed does not depend on training) is
saved as fp32 safetensors and compressed data-free with the identity transform (``--transforms``
adds the VAE) at each of ``--bits`` bits/weight. Both paths build the architecture the same way, then:

* fp32: ``safetensors.torch.load_file`` + ``load_state_dict``;
* ours: ``CompressedModel.load(...)`` and its tensors (entropy decode + transform + checks).

Two builds, each used on both sides: ``built`` (the model constructed with its random init, which
both sides pay; ours decodes straight into its parameters with
:func:`~hf_vae_compress.loading.load_into`) and ``meta`` (built on the meta device, then
``load_state_dict(assign=True)`` of the decoded dict: no init, no second copy of the weights),
which leaves the load itself to compare. ``decode_s`` is ours without the build (read the file,
decode, check, and write into the built model's parameters or a fresh dict);
``decode_weights_per_s`` is the model's weights over it. The entropy stage alone (``unpack``:
serial pcodec decode of every stream) is timed too. Each is timed ``--repeats`` times,
alternating, and the medians are compared.

Peak memory: each path runs once more in a fresh subprocess that reports its own peak RSS (the
interpreter, torch and timm included, as a user would see it). The machine's load average is
recorded before and after each model: on a shared machine, a run is fair only when it is low.

:func:`compare_loads` (and :func:`build_model`) are what ``benchmarks/scale.py`` reuses for any
architecture a spec names. Writes ``benchmarks/results/load_speed.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

from hf_vae_compress import CompressedModel, VAECompressionConfig, compress
from hf_vae_compress.loading import load_into

RESULTS = Path(__file__).resolve().parent / "results"
BUILDS = ("built", "meta")


def build_model(spec: str, device: str | None = None) -> torch.nn.Module:
    """The architecture a spec names, randomly initialised (or on ``device="meta"``: no storage, no
    init), in eval mode. ``timm:<name>`` is ``timm.create_model(name)``;
    ``transformers:<folder>`` builds the class its ``config.json``'s ``architectures`` names."""
    kind, _, target = spec.partition(":")
    if kind not in ("timm", "transformers") or not target:
        raise ValueError(f"spec {spec!r} is not 'timm:<name>' or 'transformers:<folder with config.json>'")
    with torch.device(device) if device else contextlib.nullcontext():
        if kind == "timm":
            import timm

            return timm.create_model(target, pretrained=False).eval()
        import transformers

        config = transformers.AutoConfig.from_pretrained(target)
        return getattr(transformers, config.architectures[0])(config).eval()


def load(spec: str, build: str, path: Path) -> torch.nn.Module:
    """One full load: build, read the weights (fp32 safetensors or our container), load them."""
    model = build_model(spec, "meta" if build == "meta" else None)
    if not _is_container(path):
        model.load_state_dict(load_file(str(path)), strict=True, assign=build == "meta")
    elif build == "meta":
        model.load_state_dict(CompressedModel.load(path).decode(), strict=True, assign=True)
    else:
        load_into(model, path)
    return model


def _fp32_read_onto_meta(spec: str, path: Path) -> torch.nn.Module:
    """The meta load with every fp32 byte read into memory. ``load_file`` maps the file and reads
    nothing until a weight is first used (0.03 s for ViT-B's 346 MB, its pages not even resident),
    so the meta comparison is against the build alone; this is what reading the weights costs."""
    model = build_model(spec, "meta")
    model.load_state_dict(safetensors.torch.load(path.read_bytes()), strict=True, assign=True)
    return model


def _is_container(path: Path) -> bool:
    return path.name.endswith(".vaec.safetensors")


def _decode_only(spec: str, build: str, container: Path) -> Callable[[], object]:
    """Ours without the build: the model is built once, outside the timing."""
    if build == "meta":
        return lambda: CompressedModel.load(container).decode()
    targets = build_model(spec).state_dict()
    return lambda: CompressedModel.load(container).decode_into(targets)


def _timed(fn: Callable[[], object]) -> float:
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


def _peak_rss_mib(spec: str, build: str, path: Path) -> float:
    """Peak RSS of a fresh process that loads the model once (MiB)."""
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(path), "--spec", spec, "--build", build],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["max_rss_mib"]


def compare_loads(spec: str, fp32_path: Path, container_path: Path, repeats: int = 5) -> dict:
    """fp32 safetensors against our container of the same weights, loaded the same way, in this run.

    Per build (``built``, ``meta``): the median load seconds of each (``fp32_load_s``,
    ``ours_load_s``) and their ``ratio``; ours without the build (``decode_s``) and
    ``decode_weights_per_s``; the serial entropy stage (``entropy_s``); each path's peak RSS in a
    fresh process (``fp32_peak_rss_mib``, ``ours_peak_rss_mib``, ``rss_ratio``); every sample. For
    ``meta`` also the fp32 load with its bytes read (``fp32_read_load_s``, ``ratio_vs_read``; see
    :func:`_fp32_read_onto_meta`).
    Also the machine's 1/5/15-minute load average before and after, and the torch threads.
    """
    container = CompressedModel.load(container_path)
    num_weights = sum(math.prod(e["shape"]) for e in container.header["tensors"]
                      if e["dtype"].startswith(("float", "bfloat")))
    result = dict(spec=spec, num_weights=num_weights, fp32_bytes=fp32_path.stat().st_size,
                  container_bytes=container_path.stat().st_size, threads=torch.get_num_threads(),
                  load_average_before=list(os.getloadavg()), builds={})
    for build in BUILDS:
        decode = _decode_only(spec, build, container_path)
        times: dict[str, list[float]] = {"fp32": [], "ours": [], "decode": [], "entropy": []}
        if build == "meta":
            times["fp32_read"] = []
        for _ in range(repeats):
            times["fp32"].append(_timed(lambda: load(spec, build, fp32_path)))
            if build == "meta":
                times["fp32_read"].append(_timed(lambda: _fp32_read_onto_meta(spec, fp32_path)))
            times["ours"].append(_timed(lambda: load(spec, build, container_path)))
            times["decode"].append(_timed(decode))
            times["entropy"].append(_timed(lambda: CompressedModel.load(container_path).unpack()))
        med = {k: statistics.median(v) for k, v in times.items()}
        rss = {name: _peak_rss_mib(spec, build, p) for name, p in (("fp32", fp32_path), ("ours", container_path))}
        result["builds"][build] = dict(
            fp32_load_s=med["fp32"], ours_load_s=med["ours"], ratio=med["ours"] / med["fp32"],
            decode_s=med["decode"], entropy_s=med["entropy"], decode_weights_per_s=num_weights / med["decode"],
            fp32_peak_rss_mib=rss["fp32"], ours_peak_rss_mib=rss["ours"], rss_ratio=rss["ours"] / rss["fp32"],
            samples=times)
        if build == "meta":
            result["builds"][build].update(fp32_read_load_s=med["fp32_read"], ratio_vs_read=med["ours"] / med["fp32_read"])
    result["load_average_after"] = list(os.getloadavg())
    return result


def _architecture(name: str, transforms: list[str], bits: list[float], repeats: int) -> dict:
    """One timm architecture: fp32 safetensors and a container per (transform, rate), compared."""
    spec = f"timm:{name}"
    torch.manual_seed(0)
    state = build_model(spec).state_dict()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(fp32_path))
        for transform in transforms:
            for rate in bits:
                config = VAECompressionConfig(transform=transform, target_bits_per_weight=rate)
                compressed = compress(state, config, progress=False)
                container = compressed.save(Path(tmp) / f"{transform}-{rate}")
                report = compressed.report()
                rows.append(dict(transform=transform, config=config.to_dict(), bits_per_weight=report["bits_per_weight"],
                                 format_version=report["format_version"], parts=report["parts"],
                                 **compare_loads(spec, fp32_path, container, repeats)))
    return dict(architecture=name, num_weights=rows[0]["num_weights"], fp32_bytes=rows[0]["fp32_bytes"], rows=rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architectures", nargs="+", default=["resnet50", "vit_base_patch16_224"])
    parser.add_argument("--transforms", nargs="+", default=["identity"])
    parser.add_argument("--bits", nargs="+", type=float, default=[1.0, 2.0], help="target bits per weight")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS / "load_speed.json")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--build", choices=BUILDS, default="built", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        load(args.spec, args.build, args.rss_child)
        print(json.dumps({"max_rss_mib": _peak_rss_kib() / 1024}))
        return

    models = [_architecture(name, args.transforms, args.bits, args.repeats) for name in args.architectures]
    result = dict(threads=torch.get_num_threads(), cpu_count=os.cpu_count(), models=models)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    summary = [dict(architecture=m["architecture"], transform=r["transform"], bits_per_weight=round(r["bits_per_weight"], 3),
                    build=name, **{k: v for k, v in b.items() if k != "samples"})
               for m in models for r in m["rows"] for name, b in r["builds"].items()]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
