"""Corrections that cost no bytes: after quantization, shift the stored biases and normalisation
means so that each layer's output keeps its calibration mean.

Quantization errors are correlated across a layer, so they shift its output mean; a batch norm
downstream, whose statistics were measured on the original model, then subtracts the wrong mean
(Nagel et al. 2019, "Data-free quantization"). Both fixes edit tensors the container stores anyway:

- **bias correction**: a coded layer with a bias gets ``b - (W_q - W) E[x]``, the exact shift of
  its output mean on the calibration inputs (for a grouped convolution, each output row's ``E[x]``
  is its group's);
- **norm correction**: each norm layer's running mean moves by the difference between its input
  means in the quantized and in the original model on the same batches
  (paired, so the estimate has little noise even from a few batches). A norm's input depends on
  the norms upstream of it, so the statistics are measured in :data:`NORM_PASSES` passes, each on
  the model corrected so far; every pass corrects the *original* statistics.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .calibration import Calibration, LayerInputs, as_rows, norm_input_means, norm_layers

NORM_PASSES = 2


def bias_corrections(original: dict[str, torch.Tensor], quantized: dict[str, torch.Tensor],
                     layers: dict[str, LayerInputs]) -> dict[str, torch.Tensor]:
    """Corrected biases (float32, by bias name) for every measured layer that has one."""
    out = {}
    for weight_name, inputs in layers.items():
        bias_name = weight_name[: -len("weight")] + "bias"
        if bias_name not in original or weight_name not in quantized:
            continue
        delta = as_rows(quantized[weight_name].float() - original[weight_name].float(), inputs.transposed)
        rows = delta.reshape(inputs.groups, -1, delta.shape[1])  # a grouped layer's rows see their group's mean
        shift = torch.cat([group_rows @ mean for group_rows, mean in zip(rows, inputs.mean)])
        out[bias_name] = original[bias_name].float() - shift
    return out


def norm_corrections(model: nn.Module, state_dict: dict[str, torch.Tensor],
                     calibration: Calibration) -> dict[str, torch.Tensor]:
    """Running means (by buffer name) that make each norm layer of ``model`` loaded with
    ``state_dict`` subtract the mean its input has in the quantized model.

    Only the mean moves. Rescaling the variance as well amplifies whatever is left of a channel
    the quantizer nearly erased: on resnet18 at 0.7 bits/weight one convolution rounded to all
    zeros, its norm's variance was set to 0, and the division by ``sqrt(eps)`` lost 81 pt of top-1.
    """
    reference = calibration.norm_means(model)
    if not reference:
        return {}
    quantized = copy.deepcopy(model)
    quantized.load_state_dict(state_dict, strict=False)
    modules = {n: m for n, m in norm_layers(quantized).items() if n in reference}
    for _ in range(NORM_PASSES):
        for name, mean in norm_input_means(quantized, calibration.batches, modules).items():
            with torch.no_grad():
                modules[name].running_mean.copy_(state_dict[f"{name}.running_mean"].float() + mean - reference[name])
    buffers = dict(quantized.named_buffers())
    return {f"{n}.running_mean": buffers[f"{n}.running_mean"].detach().clone() for n in modules}
