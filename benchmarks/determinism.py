"""Does a container decode to the same bits everywhere? The determinism matrix.

Containers of every reference model, with each transform (identity, and the VAE whose decoder is
a float network), are decoded:

* with 1, 2 and 4 torch threads;
* in two fresh processes;
* with ``torch.use_deterministic_algorithms`` on and off;
* on another machine: the checksums inside a container are computed where it was written, so a
  decode that passes them elsewhere is bit-identical to the writer's. ``--decode-only`` runs
  just the decodes, on folders written by an earlier run (e.g. on a machine with a GPU);
* when CUDA is available, the decoded model's outputs on CUDA against CPU on fixed inputs (not
  expected to be bit-identical: different kernels; the difference and the argmax agreement are
  recorded).

Each decode is summarised by the SHA-256 of every decoded tensor's name, dtype, shape and bytes.
Writes ``benchmarks/results/determinism.json`` (or ``--output``), with the platform.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ["fmnist-resnet18", "fmnist-mobilenetv3", "fmnist-vit", "fmnist-rtdetr"]
TRANSFORMS = ["identity", "vae"]
THREADS = [1, 2, 4]


def digest(folder: Path, threads: int | None = None, deterministic: bool = False) -> str:
    """SHA-256 of the decoded state dict (names, dtypes, shapes and bytes, in order)."""
    from hf_vae_compress.codec import CompressedModel
    from hf_vae_compress.loading import find_container

    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads or before[0])
    torch.use_deterministic_algorithms(deterministic)
    try:
        h = hashlib.sha256()
        for name, tensor in CompressedModel.load(find_container(folder)).iter_decoded():
            h.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
            h.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])


def in_fresh_process(folder: Path) -> str:
    code = "import sys; sys.path.insert(0, sys.argv[2]); from determinism import digest; print(digest(__import__('pathlib').Path(sys.argv[1])))"
    done = subprocess.run([sys.executable, "-c", code, str(folder), str(Path(__file__).parent)], capture_output=True,
                          text=True, cwd=ROOT, check=True)
    return done.stdout.strip().splitlines()[-1]


def probe_inputs(model: torch.nn.Module, n: int = 16) -> torch.Tensor:
    """Fixed random images of the shape the model takes."""
    generator = torch.Generator().manual_seed(0)
    if hasattr(model, "pretrained_cfg"):
        shape = model.pretrained_cfg["input_size"]
    else:
        from hf_vae_compress.data import image_mode, load_image_processor

        size = load_image_processor(model).size
        side = size.get("height", size.get("shortest_edge"))
        shape = (1 if image_mode(model.config) == "L" else 3, side, side)
    return torch.randn(n, *shape, generator=generator)


def cuda_vs_cpu(folder: Path) -> dict:
    from hf_vae_compress.loading import load_folder

    model = load_folder(folder)
    x = probe_inputs(model)

    def outputs(device: str) -> torch.Tensor:
        net = model.to(device)
        with torch.no_grad():
            out = net(x.to(device)) if hasattr(model, "pretrained_cfg") else net(pixel_values=x.to(device))
        return (out if isinstance(out, torch.Tensor) else out.logits).float().cpu()

    cpu, cuda = outputs("cpu"), outputs("cuda")
    return dict(max_abs_diff=float((cpu - cuda).abs().max()), bit_identical=bool(torch.equal(cpu, cuda)),
                argmax_agreement=float((cpu.argmax(-1) == cuda.argmax(-1)).float().mean()))


def build(work: Path) -> list[Path]:
    """The containers, written once (post-hoc, data-free, 2 bits/weight) in the save_pretrained layout."""
    from hf_vae_compress import VAECompressionConfig
    from hf_vae_compress.codec import FitConfig
    from hf_vae_compress.pipeline import compress_folder

    folders = []
    for model in MODELS:
        for transform in TRANSFORMS:
            folder = work / f"{model}-{transform}"
            if not (folder / "config.json").exists():
                compress_folder(str(ROOT / "reference_models" / model), folder,
                                VAECompressionConfig(target_bits_per_weight=2.0, transform=transform,
                                                     fit=FitConfig(train_steps=200)), dataset=None, progress=False)
            folders.append(folder)
    return folders


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "determinism")
    parser.add_argument("--decode-only", action="store_true", help="decode the folders under --work; write none")
    parser.add_argument("--output", type=Path, default=RESULTS / "determinism.json")
    args = parser.parse_args(argv)
    folders = sorted(p for p in args.work.iterdir() if (p / "config.json").exists()) if args.decode_only \
        else build(args.work)
    rows = []
    for folder in folders:
        try:
            reference = digest(folder)
        except Exception as err:  # noqa: BLE001 - a container that does not decode here is the finding
            rows.append(dict(container=folder.name, error=f"{type(err).__name__}: {err}"))
            print(json.dumps(rows[-1]), file=sys.stderr)
            continue
        row = dict(container=folder.name, digest=reference,
                   threads={str(t): digest(folder, t) == reference for t in THREADS},
                   fresh_processes=[in_fresh_process(folder) == reference for _ in range(2)],
                   deterministic_algorithms=digest(folder, deterministic=True) == reference)
        if torch.cuda.is_available():
            row["cuda_vs_cpu"] = cuda_vs_cpu(folder)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    result = dict(platform=dict(python=platform.python_version(), torch=torch.__version__, machine=platform.machine(),
                                processor=platform.processor(), cpu_threads=torch.get_num_threads(),
                                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None),
                  all_bit_identical=all("error" not in r and all(r["threads"].values()) and all(r["fresh_processes"])
                                        and r["deterministic_algorithms"] for r in rows),
                  rows=rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
