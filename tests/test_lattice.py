"""Structured latents (issue 24, item 4): the portable VAE's latents on a D4 or E8 lattice.

The closest-point decoders must find the closest point; the bases must be bases of the lattices at
unit volume; GPTQ's neighbour search must end where no lattice neighbour is better in the chunk's
output-error metric; and a lattice container must be an ordinary ``vae-int`` container: the same
integer decode, bit for bit, here and on a simulated other machine. The config field must refuse
what it cannot do and leave every container written without it byte for byte as before.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from hf_vae_compress import CompressedModel, VAECompressionConfig, compress
from hf_vae_compress.codec import lattice
from hf_vae_compress.codec.output_aware import (_neighbour_search, chunk_output_error, inverse_cholesky,
                                                linear_latent_symbols)
from hf_vae_compress.codec.transform import PortableVAE
from tests.test_portable_vae import OTHER_MACHINE, _digest, _probe, reference_decode
from tests.test_vae_gptq import FIT, _conv_output_error, _inputs, calibrated  # noqa: F401 (a fixture)

LATTICES = ["d4", "e8"]


def _brute_closest(name: str, x: torch.Tensor) -> torch.Tensor:
    """The closest point by enumeration: every basis combination within 2 of the decoder's answer's."""
    basis, _ = lattice._block(name)
    start = lattice.coordinates(name, x)
    n = basis.shape[0]
    span = range(-1, 2) if n == 8 else range(-2, 3)
    offsets = torch.tensor(list(itertools.product(span, repeat=n)), dtype=torch.float64)
    points = (start[:, None, :] + offsets[None]) @ basis.T
    return points[torch.arange(len(x)), ((x[:, None] - points) ** 2).sum(-1).argmin(1)]


@pytest.mark.parametrize("name", LATTICES)
def test_the_decoder_finds_the_closest_point(name):
    n = lattice.block_size(name)
    x = 1.7 * torch.randn(300 if n == 8 else 2000, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    k = lattice.coordinates(name, x)
    assert torch.equal(k, torch.round(k))
    basis, _ = lattice._block(name)
    ours = k @ basis.T
    assert torch.allclose(((x - ours) ** 2).sum(-1), ((x - _brute_closest(name, x)) ** 2).sum(-1), atol=1e-9)


@pytest.mark.parametrize("name, shortest, norm", [("d4", 24, 2 ** 0.5 / 2 ** 0.25), ("e8", 240, 2 ** 0.5)])
def test_the_bases_span_the_lattices_at_unit_volume(name, shortest, norm):
    basis, scale = lattice._block(name)
    assert abs(abs(float(torch.linalg.det(basis))) - 1) < 1e-12  # as dense as Z^n: a step means the same
    unscaled = basis * scale
    closest = {"d4": lattice._closest_dn, "e8": lattice._closest_e8}[name]
    assert torch.allclose(closest(unscaled.T), unscaled.T)  # every basis vector is a lattice point
    vectors = lattice._shortest(name) @ basis.T
    assert len(vectors) == shortest and torch.allclose(vectors.norm(dim=1), torch.full((shortest,), norm,
                                                                                      dtype=torch.float64))


def test_a_chunk_is_lattice_blocks_then_scalars():
    basis = lattice.chunk_basis("d4", 9)
    block, _ = lattice._block("d4")
    assert torch.equal(basis, torch.block_diag(block, block, torch.ones(1, 1, dtype=torch.float64)))
    assert torch.equal(lattice.chunk_basis("scalar", 9), torch.eye(9, dtype=torch.float64))
    x = torch.randn(50, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    k = lattice.coordinates("e8", x)
    assert torch.equal(k[:, 8], torch.round(x[:, 8]))  # the ninth latent: rounded
    assert lattice.moves("scalar", 9) is None
    assert lattice.moves("d4", 9).shape == (48, 9) and lattice.moves("e8", 9).shape == (240, 9)
    assert not lattice.moves("d4", 9)[:, 8].any()


def test_the_neighbour_search_ends_where_no_neighbour_is_better():
    d, rows, c = 36, 24, 9
    _, inputs = _inputs(d, seed=3)
    order, u = inverse_cholesky(inputs, chunk=c)
    u = u.double()[:, :c, :c]
    g = torch.Generator().manual_seed(4)
    decoder = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64)).Q @ lattice.chunk_basis("e8", c)
    w = torch.randn(1, c, rows, generator=g, dtype=torch.float64)
    grid = torch.full((1, c, rows), 0.3, dtype=torch.float64)
    start = torch.round(torch.linalg.solve(decoder, w[0] / 0.3))[None]
    moves = lattice.moves("e8", c)
    found = _neighbour_search(w, grid, u, decoder, start, moves).double()
    before, after = chunk_output_error(w, grid, u, decoder, start), chunk_output_error(w, grid, u, decoder, found)
    assert (after <= before + 1e-12).all() and (after < before - 1e-9).any(), (before, after)
    for move in moves:  # a local optimum: no single move lowers any row's error
        neighbour = chunk_output_error(w, grid, u, decoder, found + move[None, :, None])
        assert (neighbour >= after - 1e-9).all()


def test_the_chunk_error_is_what_gptqs_pushes_sum_to():
    d, c = 27, 9
    _, inputs = _inputs(d, seed=5)
    factor = inverse_cholesky(inputs, chunk=c)
    w = torch.randn(8, d, generator=torch.Generator().manual_seed(6))
    decoder = torch.eye(c, dtype=torch.float64)
    factors = torch.full((8,), 0.25)
    z = linear_latent_symbols(w, factors, factor, decoder)
    order, u = factor
    first = order[0, :c]  # the first chunk in the loop's order: no feedback reaches it
    chunk = w[:, first].T[None].double()
    grid = torch.full_like(chunk, 0.25)
    errors = chunk - 0.25 * z[:, first].T[None].double()
    pushed = torch.zeros(8, dtype=torch.float64)
    uu = u[0, :c, :c].double()
    for j in range(c):  # GPTQ's own updates, column by column
        e = errors[0, j] / uu[j, j]
        pushed += e ** 2
        errors[0, j:] -= uu[j, j:, None] * e[None]
    assert torch.allclose(chunk_output_error(chunk, grid, u[:, :c, :c], decoder, z[:, first].T[None].double())[0],
                          pushed)


def test_the_config_refuses_what_it_cannot_do_and_round_trips():
    with pytest.raises(ValueError, match="latent_quantizer must be one of"):
        VAECompressionConfig(transform="vae-int", latent_quantizer="a2")
    with pytest.raises(ValueError, match="needs transform in"):
        VAECompressionConfig(transform="identity", latent_quantizer="e8")
    config = VAECompressionConfig(transform="auto", latent_quantizer="d4")
    assert VAECompressionConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["latent_quantizer"] == "d4"
    default = VAECompressionConfig(transform="vae-int")
    assert "latent_quantizer" not in default.to_dict()  # containers without it keep their bytes
    assert VAECompressionConfig.from_json(default.to_json()) == default


@pytest.fixture(scope="module")
def lattice_containers(calibrated, tmp_path_factory):
    model, calibration = calibrated
    out = {}
    for name in ("scalar", *LATTICES):
        config = VAECompressionConfig(target_bits_per_weight=2.0, transform="vae-int", latent_quantizer=name, fit=FIT)
        compressed = compress(model, config, calibration=calibration, progress=False)
        out[name] = (compressed, compressed.save(tmp_path_factory.mktemp(name)))
    return out


@pytest.mark.parametrize("name", LATTICES)
def test_a_lattice_container_is_a_vae_int_container_decoded_exactly(lattice_containers, calibrated, name):
    model, calibration = calibrated
    compressed, path = lattice_containers[name]
    loaded = CompressedModel.load(path)
    assert loaded.header["transform"]["kind"] == "vae-int" and loaded.config.latent_quantizer == name
    assert set(loaded.tensors) == set(lattice_containers["scalar"][0].tensors)  # the same parts as scalar latents
    latents = loaded.unpack()
    transform = latents.transform
    assert isinstance(transform, PortableVAE) and transform.active_maps == [0]
    decoded = loaded.decode(allow_unverified=False)
    c = latents.coded[0]
    matrix, exponent = transform.maps[0]
    expected = reference_decode(latents.symbols[0].numpy(), matrix, exponent, latents.steps[0], c.layout,
                                c.scales.numpy())
    assert np.array_equal(decoded[c.name].numpy().view(np.int32), expected.view(np.int32))
    error = _conv_output_error(model, compressed, calibration)
    scalar_error = _conv_output_error(model, lattice_containers["scalar"][0], calibration)
    assert error < 3 * scalar_error, (error, scalar_error)  # coded close to the weights, not merely exactly


def test_a_lattice_container_decodes_to_the_same_bits_on_another_machine(lattice_containers):
    path = lattice_containers["e8"][1]
    here, there = _probe([path], {}), _probe([path], OTHER_MACHINE)
    if here["capability"] == there["capability"] == "DEFAULT":
        pytest.skip("this CPU already runs the generic kernels: there is no other machine to simulate")
    ours, theirs = here["containers"][str(path)], there["containers"][str(path)]
    assert ours["status"] == theirs["status"] == "ok", (ours, theirs)
    assert ours["digest"] == theirs["digest"] == _digest(CompressedModel.load(path).decode(allow_unverified=False))
