"""Output-aware rounding (GPTQ), the calibration statistics it needs, and the free corrections."""

import pytest
import torch
from torch import nn

from hf_vae_compress.codec import FitConfig, VAECompressionConfig, compress
from hf_vae_compress.codec.calibration import (LayerInputs, calibrate, layer_statistics, norm_input_means,
                                               norm_layers, output_aware_layers)
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


def test_gptq_lowers_the_output_error_of_nearest_rounding_on_the_same_grid():
    x = _correlated_inputs(4096, 48)
    w = torch.randn(16, 48)
    factors = torch.full((16,), 0.5) * torch.linspace(0.5, 1.5, 16)  # one grid step per row
    inputs = LayerInputs(x.T @ x / len(x), x.mean(0))
    symbols = output_aware_symbols(w, factors, inverse_cholesky(inputs))
    assert symbols.dtype == torch.int32 and symbols.shape == w.shape
    nearest = torch.round(w / factors[:, None])
    gptq_error = _output_error(w, symbols * factors[:, None], x)
    nearest_error = _output_error(w, nearest * factors[:, None], x)
    assert gptq_error < 0.7 * nearest_error, (gptq_error, nearest_error)


def test_gptq_is_nearest_rounding_when_inputs_are_uncorrelated():
    w = torch.randn(8, 300)
    factors = torch.full((8,), 0.3)
    inputs = LayerInputs(torch.diag(torch.rand(300) + 0.5), torch.zeros(300))  # diagonal H: nothing to push
    symbols = output_aware_symbols(w, factors, inverse_cholesky(inputs))
    assert torch.equal(symbols, torch.round(w / 0.3).to(torch.int32))


def test_layer_moments_match_a_direct_computation_in_any_grouping():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    batches = [torch.randn(4, 2, 5, 5) for _ in range(3)]
    layers = output_aware_layers(model)
    assert set(layers) == {"0.weight", "3.weight"}
    together = layer_statistics(model, batches, layers)
    one_at_a_time = layer_statistics(model, batches, layers, max_bytes=1)  # a forward pass per layer
    hidden = torch.cat([model[2](model[1](model[0](b))) for b in batches]).detach()
    assert torch.allclose(together["3.weight"].second, hidden.T @ hidden / len(hidden), atol=1e-5)
    patches = torch.cat([nn.functional.unfold(b, 3, padding=1).transpose(1, 2).reshape(-1, 18) for b in batches])
    assert torch.allclose(together["0.weight"].second, patches.T @ patches / len(patches), atol=1e-5)
    for name in layers:
        assert torch.allclose(together[name].second, one_at_a_time[name].second)
        assert torch.allclose(together[name].mean, one_at_a_time[name].mean)


def test_bias_correction_restores_the_output_mean():
    layer = nn.Linear(6, 3)
    x = torch.randn(500, 6) + 2.0
    inputs = LayerInputs(x.T @ x / len(x), x.mean(0))
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


def test_a_rate_search_factors_each_layer_once(monkeypatch):
    model = tiny_timm().eval()
    calibration = calibrate(model, [torch.randn(8, 1, 28, 28)], 1, Classification.fisher_loss(), progress=False)
    factored = []
    monkeypatch.setattr(output_aware, "inverse_cholesky", lambda inputs: factored.append(inputs) or inverse_cholesky(inputs))
    for bpw in (2.0, 3.0):  # two probes of a search
        compress(model, VAECompressionConfig(target_bits_per_weight=bpw), calibration=calibration, progress=False)
    assert len(factored) == len({id(inputs) for inputs in factored}) > 0  # 14 coded layers, not 28
    name = next(iter(calibration.layers))
    assert layer_factor(calibration, name) is layer_factor(calibration, name)


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
