"""Structured latents: the portable VAE's latents quantized on a lattice (D4, E8) instead of Z^n.

Scalar rounding of a transform's latents leaves the space-filling loss of the cube (up to 0.254
bit per dimension at high rate); a lattice whose Voronoi cell is rounder loses less: D4 gains
0.37 dB (0.061 bit per dimension at high rate), E8 0.65 dB (0.108 bit), and lattice transform
coding (Lei, Hassani and Saeedi Bidokhti, ICLR 2025) approaches the vector-quantization limit this way.

With a linear decoder the lattice needs no change to the container: a lattice point ``p = B k``
(``B`` the generator basis, columns the basis vectors, ``k`` integer) decodes through the map
``D`` as ``D p = (D B) k``, so the latents ``k`` are the scalar latents of the map ``D B``. The
container stores ``D B`` and ``k`` as it stores any map and its latents, and decodes them with
the same integer arithmetic (:mod:`.format.linear`). Only the encoder changes: it picks the lattice
point (:func:`coordinates`, Conway and Sloane's fast closest-point decoders, "Fast quantizing and
decoding algorithms for lattice quantizers and codes", IEEE Trans. IT 1982), and GPTQ's loop
searches the point's lattice neighbours in the layer's output-error metric (:func:`moves`).

A chunk of ``c`` latents is quantized block by block: as many ``n``-dimensional lattice blocks as
fit (a 9-latent 3x3 chunk: two D4 blocks or one E8 block), the rest (the latents the KLT orders
last, of least energy) rounded as scalars. Every basis is scaled to unit volume per point, so a
step means the same density of points as scalar rounding's and the rate allocation's steps keep
their meaning.

The entropy coder is the container's own: order-0, per latent dimension at best (the ``dims``
stream layout). It codes ``k`` coordinate by coordinate, not the lattice point jointly, and at
high rate that costs ``log2(prod_i |d_i| * det B)`` bits per block (``d_i`` the dual basis, the
rows of ``B^-1``) over the point's own entropy: at least 1 bit per D4 block and 4 bits per E8 block,
more than either lattice's gain. The bases below reach those minima (their dual bases are shortest
vectors); whether the low-rate regime the codec runs in behaves better is what
``benchmarks/vae_gptq.py`` measures.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch

LATENT_QUANTIZERS = ("scalar", "d4", "e8")


def _closest_dn(x: torch.Tensor) -> torch.Tensor:
    """The closest point of ``D_n`` (integer vectors with an even sum) to each row of ``x`` (last
    dimension ``n``): round every coordinate; if the sum is odd, round the coordinate furthest from
    its integer the other way (Conway and Sloane's decoder for D_n)."""
    rounded = torch.round(x)
    error = x - rounded
    worst = error.abs().argmax(-1, keepdim=True)
    away = torch.where(error.gather(-1, worst) >= 0, 1.0, -1.0).to(x.dtype)
    other = rounded.scatter_add(-1, worst, away)
    odd = (rounded.sum(-1, keepdim=True) % 2) != 0
    return torch.where(odd, other, rounded)


def _closest_e8(x: torch.Tensor) -> torch.Tensor:
    """The closest point of ``E8 = D8 ∪ (D8 + 1/2)`` to each row of ``x``: the nearer of the two
    cosets' closest points."""
    even = _closest_dn(x)
    odd = _closest_dn(x - 0.5) + 0.5
    nearer = ((x - even) ** 2).sum(-1, keepdim=True) <= ((x - odd) ** 2).sum(-1, keepdim=True)
    return torch.where(nearer, even, odd)


# Generator bases (columns), unscaled, with duals of shortest vectors. D4: the dual rows are e1, e2,
# e3 and (1/2,1/2,1/2,1/2) (so k = p1, p2, p3 and half the even sum); E8: the dual rows are E8's simple
# roots (Bourbaki), the basis its fundamental weights.
_D4_DUAL = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]]
_E8_DUAL = [[0.5, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5, 0.5], [1, 1, 0, 0, 0, 0, 0, 0], [-1, 1, 0, 0, 0, 0, 0, 0],
            [0, -1, 1, 0, 0, 0, 0, 0], [0, 0, -1, 1, 0, 0, 0, 0], [0, 0, 0, -1, 1, 0, 0, 0],
            [0, 0, 0, 0, -1, 1, 0, 0], [0, 0, 0, 0, 0, -1, 1, 0]]
_LATTICES = {"d4": (4, _closest_dn, _D4_DUAL), "e8": (8, _closest_e8, _E8_DUAL)}


def block_size(name: str) -> int:
    """The dimension of lattice ``name``'s blocks (1: scalar rounding)."""
    _check(name)
    return 1 if name == "scalar" else _LATTICES[name][0]


def _check(name: str) -> None:
    if name not in LATENT_QUANTIZERS:
        raise ValueError(f"latent_quantizer must be one of {LATENT_QUANTIZERS}, got {name!r}")


@lru_cache(maxsize=None)
def _block(name: str) -> tuple[torch.Tensor, float]:
    """Lattice ``name``'s generator basis (n x n float64, columns) at unit volume, and the scale
    it was divided by (the closest-point decoders work on the unscaled lattice)."""
    n, _, dual = _LATTICES[name]
    basis = torch.linalg.inv(torch.tensor(dual, dtype=torch.float64))
    scale = float(torch.linalg.det(basis).abs()) ** (1 / n)
    return basis / scale, scale


def chunk_basis(name: str, chunk_size: int) -> torch.Tensor:
    """The (chunk_size x chunk_size) float64 basis of a chunk's latents: lattice blocks along the
    diagonal, as many as fit, then ones (scalar rounding) for the remaining latents."""
    n = block_size(name)
    if n == 1:
        return torch.eye(chunk_size, dtype=torch.float64)
    count = chunk_size // n
    return torch.block_diag(*[_block(name)[0]] * count, torch.eye(chunk_size - count * n, dtype=torch.float64))


def coordinates(name: str, latents: torch.Tensor) -> torch.Tensor:
    """Integer coordinates ``k`` (in :func:`chunk_basis`) of the lattice point closest to each row
    of ``latents`` (chunks x chunk_size, in steps); scalar rounding for ``"scalar"`` and the
    latents left over after the blocks."""
    n = block_size(name)
    out = torch.round(latents.double())
    if n == 1:
        return out
    count = latents.shape[-1] // n
    basis, scale = _block(name)
    blocks = latents[..., : count * n].double().unflatten(-1, (count, n))
    points = _LATTICES[name][1](blocks * scale) / scale  # closest point of the unit-volume lattice
    k = torch.round(points @ torch.linalg.inv(basis).T)  # exact up to float error: round it away
    out[..., : count * n] = k.flatten(-2)
    return out


@lru_cache(maxsize=None)
def _shortest(name: str) -> torch.Tensor:
    """Lattice ``name``'s shortest nonzero vectors in basis coordinates (integer, float64): D4's
    24 and E8's 240, found among the small combinations of the basis."""
    basis, _ = _block(name)
    n = basis.shape[0]
    grid = torch.tensor(list(itertools.product(range(-2, 3), repeat=n)), dtype=torch.float64)
    norms = ((grid @ basis.T) ** 2).sum(-1)
    nonzero = norms > 1e-9
    shortest = norms[nonzero].min()
    return grid[nonzero & (norms < shortest * (1 + 1e-6))]


def moves(name: str, chunk_size: int) -> torch.Tensor | None:
    """The candidate moves (moves x chunk_size, integer float64, in basis coordinates) of GPTQ's
    neighbour search around a chunk's lattice point: each block moved alone by one of its
    lattice's shortest vectors. None for scalar latents (no search: the encoder's rounding is kept)."""
    n = block_size(name)
    if n == 1:
        return None
    shortest = _shortest(name)
    out = []
    for b in range(chunk_size // n):
        block = torch.zeros(len(shortest), chunk_size, dtype=torch.float64)
        block[:, b * n: (b + 1) * n] = shortest
        out.append(block)
    return torch.cat(out)
