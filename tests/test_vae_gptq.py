"""The portable VAE inside GPTQ's column loop (issue 24, item 2) and ``transform="auto"`` (item 5).

A linear chunk decoder's latents are chosen chunk by chunk against the layer's output error, with
each chunk's error pushed onto the later columns as GPTQ pushes a column's
(:func:`~hf_vae_compress.codec.output_aware.linear_latent_symbols`). With the identity decoder
this must be GPTQ itself; with a learned map it must beat the map's nearest latents; ``auto`` must
record which tensors kept their map, and decode exactly as ``vae-int`` does.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_vae_compress import CompressedModel, ContainerError, VAECompressionConfig, compress
from hf_vae_compress.codec import FitConfig
from hf_vae_compress.codec.calibration import LayerInputs, calibrate
from hf_vae_compress.codec.format.fields import codec_fields
from hf_vae_compress.codec.output_aware import inverse_cholesky, linear_latent_symbols, output_aware_symbols
from hf_vae_compress.tasks import Classification
from tests.test_portable_vae import correlated_state

FIT = FitConfig(train_steps=60, train_batch_chunks=1024)


def _inputs(d: int, seed: int = 0) -> tuple[torch.Tensor, LayerInputs]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * d, d, generator=g) @ (torch.randn(d, d, generator=g) + 2 * torch.eye(d))
    return x, LayerInputs((x.T @ x / len(x))[None], x.mean(0)[None])


@pytest.mark.parametrize("d", [72, 100, 300])  # whole chunks; a short last chunk; several blocks
def test_the_identity_decoder_gives_gptqs_symbols(d):
    _, inputs = _inputs(d)
    w = torch.randn(16, d, generator=torch.Generator().manual_seed(1))
    factors = 0.4 * torch.linspace(0.5, 1.5, 16)
    factor = inverse_cholesky(inputs, chunk=9)
    latents = linear_latent_symbols(w, factors, factor, torch.eye(9, dtype=torch.float64))
    assert latents.shape == (16, -(-d // 9) * 9)
    assert torch.equal(latents[:, :d], output_aware_symbols(w, factors, factor))
    assert not latents[:, d:].any()  # padding latents: zero, as the encoder codes padding


def test_chunk_order_keeps_chunks_whole_and_the_short_one_last():
    inputs = LayerInputs(torch.diag(torch.arange(1.0, 23.0))[None], torch.zeros(1, 22))
    order = inverse_cholesky(inputs, chunk=9)[0][0].tolist()
    assert order == [*range(9, 18), *range(0, 9), 18, 19, 20, 21]  # more energy first, in natural order inside


def _decoded(latents: torch.Tensor, decoder: torch.Tensor, factors: torch.Tensor, d: int) -> torch.Tensor:
    rows = latents.double().reshape(len(factors), -1, decoder.shape[0]) @ decoder.T
    return rows.reshape(len(factors), -1)[:, :d].float() * factors[:, None]


def test_a_learned_map_in_the_loop_beats_its_nearest_latents():
    d = 108
    x, inputs = _inputs(d)
    w = torch.randn(16, d, generator=torch.Generator().manual_seed(2))
    factors = torch.full((16,), 0.3)
    g = torch.Generator().manual_seed(3)
    decoder = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64)).Q * 1.1
    latents = linear_latent_symbols(w, factors, inverse_cholesky(inputs, chunk=9), decoder)
    nearest = torch.round((w / factors[:, None]).double().reshape(16, -1, 9) @ torch.linalg.inv(decoder).T)

    def output_error(q: torch.Tensor) -> float:
        return float(((x @ (w - q).T) ** 2).mean())

    looped, plain = output_error(_decoded(latents, decoder, factors, d)), output_error(_decoded(nearest, decoder, factors, d))
    assert looped < 0.7 * plain, (looped, plain)


def _model() -> nn.Module:
    state = correlated_state()
    model = nn.Sequential(nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(48, 10))
    with torch.no_grad():
        model[0].weight.copy_(state["conv.weight"])
    return model.eval()


@pytest.fixture(scope="module")
def calibrated():
    model = _model()
    g = torch.Generator().manual_seed(4)
    mix = torch.randn(32, 32, generator=g) + 2 * torch.eye(32)  # correlated channels: GPTQ has error to push
    batches = [torch.einsum("oc,nchw->nohw", mix, torch.randn(16, 32, 8, 8, generator=g)) for _ in range(2)]
    return model, calibrate(model, batches, 2, Classification.fisher_loss(), progress=False)


def _conv_output_error(model: nn.Module, compressed: CompressedModel, calibration) -> float:
    dw = (compressed.decode()["0.weight"] - model[0].weight.detach()).reshape(48, -1).double()
    return float(((dw @ calibration.layers["0.weight"].second[0].double()) * dw).sum())


def test_vae_int_is_rounded_in_the_loop_and_lowers_the_output_error(calibrated):
    model, calibration = calibrated
    rows = {}
    for rounding in ("nearest", "output_aware"):
        config = VAECompressionConfig(target_bits_per_weight=2.0, transform="vae-int", rounding=rounding, fit=FIT)
        compressed = compress(model, config, calibration=calibration, progress=False)
        assert compressed.config.rounding == rounding and compressed.header["transform"]["linear_maps"] == [0]
        choices = [layer["transform"] for layer in compressed.report()["layers"]]  # what inspect shows
        assert choices[0] == "map" and set(choices[1:]) <= {"identity"}, choices
        rows[rounding] = (len(compressed.to_bytes()), _conv_output_error(model, compressed, calibration))
    (nearest_bytes, nearest_error), (loop_bytes, loop_error) = rows["nearest"], rows["output_aware"]
    assert loop_bytes <= 1.03 * nearest_bytes and loop_error < 0.8 * nearest_error, rows


def test_auto_records_its_choice_and_decodes_as_vae_int(calibrated, tmp_path):
    model, calibration = calibrated
    config = VAECompressionConfig(target_bits_per_weight=2.0, transform="auto", fit=FIT)
    compressed = compress(model, config, calibration=calibration, progress=False)
    assert compressed.header["transform"]["kind"] == "vae-int" and compressed.config.transform == "auto"
    assert compressed.header["transform"]["linear_maps"] in ([], [0])  # the conv kept its map, or took identity
    loaded = CompressedModel.load(compressed.save(tmp_path))
    for name, tensor in compressed.decode().items():
        assert torch.equal(loaded.decode()[name], tensor)


def test_a_container_never_names_auto_as_its_kind():
    header = {"config": VAECompressionConfig(transform="auto").to_dict(),
              "transform": {"kind": "auto", "chunk_size": 9, "hidden_size": 32}}
    with pytest.raises(ContainerError, match="transform.kind"):
        codec_fields(header)


def _fit_inputs(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    rows, d = 12, 40  # a short last chunk (40 = 4 * 9 + 4)
    x = torch.randn(rows, d, generator=g, dtype=torch.float64)
    chunks = torch.nn.functional.pad(x, (0, 5)).reshape(-1, 9)
    symbols = torch.round(chunks * 1.5 + 0.3 * torch.randn(chunks.shape, generator=g, dtype=torch.float64))
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    return x, chunks, symbols, mix @ mix.T + d * torch.eye(d, dtype=torch.float64)


def _map_output_error(decoder, chunks, symbols, h, d) -> float:
    err = (chunks - (symbols / 1.5) @ decoder.T).reshape(12, -1)[:, :d]
    return float(((err @ h) * err).sum())


def test_the_output_weighted_map_is_least_squares_under_a_white_layer_and_lowers_the_output_error():
    from hf_vae_compress.codec.fit import _output_weighted_map
    x, chunks, symbols, h = _fit_inputs()
    y, ones, start = symbols / 1.5, torch.ones(12), torch.eye(9, dtype=torch.float64)
    white = torch.eye(45, dtype=torch.float64)[None]  # the padded columns weigh as much as the others
    plain = torch.linalg.lstsq(y, chunks).solution.T
    assert torch.allclose(_output_weighted_map(chunks, y, ones, white, start), plain, atol=1e-6)
    weighted = _output_weighted_map(chunks, y, ones, h[None], start)
    diagonal_blocks = torch.block_diag(*[h[i: i + 9, i: i + 9] for i in range(0, 40, 9)])  # what the fit sees
    assert _map_output_error(weighted, chunks, symbols, diagonal_blocks, 40) < _map_output_error(
        plain, chunks, symbols, diagonal_blocks, 40)
