"""BatchNorm folding: a BatchNorm's running statistics moved into its own affine parameters
before coding, so that the container stores two vectors per BatchNorm instead of four.

In eval mode a BatchNorm computes ``y = γ (x − μ) / sqrt(σ² + ε) + β``, four stored vectors of
which only their combination matters. With ``a = γ / sqrt(σ² + ε)`` the same layer is
``γ' = a·sqrt(1 + ε)``, ``β' = β − a·μ``, ``μ' = 0``, ``σ'² = 1``: an identical eval-mode output,
while the constant ``μ'`` and ``σ'²`` code to a few bytes each. On a model with many small
layers (a MobileNet's depthwise blocks) the float vectors are a large part of the container;
NNR (ISO/IEC 15938-17) folds the same way ("BNF"; Haase et al., ICIP 2021).

What changes for the user: the decoded BatchNorms' running statistics are 0 and 1, so eval-mode
outputs are those of the source model (to the stored precision), but *training* from the decoded
model (train-mode BatchNorm uses batch statistics and multiplies by ``γ'``, not ``γ``) starts
elsewhere. ``VAECompressionConfig.fold_batchnorm=False`` (``--no-fold-batchnorm``) keeps them.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import excluded

BATCHNORM_FOLDED = "batchnorm_folded"  # header key: how many BatchNorm layers a container stores folded


def foldable_batchnorms(model: nn.Module, skip: list[str] | tuple[str, ...] = ()) -> dict[str, float]:
    """``{module name: eps}`` of the BatchNorms of ``model`` that can be folded: subclasses of
    torch's ``_BatchNorm`` with an affine and running statistics, outside ``skip`` (name parts, as
    ``modules_to_not_convert``). Look-alikes (frozen batch norms with the same buffers) are left as
    they are: their forward is their own, so folding would not be known to keep their output."""
    out = {}
    for name, module in model.named_modules():
        if not (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine
                and module.track_running_stats and module.running_mean is not None):
            continue
        if not excluded(name, skip):
            out[name] = float(module.eps)
    return out


def fold_batchnorm(state_dict: dict[str, torch.Tensor], layers: dict[str, float]) -> dict[str, torch.Tensor]:
    """``state_dict`` with every BatchNorm of ``layers`` (``{name: eps}``) folded: its running mean
    moved into its bias and its running variance into its weight (computed in float64, stored in
    each tensor's dtype). Folding a folded BatchNorm leaves it as it is, and one whose running mean
    was moved since (a norm correction) gets the move folded into its bias."""
    out = dict(state_dict)
    for name, eps in layers.items():
        prefix = f"{name}." if name else ""
        keys = [prefix + k for k in ("weight", "bias", "running_mean", "running_var")]
        if not all(k in state_dict for k in keys):
            continue
        weight, bias, mean, var = (state_dict[k].double() for k in keys)
        scale = weight / torch.sqrt(var + eps)
        for key, value in zip(keys, (scale * (1 + eps) ** 0.5, bias - scale * mean,
                                     torch.zeros_like(mean), torch.ones_like(var))):
            out[key] = value.to(state_dict[key].dtype)
    return out
