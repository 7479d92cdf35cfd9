"""Decode + load speed against plain fp32 safetensors, measured in the same run, as a ratio.

A timm ``resnet50`` (random init: speed does not depend on training) is saved as fp32
safetensors and compressed with the default settings (data-free). Both paths build the
architecture the same way, then:

* fp32: ``safetensors.torch.load_file`` + ``load_state_dict``;
* ours: ``CompressedModel.load(...).decode()`` (entropy decode + decoder + hash checks) +
  ``load_state_dict``.

The entropy decode alone (``unpack``) is timed too, to split the decode time between the entropy
decoder and the decoder network with the hash checks.

Each is timed ``--repeats`` times, alternating, and the medians are compared. Writes
``benchmarks/results/load_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hf_vae_compress import CompressedModel, VAECompressionConfig, compress

RESULTS = Path(__file__).resolve().parent / "results"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", default="resnet50")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS / "load_speed.json")
    args = parser.parse_args(argv)
    import timm

    torch.manual_seed(0)
    build = lambda: timm.create_model(args.architecture, pretrained=False).eval()  # noqa: E731
    state = build().state_dict()
    num_weights = sum(v.numel() for v in state.values() if v.is_floating_point())
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(fp32_path))
        fp32_bytes = fp32_path.stat().st_size
        config = VAECompressionConfig()
        compressed = compress(state, config, progress=False)
        compressed.save(tmp)
        report = compressed.report()

        def load_fp32():
            build().load_state_dict(load_file(str(fp32_path)), strict=True)

        def load_ours():
            build().load_state_dict(CompressedModel.load(tmp).decode(), strict=True)

        decode_only = lambda: CompressedModel.load(tmp).decode()  # noqa: E731
        entropy_only = lambda: CompressedModel.load(tmp).unpack()  # noqa: E731
        fp32_times, ours_times, decode_times, entropy_times, build_times = [], [], [], [], []
        for _ in range(args.repeats):
            fp32_times.append(_timed(load_fp32))
            ours_times.append(_timed(load_ours))
            decode_times.append(_timed(decode_only))
            entropy_times.append(_timed(entropy_only))
            build_times.append(_timed(build))
    fp32_s, ours_s, decode_s = (statistics.median(t) for t in (fp32_times, ours_times, decode_times))
    result = dict(
        architecture=args.architecture, num_weights=num_weights, threads=torch.get_num_threads(),
        config=config.to_dict(), container_bytes=report["total_bytes"], bits_per_weight=report["bits_per_weight"],
        fp32_bytes=fp32_bytes,
        fp32_load_s=fp32_s, ours_load_s=ours_s, ratio=ours_s / fp32_s, decode_s=decode_s,
        entropy_s=statistics.median(entropy_times), build_s=statistics.median(build_times),
        decode_weights_per_s=num_weights / decode_s,
        samples=dict(fp32=fp32_times, ours=ours_times, decode=decode_times, entropy=entropy_times, build=build_times),
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "config")}, indent=1))


if __name__ == "__main__":
    main()
