"""Stage 4, output-aware: round a layer's weights so that its *output* error is small, not each
weight's error (GPTQ, Frantar et al. 2022, on the codec's entropy-coded grid).

Rounding each weight to its nearest level minimises ``|ΔW|²``. The layer's output error is
``tr(ΔW H ΔWᵀ)`` with ``H = E[x xᵀ]`` over its inputs, and ``H`` couples a row's input dimensions:
the error one rounding leaves can be cancelled by moving the weights not yet rounded. GPTQ does
this column by column with the Cholesky factor of ``H⁻¹``, in blocks so that most of the work is
one matrix product per block.

A grouped convolution is one such problem per group: its output rows see only their group's
input channels, so each group rounds against its own ``H`` (a depthwise one: one row per 3x3
problem). The groups go through the same column loop together, as one batch. A transposed
convolution is the direct convolution it equals (:func:`~.calibration.as_rows`): its rows are that
convolution's output channels, and its grid, one step per stored row (an input channel), steps
across their columns.

The grid is the codec's own: row ``r`` has levels ``k * step * scale[r]`` (the factor the
decoder multiplies by), so the symbols are what nearest rounding would write, only chosen better,
and are entropy-coded the same way.

**Rate-aware rounding** (CERWU, Conzelmann and Bamler 2025, on this grid): GPTQ rounds each
weight to its nearest level, whatever the symbol costs. Choosing instead, among the nearest
level, the other neighbour and zero, the one that minimises the OBS output error plus a price on
its code length, ``(w - q*s)**2 / u_jj**2 + lam_j * bits(q)``, trades output error for rate
where it is cheap. The error of the choice is pushed onto the later columns as GPTQ does, so a
weight moved to zero is compensated by its neighbours instead of shrinking the layer's output
(what sank rate-distortion rounding without feedback). ``bits`` is the order-0 code length of
the tensor's own symbols (:class:`RateAwareLevels`, what the coder codes), counted first on nearest
rounding and refitted as each column is rounded. The price is the slope of the tensor's
distortion-rate curve at its step, so the rate search still sets the rate: see
:func:`rate_penalties`. As in CERWU, the code length's quadratic part (a Gaussian's, at the
weights' spread in steps) is moved into ``H`` as a ridge (:func:`ridge_target`): GPTQ then rounds
toward the shrunk weights that trade output error for that part of the rate at the right slope,
and the per-weight choice prices only what is left of the code length.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import math

import torch

from .calibration import Calibration, LayerInputs, as_rows, from_rows, grouped_matmul

BLOCK = 128
DAMPING = 0.01  # times the mean diagonal of H: keeps the inverse stable (GPTQ's default)
# The rate term's weight relative to high-rate ECSQ theory's slope (1: the slope at this step).
RATE_SCALE = 1.0
RATE_PRIOR = 0.5  # counts added to every symbol of the rate model (Krichevsky-Trofimov): none is free
MAX_RATE_TABLE = 1 << 20  # symbol ranges wider than this (a tiny step) are rounded without a rate term
PAD_WEIGHT = 1e4  # a short chunk's padding latents: their factor, times the chunk's largest (output error ~1e-8)


def inverse_cholesky(inputs: LayerInputs, damping: float = DAMPING, chunk: int = 1,
                     dtype: torch.dtype = torch.float64, ridge: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of output rows, the column order (groups x d) and the upper Cholesky factor of
    ``(H + damping * mean(diag H) * I)⁻¹`` (groups x d x d, in that order; computed in float64 and
    returned in ``dtype``: :func:`layer_factor` keeps float32). A ``ridge`` (per group) is added to
    the damped diagonal (:func:`ridge_target`); the columns keep the order without it.

    Columns go in order of decreasing input energy (GPTQ's "act order"): the weights that matter
    most are rounded first, while there are many columns left to absorb their error. In a dev
    run at the same target it cut the ViT reference's validation drop from 0.92 to 0.32 pt.
    An input dimension the calibration data never excited (zero diagonal) gets a unit diagonal:
    its weights are rounded to nearest and nothing is pushed onto them. A grouped convolution's
    groups are independent problems (a depthwise one's: one per channel, d = the kernel's size),
    factored in one batched call.

    With ``chunk > 1`` the columns are ordered chunk by chunk (:func:`_column_order`), for a
    decoder that maps each chunk of ``chunk`` consecutive columns as one (:func:`linear_latent_symbols`).
    """
    h = inputs.second.to(torch.float64, copy=True)
    diagonal = torch.diagonal(h, dim1=-2, dim2=-1)
    diagonal[diagonal <= 0] = 1.0
    diagonal.add_(damping * diagonal.mean(-1, keepdim=True))
    order = _column_order(diagonal, chunk)
    if ridge is not None:
        diagonal.add_(ridge.double()[:, None])
    del diagonal  # a view of the unordered h: it would keep it alive
    # The upper Cholesky factor U of h⁻¹ (h⁻¹ = Uᵀ U) from one Cholesky factorisation and one
    # triangular solve: with J the reversal, J h J = L Lᵀ gives U = J L⁻¹ J (upper, positive
    # diagonal, and Uᵀ U = J L⁻ᵀ L⁻¹ J = h⁻¹). Inverting h and factoring the inverse costs about four
    # times as long for the same factor. Memory: each groups x d x d float64 matrix is 170 MB at
    # resnet50's d = 4608, and no more than two are held at once. J h J is gathered by advanced
    # indexing (take_along_dim materialised a d x d index), each intermediate is dropped once used,
    # inline rather than in a helper (whose caller would hold its argument), and L⁻¹ is solved in
    # place into an identity laid out column-major as LAPACK writes (a plain solve held a third
    # matrix). One factor peaked 974 MB above its input, then 653, 510, now 336 (the same bits each time).
    reversed_order = order.flip(-1)
    groups = torch.arange(len(order))
    rows = h[groups[:, None], reversed_order]
    del h
    lower = rows[groups[:, None, None], torch.arange(rows.shape[-1])[:, None], reversed_order[:, None, :]]
    del rows
    lower = torch.linalg.cholesky(lower)
    inverse = torch.zeros(lower.shape, dtype=lower.dtype).mT  # column-major
    inverse.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    torch.linalg.solve_triangular(lower, inverse, upper=False, out=inverse)
    del lower
    inverse = inverse.to(dtype)  # before the flip's copy: at float32 the float64 matrix is dropped first
    return order, inverse.flip(-1, -2)


def _column_order(diagonal: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per group, the columns in order of decreasing input energy; with ``chunk > 1``, whole chunks
    of ``chunk`` consecutive columns (their natural order kept inside) in order of decreasing summed
    energy, a short last chunk (the row's end) last, so that every group has its chunks at the same
    positions and the groups are still rounded as one batch."""
    if chunk == 1:
        return torch.argsort(diagonal, dim=-1, descending=True, stable=True)
    groups, d = diagonal.shape
    full = d // chunk
    energy = diagonal[:, : full * chunk].reshape(groups, full, chunk).sum(-1)
    starts = torch.argsort(energy, dim=-1, descending=True, stable=True) * chunk
    columns = (starts[:, :, None] + torch.arange(chunk)).reshape(groups, -1)
    tail = torch.arange(full * chunk, d).expand(groups, d - full * chunk)
    return torch.cat([columns, tail], 1)


def layer_factor(calibration: Calibration, name: str, chunk: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`inverse_cholesky` of the layer ``name``'s input moments, computed once per
    calibration and kept in it: a rate search compresses one model many times, at other steps
    but always against the same inputs. The factor is kept in float32, the precision GPTQ's
    updates use it in (:func:`output_aware_symbols`): the same symbols, and half the memory of
    float64 factors (951 MiB for resnet50's layers, the top of a fixed-rate compress's RSS).
    A chunk-ordered factor (``chunk > 1``) is kept under its own key."""
    key = name if chunk == 1 else f"{name}#chunk{chunk}"
    if key not in calibration.factors:
        calibration.factors[key] = inverse_cholesky(calibration.layers[name], chunk=chunk, dtype=torch.float32)
    return calibration.factors[key]


def output_aware_symbols(weight: torch.Tensor, factors: torch.Tensor, factor: tuple[torch.Tensor, torch.Tensor],
                         rate_scale: float | None = None, inputs: LayerInputs | None = None) -> torch.Tensor:
    """Integer symbols for ``weight`` on the codec's grid, chosen by GPTQ with ``factor`` from
    :func:`inverse_cholesky`: ``factors`` holds one step per row of the codec's layout
    (:class:`~.format.layout.ChunkLayout`), and the symbols come back as (rows, row length).
    With ``rate_scale`` (None: plain GPTQ) each weight's level is chosen rate-aware, with the
    price :func:`rate_penalties` sets times ``rate_scale`` (0: GPTQ's symbols again), against the
    ridge problem :func:`ridge_target` makes from the layer's ``inputs`` (needed then, and their
    moments kept: the ridge depends on the step).

    GPTQ sees the weight as (out, d): output row r belongs to group ``r // (out / groups)`` and
    is rounded against that group's factor; the groups are rounded together, column by column,
    as one batch. The layout's rows are the output rows, except for a weight with one output row,
    whose layout rows are its input channels, and a ``transposed`` convolution's, whose stored
    rows are its input channels and whose GPTQ rows are :func:`~.calibration.as_rows`'s: the grid
    then steps across the columns."""
    order, u = factor
    d = order.shape[1]
    transposed = inputs is not None and inputs.transposed
    w, grid = _columns(weight, factors, order, transposed)
    levels = None
    if rate_scale is not None:  # the weights in steps, for the rate model and its price
        x = w / grid
        distortion = rate_distortion(u, x)
        curvature = 1 / (2 * math.log(2) * x.double().var(dim=(1, 2)).clamp_min(1e-12))  # groups
        u, w = ridge_target(inputs, w, rate_scale * 2 * math.log(2) * distortion * curvature)
        levels = RateAwareLevels.of(torch.round(x), rate_scale * rate_penalties(u, distortion), curvature)
    u = u.float()  # computed in float64 (cached in float32: layer_factor); the updates need no more
    symbols = torch.empty_like(w)
    for start in range(0, d, BLOCK):
        end = min(start + BLOCK, d)
        with _one_thread():
            errors = _round_block(w[:, start:end], grid[:, start:end], u[:, start:end, start:end], symbols[:, start:end],
                                  levels, start)
        w[:, end:] -= grouped_matmul(u[:, start:end, end:].transpose(1, 2), errors)
    out = torch.empty_like(symbols)
    out.scatter_(1, order[:, :, None].expand_as(symbols), symbols)
    out = from_rows(out.transpose(1, 2).reshape(-1, d), weight.shape, transposed)
    return out.reshape(len(factors), -1).to(torch.int32)


def _columns(weight: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
             transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and its grid (one step per row of ``factors``, the codec's layout) in GPTQ's
    layout (groups x d x rows of :func:`~.calibration.as_rows`, columns in ``order``): a column
    of the weight is one contiguous row here."""
    groups, d = order.shape
    grid = factors.float()[:, None].expand(len(factors), weight.numel() // len(factors)).reshape(weight.shape)
    w, grid = (as_rows(t, transposed).reshape(groups, -1, d).take_along_dim(order[:, None, :], 2)
               for t in (weight.detach().float(), grid))
    return w.transpose(1, 2).contiguous(), grid.transpose(1, 2).contiguous()


def linear_latent_symbols(weight: torch.Tensor, factors: torch.Tensor, factor: tuple[torch.Tensor, torch.Tensor],
                          decoder: torch.Tensor, limit: int = (1 << 31) - 1,
                          encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                          moves: torch.Tensor | None = None) -> torch.Tensor:
    """Integer latents for ``weight`` under a linear chunk decoder, chosen inside GPTQ's column loop.

    A chunk is ``c = decoder.shape[0]`` consecutive columns of a row (a 3x3 kernel of one input
    channel, or ``c`` input features of a Linear row) and decodes to ``q = f * (decoder @ z)`` with
    ``f`` the row's factor (``factors``, as for :func:`output_aware_symbols`) and ``z`` its integer
    latents. ``factor`` is the chunk-ordered one (:func:`inverse_cholesky` with ``chunk=c``): the
    chunks are taken in that order, each after the error of the earlier ones has been pushed onto it.

    For a chunk ``B`` with ``U_BB`` the diagonal block of the factor, its share of the layer's
    output error is ``|U_BB^-T (w_B - q_B)|^2`` (what GPTQ's per-column errors sum to). In latents
    ``y = decoder^-1 w_B`` this is ``|V^-T (y - f z)|^2`` with ``V`` the upper factor of the QR of
    ``U_BB decoder^-T``: the same problem as GPTQ's with factor ``V``, so ``z`` is chosen by GPTQ's
    own rounding in latent space (Babai's nearest plane on that lattice). The chunk's weight
    error is then pushed onto the later columns exactly as GPTQ pushes a column's. With the
    identity decoder ``V = U_BB`` and the symbols are GPTQ's (with the same factor).

    With ``encode`` (the fitted encoder's quantizer, fed each chunk after the feedback) its latents
    are the start instead of nearest plane's. With ``moves`` (integer latent steps, moves x c:
    a lattice's shortest vectors in its basis, :func:`~.lattice.moves`) the start is then improved
    by :func:`_neighbour_search` in the chunk's output-error metric: nearest plane reaches only a
    parallelepiped cell of the lattice, the neighbours of a lattice point its Voronoi cell's.

    A short last chunk (the row's end) has padding latents that decode to nothing: they get a
    negligible weight in the metric and target zero. Returns (rows, chunks per row * c) int32
    latents in the codec's chunk layout; ``limit`` clips them (the decoder's exact range).
    """
    order, u = factor
    groups, d = order.shape
    size = decoder.shape[0]
    w, grid = _columns(weight, factors, order)
    rows = w.shape[2]
    count = -(-d // size)
    latents = torch.empty(groups, count, size, rows)
    u, decoder = u.float(), decoder.double()
    inverse = torch.linalg.inv(decoder)
    for start, end in _chunk_blocks(d, size):
        errors = torch.empty_like(w[:, start:end])
        with _one_thread():
            for a in range(start, end, size):
                b = min(a + size, d)
                if encode is None:
                    z = _nearest_plane(w[:, a:b], grid[:, a:b], u[:, a:b, a:b], inverse)
                else:
                    z = _encoded(w[:, a:b], grid[:, a:b], size, encode)
                if moves is not None:
                    z = _neighbour_search(w[:, a:b], grid[:, a:b], u[:, a:b, a:b], decoder, z, moves)
                z.clamp_(-limit, limit)
                q = torch.einsum("kj,gjr->gkr", decoder, z.double()).float()[:, : b - a] * grid[:, a:b]
                for j in range(a, b):
                    errors[:, j - start] = _push(w[:, start:end], q[:, j - a], u[:, start:end, start:end], j - start)
                latents[:, a // size] = z
        w[:, end:] -= grouped_matmul(u[:, start:end, end:].transpose(1, 2), errors)
    chunk_order = (order[:, ::size] // size)[:, :, None, None].expand_as(latents)
    out = torch.empty_like(latents).scatter_(1, chunk_order, latents)
    return out.permute(0, 3, 1, 2).reshape(groups * rows, count * size).to(torch.int32)


def _chunk_blocks(d: int, size: int) -> list[tuple[int, int]]:
    """GPTQ's blocks of columns (lazy batch updates), cut at chunk boundaries: as many whole
    chunks as fit in :data:`BLOCK` columns (at least one)."""
    width = max(size, BLOCK // size * size)
    return [(start, min(start + width, d)) for start in range(0, d, width)]


def _encoded(w: torch.Tensor, grid: torch.Tensor, size: int, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The latents (groups x c x rows) ``encode`` gives one chunk (``w``: groups x m x rows, the
    error of the earlier chunks already pushed onto it), fed as (chunks, c) rows in steps, the
    padding zero as the codec pads."""
    groups, m, rows = w.shape
    x = torch.nn.functional.pad(w / grid, (0, 0, 0, size - m)).transpose(1, 2).reshape(-1, size)
    return encode(x).float().reshape(groups, rows, size).transpose(1, 2)


def _nearest_plane(w: torch.Tensor, grid: torch.Tensor, u: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """The latents (groups x c x rows) of one chunk (``w``: groups x m x rows, ``m <= c``) that GPTQ's
    rounding picks in latent space, where the chunk's output error has the factor ``V`` (see
    :func:`linear_latent_symbols`); ``inverse`` is the decoder's inverse."""
    groups, m, rows = w.shape
    size = inverse.shape[0]
    u = u.double()
    if m < size:  # padding latents: target zero, weight ~0 (a huge factor) in the output error
        padded = u.new_zeros(groups, size, size)
        padded[:, :m, :m] = u
        padded[:, m:, m:] = PAD_WEIGHT * u.diagonal(dim1=-2, dim2=-1).amax(-1)[:, None, None] * torch.eye(size - m)
        u = padded
        w = torch.cat([w, w.new_zeros(groups, size - m, rows)], 1)
        grid = torch.cat([grid, grid[:, :1].expand(groups, size - m, rows)], 1)
    v = torch.linalg.qr(u @ inverse.T).R
    v = v * torch.sign(v.diagonal(dim1=-2, dim2=-1))[:, :, None]  # a positive diagonal
    y = torch.einsum("kj,gjr->gkr", inverse, w.double()).float()
    z = torch.empty_like(y)
    _round_block(y, grid, v.float(), z)
    return z


def chunk_output_error(w: torch.Tensor, grid: torch.Tensor, u: torch.Tensor, decoder: torch.Tensor,
                       z: torch.Tensor) -> torch.Tensor:
    """Per group and row (groups x rows), a chunk's share of the layer's output error with latents
    ``z`` (groups x c x rows): ``|U_BB^-T (w_B - q_B)|^2`` (:func:`linear_latent_symbols`), what the
    GPTQ pushes of its columns' errors sum to."""
    m = w.shape[1]
    q = torch.einsum("kj,gjr->gkr", decoder.double(), z.double())[:, :m] * grid.double()
    return _whitened(u, w.double() - q).pow(2).sum(1)


def _whitened(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``U^-T x`` per group (``u`` upper triangular, groups x m x m; ``x`` groups x m x n)."""
    return torch.linalg.solve_triangular(u.double().transpose(1, 2), x, upper=False)


def _neighbour_search(w: torch.Tensor, grid: torch.Tensor, u: torch.Tensor, decoder: torch.Tensor, z: torch.Tensor,
                      moves: torch.Tensor) -> torch.Tensor:
    """Latents ``z`` (groups x c x rows) of one chunk moved, row by row, to the neighbour (``z`` plus
    one of ``moves``) with the least :func:`chunk_output_error`, as long as one is strictly better
    (at most c rounds: each round lowers every moved row's error).

    The error of ``z + v`` is ``|r - f P v|^2`` with ``r`` the whitened residual of ``z``, ``f`` the
    row's factor and ``P = U^-T D_m`` (``D_m`` the decoder's first m rows): one matrix product per
    round for all rows and moves."""
    m = w.shape[1]
    factor = grid[:, 0].double()  # one factor per row: a chunk is part of one row
    p = _whitened(u, decoder.double()[:m].expand(len(u), -1, -1)) @ moves.T  # groups x m x moves
    norms = p.pow(2).sum(1)  # groups x moves
    z = z.double()
    for _ in range(z.shape[1]):
        q = torch.einsum("kj,gjr->gkr", decoder.double(), z)[:, :m] * grid.double()
        r = _whitened(u, w.double() - q)
        gain = 2 * factor[:, :, None] * torch.einsum("gmr,gmv->grv", r, p) - factor[:, :, None] ** 2 * norms[:, None]
        best, index = gain.max(-1)  # groups x rows
        better = best > 0
        if not better.any():
            break
        z = z + torch.where(better[:, None], moves.T[:, index].permute(1, 0, 2), 0.0)
    return z.float()


def rate_distortion(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per group (groups), ``D``: the mean output error per weight of nearest rounding, ``e**2 /
    u_jj**2`` with ``e`` the rounding error in steps of weights ``x`` (groups x d x rows)."""
    diagonal = torch.diagonal(u, dim1=-2, dim2=-1).double() ** 2
    errors = (x.double() - torch.round(x.double())).pow(2).mean(-1)
    return (errors / diagonal).mean(-1)


def rate_penalties(u: torch.Tensor, distortion: torch.Tensor) -> torch.Tensor:
    """Per group and column (groups x d), the price of one bit in units of the squared rounding
    error in steps, ``(x - q)**2``, with ``distortion`` the groups' :func:`rate_distortion`.

    ECSQ theory: ``dD/dR = -2 ln2 D`` per weight. Weighted by GPTQ's ``1 / u_jj**2`` (the output
    error a column's rounding error costs), a group's output error ``D`` is the mean of
    ``e**2 / u_jj**2`` over its weights, with ``e`` their nearest-rounding error in steps; a bit
    is worth ``2 ln2 D`` of it, that is ``2 ln2 D u_jj**2`` of a column's squared error in steps.
    At high rate ``e**2`` averages ``1/12`` and this is ``ln2/6 * s**2`` against the error term
    ``(w - q*s)**2 / u_jj**2`` averaged over the columns; at the low rates the codec runs at most
    weights round to zero, ``e**2`` is well below ``1/12``, and high-rate theory's price (dev,
    resnet18 at 0.33 bits/weight: 0.98 pt validation drop against GPTQ's 0.14) overprices the
    bits and shrinks the weights into a dead zone. Measuring ``D`` keeps the price at the slope
    the rate search's step puts the tensor at; the rate search moves the step as before.

    A column whose inputs carry little of their own energy (a large ``u_jj``) pays more per bit
    of error it keeps, so its small weights go to zero where the output barely notices."""
    diagonal = torch.diagonal(u, dim1=-2, dim2=-1).double() ** 2
    return (2 * math.log(2) * distortion[:, None] * diagonal).float()


def ridge_target(inputs: LayerInputs, w: torch.Tensor, strength: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CERWU's ridge: the quadratic part of the rate, ``strength * k**2`` per symbol ``k`` (per
    group, in units of the output error in steps), moved into the problem's ``H``.

    Returns the factor of ``H + strength I`` (:func:`inverse_cholesky`, GPTQ's column order) and
    the weights' ridge target ``(H + strength I)⁻¹ H w = w - strength (H + strength I)⁻¹ w`` that
    GPTQ then rounds (``w``: groups x d x rows, in that order). The target is the least output error
    plus ridge penalty, the point rate-aware rounding aims at: without the ridge, each weight moved
    toward zero for its rate was compensated by pushing the later columns *away* from zero, which
    the rate term then fought column by column (dev, resnet18 at 0.36 bits/weight: 0.42 pt drop
    against GPTQ's 0.14; with the ridge 0.14 at a 7 % smaller container)."""
    _, u = inverse_cholesky(inputs, ridge=strength)
    wide = w.double()
    shrunk = wide - strength.double()[:, None, None] * (u.mT @ (u @ wide))
    return u, shrunk.float()


class RateAwareLevels:
    """The rate-aware choice of level for one tensor in GPTQ's layout (groups x d x rows), and
    its rate model: the order-0 code lengths ``-log2 p(q)`` of the tensor's symbols, from their
    counts (plus :data:`RATE_PRIOR` each), the model :func:`~.rate.estimate_bits` measures and
    pcodec codes.

    The counts start from ``nearest`` (the weights rounded to nearest before any feedback) and
    are refitted as the tensor is rounded: each rounded column's chosen symbols replace its
    nearest ones, so the later columns are priced by what the tensor has become (more zeros, as
    the dead zone grows)."""

    def __init__(self, nearest: torch.Tensor, penalties: torch.Tensor, curvature: torch.Tensor | None = None) -> None:
        self.nearest, self.penalties = nearest, penalties[:, :, None]
        self.curvature = None if curvature is None else curvature.float()[:, None]
        self.low = int(nearest.min()) - 1  # one unseen level either side: a neighbour may step out
        self.counts = self._count(nearest, int(nearest.max()) + 2 - self.low)
        self._refresh()

    @classmethod
    def of(cls, nearest: torch.Tensor, penalties: torch.Tensor, curvature: torch.Tensor | None = None
           ) -> RateAwareLevels | None:
        """The levels of ``nearest``, or None where its range is too wide for a table (a tiny step,
        where the rate term is worth nothing)."""
        return cls(nearest, penalties, curvature) if int(nearest.max()) - int(nearest.min()) < MAX_RATE_TABLE else None

    def bits(self, symbols: torch.Tensor) -> torch.Tensor:
        """Code lengths of ``symbols``; one outside the table costs what its edge (unseen) costs.
        With a ridge's ``curvature`` its quadratic part is taken off (the ridge prices it)."""
        bits = self.table[(symbols - self.low).clamp(0, len(self.table) - 1).long()]
        return bits if self.curvature is None else bits - self.curvature * symbols ** 2

    def choose(self, x: torch.Tensor, column: int) -> torch.Tensor:
        """For ``column`` (``x``: its weights in steps, groups x rows), the level among the nearest
        one, the other neighbour and zero that minimises ``(x - q)**2 + penalty * bits(q)``; the
        counts are then refitted with the choice.

        The nearest level is kept unless another costs strictly less, so a zero price gives
        exactly the nearest levels (GPTQ's). Zero is the dead zone's level: the most frequent
        symbol, it can win from several steps away where the price is high."""
        penalty = self.penalties[:, column]
        nearest = torch.round(x)
        best, cost = nearest, (x - nearest) ** 2 + penalty * self.bits(nearest)
        for candidate in (nearest + torch.sign(x - nearest), torch.zeros_like(x)):
            candidate_cost = (x - candidate) ** 2 + penalty * self.bits(candidate)
            better = candidate_cost < cost
            best, cost = torch.where(better, candidate, best), torch.where(better, candidate_cost, cost)
        span = len(self.counts)
        self.counts += self._count(best, span) - self._count(self.nearest[:, column], span)
        self._refresh()
        return best

    def _count(self, symbols: torch.Tensor, span: int) -> torch.Tensor:
        index = (symbols - self.low).clamp(0, span - 1).long().reshape(-1)
        return torch.bincount(index, minlength=span).double()

    def _refresh(self) -> None:
        counts = self.counts + RATE_PRIOR
        self.table = torch.log2(counts.sum() / counts).float()


def _round_block(w: torch.Tensor, grid: torch.Tensor, u: torch.Tensor, symbols: torch.Tensor,
                 levels: RateAwareLevels | None = None, start: int = 0) -> torch.Tensor:
    """Round one block of columns (``w``: groups x block x rows, updated in place) in order, each
    column's error pushed onto the block's later columns; the symbols go into ``symbols``. With
    ``levels`` the level is chosen rate-aware (the block starts at column ``start`` of the
    tensor), else nearest. Returns the scaled errors (groups x block x rows) that the caller
    pushes onto the columns after the block in one matrix product (GPTQ's lazy batch update)."""
    errors = torch.empty_like(w)
    for j in range(w.shape[1]):
        column, step = w[:, j], grid[:, j]
        q = torch.round(column / step) if levels is None else levels.choose(column / step, start + j)
        symbols[:, j] = q
        errors[:, j] = _push(w, q * step, u, j)
    return errors


def _push(w: torch.Tensor, value: torch.Tensor, u: torch.Tensor, j: int) -> torch.Tensor:
    """Set column ``j`` of ``w`` (groups x columns x rows) to ``value`` and push its error onto the
    later columns (GPTQ's update with the factor ``u``); returns the scaled error."""
    err = (w[:, j] - value) / u[:, j, j, None]
    w[:, j:] -= u[:, j, j:, None] * err[:, None, :]
    return err


@contextmanager
def _one_thread():
    """Run the enclosed tensor operations on one thread. The column updates are too small to
    split: a parallel region costs more in synchronisation than it saves, and on a machine whose
    cores are shared it waits for the slowest one (a resnet50 layer's columns took 5x as long
    on two threads as on one on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
