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

from hf_vae_compress import CompressedModel
from hf_vae_compress.data import load_fashion_mnist
from hf_vae_compress.detection import is_detection_model
from hf_vae_compress.evaluate import evaluate, logits_of
from hf_vae_compress.hub import CardInfo, push_to_hub
from hf_vae_compress.loading import find_container
from hf_vae_compress.models import model_format, read_config
from hf_vae_compress.pipeline import load_compressed
from hf_vae_compress.testing.hub_server import HubServer

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


def roundtrip(name: str, hub: HubServer, workdir: Path) -> dict:
    artifact = RESULTS / "artifacts" / name
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
    fp32_repo, vaec_repo = f"{ORG}/{name}", f"{ORG}/{name}-vaec"
    api.create_repo(fp32_repo, exist_ok=True)
    api.upload_folder(repo_id=fp32_repo, folder_path=str(base), ignore_patterns=["train_result.json"])
    plot = RESULTS / f"rate_accuracy_{name}.png"
    push_to_hub(CompressedModel.load(artifact), vaec_repo, base,
                CardInfo(base_model=fp32_repo, dataset="fashion_mnist", plot=plot if plot.exists() else None),
                endpoint=hub.url, token=TOKEN)

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
    return dict(model=name, format=fmt, container_bytes=find_container(artifact).stat().st_size,
                paths=paths)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--output", type=Path, default=RESULTS / "hub_roundtrip.json")
    args = parser.parse_args(argv)
    # classifiers only: the detector's Hub path is covered by tests/test_detection.py, not timed here yet
    names = args.models or sorted(p.name for p in (RESULTS / "artifacts").iterdir()
                                  if p.is_dir() and (ROOT / "reference_models" / p.name).exists()
                                  and not is_detection_model(read_config(ROOT / "reference_models" / p.name)))
    with HubServer() as hub, tempfile.TemporaryDirectory() as tmp:
        rows = [roundtrip(name, hub, Path(tmp) / name) for name in names]
    args.output.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
