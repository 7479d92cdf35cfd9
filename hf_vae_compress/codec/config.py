"""The codec's configuration: plain data that round-trips through JSON and is stored in every container."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import ClassVar

from .format.limits import MAX_CHUNK_SIZE, MAX_HIDDEN_SIZE
from .lattice import LATENT_QUANTIZERS

class JsonConfig:
    """Round-trips a dataclass through plain JSON, refusing unknown fields.

    A field named in ``RECORDED_IF_SET`` is left out of the dict while it holds its default: a
    field added after containers were written (which store the config) keeps the bytes of every
    container that does not use it, and readers from before it still read those."""

    RECORDED_IF_SET: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in self.RECORDED_IF_SET:
            if data[name] == defaults[name]:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


TRANSFORMS = ("vae", "vae-int", "identity", "auto")
LINEAR_DECODERS = ("vae-int", "auto")  # the transforms whose latents decode through a linear map
# The bits per weight a compression may be asked for. Below the floor every weight rounds to zero on
# real models (0.01 coded a classifier to chance); above the ceiling the container is larger than an
# fp16 checkpoint of the same weights. The rate search's bracket (search.SEARCH_RANGE_BPW) starts
# at the same floor.
TARGET_BPW_RANGE = (0.125, 16.0)
ROUNDINGS = ("nearest", "output_aware", "rate_aware")
NORMALIZATIONS = ("channel", "tensor")


@dataclass
class FitConfig(JsonConfig):
    """How the learned (VAE) transform is fitted to the model's chunks (:mod:`.fit`); the identity
    transform learns nothing and ignores it. The decoder is then refined for half the steps at a
    third of the learning rate."""

    train_steps: int = 800
    train_batch_chunks: int = 4096
    learning_rate: float = 1e-2

    def __post_init__(self) -> None:
        if self.train_steps < 1 or self.train_batch_chunks < 1:
            raise ValueError(f"train_steps and train_batch_chunks must be at least 1, got {self.train_steps} "
                             f"and {self.train_batch_chunks}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive finite number, got {self.learning_rate}")


@dataclass
class VAECompressionConfig(JsonConfig):
    """How to compress a model's weights.

    Rate is set by exactly one of ``target_bits_per_weight`` (the real container bits divided by
    the number of floating-point values, searched) or ``beta`` (a fixed Lagrange multiplier on
    Fisher-weighted squared error per bit). Either way the per-tensor quantization steps follow
    from one global trade-off, so layers the loss is sensitive to get finer steps.
    """

    target_bits_per_weight: float | None = 1.0
    beta: float | None = None
    # "identity" (scalar quantization, no decoder network) is the default: its decode is integer
    # arithmetic and one exact multiply, bit-identical on every machine. The VAE's float decoder
    # is not: a VAE container written on one CPU failed its checksums on another
    # (benchmarks/results/determinism_device.json), so it is opt-in. "vae-int" is the learned
    # transform with an integer decoder (format/linear.py): portable like the identity, but with
    # nearest rounding it was not smaller (issue 24). With output-aware rounding its latents are
    # chosen inside GPTQ's column loop (output_aware.linear_latent_symbols). "auto" is vae-int where
    # each tensor keeps its map only if that measured fewer bytes than the identity at equal
    # output error (compress._choose); a container records it as vae-int with the kept maps.
    # Neither is the default: see benchmarks/results/vae_gptq.json.
    transform: str = "identity"
    chunk_size: int = 9  # one 3x3 kernel per chunk for 3x3 convolutions
    hidden_size: int = 32
    normalization: str = "channel"
    min_numel: int = 1024  # smaller tensors (and every 1-D tensor) are coded as floats, not chunked
    raw_dtype: str = "float16"  # stored float tensors are rounded to this dtype first ...
    vector_mantissa_bits: int = 7  # ... then to this relative precision (2**-8), and entropy-coded
    fit: FitConfig = field(default_factory=FitConfig)  # the VAE transform's training
    calibration_batches: int = 8
    # How weights are rounded to the grid: "output_aware" (GPTQ error compensation against each
    # layer's calibration inputs; identity transform, with calibration data: otherwise nearest) or
    # "nearest". Output-aware rounding is the default because the rate search's containers within
    # the same accuracy budget were 1.47-2.48x smaller than nearest rounding's on all four reference
    # models (benchmarks/results/posthoc_quality.json). Bias and norm corrections (no extra bytes)
    # were never smaller there, and 6 % and 29 % larger on MobileNet and RT-DETR: off by default.
    # "rate_aware" is GPTQ whose every level is chosen against what its symbol costs, at the slope
    # the step sets, with the code length's quadratic part as a ridge on H (CERWU; :mod:`.output_aware`),
    # kept per tensor only where it beats GPTQ's own rate-error line. It is opt-in: within the same
    # budget (the larger container of two calibration draws, posthoc_quality.json, BatchNorm folded)
    # it was 1.20x smaller than output_aware on resnet18 and 1.15x on MobileNetV3, but 0.96x on the
    # ViT and 1.01x on RT-DETR (whose test drop then exceeded the budget), and its searches take up
    # to 15x as long.
    rounding: str = "output_aware"
    correct_biases: bool = False
    correct_norms: bool = False
    seed: int = 0
    modules_to_not_convert: list[str] = field(default_factory=list)
    # How a linear decoder's latents are quantized (vae-int, auto): "scalar" (rounded to integers)
    # or on a lattice, "d4" or "e8" (:mod:`.lattice`): the container stores the lattice's latents as
    # the scalar latents of the map times the lattice's basis, and decodes them as any vae-int
    # container. Only the encoder changes. Not the default: the container's coder codes the basis
    # coordinates one by one, not the lattice point, which costs more than the lattice gains on
    # i.i.d. sources, and at 1.5 bits/weight D4 coded resnet18 in more bytes at 2.8x scalar
    # latents' output error (benchmarks/results/vae_gptq.json: lattice_source_model, equal_rate).
    latent_quantizer: str = "scalar"
    # Store each BatchNorm with its running statistics folded into its weight and bias (:mod:`.folding`):
    # the same eval-mode output, two float vectors per BatchNorm fewer to code.
    fold_batchnorm: bool = True

    RECORDED_IF_SET = ("latent_quantizer", "fold_batchnorm")

    def __post_init__(self) -> None:
        if isinstance(self.fit, dict):  # from JSON: a stored config names the nested fields
            self.fit = FitConfig.from_dict(self.fit)
        if (self.target_bits_per_weight is None) == (self.beta is None):
            raise ValueError("set exactly one of target_bits_per_weight and beta")
        for name in ("target_bits_per_weight", "beta"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):  # nan passed `<= 0`
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if self.latent_quantizer not in LATENT_QUANTIZERS:
            raise ValueError(f"latent_quantizer must be one of {LATENT_QUANTIZERS}, got {self.latent_quantizer!r}")
        if self.latent_quantizer != "scalar" and self.transform not in LINEAR_DECODERS:
            raise ValueError(f"latent_quantizer={self.latent_quantizer!r} quantizes a linear decoder's latents: it needs "
                             f"transform in {LINEAR_DECODERS}, got {self.transform!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.raw_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"raw_dtype must be float16, bfloat16 or float32, got {self.raw_dtype!r}")
        if not 1 <= self.vector_mantissa_bits <= 23:
            raise ValueError("vector_mantissa_bits must be between 1 and 23")
        # the reader's own limits: nothing is written that a reader would refuse
        if not 1 <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be between 1 and {MAX_CHUNK_SIZE}, got {self.chunk_size}")
        if not 1 <= self.hidden_size <= MAX_HIDDEN_SIZE:
            raise ValueError(f"hidden_size must be between 1 and {MAX_HIDDEN_SIZE}, got {self.hidden_size}")


def excluded(name: str, modules_to_not_convert: list[str] | tuple[str, ...]) -> bool:
    """Whether the tensor or module ``name`` lies in ``modules_to_not_convert`` (a part of the name
    matches): what neither coding nor BatchNorm folding touches."""
    return any(part and part in name for part in modules_to_not_convert)


def check_target_rate(bits_per_weight: float) -> float:
    """``bits_per_weight`` when a compression may be asked for it, else a ValueError that says
    the allowed range. Checked when encoding, not when reading a container's stored config, so
    containers written before the range existed still load."""
    low, high = TARGET_BPW_RANGE
    if not (math.isfinite(bits_per_weight) and low <= bits_per_weight <= high):
        raise ValueError(f"target bits per weight must be between {low} and {high}, got {bits_per_weight}: below "
                         f"{low} every weight rounds to zero, above {high} the container outgrows an fp16 checkpoint")
    return bits_per_weight
