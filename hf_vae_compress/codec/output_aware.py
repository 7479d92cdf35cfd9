"""Stage 4, output-aware: round a layer's weights so that its *output* error is small, not each
weight's error (GPTQ, Frantar et al. 2022, on the codec's entropy-coded grid).

Rounding each weight to its nearest level minimises ``|ΔW|²``. The layer's output error is
``tr(ΔW H ΔWᵀ)`` with ``H = E[x xᵀ]`` over its inputs, and ``H`` couples a row's input dimensions:
the error one rounding leaves can be cancelled by moving the weights not yet rounded. GPTQ does
this column by column with the Cholesky factor of ``H⁻¹``, in blocks so that most of the work is
one matrix product per block.

The grid is the codec's own: row ``r`` has levels ``k * step * scale[r]`` (the factor the
decoder multiplies by), so the symbols are what nearest rounding would write, only chosen better,
and are entropy-coded the same way.
"""

from __future__ import annotations

import torch

from .calibration import Calibration, LayerInputs

BLOCK = 128
DAMPING = 0.01  # times the mean diagonal of H: keeps the inverse stable (GPTQ's default)


def inverse_cholesky(inputs: LayerInputs, damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """The column order and the upper Cholesky factor of ``(H + damping * mean(diag H) * I)⁻¹``
    (float64, in that order).

    Columns go in order of decreasing input energy (GPTQ's "act order"): the weights that matter
    most are rounded first, while there are many columns left to absorb their error. In a dev
    run at the same target it cut the ViT reference's validation drop from 0.92 to 0.32 pt.
    An input dimension the calibration data never excited (zero diagonal) gets a unit diagonal:
    its weights are rounded to nearest and nothing is pushed onto them.
    """
    h = inputs.second.double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    torch.diagonal(h).add_(damping * torch.diagonal(h).mean())
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    h = h[order][:, order]
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return order, torch.linalg.cholesky(inverse, upper=True)


def layer_factor(calibration: Calibration, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`inverse_cholesky` of the layer ``name``'s input moments, computed once per
    calibration and kept in it: a rate search compresses one model many times, at other steps
    but always against the same inputs."""
    if name not in calibration.factors:
        calibration.factors[name] = inverse_cholesky(calibration.layers[name])
    return calibration.factors[name]


def output_aware_symbols(weight: torch.Tensor, factors: torch.Tensor,
                         factor: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Integer symbols (rows x d) for ``weight`` viewed as (rows, d), on the grid
    ``symbol * factors[row]``, chosen by GPTQ with ``factor`` from :func:`inverse_cholesky`."""
    order, u = factor
    u = u.float()  # the factor is computed in float64; the updates need no more than float32
    w = weight.detach().float().reshape(len(factors), -1)[:, order].clone()
    grid = factors.float()[:, None]
    d = w.shape[1]
    symbols = torch.empty_like(w)
    for start in range(0, d, BLOCK):
        end = min(start + BLOCK, d)
        block_u = u[start:end, start:end]
        errors = torch.empty(w.shape[0], end - start, dtype=w.dtype)
        for j in range(end - start):
            column = w[:, start + j: start + j + 1]
            q = torch.round(column / grid)
            symbols[:, start + j: start + j + 1] = q
            err = (column - q * grid) / block_u[j, j]
            w[:, start + j:end] -= err * block_u[j, j:]
            errors[:, j: j + 1] = err
        w[:, end:] -= errors @ u[start:end, end:]
    out = torch.empty_like(symbols)
    out[:, order] = symbols
    return out.to(torch.int32)
