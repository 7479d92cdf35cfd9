"""Every container we ship decodes on any machine, and every failure says which kind it is.

"Another machine" is simulated on this one: ``ATEN_CPU_CAPABILITY=default`` makes PyTorch's own
kernels take their generic (non-AVX) code path and ``MKL_ENABLE_INSTRUCTIONS=SSE4_2`` does the
same for MKL's matmuls, so float networks give other bits, as they do on another CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_vae_compress import CompressedModel, IntegrityError, VAECompressionConfig, compress
from hf_vae_compress.codec import FitConfig
from hf_vae_compress.codec.format.integrity import ALLOW_UNVERIFIED_ENV, MachineDependentError
from hf_vae_compress.codec.transform import WeightVAE
from tests.conftest import assert_damage_is_corrupt, tiny_timm, tiny_vit

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = sorted(p for p in (ROOT / "benchmarks" / "results" / "artifacts").iterdir() if p.is_dir())
FIXTURES = sorted((ROOT / "tests" / "data" / "v1").glob("*.safetensors"))
OTHER_MACHINE = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
VAE = dict(transform="vae", fit=FitConfig(train_steps=60, train_batch_chunks=1024))


def _probe(paths: list[Path], env: dict[str, str]) -> dict:
    """Decode in a fresh process under this machine's own kernels updated by ``env`` (so the
    comparison holds even when the suite itself runs under the simulated machine)."""
    ignored = {ALLOW_UNVERIFIED_ENV, *OTHER_MACHINE}
    done = subprocess.run([sys.executable, "-m", "tests.decode_probe", *map(str, paths)], cwd=ROOT, check=True,
                          capture_output=True, text=True, timeout=600,
                          env={**{k: v for k, v in os.environ.items() if k not in ignored}, **env})
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> dict[str, Path]:
    """Containers written here, now, by each transform: a timm CNN and a transformers ViT."""
    out = {}
    for name, make in (("timm", tiny_timm), ("vit", tiny_vit)):
        for transform in ("identity", "vae"):
            fields = VAE if transform == "vae" else dict(transform="identity", rounding="nearest")
            compressed = compress(make(), VAECompressionConfig(target_bits_per_weight=3.0, **fields), progress=False)
            out[f"{name}-{transform}"] = compressed.save(tmp_path_factory.mktemp(f"{name}-{transform}"))
    return out


def test_committed_artifacts_are_portable():
    """What the README points users at must load on their machine, whatever it is."""
    assert ARTIFACTS
    assert [p.name for p in ARTIFACTS if not CompressedModel.load(p).portable] == []


def test_every_container_decodes_alike_on_another_machine(fresh):
    paths = [*ARTIFACTS, *FIXTURES, *fresh.values()]
    here, there = _probe(paths, {}), _probe(paths, OTHER_MACHINE)
    if here["capability"] == there["capability"] == "DEFAULT":
        pytest.skip("this CPU already runs the generic kernels: there is no other machine to simulate")
    assert here["float_probe"] != there["float_probe"], "the settings did not change float results: test proves nothing"
    for path in map(str, paths):
        ours, theirs = here["containers"][path], there["containers"][path]
        portable = CompressedModel.load(path).portable
        if portable:
            assert ours["status"] == theirs["status"] == "ok", (path, ours, theirs)
            assert ours["digest"] == theirs["digest"], path
        else:  # the float decoder: the same bits, or the honest machine-dependence error; never "corrupt"
            for result in (ours, theirs):
                assert result["status"] in ("ok", "machine_dependent"), (path, result)
            if ours["status"] == theirs["status"] == "ok":
                assert ours["digest"] == theirs["digest"], path
    for path in fresh.values():  # the writer's own machine (this process's kernels) verifies everything
        CompressedModel.load(path).decode(allow_unverified=False)


@pytest.mark.parametrize("part", ["streams", "scales", "decoder.mlp.fc2.weight"])
def test_damaged_stored_bytes_of_a_vae_container_are_called_corrupt(fresh, part, tmp_path):
    path = fresh["vit-vae"]
    assert CompressedModel.load(path).stored_bytes_verified()
    assert_damage_is_corrupt(path, part, tmp_path, 0x10)


def test_another_float_output_is_machine_dependent_never_corrupt(fresh, monkeypatch, caplog):
    """The stored bytes intact, the decoder network's float output one ulp off: what another CPU does."""
    original = WeightVAE.decode
    monkeypatch.setattr(WeightVAE, "decode", lambda self, *a: torch.nextafter(original(self, *a), torch.tensor(1.0)))
    compressed = CompressedModel.load(fresh["vit-vae"])
    assert compressed.stored_bytes_verified()
    with pytest.raises(MachineDependentError, match=ALLOW_UNVERIFIED_ENV) as caught:
        compressed.decode()
    assert "corrupt" not in str(caught.value) and "stored bytes are intact" in str(caught.value)
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "1")  # the documented opt-in: loads, and says what it skipped
    decoded = compressed.decode()
    assert set(decoded) == {e["name"] for e in compressed.header["tensors"]}
    assert "could not be verified" in caplog.text


def test_the_identity_decoder_is_checked_whatever_the_opt_in(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "1")
    compressed = CompressedModel.load(fresh["timm-identity"])
    checks = compressed.tensors["checks"].clone()
    checks[32] ^= 0xFF  # the first tensor's CRC, re-sealed: as if the decoder produced other bits
    resealed = CompressedModel(compressed.header, {**compressed.tensors, "checks": checks})
    with pytest.raises(IntegrityError, match="decoder differs") as caught:
        CompressedModel.load(resealed.save(tmp_path)).decode()
    assert not isinstance(caught.value, MachineDependentError)
