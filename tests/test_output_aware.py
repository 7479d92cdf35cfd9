"""Output-aware rounding (GPTQ), the calibration statistics it needs, and the free corrections."""

import dataclasses

import pytest
import torch
from torch import nn

from hf_vae_compress.codec import FitConfig, VAECompressionConfig, compress
from hf_vae_compress.codec.calibration import (LayerInputs, as_rows, calibrate, from_rows, layer_rows, layer_statistics,
                                               norm_input_means, norm_layers, output_aware_layers)
from hf_vae_compress.codec.correction import bias_corrections, norm_corrections
from hf_vae_compress.codec import output_aware
from hf_vae_compress.codec.output_aware import inverse_cholesky, layer_factor, output_aware_symbols
from hf_vae_compress.tasks import Classification
from tests.conftest import tiny_timm


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) + 2 * torch.eye(d)
    return torch.randn(n, d, generator=g) @ mix


def _output_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (w - q).T) ** 2).mean())


def _moments(x: torch.Tensor) -> LayerInputs:
    """The input moments of an ungrouped layer fed the rows of ``x``."""
    return LayerInputs((x.T @ x / len(x))[None], x.mean(0)[None])


def test_gptq_lowers_the_output_error_of_nearest_rounding_on_the_same_grid():
    x = _correlated_inputs(4096, 48)
    w = torch.randn(16, 48)
    factors = torch.full((16,), 0.5) * torch.linspace(0.5, 1.5, 16)  # one grid step per row
    symbols = output_aware_symbols(w, factors, inverse_cholesky(_moments(x)))
    assert symbols.dtype == torch.int32 and symbols.shape == w.shape
    nearest = torch.round(w / factors[:, None])
    gptq_error = _output_error(w, symbols * factors[:, None], x)
    nearest_error = _output_error(w, nearest * factors[:, None], x)
    assert gptq_error < 0.7 * nearest_error, (gptq_error, nearest_error)


def test_gptq_is_nearest_rounding_when_inputs_are_uncorrelated():
    w = torch.randn(8, 300)
    factors = torch.full((8,), 0.3)
    inputs = LayerInputs(torch.diag(torch.rand(300) + 0.5)[None], torch.zeros(1, 300))  # diagonal H: nothing to push
    symbols = output_aware_symbols(w, factors, inverse_cholesky(inputs))
    assert torch.equal(symbols, torch.round(w / 0.3).to(torch.int32))


def _unblocked_gptq(w: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """GPTQ as written in the paper without lazy batches: each column's error goes straight onto
    every later column. ``order`` and ``u`` for one group; symbols in the original column order."""
    w = w[:, order].clone()
    steps = factors[:, None].expand_as(w)
    symbols = torch.empty_like(w)
    for j in range(w.shape[1]):
        symbols[:, j] = torch.round(w[:, j] / steps[:, j])
        err = (w[:, j] - symbols[:, j] * steps[:, j]) / u[j, j]
        w[:, j:] -= err[:, None] * u[j, j:][None]
    return torch.empty_like(symbols).index_copy_(1, order, symbols)


def test_inverse_cholesky_factors_the_inverse_of_the_damped_reordered_moments():
    x = _correlated_inputs(2000, 40)
    order, u = inverse_cholesky(_moments(x))
    h = (x.T @ x / len(x)).double()
    damped = h + output_aware.DAMPING * h.diagonal().mean() * torch.eye(40, dtype=torch.float64)
    reordered = damped[order[0]][:, order[0]]
    assert torch.equal(u[0], u[0].triu()) and (u[0].diagonal() > 0).all()
    assert torch.allclose(u[0].T @ u[0], torch.linalg.inv(reordered), rtol=1e-8, atol=1e-10)


def test_lazy_block_updates_give_the_symbols_of_the_unblocked_loop():
    d = 2 * output_aware.BLOCK + 44  # three blocks, the last one short
    x = _correlated_inputs(4 * d, d)
    w = torch.randn(24, d)
    factors = 0.4 * torch.linspace(0.5, 1.5, 24)
    factor = inverse_cholesky(_moments(x))
    blocked = output_aware_symbols(w, factors, factor)
    unblocked = _unblocked_gptq(w, factors, factor[0][0], factor[1][0].float())
    assert (blocked != unblocked).float().mean() < 0.01  # float-rounding ties only
    blocked_error = _output_error(w, blocked * factors[:, None], x)
    unblocked_error = _output_error(w, unblocked * factors[:, None], x)
    assert abs(blocked_error - unblocked_error) <= 1e-3 * unblocked_error, (blocked_error, unblocked_error)


def test_layer_moments_match_a_direct_computation_in_any_grouping():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    batches = [torch.randn(4, 2, 5, 5) for _ in range(3)]
    layers = output_aware_layers(model)
    assert set(layers) == {"0.weight", "3.weight"}
    together = layer_statistics(model, batches, layers)
    one_at_a_time = layer_statistics(model, batches, layers, max_bytes=1)  # a forward pass per layer
    hidden = torch.cat([model[2](model[1](model[0](b))) for b in batches]).detach()
    assert torch.allclose(together["3.weight"].second[0], hidden.T @ hidden / len(hidden), atol=1e-5)
    patches = torch.cat([nn.functional.unfold(b, 3, padding=1).transpose(1, 2).reshape(-1, 18) for b in batches])
    assert torch.allclose(together["0.weight"].second[0], patches.T @ patches / len(patches), atol=1e-5)
    for name in layers:
        assert torch.allclose(together[name].second, one_at_a_time[name].second)
        assert torch.allclose(together[name].mean, one_at_a_time[name].mean)


def test_bias_correction_restores_the_output_mean():
    layer = nn.Linear(6, 3)
    x = torch.randn(500, 6) + 2.0
    inputs = _moments(x)
    original = {"weight": layer.weight.detach(), "bias": layer.bias.detach()}
    shifted = layer.weight.detach() + 0.1  # a correlated error: every weight rounded up
    corrected = bias_corrections(original, {"weight": shifted}, {"weight": inputs})
    out_original = x @ original["weight"].T + original["bias"]
    out_corrected = x @ shifted.T + corrected["bias"]
    assert torch.allclose(out_original.mean(0), out_corrected.mean(0), atol=1e-4)


def test_norm_correction_moves_running_means_by_the_measured_shift():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), nn.BatchNorm2d(3)).eval()
    batches = [torch.randn(8, 2, 4, 4) + 1.0 for _ in range(2)]
    calibration = calibrate(model, batches, 2, loss_fn=lambda m, b: (m(b).pow(2).sum(), len(b)), progress=False)
    assert set(calibration.norm_means(model)) == {"1"} and set(norm_layers(model)) == {"1"}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["0.weight"] = state["0.weight"] + 0.25  # shifts every output channel's mean
    corrected = norm_corrections(model, state, calibration)
    quantized = nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), nn.BatchNorm2d(3)).eval()
    quantized.load_state_dict(state)
    shift = norm_input_means(quantized, batches, {"1": quantized[1]})["1"] - calibration.norm_means(model)["1"]
    assert shift.abs().min() > 0.1
    assert torch.allclose(corrected["1.running_mean"], model[1].running_mean + shift, atol=1e-5)


def test_compress_with_output_aware_rounding_cuts_the_output_error_and_is_deterministic():
    model = tiny_timm().eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 1, 28, 28, generator=g) for _ in range(2)]
    errors, sizes = {}, {}
    for rounding in ("nearest", "output_aware"):
        config = VAECompressionConfig(target_bits_per_weight=2.0, calibration_batches=2, rounding=rounding)
        compressed = compress(model, config, calibration_data=batches, loss_fn=Classification.fisher_loss(), progress=False)
        again = compress(model, config, calibration_data=batches, loss_fn=Classification.fisher_loss(), progress=False)
        assert compressed.to_bytes() == again.to_bytes()
        decoded = tiny_timm().eval()
        decoded.load_state_dict(compressed.decode())
        with torch.no_grad():
            errors[rounding] = float((decoded(batches[0]) - model(batches[0])).pow(2).mean())
        sizes[rounding] = len(compressed.to_bytes())
    assert errors["output_aware"] < 0.5 * errors["nearest"], errors
    assert sizes["output_aware"] < 1.2 * sizes["nearest"], sizes
    stages = compressed.stats["stage_seconds"]
    assert set(stages) == {"prepare", "calibration", "container", "allocate", "rounding", "corrections"}
    assert stages["rounding"] > 0 and sum(stages.values()) == pytest.approx(compressed.stats["encode_seconds"], abs=0.01)


def test_a_rate_search_factors_each_layer_once_largest_first(monkeypatch):
    model = tiny_timm().eval()
    calibration = calibrate(model, [torch.randn(8, 1, 28, 28)], 1, Classification.fisher_loss(), progress=False)
    factored = []
    monkeypatch.setattr(output_aware, "inverse_cholesky",
                        lambda inputs, **kw: factored.append(inputs) or inverse_cholesky(inputs, **kw))
    for bpw in (2.0, 3.0):  # two probes of a search
        compress(model, VAECompressionConfig(target_bits_per_weight=bpw), calibration=calibration, progress=False)
    assert len(factored) == len({id(inputs) for inputs in factored}) > 0  # 14 coded layers, not 28
    # the largest factors are made first, while the compress holds least (model order would not be)
    sizes = [inputs.entries for inputs in factored]
    assert sizes == sorted(sizes, reverse=True) and sizes != [x.entries for x in calibration.layers.values()]
    name = next(iter(calibration.layers))
    assert layer_factor(calibration, name) is layer_factor(calibration, name)


def test_a_single_use_calibration_trades_each_moment_for_its_factor_and_codes_the_same_container():
    model = tiny_timm().eval()
    kept = calibrate(model, [torch.randn(8, 1, 28, 28)], 1, Classification.fisher_loss(), progress=False)
    single = dataclasses.replace(kept, layers={n: LayerInputs(x.second.clone(), x.mean.clone())
                                               for n, x in kept.layers.items()}, factors={}, single_use=True)
    config = VAECompressionConfig(target_bits_per_weight=2.0)  # output-aware, re-aimed once: each factor used twice
    a = compress(model, config, calibration=kept, progress=False)
    b = compress(model, config, calibration=single, progress=False)
    assert all(x.second is not None for x in kept.layers.values())
    # the rounded layers' moments made way for their factors; layers stored as floats keep theirs
    assert {n for n, x in single.layers.items() if x.second is None} == set(single.factors) == set(kept.factors) != set()
    assert a.report()["total_bytes"] == b.report()["total_bytes"]
    decoded_a, decoded_b = a.decode(), b.decode()
    assert all(torch.equal(decoded_a[k], decoded_b[k]) for k in decoded_a)


def test_rounding_is_validated_and_round_trips():
    config = VAECompressionConfig(rounding="nearest", correct_norms=True)
    assert VAECompressionConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="rounding"):
        VAECompressionConfig(rounding="stochastic")


def test_the_header_records_the_rounding_that_was_done():
    model = tiny_timm().eval()
    config = VAECompressionConfig(target_bits_per_weight=2.0, correct_norms=True)  # output-aware by default
    without_data = compress(model, config, progress=False)
    assert without_data.config.rounding == "nearest" and not without_data.config.correct_norms
    with_data = compress(model, config, calibration_data=[torch.randn(8, 1, 28, 28)],
                         loss_fn=Classification.fisher_loss(), progress=False)
    assert with_data.config.rounding == "output_aware" and with_data.config.correct_norms
    del with_data.header["config"]["rounding"]  # a container written before output-aware rounding existed
    assert with_data.config.rounding == "nearest"
    vae = VAECompressionConfig(target_bits_per_weight=2.0, transform="vae", fit=FitConfig(train_steps=5))
    learned = compress(model, vae, calibration_data=[torch.randn(8, 1, 28, 28)], loss_fn=Classification.fisher_loss(),
                       progress=False)
    assert learned.config.rounding == "nearest"  # the VAE's symbols are not levels in weight space


# Grouped and depthwise convolutions: each group of output rows is its own GPTQ problem over its
# group's input channels.

def _grouped_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: 8 problems of d = 9
                         nn.ReLU(),
                         nn.Conv2d(8, 12, 3, padding=1, groups=4)).eval()  # 4 problems of d = 18, 3 rows each


def _smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """Images whose neighbouring pixels are correlated, as in real feature maps: upsampled noise."""
    g = torch.Generator().manual_seed(seed)
    return nn.functional.interpolate(torch.randn(n, 2, 4, 4, generator=g), size=12, mode="bilinear") + 0.5


def _layer_input(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = layer.register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def test_grouped_and_depthwise_convolutions_are_measured_per_group():
    model, x = _grouped_model(), _smooth_images(8)  # 8 * 12 * 12 rows: under the per-batch cap, all kept
    layers = output_aware_layers(model)
    assert set(layers) == {"0.weight", "2.weight", "4.weight"}
    stats = layer_statistics(model, [x], layers)
    assert stats["2.weight"].second.shape == (8, 9, 9) and stats["4.weight"].second.shape == (4, 18, 18)
    for name, layer in (("2.weight", model[2]), ("4.weight", model[4])):
        patches = nn.functional.unfold(_layer_input(model, layer, x), 3, padding=1).transpose(1, 2)
        per_group = patches.reshape(-1, layer.groups, layer.weight[0].numel()).transpose(0, 1)
        for g in range(layer.groups):
            rows = per_group[g]
            assert torch.allclose(stats[name].second[g], rows.T @ rows / len(rows), atol=1e-5)
            assert torch.allclose(stats[name].mean[g], rows.mean(0), atol=1e-6)


def test_grouped_and_depthwise_convolutions_round_output_aware():
    """At the same grid, GPTQ per group changes symbols and lowers the layer's output error,
    both as ``tr(ΔW H ΔWᵀ)`` summed over groups and measured by running the layer."""
    model, x = _grouped_model(), _smooth_images(8)
    stats = layer_statistics(model, [x], output_aware_layers(model))
    for name, layer in (("2.weight", model[2]), ("4.weight", model[4])):
        w = layer.weight.detach()
        factors = 0.6 * w.flatten(1).pow(2).mean(1).sqrt()  # a coarse step per output row
        gptq = output_aware_symbols(w, factors, inverse_cholesky(stats[name]))
        nearest = torch.round(w.flatten(1) / factors[:, None])
        assert (gptq != nearest).any()
        inputs = _layer_input(model, layer, x)
        errors = {}
        for kind, symbols in (("gptq", gptq), ("nearest", nearest)):
            delta = (symbols * factors[:, None] - w.flatten(1)).reshape(layer.groups, -1, w[0].numel())
            trace = float(sum(torch.trace(d @ h @ d.T) for d, h in zip(delta, stats[name].second)))
            quantized = nn.functional.conv2d(inputs, (symbols * factors[:, None]).reshape(w.shape), None,
                                             padding=1, groups=layer.groups)
            measured = float((quantized - nn.functional.conv2d(inputs, w, None, padding=1, groups=layer.groups))
                             .pow(2).mean(dim=(0, 2, 3)).sum())  # summed over output channels, like the trace
            errors[kind] = trace, measured
        assert errors["gptq"][1] == pytest.approx(errors["gptq"][0], rel=1e-3)
        assert errors["gptq"][0] < 0.8 * errors["nearest"][0], (name, errors)


def _decoded_by_rounding(model: nn.Module, batches: list) -> dict[str, dict[str, torch.Tensor]]:
    """``model`` compressed at the same steps (a fixed beta) with each rounding, decoded."""
    decoded = {}
    for rounding in ("nearest", "output_aware"):
        config = VAECompressionConfig(beta=0.1, target_bits_per_weight=None, min_numel=16, calibration_batches=2,
                                      rounding=rounding)
        compressed = compress(model, config, calibration_data=batches, loss_fn=lambda m, b: (m(b).pow(2).sum(), len(b)),
                              progress=False)
        assert compressed.config.rounding == rounding
        decoded[rounding] = compressed.decode()
    return decoded


def _one_layer_errors(make_model, decoded: dict, name: str, batch: torch.Tensor) -> dict[str, float]:
    """Per rounding, the output error of the model with only ``name`` quantized."""
    model = make_model()
    errors = {}
    for rounding, state in decoded.items():
        quantized = make_model()
        quantized.load_state_dict(dict(model.state_dict(), **{name: state[name]}))
        with torch.no_grad():
            errors[rounding] = float((quantized(batch) - model(batch)).pow(2).mean())
    return errors


def test_compress_rounds_grouped_convolutions_output_aware():
    """Through compress, at the same steps: the depthwise and the grouped layer each decode to other
    weights than nearest rounding's, and the model with only that layer quantized is closer to the original."""
    batches = [_smooth_images(8, seed) for seed in range(2)]
    decoded = _decoded_by_rounding(_grouped_model(), batches)
    for name in ("2.weight", "4.weight"):
        assert not torch.equal(decoded["nearest"][name], decoded["output_aware"][name])
        errors = _one_layer_errors(_grouped_model, decoded, name, batches[0])
        assert errors["output_aware"] < 0.8 * errors["nearest"], (name, errors)


def test_bias_correction_restores_a_grouped_convolutions_output_mean():
    model, x = _grouped_model(), _smooth_images(8)
    layer = model[4]
    stats = layer_statistics(model, [x], {"4.weight": layer})
    original = {"weight": layer.weight.detach(), "bias": layer.bias.detach()}
    shifted = original["weight"] + 0.1 * torch.linspace(-1, 1, 12)[:, None, None, None]  # a different error per row
    corrected = bias_corrections(original, {"weight": shifted}, {"weight": stats["4.weight"]})
    inputs = _layer_input(model, layer, x)
    out_original = nn.functional.conv2d(inputs, original["weight"], original["bias"], padding=1, groups=4)
    out_corrected = nn.functional.conv2d(inputs, shifted, corrected["bias"], padding=1, groups=4)
    assert torch.allclose(out_original.mean(dim=(0, 2, 3)), out_corrected.mean(dim=(0, 2, 3)), atol=1e-4)


def test_grouped_conv1d_is_measured_and_other_layers_are_left_to_nearest():
    model = nn.Sequential(nn.Conv1d(4, 6, 3, padding=2, dilation=2, stride=2, groups=2),
                          nn.ConvTranspose2d(6, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                          nn.Conv2d(4, 4, 3, padding="same"), nn.Embedding(10, 4))
    assert set(output_aware_layers(model)) == {"0.weight"}
    conv = model[0]
    x = torch.randn(5, 4, 11)
    stats = layer_statistics(conv, [x], {"weight": conv})["weight"]
    patches = nn.functional.unfold(x[:, :, None], (1, 3), (1, 2), (0, 2), (1, 2)).transpose(1, 2).reshape(-1, 2, 6)
    for g in range(2):
        assert torch.allclose(stats.second[g], patches[:, g].T @ patches[:, g] / len(patches), atol=1e-5)


def test_a_convolution_with_one_output_channel_rounds_output_aware():
    """Its layout's rows are its input channels (one step each), not its one output row."""
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1)).eval()
    batches = [_smooth_images(8)]
    config = VAECompressionConfig(target_bits_per_weight=2.0, min_numel=16, calibration_batches=1)
    compressed = compress(model, config, calibration_data=batches, loss_fn=lambda m, b: (m(b).sum(), len(b)),
                          progress=False)
    assert compressed.config.rounding == "output_aware"
    assert compressed.decode()["2.weight"].shape == (1, 8, 3, 3)


def _transposed_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(),
                         nn.ConvTranspose2d(6, 4, (3, 2), stride=2, padding=1, output_padding=1, dilation=(1, 2))).eval()


def _transposed_output(layer: nn.Module, inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return nn.functional.conv_transpose2d(inputs, weight, None, layer.stride, layer.padding, layer.output_padding,
                                          1, layer.dilation)


@pytest.mark.parametrize("layer,x", [
    (nn.ConvTranspose2d(3, 4, (3, 2), stride=(2, 3), padding=(1, 2), output_padding=(1, 0), dilation=(1, 2),
                        bias=False), torch.randn(2, 3, 5, 6)),
    (nn.ConvTranspose1d(3, 4, 4, stride=3, padding=2, output_padding=1, bias=False), torch.randn(2, 3, 7)),
    (nn.ConvTranspose2d(3, 4, 3, padding=3, bias=False), torch.randn(3, 6, 6)),  # a pad beyond the kernel crops; unbatched
])
def test_a_transposed_convolution_is_its_rows_times_the_direct_convolution_s_weight(layer, x):
    """Every output pixel of a transposed convolution is one of :func:`layer_rows`'s rows times
    :func:`as_rows` of its weight, whatever the stride, padding, output padding and dilation: the
    output error of a weight error factors as for a direct convolution."""
    rows = layer_rows(layer, x, torch.Generator().manual_seed(0), max_rows=1 << 20)
    with torch.no_grad():
        out = layer(x)
    out = out if x.ndim == layer.weight.ndim else out.unsqueeze(0)  # unbatched
    expected = out.movedim(1, -1).reshape(-1, out.shape[1])
    assert torch.allclose(rows @ as_rows(layer.weight.detach(), transposed=True).T, expected, atol=1e-5)
    assert torch.equal(from_rows(as_rows(layer.weight, transposed=True), layer.weight.shape, transposed=True),
                       layer.weight)


def test_a_transposed_convolution_rounds_output_aware():
    """GPTQ on the direct convolution's rows, with the stored weight's grid (a step per stored row,
    an input channel: it steps across GPTQ's columns), lowers the layer's measured output error."""
    model, x = _transposed_model(), _smooth_images(8)
    layer = model[2]
    stats = layer_statistics(model, [x], output_aware_layers(model))
    assert stats["2.weight"].transposed and stats["2.weight"].second.shape == (1, 36, 36)  # d = 6 inputs * 3 * 2
    w = layer.weight.detach()
    factors = 0.6 * w.flatten(1).pow(2).mean(1).sqrt()
    gptq = output_aware_symbols(w, factors, inverse_cholesky(stats["2.weight"]), inputs=stats["2.weight"])
    nearest = torch.round(w.flatten(1) / factors[:, None])
    assert gptq.shape == nearest.shape and (gptq != nearest).any()
    inputs = _layer_input(model, layer, x)
    errors = {kind: float((_transposed_output(layer, inputs, (q * factors[:, None]).reshape(w.shape))
                           - _transposed_output(layer, inputs, w)).pow(2).mean())
              for kind, q in (("gptq", gptq), ("nearest", nearest))}
    assert errors["gptq"] < 0.8 * errors["nearest"], errors


def test_compress_rounds_transposed_convolutions_output_aware_and_corrects_their_bias():
    model = _transposed_model()
    batches = [_smooth_images(8, seed) for seed in range(2)]
    decoded = _decoded_by_rounding(model, batches)
    assert not torch.equal(decoded["nearest"]["2.weight"], decoded["output_aware"]["2.weight"])
    errors = _one_layer_errors(_transposed_model, decoded, "2.weight", batches[0])
    assert errors["output_aware"] < 0.8 * errors["nearest"], errors
    layer, x = model[2], _smooth_images(3)  # 3 * 24 * 24 rows: under the per-batch cap, all kept (the exact mean)
    stats = layer_statistics(model, [x], {"2.weight": layer})
    original = {"weight": layer.weight.detach(), "bias": layer.bias.detach()}
    shifted = original["weight"] + 0.1 * torch.linspace(-1, 1, 4)[None, :, None, None]  # another error per output
    corrected = bias_corrections(original, {"weight": shifted}, {"weight": stats["2.weight"]})
    inputs = _layer_input(model, layer, x)
    means = [(_transposed_output(layer, inputs, weight) + bias[:, None, None]).mean(dim=(0, 2, 3))
             for weight, bias in ((original["weight"], original["bias"]), (shifted, corrected["bias"]))]
    assert torch.allclose(*means, atol=1e-4)
