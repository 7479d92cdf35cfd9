"""Hub round trip of each reference model's headline container, measured (issue: Hub round trip).

For every model with a headline container in ``benchmarks/results/artifacts/``:

1. push the container (with its model card, accuracy measured on the test split) and the
   uncompressed fp32 model to a loopback Hub server on 127.0.0.1 (the real ``huggingface_hub``
   client talks to :mod:`hf_vae_compress.testing.hub_server`);
2. in a fresh process each, load both with the call a user would make (transformers
   ``AutoModelForImageClassification.from_pretrained`` for transformers models and for timm models
   through TimmWrapper, ``hf_vae_compress.create_model("hf-hub:...")`` for timm), timing the load,
   then evaluate on the test split and compute logits on fixed probe inputs;
3. compare with the local decode (``load_compressed`` on the artifact folder): top-1 equal and
   logits bit-identical.

``--vae-int MODEL`` adds a row for a portable-VAE container (``transform="vae-int"``, at
``--vae-int-bpw`` bits/weight, calibrated on Fashion-MNIST), written by ``compress_folder`` into
the run's temporary folder and pushed the same way: issue 24 asks that the learned decoder, not only
identity, survive the Hub with the logits of the local decode.

Writes ``benchmarks/results/hub_roundtrip.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file

from hf_vae_compress import CompressedModel, VAECompressionConfig
from hf_vae_compress.data import load_fashion_mnist
from hf_vae_compress.detection import is_detection_model
from hf_vae_compress.evaluate import evaluate, logits_of
from hf_vae_compress.hub import CardInfo, push_to_hub
from hf_vae_compress.loading import find_container
from hf_vae_compress.models import model_format, read_config
from hf_vae_compress.pipeline import compress_folder, load_compressed
from hf_vae_compress.testing.hub_server import HubServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_compress import machine_loaded  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TOKEN = "hf_loopback"
ORG = "loopback"

# Run in a fresh interpreter: load REPO with LOADER, time it, evaluate, hash probe logits.
CHILD = r"""
import hashlib, json, sys, time, torch
repo, loader = sys.argv[1], sys.argv[2]
start = time.perf_counter()
if loader == "timm":
    import hf_vae_compress
    model = hf_vae_compress.create_model(f"hf-hub:{repo}")
elif loader == "timm-fp32":
    import timm
    model = timm.create_model(f"hf-hub:{repo}", pretrained=True)
else:
    if loader == "transformers":
        import hf_vae_compress  # registers the quantizer
    from transformers import AutoModelForImageClassification
    model = AutoModelForImageClassification.from_pretrained(repo)
load_s = time.perf_counter() - start
model.eval()
from hf_vae_compress.data import load_fashion_mnist
from hf_vae_compress.evaluate import evaluate, logits_of
from safetensors.torch import load_file
probe = load_file(sys.argv[3])["probe"]
with torch.no_grad():
    logits = logits_of(model(probe)).contiguous()
result = evaluate(model, load_fashion_mnist("test"), progress=False)
print(json.dumps(dict(load_s=load_s, top1=result["top1"],
                      logits_sha256=hashlib.sha256(logits.numpy().tobytes()).hexdigest())))
"""


def _child(endpoint: str, home: Path, repo: str, loader: str, probe: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", HF_TOKEN=TOKEN,
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_DATASETS_CACHE=os.environ.get(
                   "HF_DATASETS_CACHE", str(Path.home() / ".cache/huggingface/datasets")))
    out = subprocess.run([sys.executable, "-c", CHILD, repo, loader, str(probe)], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"loading {repo} with {loader} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def vae_int_folder(name: str, bits_per_weight: float, out: Path) -> Path:
    """A portable-VAE container of reference model ``name`` at a fixed rate (compress-time only)."""
    config = VAECompressionConfig(transform="vae-int", target_bits_per_weight=bits_per_weight)
    compress_folder(str(ROOT / "reference_models" / name), out, config, dataset="fashion_mnist", progress=False)
    return out


def roundtrip(name: str, artifact: Path, hub: HubServer, workdir: Path, commit: str) -> dict:
    base = ROOT / "reference_models" / name
    fmt = model_format(read_config(base))
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / "probe.safetensors"
    save_file({"probe": torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))}, str(probe))

    local = load_compressed(artifact)
    with torch.no_grad():
        local_logits = logits_of(local(load_file(str(probe))["probe"])).contiguous()
    local_top1 = evaluate(local, load_fashion_mnist("test"), progress=False)["top1"]

    api = HfApi(endpoint=hub.url, token=TOKEN)
    transform = CompressedModel.load(artifact).config.transform
    fp32_repo, vaec_repo = f"{ORG}/{name}", f"{ORG}/{name}-vaec-{transform}"
    api.create_repo(fp32_repo, exist_ok=True)
    api.upload_folder(repo_id=fp32_repo, folder_path=str(base), ignore_patterns=["train_result.json"])
    plot = RESULTS / f"rate_accuracy_{name}.png"
    push_to_hub(CompressedModel.load(artifact), vaec_repo, base,
                CardInfo(base_model=fp32_repo, dataset="fashion_mnist", plot=plot if plot.exists() else None),
                endpoint=hub.url, token=TOKEN)

    loaded = machine_loaded(os.getloadavg()[0])  # shared machine: the load seconds are indicative only
    loaders = {"timm": [("timm", "timm-fp32"), ("transformers", "transformers-fp32")],
               "transformers": [("transformers", "transformers-fp32")]}[fmt]
    paths = []
    for compressed_loader, fp32_loader in loaders:
        home = workdir / f"home-{compressed_loader}"
        ours = _child(hub.url, home, vaec_repo, compressed_loader, probe)
        fp32 = _child(hub.url, home, fp32_repo, fp32_loader, probe)
        paths.append(dict(
            loader=compressed_loader, top1=ours["top1"], fp32_top1=fp32["top1"], local_decode_top1=local_top1,
            top1_equal=ours["top1"] == local_top1,
            logits_bit_identical=ours["logits_sha256"] == hashlib.sha256(local_logits.numpy().tobytes()).hexdigest(),
            load_s=ours["load_s"], fp32_load_s=fp32["load_s"], load_ratio=ours["load_s"] / fp32["load_s"],
        ))
    return dict(model=name, format=fmt, transform=transform, container_bytes=find_container(artifact).stat().st_size,
                commit=commit, machine_loaded=loaded, paths=paths)


def _row_key(row: dict) -> tuple[str, str]:
    return row["model"], row.get("transform", "identity")  # rows before vae-int rows existed were identity


def merged(output: Path, rows: list[dict]) -> list[dict]:
    """``rows`` replace the rows of ``output`` for the same model and transform; the others are kept
    (a partial rerun must not drop rows it did not measure)."""
    new = {_row_key(row) for row in rows}
    kept = json.loads(output.read_text())["rows"] if output.exists() else []
    return [row for row in kept if _row_key(row) not in new] + rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=None,
                        help="headline artifacts to round-trip (default: every classifier; none: only --vae-int)")
    parser.add_argument("--vae-int", nargs="*", default=[], metavar="MODEL",
                        help="also round-trip a vae-int container of these reference models")
    parser.add_argument("--vae-int-bpw", type=float, default=2.0)
    parser.add_argument("--output", type=Path, default=RESULTS / "hub_roundtrip.json")
    args = parser.parse_args(argv)
    # classifiers only: the detector's Hub path is covered by tests/test_detection.py, not timed here yet
    names = args.models if args.models is not None else sorted(p.name for p in (RESULTS / "artifacts").iterdir()
                                  if p.is_dir() and (ROOT / "reference_models" / p.name).exists()
                                  and not is_detection_model(read_config(ROOT / "reference_models" / p.name)))
    # the commit this process imported the package at (the children load the tree as it is then)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
    with HubServer() as hub, tempfile.TemporaryDirectory() as tmp:
        rows = [roundtrip(name, RESULTS / "artifacts" / name, hub, Path(tmp) / name, commit) for name in names]
        rows += [roundtrip(name, vae_int_folder(name, args.vae_int_bpw, Path(tmp) / f"{name}-vae-int"), hub,
                           Path(tmp) / f"{name}-vae-int-hub", commit) for name in args.vae_int]
    args.output.write_text(json.dumps({"rows": merged(args.output, rows)}, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
