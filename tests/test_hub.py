"""Hub round trip against the loopback Hub of hf_vae_compress.testing: push, then load in fresh processes.

Tiny timm and transformers models are compressed once per module and pushed with
``hf_vae_compress.push_to_hub``. Every load from the Hub runs in a fresh subprocess with its own
HF_HOME and HF_ENDPOINT pointing at the server (huggingface_hub reads HF_ENDPOINT at import), one
thread, and writes its logits to a file; the parent compares them with ``torch.equal`` to the local
decode (``load_compressed`` of the compressed folder).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest
import torch

from hf_vae_compress import CardInfo, VAECompressionConfig, compress, create_model, push_to_hub, save_pretrained
from hf_vae_compress.cli import main
from hf_vae_compress.codec import CONTAINER_NAME, FitConfig
from hf_vae_compress.data import load_image_dataset
from hf_vae_compress.evaluate import evaluate
from hf_vae_compress.integrations.transformers_quantizer import check_transformers_api
from hf_vae_compress.models import load_model
from hf_vae_compress.pipeline import compress_folder, load_compressed
from hf_vae_compress.testing.hub_server import HubServer

TOKEN = "hf_test"
ROOT = Path(__file__).resolve().parent.parent
FAST = VAECompressionConfig(target_bits_per_weight=4.0, fit=FitConfig(train_steps=60, train_batch_chunks=1024))
REPOS = {"timm": "test-org/tiny-timm-vaec", "vit": "test-org/tiny-vit-vaec"}
FP32_REPOS = {"timm": "test-org/tiny-timm", "vit": "test-org/tiny-vit"}
TIMINGS: dict[str, float] = {}


def _png(path: Path) -> Path:
    """A valid 1x1 PNG: stands in for a rate-accuracy plot."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:  # as tests/test_hub_server.py's `hub`, for the whole module
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        mp.setattr("huggingface_hub.utils._detect_agent._registry", {"standardEnvVars": [], "harnesses": {}},
                   raising=False)
        mp.setenv("HF_XET_LOG_DEST", str(tmp_path_factory.getbasetemp() / "hf_xet.log"))
        with HubServer() as server:
            yield server


@pytest.fixture(scope="module")
def published(hub, timm_folder, vit_folder, small_test_set, tmp_path_factory):
    """Both tiny models compressed, pushed (with a measured card), and their fp32 originals uploaded."""
    from huggingface_hub import HfApi

    tmp = tmp_path_factory.mktemp("published")
    plot = _png(tmp / "rate_accuracy_tiny.png")
    api = HfApi(endpoint=hub.url, token=TOKEN)
    out = {"dirs": {}, "sources": {"timm": timm_folder, "vit": vit_folder}, "commits": {}, "compressed": {},
           "plot": plot, "x": tmp / "x.pt", "reference": {}}
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    torch.save(x, out["x"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind, source in out["sources"].items():
            start = time.perf_counter()
            folder = tmp / f"{kind}-compressed"
            compressed = compress_folder(str(source), folder, FAST, progress=False)
            TIMINGS[f"compress {kind}"] = time.perf_counter() - start
            start = time.perf_counter()
            info = CardInfo(base_model=FP32_REPOS[kind], license="apache-2.0", dataset=str(small_test_set),
                            plot=plot, tags=["tiny"])
            out["commits"][kind] = push_to_hub(compressed, REPOS[kind], source, info, endpoint=hub.url, token=TOKEN)
            TIMINGS[f"push {kind} (with evaluation)"] = time.perf_counter() - start
            api.create_repo(FP32_REPOS[kind])
            api.upload_folder(folder_path=source, repo_id=FP32_REPOS[kind])
            out["dirs"][kind], out["compressed"][kind] = folder, compressed
            with torch.no_grad():
                logits = load_compressed(folder)(x)
            out["reference"][kind] = logits if isinstance(logits, torch.Tensor) else logits.logits
    finally:
        torch.set_num_threads(threads)
    return out


def _env(endpoint: str, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_")) or k.startswith("HF_VAE_COMPRESS_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_XET_LOG_DEST=str(home / "xet.log"), TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT), **extra)
    return env


PREAMBLE = """
import json, statistics, sys, time
import torch
torch.set_num_threads(1)
def logits(model, x):
    with torch.no_grad():
        out = model.eval()(x)
    return out if isinstance(out, torch.Tensor) else out.logits
def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start
outcomes = {}
def attempt(name, fn):  # what a load gives: LOADED, or the error's type and message
    try:
        fn()
        outcomes[name] = "LOADED"
    except Exception as err:
        outcomes[name] = f"{'OSError' if isinstance(err, OSError) else type(err).__name__}: {err}"
def compare_load_times(fp32, compressed, repeats=3):
    # median wall time of cached loads, alternating, after both were loaded once
    times = {"fp32": [], "compressed": []}
    for _ in range(repeats):
        times["fp32"].append(timed(fp32)[1])
        times["compressed"].append(timed(compressed)[1])
    return {k: statistics.median(v) for k, v in times.items()}
"""


def _record(name: str, result: dict) -> None:
    fp32_first, compressed_first = result["first"]
    TIMINGS[f"{name}: fp32 first load (download; loads first, so also pays lazy imports)"] = fp32_first
    TIMINGS[f"{name}: compressed first load (download + decode)"] = compressed_first
    TIMINGS[f"{name}: fp32 cached load (median of 3)"] = result["cached"]["fp32"]
    TIMINGS[f"{name}: compressed cached load (median of 3)"] = result["cached"]["compressed"]


def _run(code: str, env: dict[str, str], name: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PREAMBLE + textwrap.dedent(code)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=180)
    TIMINGS[f"subprocess {name}"] = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_transformers_api_surface_is_pinned():
    """The quantizer hooks this package relies on; a transformers upgrade that moves them fails here."""
    problems = check_transformers_api()
    assert problems == [], "\n".join(["transformers moved API that the hf_vae_compress quantizer relies on:",
                                      *problems, "update hf_vae_compress/integrations/transformers_quantizer.py"])


def test_push_is_one_commit_and_snapshot_download_matches(hub, published, tmp_path):
    from huggingface_hub import snapshot_download

    for kind, repo in REPOS.items():
        commits = hub.repos[repo]
        assert [c.title for c in commits][0] == "initial commit" and len(commits) == 2
        assert published["commits"][kind].oid == commits[-1].oid
        snapshot = Path(snapshot_download(repo, endpoint=hub.url, cache_dir=tmp_path / "cache"))
        files = {p.name for p in snapshot.iterdir()}
        expected = {".gitattributes", "README.md", "config.json", CONTAINER_NAME, "modeling_hf_vae_compress.py",
                    published["plot"].name}
        if kind == "vit":
            expected.add("preprocessor_config.json")
        assert files == expected
        assert not any(name.endswith((".bin", ".pth", ".pt")) or name == "model.safetensors" for name in files)
        assert (snapshot / CONTAINER_NAME).read_bytes() == published["compressed"][kind].to_bytes()
        assert (snapshot / published["plot"].name).read_bytes() == published["plot"].read_bytes()
        config = json.loads((snapshot / "config.json").read_text())
        base_config = json.loads((published["sources"][kind] / "config.json").read_text())
        quant = config.pop("quantization_config")
        assert quant["quant_method"] == "hf_vae_compress" and quant["container"] == CONTAINER_NAME
        assert quant["dtype"] == "float32" and 0 < quant["bits_per_weight"] < 32
        assert config.pop("auto_map") == {
            "AutoModelForImageClassification": "modeling_hf_vae_compress.HfVaeCompressForImageClassification"}
        base_config.get("model_args", {}).pop("num_classes", None)
        assert config == base_config
        shim = ROOT / "hf_vae_compress/integrations/remote_code/modeling_hf_vae_compress.py"
        assert (snapshot / "modeling_hf_vae_compress.py").read_bytes() == shim.read_bytes()

        # the same files load with timm's local-dir naming too
        if kind == "timm":
            model = create_model(f"local-dir:{snapshot}").eval()
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # the reference logits were computed on one thread: same summation order
            try:
                with torch.no_grad():
                    assert torch.equal(model(torch.load(published["x"], weights_only=True)), published["reference"]["timm"])
            finally:
                torch.set_num_threads(threads)
    assert hub.unhandled == []


def test_container_bytes_are_canonical(published):
    """safetensors writes its metadata map in hash order; the pushed container must not depend on it."""
    compressed = published["compressed"]["vit"]
    assert len({compressed.to_bytes() for _ in range(16)}) == 1


def test_pushing_again_is_idempotent_and_stale_weights_are_deleted(hub, published):
    from huggingface_hub import HfApi

    repo, kind = REPOS["vit"], "vit"
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.upload_file(path_or_fileobj=b"stale fp32 weights", path_in_repo="model.safetensors", repo_id=repo)
    n_commits = len(hub.repos[repo])
    info = CardInfo(base_model=FP32_REPOS[kind], license="apache-2.0", dataset=None, plot=published["plot"])
    cleanup = push_to_hub(published["compressed"][kind], repo, published["sources"][kind], info, endpoint=hub.url,
                          token=TOKEN)
    assert len(hub.repos[repo]) == n_commits + 1  # one commit: card changed (no accuracy) and the stale file deleted
    assert "model.safetensors" not in hub.files(repo)
    files = hub.files(repo)

    n_requests = len(hub.requests)
    again = push_to_hub(published["compressed"][kind], repo, published["sources"][kind], info, endpoint=hub.url,
                        token=TOKEN)
    assert again.oid == cleanup.oid == hub.repos[repo][-1].oid
    assert len(hub.repos[repo]) == n_commits + 1 and hub.files(repo) == files
    assert not [r for r in hub.requests[n_requests:] if r[0] == "POST" and "/commit/" in r[1]]


def test_model_card_metadata_and_measured_accuracy(hub, published, small_test_set, tmp_path):
    repo = REPOS["timm"]
    card = _run(f"""
        from huggingface_hub import ModelCard
        card = ModelCard.load({repo!r})
        print(json.dumps({{"data": card.data.to_dict(), "text": card.text}}))
    """, _env(hub.url, tmp_path / "home"), "ModelCard.load")
    data = card["data"]
    assert data["base_model"] == FP32_REPOS["timm"] and data["base_model_relation"] == "quantized"
    assert data["library_name"] == "timm" and data["pipeline_tag"] == "image-classification"
    assert data["license"] == "apache-2.0"
    assert {"hf-vae-compress", "tiny", "image-classification"} <= set(data["tags"])
    result = data["model-index"][0]["results"][0]
    assert result["task"]["type"] == "image-classification" and result["dataset"]["split"] == "test"
    assert result["metrics"][0]["type"] == "accuracy"

    # the numbers are measured: evaluate both models here and find them in the card
    test_set = load_image_dataset(str(small_test_set))
    compressed = evaluate(load_compressed(published["dirs"]["timm"]), test_set, progress=False)
    base = evaluate(load_model(published["sources"]["timm"]), test_set, progress=False)
    assert result["metrics"][0]["value"] == pytest.approx(compressed["top1"])
    text = card["text"]
    assert f"{100 * compressed['top1']:.2f} %" in text and f"{100 * base['top1']:.2f} %" in text
    container_bytes = (published["dirs"]["timm"] / CONTAINER_NAME).stat().st_size
    base_bytes = (published["sources"]["timm"] / "model.safetensors").stat().st_size
    assert f"| {container_bytes:,} |" in text and f"| {base_bytes:,} |" in text
    assert f"![Top-1 accuracy against bits per weight]({published['plot'].name})" in text
    assert f'hf_vae_compress.create_model("hf-hub:{repo}")' in text


def test_timm_create_model_from_hub(hub, published, tmp_path):
    out = tmp_path / "logits.pt"
    result = _run(f"""
        import hf_vae_compress, timm
        x = torch.load({str(published["x"])!r}, weights_only=True)
        fp32 = lambda: timm.create_model("hf-hub:{FP32_REPOS["timm"]}", pretrained=True)
        compressed = lambda: hf_vae_compress.create_model("hf-hub:{REPOS["timm"]}")
        _, fp32_first = timed(fp32)
        model, compressed_first = timed(compressed)
        torch.save(logits(model, x), {str(out)!r})
        print(json.dumps({{"type": type(model).__name__, "first": [fp32_first, compressed_first],
                          "cached": compare_load_times(fp32, compressed)}}))
    """, _env(hub.url, tmp_path / "home"), "timm create_model")
    assert result["type"] == "ResNet"
    assert torch.equal(torch.load(out, weights_only=True), published["reference"]["timm"])
    _record("timm: timm.create_model vs hf_vae_compress.create_model", result)


@pytest.mark.parametrize("kind, model_type", [("vit", "ViTForImageClassification"),
                                              ("timm", "TimmWrapperForImageClassification")])
def test_transformers_from_pretrained_decodes_through_the_quantizer(hub, published, tmp_path, kind, model_type):
    """A transformers ViT repo, and a timm repo through TimmWrapper: the quantizer decodes both."""
    out = tmp_path / "logits.pt"
    result = _run(f"""
        import hf_vae_compress
        from transformers import AutoModelForImageClassification as Auto
        x = torch.load({str(published["x"])!r}, weights_only=True)
        fp32 = lambda: Auto.from_pretrained({FP32_REPOS[kind]!r})
        compressed = lambda: Auto.from_pretrained({REPOS[kind]!r})
        _, fp32_first = timed(fp32)
        (model, info), compressed_first = timed(lambda: Auto.from_pretrained({REPOS[kind]!r}, output_loading_info=True))
        torch.save(logits(model, x), {str(out)!r})
        print(json.dumps({{"type": type(model).__name__, "info": {{k: sorted(map(str, v)) for k, v in info.items()}},
                          "quant": model.config.quantization_config.quant_method, "dtype": str(model.dtype),
                          "decode_s": model.hf_quantizer.decode_seconds, "first": [fp32_first, compressed_first],
                          "cached": compare_load_times(fp32, compressed)}}))
    """, _env(hub.url, tmp_path / "home"), f"transformers {kind}")
    assert result["type"] == model_type and result["quant"] == "hf_vae_compress"
    assert result["dtype"] == "torch.float32"
    assert all(not v for v in result["info"].values()), result["info"]  # no missing / unexpected / mismatched
    assert torch.equal(torch.load(out, weights_only=True), published["reference"][kind])
    _record(f"{kind}: AutoModelForImageClassification.from_pretrained", result)
    TIMINGS[f"{kind}: decode inside the first compressed from_pretrained"] = result["decode_s"]


@pytest.mark.parametrize("kind", ["vit", "timm"])
def test_remote_code_without_importing_the_plugin(hub, published, tmp_path, kind):
    out = tmp_path / "logits.pt"
    result = _run(f"""
        from transformers import AutoModelForImageClassification as Auto
        x = torch.load({str(published["x"])!r}, weights_only=True)
        model = Auto.from_pretrained({REPOS[kind]!r}, trust_remote_code=True)
        torch.save(logits(model, x), {str(out)!r})
        print(json.dumps({{"type": type(model).__name__, "plugin": "hf_vae_compress" in sys.modules}}))
    """, _env(hub.url, tmp_path / "home"), f"remote code {kind}")
    assert result["plugin"]  # imported by the shim, not by us
    assert torch.equal(torch.load(out, weights_only=True), published["reference"][kind])


def test_offline_load_from_cache(hub, published, tmp_path):
    from huggingface_hub import snapshot_download

    home = tmp_path / "home"
    for repo in REPOS.values():
        snapshot_download(repo, endpoint=hub.url, cache_dir=home / "hub")
    n_requests = len(hub.requests)
    out = {kind: tmp_path / f"{kind}.pt" for kind in REPOS}
    _run(f"""
        import hf_vae_compress
        from transformers import AutoModelForImageClassification as Auto
        x = torch.load({str(published["x"])!r}, weights_only=True)
        torch.save(logits(Auto.from_pretrained({REPOS["vit"]!r}), x), {str(out["vit"])!r})
        torch.save(logits(hf_vae_compress.create_model("hf-hub:{REPOS["timm"]}"), x), {str(out["timm"])!r})
        print("{{}}")
    """, _env(hub.url, home, HF_HUB_OFFLINE="1"), "offline")
    assert len(hub.requests) == n_requests  # offline really made no request
    for kind, path in out.items():
        assert torch.equal(torch.load(path, weights_only=True), published["reference"][kind])


BLOCK_PLUGIN = """
import importlib.abc
class _NoPlugin(importlib.abc.MetaPathFinder):  # as if hf-vae-compress were not installed
    def find_spec(self, name, path=None, target=None):
        if name == "hf_vae_compress" or name.startswith("hf_vae_compress."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NoPlugin())
"""


def test_stock_loaders_without_the_plugin_fail_loudly(hub, published, tmp_path):
    result = _run(BLOCK_PLUGIN + textwrap.dedent(f"""
        import timm
        from transformers import AutoModelForImageClassification as Auto
        attempt("no-plugin import", lambda: __import__("hf_vae_compress"))
        for kind, repo in {REPOS!r}.items():
            attempt(f"{{kind}} stock", lambda: Auto.from_pretrained(repo))
            attempt(f"{{kind}} remote code", lambda: Auto.from_pretrained(repo, trust_remote_code=True))
            attempt(f"{{kind}} variant", lambda: Auto.from_pretrained(repo, variant="vaec"))
        attempt("timm stock", lambda: timm.create_model("hf-hub:{REPOS["timm"]}", pretrained=True))
        print(json.dumps(outcomes))
    """), _env(hub.url, tmp_path / "home"), "no plugin")
    assert result["no-plugin import"].startswith("ModuleNotFoundError")
    for kind in REPOS:
        assert result[f"{kind} stock"].startswith("OSError"), result
        assert "model.safetensors" in result[f"{kind} stock"] or "pytorch_model.bin" in result[f"{kind} stock"]
        assert result[f"{kind} remote code"].startswith("ImportError"), result
        assert "pip install hf-vae-compress" in result[f"{kind} remote code"]
        assert result[f"{kind} variant"].startswith("OSError"), result  # no variant names the container
    assert result["timm stock"].startswith("OSError"), result


def test_a_container_that_does_not_fit_the_model_raises(published, tmp_path):
    """Strict loads: the ViT config with the timm container fails on every path, never loads partially."""
    from transformers import AutoModelForImageClassification

    for kind, other in (("vit", "timm"), ("timm", "vit")):
        folder = tmp_path / kind
        shutil.copytree(published["dirs"][kind], folder)
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "hf_vae_compress", "container": CONTAINER_NAME}
        (folder / "config.json").write_text(json.dumps(config))
        shutil.copyfile(published["dirs"][other] / CONTAINER_NAME, folder / CONTAINER_NAME)
        with pytest.raises(RuntimeError, match="missing"):
            AutoModelForImageClassification.from_pretrained(folder)
    with pytest.raises(RuntimeError, match="missing keys"):
        create_model(f"local-dir:{tmp_path / 'timm'}")


def test_local_folder_with_another_dtype_and_no_resave(published, tmp_path):
    """dtype= is honoured (decoded weights cast after the hash check); the loaded model cannot be re-saved."""
    from transformers import AutoModelForImageClassification

    folder = tmp_path / "vit"
    save_pretrained(published["compressed"]["vit"], published["sources"]["vit"], folder)
    model = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and "transformers_weights" not in model.config.to_dict()
    reference = load_compressed(published["dirs"]["vit"]).state_dict()
    assert all(torch.equal(v, reference[k].to(v.dtype)) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "resaved")


def test_cli_push(hub, published, tmp_path, capsys):
    repo = "test-org/cli-push"
    argv = ["push", str(published["dirs"]["vit"]), repo, "--endpoint", hub.url, "--token", TOKEN, "--dataset", "none",
            "--base", str(published["sources"]["vit"]), "--base-model", FP32_REPOS["vit"], "--license", "mit", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["commit"] == hub.repos[repo][-1].oid and len(hub.repos[repo]) == 2
    files = hub.files(repo)
    assert files[CONTAINER_NAME] == (published["dirs"]["vit"] / CONTAINER_NAME).read_bytes()
    assert b"license: mit" in files["README.md"] and b"base_model: test-org/tiny-vit" in files["README.md"]
    assert main(argv) == 0 and len(hub.repos[repo]) == 2  # idempotent from the CLI too
    capsys.readouterr()


def _tampered(container: bytes) -> bytes:
    """The container with one byte of its recorded model SHA-256 flipped: a well-formed file whose
    weights no longer match what was measured at compression time."""
    n = struct.unpack("<Q", container[:8])[0]
    begin, _ = json.loads(container[8: 8 + n])["checks"]["data_offsets"]
    at = 8 + n + begin
    return container[:at] + bytes([container[at] ^ 0x01]) + container[at + 1:]


def test_a_tampered_repo_raises_integrity_error_through_every_loader(hub, published, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=TOKEN)
    repos = {}
    for kind, repo in REPOS.items():
        folder = tmp_path / kind
        shutil.copytree(published["dirs"][kind], folder)
        (folder / CONTAINER_NAME).write_bytes(_tampered((folder / CONTAINER_NAME).read_bytes()))
        repos[kind] = f"test-org/tampered-{kind}"
        api.create_repo(repos[kind])
        api.upload_folder(folder_path=folder, repo_id=repos[kind])
    result = _run(f"""
        import hf_vae_compress
        from transformers import AutoModelForImageClassification as Auto
        for kind, repo in {repos!r}.items():
            attempt(f"{{kind}} quantizer", lambda: Auto.from_pretrained(repo))
            attempt(f"{{kind}} remote code", lambda: Auto.from_pretrained(repo, trust_remote_code=True))
        attempt("timm", lambda: hf_vae_compress.create_model("hf-hub:{repos["timm"]}"))
        print(json.dumps(outcomes))
    """, _env(hub.url, tmp_path / "home"), "tampered")
    assert len(result) == 5 and all(v.startswith("IntegrityError") for v in result.values()), result


def test_four_processes_loading_one_cold_cache_at_once_get_identical_weights(hub, published, tmp_path):
    home = tmp_path / "shared-home"
    code = PREAMBLE + textwrap.dedent(f"""
        import hashlib, hf_vae_compress
        from transformers import AutoModelForImageClassification as Auto
        x = torch.load({str(published["x"])!r}, weights_only=True)
        model = Auto.from_pretrained({REPOS["vit"]!r})
        torch.save(logits(model, x), sys.argv[1])
    """)
    env = _env(hub.url, home)
    outs = [tmp_path / f"logits-{i}.pt" for i in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out)], env=env, cwd=ROOT, stderr=subprocess.PIPE,
                              text=True) for out in outs]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    for out in outs:
        assert torch.equal(torch.load(out, weights_only=True), published["reference"]["vit"])


def test_an_interrupted_push_leaves_the_old_or_the_new_commit(hub, published, tmp_path):
    """A push killed at any moment: the repo is at its old commit or at the complete new one."""
    repo, kind = "test-org/interrupted", "timm"
    push_to_hub(published["compressed"][kind], repo, published["sources"][kind], endpoint=hub.url, token=TOKEN)
    old = hub.files(repo)
    other = compress(load_model(published["sources"][kind]),
                     VAECompressionConfig(target_bits_per_weight=2.0, transform="identity"), progress=False)
    other.save(tmp_path / "new")
    code = f"""
        from hf_vae_compress import CompressedModel, push_to_hub
        push_to_hub(CompressedModel.load({str(tmp_path / "new")!r}), {repo!r}, {str(published["sources"][kind])!r},
                    endpoint={hub.url!r}, token={TOKEN!r})
    """
    env = _env(hub.url, tmp_path / "home")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, check=True, timeout=180)
    full = time.perf_counter() - start
    new = hub.files(repo)
    assert new[CONTAINER_NAME] == other.to_bytes() and new != old
    outcomes = []
    for fraction in (0.3, 0.6, 0.8, 0.9, 0.95, 0.99):  # kill points spread over the whole push
        push_to_hub(published["compressed"][kind], repo, published["sources"][kind], endpoint=hub.url, token=TOKEN)
        assert hub.files(repo) == old
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT)
        time.sleep(fraction * full)
        proc.kill()
        proc.wait()
        files = hub.files(repo)
        assert files in (old, new), f"half-written repo after a kill at {fraction:.0%} of the push"
        outcomes.append("new" if files == new else "old")
    TIMINGS[f"interrupted pushes ended at (old/new): {outcomes}"] = full


def test_report_timings():
    """Not a check: prints the wall times measured above (pytest -s, or see the -rA summary)."""
    for name, seconds in TIMINGS.items():
        print(f"{name:<92}{seconds:8.3f} s")
