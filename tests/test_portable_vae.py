"""The portable VAE (``transform="vae-int"``): a learned transform whose decoder is exact everywhere.

Its decoder is an int16 linear map per tensor whose products are exact by a proven bound, then fixed IEEE roundings
(:mod:`hf_vae_compress.codec.format.linear`). These tests compress a small model whose conv kernels
are correlated (so the transform keeps a learned map for them) and whose linear layer is white (so
it keeps the identity there), and check that the decode is the integer arithmetic, bit for bit, on
this machine and on a simulated other one; that damage is refused as corruption; and that the float
VAE's containers still load as before.

Run as ``python -m tests.test_portable_vae PATH...`` it is the other machine's decoder: it prints
:mod:`tests.decode_probe`'s JSON for the containers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_vae_compress import CompressedModel, ContainerError, IntegrityError, VAECompressionConfig, compress
from hf_vae_compress.codec import FitConfig, config as codec_config
from hf_vae_compress.codec.format import identity, linear
from hf_vae_compress.codec.format.integrity import ALLOW_UNVERIFIED_ENV, MachineDependentError, ModelHash
from hf_vae_compress.codec.format.layout import ChunkLayout
from hf_vae_compress.codec.transform import PortableVAE, WeightVAE
from hf_vae_compress.finetune import FinetuneConfig, finetune
from tests.conftest import assert_damage_is_corrupt

ROOT = Path(__file__).resolve().parent.parent
OTHER_MACHINE = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
KIND = "vae-int"
FIT = FitConfig(train_steps=60, train_batch_chunks=1024)


def correlated_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A conv weight whose 3x3 kernels share one non-trivial covariance (a KLT pays for its map), a
    white linear weight (no map pays) and a bias (stored)."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(9, 9, generator=generator, dtype=torch.float64))[0].float()
    energy = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.12, 0.06, 0.03, 0.015]).sqrt()
    kernels = (torch.randn(48 * 32, 9, generator=generator) * energy) @ basis.T
    return {"conv.weight": 0.05 * kernels.reshape(48, 32, 3, 3),
            "fc.weight": 0.02 * torch.randn(16, 288, generator=generator),
            "fc.bias": 0.01 * torch.randn(16, generator=generator)}


def _compress(kind: str, directory: Path) -> Path:
    config = VAECompressionConfig(target_bits_per_weight=3.0, transform=kind, rounding="nearest", fit=FIT)
    return compress(correlated_state(), config, progress=False).save(directory)


@pytest.fixture(scope="module")
def containers(tmp_path_factory) -> dict[str, Path]:
    return {kind: _compress(kind, tmp_path_factory.mktemp(kind)) for kind in (KIND, "vae")}


def _digest(decoded: dict[str, torch.Tensor]) -> str:
    digest = ModelHash()
    for name, tensor in decoded.items():
        digest.update(name, tensor)
    return digest.digest().hex()


def _probe(paths: list[Path], env: dict[str, str]) -> dict:
    """Decode in a fresh process under this machine's kernels updated by ``env``."""
    ignored = {ALLOW_UNVERIFIED_ENV, *OTHER_MACHINE}
    done = subprocess.run([sys.executable, "-m", "tests.test_portable_vae", *map(str, paths)], cwd=ROOT, check=True,
                          capture_output=True, text=True, timeout=600,
                          env={**{k: v for k, v in os.environ.items() if k not in ignored}, **env})
    return json.loads(done.stdout)


def reference_decode(symbols: np.ndarray, matrix: np.ndarray, exponent: int, step: float, layout: ChunkLayout,
                     scales: np.ndarray) -> np.ndarray:
    """The decode written out independently: exact integer products summed in Python integers, the
    exact value ``acc * 2**e`` rounded once to float32, times the row's float32 factor."""
    acc = np.zeros(symbols.shape, dtype=object)
    for k in range(symbols.shape[1]):  # Python integers: no overflow, no float anywhere
        acc += symbols[:, k: k + 1].astype(object) * matrix[:, k].astype(object)[None, :]
    values = np.array([[math.ldexp(int(a), exponent) for a in row] for row in acc], dtype=np.float64)
    rows = values.astype(np.float32).reshape(layout.rows, layout.padded_len)[:, : layout.row_len]
    factors = np.array([np.float32(float(s) * step) for s in scales], dtype=np.float32)
    return (rows * factors[:, None]).reshape(layout.shape)


def test_the_decode_is_the_integer_arithmetic(containers):
    compressed = CompressedModel.load(containers[KIND])
    assert compressed.portable
    decoded = compressed.decode(allow_unverified=False)
    latents = compressed.unpack()
    transform = latents.transform
    assert isinstance(transform, PortableVAE)
    names = [c.name for c in latents.coded]
    assert [names[t] for t in transform.active_maps] == ["conv.weight"], "the correlated kernels keep a map"
    original = correlated_state()
    for i, c in enumerate(latents.coded):
        scales = c.scales.numpy()
        if i in transform.maps:
            matrix, exponent = transform.maps[i]
            assert matrix.dtype == np.int16 and np.abs(matrix).max() >= 1 << 14  # 15 significant bits used
            expected = reference_decode(latents.symbols[i].numpy(), matrix, exponent, latents.steps[i], c.layout, scales)
        else:  # no map: the identity's decode
            expected = identity.decode_weights(latents.symbols[i], latents.steps[i], c.layout, c.scales).numpy()
        assert np.array_equal(decoded[c.name].numpy().view(np.int32), expected.view(np.int32)), c.name
        error = float((decoded[c.name] - original[c.name]).pow(2).mean() / original[c.name].pow(2).mean())
        assert error < 0.05, (c.name, error)  # 3 bits/weight: close to the weights, not merely exact


def test_the_same_bits_on_another_machine(containers):
    path = containers[KIND]
    here, there = _probe([path], {}), _probe([path], OTHER_MACHINE)
    if here["capability"] == there["capability"] == "DEFAULT":
        pytest.skip("this CPU already runs the generic kernels: there is no other machine to simulate")
    assert here["float_probe"] != there["float_probe"], "the settings did not change float results: test proves nothing"
    ours, theirs = here["containers"][str(path)], there["containers"][str(path)]
    assert ours["status"] == theirs["status"] == "ok", (ours, theirs)
    assert ours["digest"] == theirs["digest"] == _digest(CompressedModel.load(path).decode(allow_unverified=False))


@pytest.mark.parametrize("part", ["streams", "decoder.linear", "decoder.exponents"])
def test_a_damaged_stored_byte_is_refused_as_corrupt(containers, part, tmp_path):
    path = containers[KIND]
    assert_damage_is_corrupt(path, part, tmp_path, 0x01)


def test_another_decoded_bit_is_a_bug_never_machine_dependent(containers, tmp_path, monkeypatch):
    """Intact stored bytes whose decode misses its CRC: an exact decoder cannot differ by machine."""
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "1")
    compressed = CompressedModel.load(containers[KIND])
    names = [e["name"] for e in compressed.header["tensors"]]
    checks = compressed.tensors["checks"].clone()
    checks[32 + 4 * names.index("conv.weight")] ^= 0xFF  # its CRC, re-sealed
    resealed = CompressedModel(compressed.header, {**compressed.tensors, "checks": checks})
    with pytest.raises(IntegrityError, match="decoder differs") as caught:
        CompressedModel.load(resealed.save(tmp_path)).decode()
    assert not isinstance(caught.value, MachineDependentError)


def test_a_reader_without_the_kind_refuses_it_clearly(containers, monkeypatch):
    """What a reader that predates ``vae-int`` does: its config refuses the kind, nothing is decoded."""
    monkeypatch.setattr(codec_config, "TRANSFORMS", ("vae", "identity"))
    with pytest.raises(ContainerError, match="transform must be one of .*'vae-int'"):
        CompressedModel.load(containers[KIND]).decode()


def test_the_float_vae_still_loads_as_before(containers):
    compressed = CompressedModel.load(containers["vae"])
    assert not compressed.portable and isinstance(compressed.unpack().transform, WeightVAE)
    assert compressed.tensors["decoder.linear"].dtype == torch.float16
    decoded = compressed.decode(allow_unverified=False)  # the writer's machine verifies its own float decode
    assert set(decoded) == set(correlated_state())


def test_finetuning_trains_the_latents_through_the_stored_maps(tmp_path):
    """Fine-tuning moves the latents and leaves the integer maps as stored: still portable, verified."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(32, 48, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(48, 10)).eval()
    with torch.no_grad():
        model[2].weight.copy_(correlated_state()["conv.weight"])
    x = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(-1)
    config = VAECompressionConfig(target_bits_per_weight=1.0, transform=KIND, rounding="nearest", fit=FIT)
    compressed = compress(model, config, progress=False)
    assert compressed.header["transform"]["linear_maps"] == [0]
    settings = FinetuneConfig(steps=20, batch_size=64, latent_learning_rate=0.2, rate_weight=0.01)
    tuned = finetune(compressed, model, (x, y), settings, progress=False)
    assert tuned.portable and tuned.header["transform"] == compressed.header["transform"]
    for part in ("decoder.linear", "decoder.exponents"):
        assert torch.equal(tuned.tensors[part], compressed.tensors[part]), part
    assert not torch.equal(tuned.unpack().symbols[0], compressed.unpack().symbols[0]), "no latent moved"
    CompressedModel.load(tuned.save(tmp_path)).decode(allow_unverified=False)


def test_map_exponent_rule():
    generator = np.random.default_rng(0)
    for magnitude in (1e-3, 0.7, 1.0, 3.0, 1e3):
        matrix = generator.standard_normal((9, 9)) * magnitude
        stored, exponent = linear.quantize_matrix(matrix)
        assert stored.dtype == np.int16 and (1 << 14) <= np.abs(stored).max() <= linear.MATRIX_MAX
        assert np.abs(linear.dequantize_matrix(stored, exponent) - matrix).max() <= math.ldexp(0.5, exponent)
    stored, exponent = linear.quantize_matrix(np.full((2, 2), 1.0 - 2.0 ** -17))  # rounds up to 2**15: one more
    assert stored.max() == 1 << 14 and exponent == -14


def test_the_unit_map_decodes_as_the_identity():
    layout = ChunkLayout.of((6, 4, 3, 3), 9)
    symbols = torch.randint(-1000, 1000, (layout.num_chunks, 9), dtype=torch.int32)
    scales = torch.full((6,), 0.37)
    unit = (np.eye(9) * (1 << 14)).astype(np.int16)
    ours = linear.decode_weights(symbols, unit, -14, 0.013, layout, scales)
    assert torch.equal(ours.view(torch.int32), identity.decode_weights(symbols, 0.013, layout, scales).view(torch.int32))


def test_symbols_beyond_the_exact_range_are_refused():
    matrix = np.full((4096, 4096), linear.MATRIX_MAX, dtype=np.int16)
    limit = linear.symbol_limit(matrix)
    assert limit < (1 << 31) - 1
    linear.check_bound(np.array([[limit]]), matrix)
    with pytest.raises(ValueError, match="2\\*\\*53"):
        linear.check_bound(np.array([[limit + 1]]), matrix)


if __name__ == "__main__":
    from tests.decode_probe import main

    main(sys.argv[1:])
