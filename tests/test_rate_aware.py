"""Rate-aware output-aware rounding: GPTQ whose every level is chosen against what its symbol costs."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from hf_vae_compress.codec import VAECompressionConfig, compress
from hf_vae_compress.codec.calibration import calibrate
from hf_vae_compress.codec.compress import _beats_gptq, _levels, _prepare, _rate_aware_if_better
from hf_vae_compress.codec.calibration import LayerInputs, layer_statistics, output_aware_layers
from hf_vae_compress.codec.output_aware import (RateAwareLevels, inverse_cholesky, output_aware_symbols,
                                                rate_distortion, rate_penalties, ridge_target)
from hf_vae_compress.codec.rate import estimate_bits, estimate_tensor_bits
from hf_vae_compress.tasks import Classification
from tests.conftest import tiny_timm


def _problem(rows: int = 64, d: int = 200, seed: int = 0):
    """A layer with correlated inputs (so GPTQ has work to do), its H, a grid of a step per row, the
    GPTQ factor and the layer's inputs."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) + 2 * torch.eye(d)
    x = torch.randn(8 * d, d, generator=g) @ mix
    h = x.T @ x / len(x)
    w = torch.randn(rows, d, generator=g)
    factors = torch.linspace(0.6, 1.2, rows)
    inputs = LayerInputs(h[None], x.mean(0)[None])
    return w, factors, h, inverse_cholesky(inputs), inputs


def _output_error(w: torch.Tensor, symbols: torch.Tensor, factors: torch.Tensor, h: torch.Tensor) -> float:
    delta = w - symbols * factors[:, None]
    return float(torch.trace(delta @ h @ delta.T))


def test_rate_aware_symbols_cost_fewer_bits_at_a_bounded_output_error():
    w, factors, h, factor, inputs = _problem()
    gptq = output_aware_symbols(w, factors, factor)
    rate_aware = output_aware_symbols(w, factors, factor, 1.0, inputs)
    nearest = torch.round(w / factors[:, None])
    bits = {k: estimate_bits(s.numpy().astype(np.int64)) for k, s in
            (("gptq", gptq), ("rate_aware", rate_aware), ("nearest", nearest))}
    errors = {k: _output_error(w, s, factors, h) for k, s in
              (("gptq", gptq), ("rate_aware", rate_aware), ("nearest", nearest))}
    assert bits["rate_aware"] < 0.97 * bits["gptq"], bits
    # the bits are bought at less output error each than a coarser step would cost:
    # high-rate theory's slope at this step is 2 ln2 D per bit
    slope = 2 * math.log(2) * errors["gptq"] / w.numel()
    assert errors["rate_aware"] - errors["gptq"] < slope * (bits["gptq"] - bits["rate_aware"]), (bits, errors)
    assert errors["rate_aware"] < 1.5 * errors["gptq"] < errors["nearest"], errors


def test_a_higher_price_buys_fewer_bits_with_more_zeros():
    w, factors, _, factor, inputs = _problem(seed=1)
    bits, zeros = [], []
    for scale in (0.5, 1.0, 2.0):
        symbols = output_aware_symbols(w, factors, factor, scale, inputs)
        bits.append(estimate_bits(symbols.numpy().astype(np.int64)))
        zeros.append(int((symbols == 0).sum()))
    assert bits[0] > bits[1] > bits[2] and zeros[0] < zeros[1] < zeros[2], (bits, zeros)


def test_a_zero_price_gives_gptqs_symbols_exactly():
    w, factors, _, factor, inputs = _problem(seed=2)
    assert torch.equal(output_aware_symbols(w, factors, factor, 0.0, inputs), output_aware_symbols(w, factors, factor))


def test_the_rate_model_is_refitted_to_the_symbols_chosen():
    """After the last column the counts are the histogram of the tensor's rate-aware symbols (each
    column's choice replaced its nearest symbols), so the code lengths are the coder's own."""
    w, factors, _, (order, u), _ = _problem(rows=16, d=40, seed=3)
    x = (w / factors[:, None])[:, order[0]].T[None]  # GPTQ's layout without feedback: groups x d x rows
    levels = RateAwareLevels(torch.round(x), rate_penalties(u, rate_distortion(u, x)))
    chosen = torch.stack([levels.choose(x[:, j], j) for j in range(x.shape[1])], 1)
    assert (chosen != torch.round(x)).any()
    histogram = torch.bincount((chosen - levels.low).long().reshape(-1), minlength=len(levels.counts)).double()
    assert torch.equal(levels.counts, histogram)
    p = (histogram + 0.5) / (histogram + 0.5).sum()
    assert torch.allclose(levels.bits(torch.tensor([0.0])), -torch.log2(p[-levels.low]).float())


def test_the_price_of_a_bit_is_the_slope_of_the_measured_distortion_weighted_by_each_columns_energy():
    u = torch.diag(torch.tensor([1.0, 1.0, 2.0, 4.0]))[None]  # 1/u²: 1, 1, 1/4, 1/16
    rho = (1 + 1 + 0.25 + 0.0625) / 4
    x = torch.tensor([-2.25, 0.25, 1.25])[None, None].expand(1, 4, 3)  # every weight a quarter step off
    expected = 2 * math.log(2) * rho / 16 * torch.tensor([1.0, 1.0, 4.0, 16.0])
    assert torch.allclose(rate_penalties(u, rate_distortion(u, x))[0], expected)
    fine = torch.linspace(-50, 50, 100_001)[None, None].expand(1, 5, -1)  # high rate: errors uniform, e² = 1/12
    eye = torch.eye(5)[None]
    assert torch.allclose(rate_penalties(eye, rate_distortion(eye, fine)), torch.full((1, 5), math.log(2) / 6), rtol=1e-3)


def test_the_ridge_target_is_the_least_output_error_plus_ridge_penalty():
    """Moving the rate's quadratic part into H (CERWU): the target minimises
    ``(x - t)ᵀ H (x - t) + s |t|²`` per row, i.e. solves ``(H + s I) t = H x``, and the factor is that
    of ``(H + s I)⁻¹`` (with GPTQ's damping), so the feedback steers toward the shrunk target."""
    w, factors, _, (order, u), inputs = _problem(rows=8, d=30, seed=4)
    x = w[:, order[0]].T[None].contiguous()  # groups x d x rows, GPTQ's column order
    strength = torch.tensor([0.7])
    ridged, target = ridge_target(inputs, x, strength)
    damped = inputs.second[0].double() + 0.01 * inputs.second[0].diagonal().double().mean() * torch.eye(30)
    h = damped[order[0]][:, order[0]]
    expected = torch.linalg.solve(h + 0.7 * torch.eye(30, dtype=torch.float64), h @ x[0].double())
    assert torch.allclose(target[0].double(), expected, atol=1e-5)
    assert torch.allclose(ridged[0].mT @ ridged[0], torch.linalg.inv(h + 0.7 * torch.eye(30, dtype=torch.float64)),
                          atol=1e-6)
    assert target.abs().sum() < x.abs().sum()  # shrunk toward zero, where symbols are cheap
    unchanged = ridge_target(inputs, x, torch.tensor([0.0]))
    assert torch.equal(unchanged[1], x) and torch.allclose(unchanged[0].float(), u.float())


def _grouped_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: 8 problems of d = 9
                         nn.ReLU(),
                         nn.Conv2d(8, 12, 3, padding=1, groups=4)).eval()  # 4 problems of d = 18


def _smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return nn.functional.interpolate(torch.randn(n, 2, 4, 4, generator=g), size=12, mode="bilinear") + 0.5


def test_grouped_and_depthwise_convolutions_round_rate_aware():
    model = _grouped_model()
    stats = layer_statistics(model, [_smooth_images(8)], output_aware_layers(model))
    for name, layer in (("2.weight", model[2]), ("4.weight", model[4])):
        w = layer.weight.detach()
        factors = 0.5 * w.flatten(1).pow(2).mean(1).sqrt()
        factor = inverse_cholesky(stats[name])
        gptq = output_aware_symbols(w, factors, factor)
        assert torch.equal(output_aware_symbols(w, factors, factor, 0.0, stats[name]), gptq)
        rate_aware = output_aware_symbols(w, factors, factor, 2.0, stats[name])
        assert rate_aware.shape == gptq.shape and (rate_aware != gptq).any()
        assert estimate_bits(rate_aware.numpy().astype(np.int64)) < estimate_bits(gptq.numpy().astype(np.int64))
        errors = [sum(float(torch.trace(d @ h @ d.T)) for d, h in
                      zip((s * factors[:, None] - w.flatten(1)).reshape(layer.groups, -1, w[0].numel()), stats[name].second))
                  for s in (gptq, rate_aware)]
        assert errors[1] < 3 * errors[0], (name, errors)


@pytest.mark.parametrize("bpw", [1.0, 2.0])
def test_compress_with_rate_aware_rounding_hits_the_target_rate(bpw):
    model = tiny_timm().eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 1, 28, 28, generator=g) for _ in range(2)]
    config = VAECompressionConfig(target_bits_per_weight=bpw, calibration_batches=2, rounding="rate_aware")
    compressed = compress(model, config, calibration_data=batches, loss_fn=Classification.fisher_loss(), progress=False)
    assert compressed.config.rounding == "rate_aware"
    assert compressed.report()["bits_per_weight"] == pytest.approx(bpw, rel=0.1)
    assert VAECompressionConfig.from_json(compressed.config.to_json()) == compressed.config
    without_data = compress(model, config, progress=False)
    assert without_data.config.rounding == "nearest"


def _low_rank_problem():
    """A two-layer MLP fed with a 2-D signal embedded in 64 inputs (like a detector's query-position
    head), its calibration, and its two coded weights."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    embedding = torch.randn(2, 64, generator=g)
    batches = [torch.randn(64, 2, generator=g) @ embedding + 1e-3 * torch.randn(64, 64, generator=g) for _ in range(4)]
    calibration = calibrate(model, batches, 4, Classification.fisher_loss(), progress=False)
    state_dict = {k: v.detach() for k, v in model.state_dict().items()}
    coded = _prepare(state_dict, ["0.weight", "2.weight"], VAECompressionConfig(rounding="rate_aware"))
    return state_dict, calibration, coded


def _error_and_bits(state_dict, c, step, symbols, calibration):
    """Output error tr(dW H dWᵀ) of ``c`` coded as ``symbols`` at ``step``, and the coder's bits."""
    rows = symbols.double().reshape(c.layout.rows, c.layout.padded_len)[:, : c.layout.row_len]
    delta = rows * (c.scales.double() * step)[:, None] - state_dict[c.name].double()
    h = calibration.layers[c.name].second[0].double()
    return float(torch.trace(delta @ h @ delta.T)), estimate_tensor_bits(symbols.numpy())


def test_rate_aware_symbols_are_kept_only_below_gptqs_rate_error_line():
    """A tensor keeps its rate-aware symbols only where they cost fewer bits than GPTQ would at the
    same output error, read off GPTQ's line in (log error, bits) through its step and a quarter
    octave coarser; else it keeps GPTQ's symbols exactly."""
    state_dict, calibration, coded = _low_rank_problem()
    decisions = []
    for c in coded:
        for step in (0.5, 1.0, 2.0):
            gptq = _levels(state_dict, c, step, calibration)
            rate_aware = _levels(state_dict, c, step, calibration, 1.0)
            kept = _rate_aware_if_better(state_dict, c, step, gptq, calibration, 1.0)
            coarse = _levels(state_dict, c, step * 2 ** 0.25, calibration)
            (e0, b0), (e1, b1), (e, b) = (_error_and_bits(state_dict, c, s, q, calibration)
                                          for s, q in ((step, gptq), (step * 2 ** 0.25, coarse), (step, rate_aware)))
            below = b < b0 + (b1 - b0) / math.log(e1 / e0) * math.log(e / e0)
            assert torch.equal(kept, rate_aware if below else gptq), (c.name, step, e / e0, b / b0)
            decisions.append(below)
    assert any(decisions) and not all(decisions), decisions  # both outcomes occur on this model


def test_a_coding_at_gptqs_error_in_fewer_bits_beats_it_and_one_at_far_more_error_does_not():
    state_dict, calibration, coded = _low_rank_problem()
    c = coded[1]
    gptq = _levels(state_dict, c, 1.0, calibration)
    error, bits = _error_and_bits(state_dict, c, 1.0, gptq, calibration)
    assert _beats_gptq(state_dict, c, 1.0, gptq, error, bits - 1, calibration)
    assert not _beats_gptq(state_dict, c, 1.0, gptq, error, bits + 1, calibration)
    assert not _beats_gptq(state_dict, c, 1.0, gptq, 100 * error, 0.9 * bits, calibration)
